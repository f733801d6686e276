// CUDA on the CPU, for tests: the project's CUDA sources compiled by the host C++
// compiler, every CUDA thread of a block a fiber (ucontext) of one OS thread.
// Force-included by build.py, which also rewrites the `kernel<<<grid, block, smem,
// stream>>>(args)` launches into emu::launch(...).run([=] { kernel(args); }), and
// `extern __shared__` arrays into the block's dynamic shared memory.
//
// What it models: the blocks of a grid one after another; a block's threads each run
// until they wait at __syncthreads (all threads that have not returned must arrive,
// as on the GPU; a thread that returns leaves the barrier), at a warp shuffle or
// __syncwarp (the warp's live lanes), or return; a barrier that can never complete
// (threads of one block waiting at different barriers) is reported as a launch error.
// Between barriers threads run one after another, in the order MBX_EMU_ORDER gives
// ("forward", the default, or "reverse"): a read of another thread's shared-memory
// write without a barrier between them sees the write in one order and not in the
// other (poison: dynamic shared memory is 0xFF, NaN in every float type, at every
// block's start). cp.async copies land at the wait_group that covers them in the
// forward order, at once in the reverse one (see cp_async). WMMA: shadow/mma.h. Also
// modelled: the 48 KB dynamic shared memory limit unless cudaFuncSetAttribute raised
// it for that kernel, grid and block limits, the SM count (MBX_EMU_SMS, default 4:
// small grids, so the kernels' loops over several tiles per block run). Static
// __shared__ arrays are poisoned at every block's start too. Shared memory is
// allocated at its exact size (dynamic: 128-byte aligned), so that a build with
// AddressSanitizer (build.py's sanitize) reports any access past it, as it does for
// the tensors' memory; the fiber switches are announced to ASan. Not modelled:
// timing, the memory model beyond the above, warp-synchronous code without shuffles
// or __syncwarp, bank conflicts, register limits, and the GPU's floating-point
// contraction (the host compiles with -ffp-contract=off).
#pragma once

#include <cuda_runtime.h>
#include <ucontext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__SANITIZE_ADDRESS__) && !defined(EMU_PROFILE)  // EMU_PROFILE: kernel-ASan's calls
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#ifdef EMU_PROFILE
#include "profile.h"
// the emulator's own functions called from kernels: their accesses are not the kernel's
#define EMU_QUIET const ::emu::prof::Quiet emu_quiet_
#define EMU_NOINLINE __attribute__((noinline))
#else
#define EMU_QUIET
#define EMU_NOINLINE
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

// the running fiber's thread and block indices (set at every switch)
inline uint3 t_thread{0, 0, 0};
inline uint3 t_block{0, 0, 0};
inline unsigned t_linear = 0;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;

enum class State { kRun, kBlockBar, kWarpBar, kDone };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::kRun;
  void* fake_stack = nullptr;  // ASan's, while the fiber is switched out
  // cp.async: this thread's copies not yet committed, and its committed groups not yet
  // waited for (oldest first)
  struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes;  // read from src; the rest of the 16 are zero
  };
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

constexpr size_t kStack = 256 * 1024;

struct Block {
  std::vector<Fiber> fibers;  // kept across blocks: the stacks are reused
  std::vector<std::array<unsigned char, 16>> slots;  // one per thread, for shuffles
  std::unique_ptr<unsigned char, FreeDeleter> smem;  // dynamic shared memory, exact size
  size_t smem_bytes = 0;
  ucontext_t sched;
  const void* sched_stack = nullptr;  // the scheduler's stack, for ASan's switches back
  size_t sched_stack_size = 0;
  const std::function<void()>* body = nullptr;
  unsigned cur = 0;
};
inline Block g_blk_storage;
inline Block* g_blk = &g_blk_storage;
inline cudaError_t g_error = cudaSuccess;
inline std::map<std::string, int> g_max_dyn_smem;  // by the kernel's name in the source
inline std::mutex g_mu;

inline int sms() {
  const char* v = std::getenv("MBX_EMU_SMS");
  return v ? std::atoi(v) : 4;
}

// Fiber switches, announced to AddressSanitizer when it is on (it keeps shadow state
// per stack): the scheduler's switch to fiber i and back, and the fiber's side of
// them (entered: at its start and after every switch back to it; leaving: to wait, or
// for good when it returns).
inline void switch_to_fiber(Block& b, unsigned i) {
#ifdef EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, b.fibers[i].stack.get(), kStack);
#endif
  swapcontext(&b.sched, &b.fibers[i].ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void fiber_entered(Fiber& f) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_blk->sched_stack, &g_blk->sched_stack_size);
#else
  (void)f;
#endif
}

