// What the emulator counts, for tests: launches, blocks, threads and fiber switches since the last
// reset, and the most recent launches' configurations.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime_api.h"

namespace qk_emu {

struct EmuStats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0;
};

struct LaunchRecord {
  std::string kernel;
  unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z;
  size_t shared_bytes;
  cudaError_t error;
};

EmuStats read_stats();
std::vector<LaunchRecord> read_launch_log();
void reset_stats();

}  // namespace qk_emu
