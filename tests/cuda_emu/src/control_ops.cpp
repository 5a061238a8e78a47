// Control ops of an emulated library (namespace QK_EMU_LIB), for tests: emu_stats() -> [launches,
// blocks, threads, fiber switches], emu_launch_log() -> one "kernel grid=(x,y,z) block=(x,y,z)
// shared=N error=E" line per recent launch, emu_reset() clears both. Plus the device-properties
// functions of the ATen/cuda/CUDAContext.h stand-in.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>

#include "qk_emu/control.h"

namespace {

std::vector<int64_t> emu_stats() {
  const qk_emu::EmuStats s = qk_emu::read_stats();
  return {(int64_t)s.launches, (int64_t)s.blocks, (int64_t)s.threads, (int64_t)s.switches};
}

std::vector<std::string> emu_launch_log() {
  std::vector<std::string> out;
  for (const qk_emu::LaunchRecord& r : qk_emu::read_launch_log()) {
    char buf[160];
    std::snprintf(buf, sizeof buf, " grid=(%u,%u,%u) block=(%u,%u,%u) shared=%zu error=%d", r.grid_x, r.grid_y,
                  r.grid_z, r.block_x, r.block_y, r.block_z, r.shared_bytes, (int)r.error);
    out.push_back(r.kernel + buf);
  }
  return out;
}

void emu_reset() { qk_emu::reset_stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(QK_EMU_LIB, m) {
  m.def("emu_stats() -> int[]", &emu_stats);
  m.def("emu_launch_log() -> str[]", &emu_launch_log);
  m.def("emu_reset() -> ()", &emu_reset);
}

namespace at {
namespace cuda {

cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device) {
  static std::mutex m;
  static std::map<int, std::unique_ptr<cudaDeviceProp>> props;
  std::lock_guard<std::mutex> lock(m);
  auto& p = props[device];
  if (!p) {
    p = std::make_unique<cudaDeviceProp>();
    C10_CUDA_CHECK(cudaGetDeviceProperties(p.get(), device));
  }
  return p.get();
}

cudaDeviceProp* getCurrentDeviceProperties() { return getDeviceProperties(current_device()); }

}  // namespace cuda
}  // namespace at