inline void fiber_leaving(Fiber& f, bool for_good) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(for_good ? nullptr : &f.fake_stack, g_blk->sched_stack,
                                 g_blk->sched_stack_size);
#else
  (void)f;
  (void)for_good;
#endif
}

inline void wait(State why) {
  EMU_QUIET;
  Fiber& f = g_blk->fibers[g_blk->cur];
  f.state = why;
  fiber_leaving(f, false);
  swapcontext(&f.ctx, &g_blk->sched);
  fiber_entered(f);
}

inline void syncthreads() { wait(State::kBlockBar); }

// __syncwarp: every lane of the warp that has not returned arrives (as at a shuffle)
inline void syncwarp() { wait(State::kWarpBar); }

inline unsigned lane() {
  EMU_QUIET;
  return t_linear % 32;
}

template <typename T>
inline T shfl_down(unsigned /*mask*/, T v, int delta, int width = 32) {
  static_assert(sizeof(T) <= 16, "shuffle of more than 16 bytes");
  EMU_QUIET;
  const unsigned warp = t_linear / 32, lane = t_linear % 32;
  std::memcpy(g_blk->slots[t_linear].data(), &v, sizeof(T));
  wait(State::kWarpBar);
  T r = v;
  const unsigned src = lane + unsigned(delta);
  const unsigned n = g_block_dim.x * g_block_dim.y * g_block_dim.z;
  if ((lane % width) + unsigned(delta) < unsigned(width) && warp * 32 + src < n)
    std::memcpy(&r, g_blk->slots[warp * 32 + src].data(), sizeof(T));
  wait(State::kWarpBar);  // nobody overwrites a slot before every lane has read it
  return r;
}

inline void fiber_main() {
  const std::function<void()>* body;
  {
    EMU_QUIET;
    fiber_entered(g_blk->fibers[g_blk->cur]);
    body = g_blk->body;
  }
  (*body)();
  EMU_QUIET;
  Fiber& f = g_blk->fibers[g_blk->cur];
  f.state = State::kDone;
  fiber_leaving(f, true);  // uc_link returns to the scheduler
}

// The block's static __shared__ arrays (build.py rewrites each declaration into a
// call with its own key): allocated, poisoned, at the first thread's declaration in
// each block.
inline std::map<std::string, std::vector<unsigned char>> g_static_smem;

template <typename A>
inline A& shared(const char* key) {
  EMU_QUIET;
  auto& buf = g_static_smem[key];
  if (buf.empty()) buf.assign(sizeof(A), 0xFF);
  return *reinterpret_cast<A*>(buf.data());
}

inline bool reverse_order() {
  const char* v = std::getenv("MBX_EMU_ORDER");
  return v != nullptr && std::strcmp(v, "reverse") == 0;
}

// The block's first n fibers, with their stacks (kept across blocks).
inline void ensure_fibers(unsigned n) {
  Block& b = *g_blk;
  if (b.fibers.size() < n) b.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i)
    if (!b.fibers[i].stack) b.fibers[i].stack.reset(new char[kStack]);
}

inline bool g_reverse = false;  // the launch's MBX_EMU_ORDER

// Runs one block's n threads to completion; false if its barriers deadlock.
inline bool run_block(unsigned n, const uint3& bid, const std::function<void()>& body) {
  Block& b = *g_blk;
  ensure_fibers(n);
  b.body = &body;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = State::kRun;
    f.fake_stack = nullptr;
    f.open.clear();
    f.groups.clear();
  }
  t_block = bid;
  for (;;) {
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = g_reverse ? n - 1 - k : k;
      if (b.fibers[i].state != State::kRun) continue;
      b.cur = i;
      t_linear = i;
      t_thread = uint3{i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y,
                       i / (g_block_dim.x * g_block_dim.y)};
#ifdef EMU_PROFILE
      prof::g_on = true;
      std::atomic_signal_fence(std::memory_order_seq_cst);
      switch_to_fiber(b, i);
      std::atomic_signal_fence(std::memory_order_seq_cst);
      prof::g_on = false;
#else
      switch_to_fiber(b, i);
#endif
    }
    // every thread now waits or is done: release the barriers that are complete
    bool released = false, all_done = true, all_block = true;
    for (unsigned w = 0; w * 32 < n; ++w) {
      bool warp_ready = true, any = false;
      for (unsigned i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
        const State st = b.fibers[i].state;
        if (st == State::kDone) continue;
        any = true;
        warp_ready = warp_ready && st == State::kWarpBar;
      }
      if (any && warp_ready) {
        for (unsigned i = w * 32; i < std::min(n, w * 32 + 32); ++i)
          if (b.fibers[i].state == State::kWarpBar) b.fibers[i].state = State::kRun;
        released = true;
      }
    }
    if (released) continue;
    for (unsigned i = 0; i < n; ++i) {
      const State st = b.fibers[i].state;
      all_done = all_done && st == State::kDone;
      all_block = all_block && (st == State::kDone || st == State::kBlockBar);
    }
    if (all_done) return true;
    if (!all_block) return false;  // some wait at a warp barrier, others at the block's
    for (unsigned i = 0; i < n; ++i)
      if (b.fibers[i].state == State::kBlockBar) b.fibers[i].state = State::kRun;
  }
}

