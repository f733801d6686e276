// Memory-access counts of the emulated kernels (emu.h, build.py's profile build): what
// Nsight Compute reports as shared-memory wavefronts and global sectors per request,
// counted exactly from the addresses every thread touches, not timed.
//
// How: the kernels' units are compiled with -fsanitize=kernel-address and calls for
// every access (--param asan-instrumentation-with-call-threshold=0), so each load and
// store calls __asan_{load,store}N_noabort(address) (emu_module.cpp) with the
// instruction's address as its return address. While a fiber runs kernel code, the
// access is logged per thread with the instruction and how often this thread has run
// it (the emulator's own code, the fiber stacks, the launch's closure and this module's
// globals are not logged). At the end of each block the lanes of each warp that ran
// the same instruction the same n-th time form one request:
// - shared memory: 4-byte banks, 32 of them; a request of s-byte accesses is served in
//   phases of 128 / s lanes (all 32 for s <= 4); a phase takes as many wavefronts as
//   the most distinct 4-byte words any one bank holds (a word read by several lanes
//   is one); ideal: the phase's distinct bytes / 128, rounded up.
// - global memory: the distinct 32-byte sectors the request touches; ideal: its
//   distinct bytes / 32, rounded up.
// Totals per kernel (its launch key) until profile_take(). Not counted: the WMMA
// fragments' loads and stores (shadow/mma.h has every lane read the whole tile, not
// what a GPU does), caches (a sector is counted each time a request touches it), and the
// store of a read-modify-write whose load the compiler already checked (GCC's
// instrumentation checks one address once per basic block).
#pragma once

#include <link.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace emu {
namespace prof {

struct Access {
  uintptr_t pc, addr;
  uint32_t size, occ;
  bool store, shared;
};

struct Counts {
  uint64_t requests = 0, units = 0, ideal = 0, bytes = 0;  // units: wavefronts or sectors
};

// [shared][store][log2 of the access size: 1 to 16 bytes, 5 for other sizes]
struct KernelCounts {
  Counts c[2][2][6];
};

inline int size_class(uint32_t size) {
  switch (size) {
    case 1: return 0;
    case 2: return 1;
    case 4: return 2;
    case 8: return 3;
    case 16: return 4;
    default: return 5;
  }
}

// A fiber is running kernel code. Volatile, and fenced where it changes: the calls
// before each access do not count as reads of it for the compiler, which would
// otherwise drop or move a Quiet's stores.
inline volatile bool g_on = false;
inline std::vector<std::vector<Access>> g_log;  // per thread of the block
inline std::vector<std::unordered_map<uintptr_t, uint32_t>> g_occ;  // per thread: pc -> runs
inline std::vector<std::pair<uintptr_t, uintptr_t>> g_skip;  // ranges never logged
inline std::map<std::string, KernelCounts> g_totals;
// MBX_EMU_PROFILE_PC=1: also per instruction (module offset of the access's call site),
// printed by profile_take (for addr2line)
inline std::map<std::tuple<std::string, uintptr_t, bool, bool, uint32_t>, Counts> g_by_pc;
inline uintptr_t g_base = 0;

// Suspends logging in the emulator's own functions called from kernels.
struct Quiet {
  bool saved;
  Quiet() : saved(g_on) {
    g_on = false;
    std::atomic_signal_fence(std::memory_order_seq_cst);
  }
  ~Quiet() {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    g_on = saved;
  }
};

inline int module_segments(dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<std::vector<std::pair<uintptr_t, uintptr_t>>*>(data);
  const auto self = reinterpret_cast<uintptr_t>(&g_totals);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (ph.p_type == PT_LOAD && self >= lo && self < hi) {
      g_base = info->dlpi_addr;
      for (int j = 0; j < info->dlpi_phnum; ++j)
        if (info->dlpi_phdr[j].p_type == PT_LOAD)
          out->emplace_back(info->dlpi_addr + info->dlpi_phdr[j].p_vaddr,
                            info->dlpi_addr + info->dlpi_phdr[j].p_vaddr +
                                info->dlpi_phdr[j].p_memsz);
      return 1;
    }
  }
  return 0;
}

// This module's loaded segments (its globals: the emulator's state), found once.
inline const std::vector<std::pair<uintptr_t, uintptr_t>>& module_ranges() {
  static const auto ranges = [] {
    std::vector<std::pair<uintptr_t, uintptr_t>> r;
    dl_iterate_phdr(module_segments, &r);
    return r;
  }();
  return ranges;
}

