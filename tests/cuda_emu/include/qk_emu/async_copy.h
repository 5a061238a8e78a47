// The emulator's model of cp.async (csrc/cuda/mma/cp_async.h hands its copies here): each CUDA thread keeps
// its copies in flight, grouped at every commit, and a copy lands in shared memory
//   QK_EMU_CP_ASYNC=wait  (default) when the issuing thread waits for its group: the latest moment the PTX
//                         ISA allows, so a stage read before its wait (or without the barrier after it)
//                         holds stale data;
//   QK_EMU_CP_ASYNC=issue at once: the earliest, so a stage refilled while another warp still reads it
//                         is overwritten under that warp.
// A thread must wait for all its copies before it exits, as on the device.
#pragma once
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "device.h"

namespace qk_emu {

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
  int src_bytes;  // the rest of the `bytes` is zero-filled
};

struct AsyncCopies {
  bool land_at_issue = false;
  std::vector<AsyncCopy> open;                  // issued since the last commit
  std::deque<std::vector<AsyncCopy>> groups;    // committed, oldest first
};

inline void land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
}

// The copies in flight of every CUDA thread that has some. A block runs on one OS thread at a time, so a
// table per OS thread keyed by the thread's coordinates is private to each CUDA thread. An entry is made
// at a thread's first copy (reading QK_EMU_CP_ASYNC then) and dropped when nothing is in flight.
inline std::unordered_map<uint64_t, AsyncCopies>& async_table() {
  static thread_local std::unordered_map<uint64_t, AsyncCopies> table;
  return table;
}

inline uint64_t async_key() {
  const ThreadIds& t = ids();
  const uint64_t block = t.block_idx.x + (uint64_t)t.grid_dim.x * (t.block_idx.y + (uint64_t)t.grid_dim.y * t.block_idx.z);
  const uint64_t thread = t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z);
  return (block << 16) | thread;
}

inline AsyncCopies& async_copies() {
  auto& table = async_table();
  const uint64_t key = async_key();
  auto found = table.find(key);
  if (found != table.end()) return found->second;
  AsyncCopies& fresh = table[key];
  const char* mode = std::getenv("QK_EMU_CP_ASYNC");
  fresh.land_at_issue = mode != nullptr && std::string(mode) == "issue";
  return fresh;
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  const AsyncCopy c{dst, src, bytes, src_bytes};
  AsyncCopies& q = async_copies();
  if (q.land_at_issue)
    land(c);
  else
    q.open.push_back(c);
}

inline void cp_async_commit() {
  AsyncCopies& q = async_copies();
  if (q.land_at_issue) return;  // nothing is ever in flight
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}

inline void cp_async_wait(int most_recent_in_flight) {
  auto& table = async_table();
  auto found = table.find(async_key());
  if (found == table.end()) return;
  AsyncCopies& q = found->second;
  while ((int)q.groups.size() > most_recent_in_flight) {
    for (const AsyncCopy& c : q.groups.front()) land(c);
    q.groups.pop_front();
  }
  if (q.groups.empty() && q.open.empty()) table.erase(found);
}

}  // namespace qk_emu