template <typename T>
inline T* dyn_smem() {
  return reinterpret_cast<T*>(g_blk->smem.get());
}

// cp.async (sm_80): build.py rewrites the PTX (asm) into these. A copy lands at the
// issuing thread's cp.async.wait_group that covers it (the latest a GPU may land it:
// a read of the destination before that wait, or by another thread before the barrier
// after it, sees the poison or the old data) in the default thread order, and at once
// under MBX_EMU_ORDER=reverse (the earliest: an overwrite of a buffer other threads
// still read shows). __cvta_generic_to_shared gives the offset in the block's dynamic
// shared memory, the only place the kernels copy to.

#ifdef EMU_PROFILE
// One access of the running thread for profile.h (the hooks in emu_module.cpp, and
// cp.async's two halves); bytes 0: none (a zero-filling copy reads nothing).
inline void prof_access(const void* pc, const void* addr, uint32_t bytes, bool store) {
  if (bytes == 0) return;
  const auto smem = reinterpret_cast<uintptr_t>(g_blk->smem.get());
  prof::record(t_linear, reinterpret_cast<uintptr_t>(pc), reinterpret_cast<uintptr_t>(addr),
               bytes, store, smem, smem + g_blk->smem_bytes, g_static_smem);
}
#endif

inline unsigned cvta_shared(const void* p) {
  EMU_QUIET;
  const auto* b = g_blk->smem.get();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b || c > b + g_blk->smem_bytes) {
    std::fprintf(stderr, "emu: __cvta_generic_to_shared of a pointer outside dynamic shared "
                 "memory\n");
    std::abort();
  }
  return unsigned(c - b);
}

inline void land(const Fiber::Copy& c) {
  std::memcpy(c.dst, c.src, size_t(c.bytes));
  std::memset(c.dst + c.bytes, 0, size_t(16 - c.bytes));
}

EMU_NOINLINE inline void cp_async(unsigned dst, const void* src, int src_bytes) {
  EMU_QUIET;
#ifdef EMU_PROFILE
  prof_access(__builtin_return_address(0), src, src_bytes > 0 ? 16 : 0, false);
  prof_access(__builtin_return_address(0), g_blk->smem.get() + dst, 16, true);
#endif
  if (dst % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      size_t(dst) + 16 > g_blk->smem_bytes || src_bytes < 0 || src_bytes > 16) {
    std::fprintf(stderr, "emu: cp.async of 16 bytes to shared offset %u (of %zu) from %p: "
                 "misaligned or out of bounds\n", dst, g_blk->smem_bytes, src);
    std::abort();
  }
  const Fiber::Copy c{g_blk->smem.get() + dst, static_cast<const unsigned char*>(src), src_bytes};
  if (g_reverse)
    land(c);
  else
    g_blk->fibers[g_blk->cur].open.push_back(c);
}