// At a block's start: the ranges not logged (this module's image, the fiber stacks,
// the closure holding the kernel's arguments), empty logs.
inline void block_begins(unsigned n, const std::vector<std::pair<uintptr_t, uintptr_t>>& more) {
  g_skip = module_ranges();
  g_skip.insert(g_skip.end(), more.begin(), more.end());
  g_log.assign(n, {});
  g_occ.assign(n, {});
}

inline bool skipped(uintptr_t a) {
  for (const auto& r : g_skip)
    if (a >= r.first && a < r.second) return true;
  return false;
}

// One logged access of the running thread; shared when it falls in [smem, smem_end) or
// in one of the static buffers.
template <typename Statics>
inline void record(unsigned thread, uintptr_t pc, uintptr_t addr, uint32_t size, bool store,
                   uintptr_t smem, uintptr_t smem_end, const Statics& statics) {
  bool shared = addr >= smem && addr < smem_end;
  for (const auto& kv : statics) {
    const auto lo = reinterpret_cast<uintptr_t>(kv.second.data());
    shared = shared || (addr >= lo && addr < lo + kv.second.size());
  }
  if (!shared && skipped(addr)) return;
  const uint32_t occ = g_occ[thread][pc]++;
  g_log[thread].push_back(Access{pc, addr, size, occ, store, shared});
}

// One request: (lane, address, size) of each lane that took part, in lane order.
using Lanes = std::vector<std::tuple<unsigned, uintptr_t, uint32_t>>;

inline void count(Counts& c, bool shared, const Lanes& lanes) {
  c.requests += 1;
  std::set<uintptr_t> bytes;
  for (const auto& l : lanes) {
    c.bytes += std::get<2>(l);
    for (uint32_t b = 0; b < std::get<2>(l); ++b) bytes.insert(std::get<1>(l) + b);
  }
  if (!shared) {
    std::set<uintptr_t> sectors;
    for (uintptr_t b : bytes) sectors.insert(b / 32);
    c.units += sectors.size();
    c.ideal += (bytes.size() + 31) / 32;
    return;
  }
  // phases of 128 / size lanes by lane number (lanes 0-7, 8-15, ... for 16 bytes)
  const uint32_t size = std::max<uint32_t>(std::get<2>(lanes.front()), 4);
  const unsigned per_phase = std::max<unsigned>(1, 128 / size);
  std::map<unsigned, std::pair<std::map<unsigned, std::set<uintptr_t>>, std::set<uintptr_t>>> phases;
  for (const auto& l : lanes) {
    auto& ph = phases[std::get<0>(l) / per_phase];
    for (uint32_t b = 0; b < std::get<2>(l); ++b) {
      const uintptr_t byte = std::get<1>(l) + b;
      ph.second.insert(byte);
      ph.first[unsigned(byte / 4 % 32)].insert(byte / 4);  // bank -> its distinct words
    }
  }
  for (const auto& kv : phases) {
    size_t most = 1;
    for (const auto& bank : kv.second.first) most = std::max(most, bank.second.size());
    c.units += most;
    c.ideal += std::max<size_t>(1, (kv.second.second.size() + 127) / 128);
  }
}

// At a block's end: its warps' requests added to the kernel's totals.
inline void block_ends(const std::string& key, unsigned n) {
  KernelCounts& k = g_totals[key];
  const bool by_pc = std::getenv("MBX_EMU_PROFILE_PC") != nullptr;
  for (unsigned w = 0; w * 32 < n; ++w) {
    // (pc, occ, store, shared) -> (lane, addr, size) in lane order
    std::map<std::tuple<uintptr_t, uint32_t, bool, bool>, Lanes> requests;
    for (unsigned t = w * 32; t < std::min(n, w * 32 + 32); ++t)
      for (const Access& a : g_log[t])
        requests[{a.pc, a.occ, a.store, a.shared}].emplace_back(t % 32, a.addr, a.size);
    for (const auto& kv : requests) {
      const bool store = std::get<2>(kv.first), shared = std::get<3>(kv.first);
      count(k.c[shared][store][size_class(std::get<2>(kv.second.front()))], shared, kv.second);
      if (by_pc)
        count(g_by_pc[{key, std::get<0>(kv.first) - g_base, shared, store,
                       std::get<2>(kv.second.front())}], shared, kv.second);
    }
  }
  g_log.clear();
}

}  // namespace prof
}  // namespace emu