inline void cp_async_commit() {
  EMU_QUIET;
  Fiber& f = g_blk->fibers[g_blk->cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

inline void cp_async_wait(int newest_pending) {
  EMU_QUIET;
  Fiber& f = g_blk->fibers[g_blk->cur];
  while (f.groups.size() > size_t(std::max(newest_pending, 0))) {
    for (const auto& c : f.groups.front()) land(c);
    f.groups.erase(f.groups.begin());
  }
}

inline cudaError_t fail(cudaError_t e) {
  g_error = e;
  return e;
}

struct Launch {
  const char* key;
  dim3 grid, block;
  size_t smem;
  // the kernel's closure is copied here, so that its arguments are at a known place
  // (profile.h does not count the threads' reads of them)
  template <typename F>
  void run(const F& body) const {
    struct Call {  // the closure and the std::function calling it, side by side
      F local;
      std::function<void()> fn;
    };
    Call call{body, {}};
    call.fn = [&call] { call.local(); };
    go(key, call.fn, reinterpret_cast<uintptr_t>(&call), sizeof(Call));
  }
  void go(const std::string& key, const std::function<void()>& body, uintptr_t closure,
          size_t closure_bytes) const {
    const unsigned n = block.x * block.y * block.z;
    int limit = 48 * 1024;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      auto it = g_max_dyn_smem.find(key);
      if (it != g_max_dyn_smem.end()) limit = std::max(limit, it->second);
    }
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535 || smem > size_t(limit)) {
      fail(cudaErrorInvalidConfiguration);
      return;
    }
    if (std::getenv("MBX_EMU_TRACE"))
      std::fprintf(stderr, "emu launch %s grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n",
                   key.c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
    g_block_dim = block;
    g_grid_dim = grid;
    g_reverse = reverse_order();
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          g_blk->slots.assign(n, {});
          void* p = nullptr;
          if (posix_memalign(&p, 128, smem ? smem : 1) != 0) throw std::bad_alloc();
          std::memset(p, 0xFF, smem);
          g_blk->smem.reset(static_cast<unsigned char*>(p));
          g_blk->smem_bytes = smem;
          g_static_smem.clear();
#ifdef EMU_PROFILE
          ensure_fibers(n);
          std::vector<std::pair<uintptr_t, uintptr_t>> skip{{closure, closure + closure_bytes}};
          for (unsigned i = 0; i < n; ++i) {
            const auto st = reinterpret_cast<uintptr_t>(g_blk->fibers[i].stack.get());
            skip.emplace_back(st, st + kStack);
          }
          prof::block_begins(n, skip);
#else
          (void)closure;
          (void)closure_bytes;
#endif
          if (!run_block(n, uint3{bx, by, bz}, body)) {
            std::fprintf(stderr, "emu: %s block (%u,%u,%u): threads wait at different "
                         "barriers (deadlock)\n", key.c_str(), bx, by, bz);
            fail(cudaErrorLaunchFailure);
            return;
          }
#ifdef EMU_PROFILE
          prof::block_ends(key, n);
#endif
        }
  }
};

inline Launch launch(const char* key, dim3 grid, dim3 block, size_t smem = 0,
                     cudaStream_t = nullptr) {
  return Launch{key, grid, block, smem};
}

inline cudaError_t get_last_error() {
  const cudaError_t e = g_error;
  g_error = cudaSuccess;
  return e;
}
cudaError_t last_error_extern();  // get_last_error for the units without this header

// cudaFuncSetAttribute(kernel, attr, value), keyed by the kernel's text as the launch
// is (the text before the attribute's name)
template <typename F>
inline cudaError_t func_set_attribute(const char* text, F*, cudaFuncAttribute attr, int value) {
  std::string key(text);
  key = key.substr(0, key.rfind(", cudaFuncAttribute"));
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value > 227 * 1024) return fail(cudaErrorInvalidValue);  // an H100's opt-in limit
  std::lock_guard<std::mutex> lock(g_mu);
  g_max_dyn_smem[key] = value;
  return cudaSuccess;
}

inline cudaError_t get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    *v = sms();
    return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue);
}

// cudaFuncGetAttributes: the binary version of an sm_90 build (what pw_fused_supported
// asks); the rest zero
template <typename F>
inline cudaError_t func_get_attributes(cudaFuncAttributes* a, F*) {
  *a = cudaFuncAttributes{};
  a->binaryVersion = 90;
  a->ptxVersion = 90;
  return cudaSuccess;
}

template <typename F>
inline cudaError_t occupancy(int* blocks, F*, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}

}  // namespace emu

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __cvta_generic_to_shared(p) ::emu::cvta_shared(p)
#define __shfl_down_sync(mask, v, ...) ::emu::shfl_down(mask, v, __VA_ARGS__)
#define __fmul_rn(a, b) ((a) * (b))
#define __dmul_rn(a, b) ((a) * (b))
#define cudaGetLastError ::emu::get_last_error
#define cudaFuncSetAttribute(...) ::emu::func_set_attribute(#__VA_ARGS__, __VA_ARGS__)
#define cudaGetDevice ::emu::get_device
#define cudaFuncGetAttributes ::emu::func_get_attributes
#define __syncwarp(...) ::emu::syncwarp()
#define cudaDeviceGetAttribute ::emu::device_get_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::emu::occupancy

using std::max;
using std::min;
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
