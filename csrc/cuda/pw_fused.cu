// Fused pointwise (1x1) conv + BatchNorm (eval, folded) + activation (+ residual)
// in ONE kernel on tensor cores, fp16 and bf16, channels_last.
//
// Math: X = x as a row-major [P, Cin] matrix (P = N*H*W), W = weight [Cout, Cin].
//   z[p, c] = sum_k X[p, k] * W[c, k]              (fp32 accumulators)
//   y[p, c] = T(act(z * scale[c] + shift[c]) + residual[p, c])
// The conv output z never goes to global memory (nor is it rounded to T).
//
// Design
//   * Tile 128 pixels x 64 output channels per block and step, 256 threads = 8
//     warps laid out 4 (pixels) x 2 (channels); each warp owns 32 x 32 = 2 x 2
//     WMMA 16x16x16 fragments (4 fp32 accumulator fragments, 32 floats/thread).
//     64 channels: MobileNetV2's Cout (16..1280) are mostly multiples of 16/32.
//   * Persistent blocks: grid = min(#tiles, resident blocks), made coprime with
//     the number of channel tiles nCt (see launch()); block b takes tiles b,
//     b + grid, ... with the channel tile fastest (tile t -> pixel tile t / nCt,
//     channel tile t % nCt), so the blocks sharing an X tile run together and
//     re-read it from L2, not DRAM.
//   * One flat 3-stage cp.async pipeline over the block's (tile, K chunk of 32)
//     sequence: loads run two chunks ahead, across tile boundaries, so the next
//     tile's X is in flight during this tile's epilogue. The 16-byte path needs Cin % 8 == 0 and 16-byte aligned x, w (then every
//     8-element chunk is wholly in or out of bounds; out is zero-filled);
//     otherwise bounds-checked scalar loads (synchronous, same pipeline slots).
//     k-steps of 16 wholly beyond Cin and warps whose 32x32 sub-tile lies wholly
//     outside (P, Cout) skip their MMAs (uniform branches; every thread reaches
//     every __syncthreads).
//   * Epilogue per warp, no block barrier: the warp stages its 32 scale/shift
//     values in its own shared slots, stores 16 rows x 32 channels of
//     accumulators at a time to its own shared scratch, applies
//     scale/shift/act/residual and stores y, 8 channels (16 B) per
//     access when Cout % 8 == 0 and y, residual are 16-byte aligned,
//     else one element per access; all bounds-checked. The activation is hoisted
//     out of the element loops (a switch around a template, as mbx::with_act).
//   * Dynamic shared memory: A 3 x 128 x 40 halves (32 + 8 padding: 80-byte rows,
//     so the 8 rows of an ldmatrix phase hit distinct banks) = 30720 B, B 3 x 64 x
//     40 = 15360 B, C scratch 8 warps x 16 x 36 floats = 18432 B, scale/shift
//     8 x 64 floats = 2048 B: 66560 B (opt-in above 48 KiB; 3 blocks per SM on
//     H100 with the 80-register cap of __launch_bounds__(256, 3), 2 on A100).
//
// Why WMMA (<mma.h>) and not inline mma.sync PTX: one source for fp16 and bf16
// (the fragment types differ only in the element type), documented alignment
// rules, and the epilogue goes through shared memory anyway (16-byte coalesced
// stores), so the opaque fragment layout costs little. These layers are
// memory-bound (16->96: ~14 flop/byte, far below the tensor-core ridge point),
// so mma.sync-class throughput (no wgmma/TMA) is plenty. WMMA for bf16 and
// cp.async need sm_80: the kernel body is compiled only for sm_80+, and
// pw_fused_supported() checks the binary the current device runs.
//
// Bytes moved (eval, fp16, no residual), vs the cuBLAS GEMM + in-place epilogue:
//   unfused: GEMM reads x, writes y; epilogue reads y, writes y   -> x + 3y
//   fused:   reads x (W, scale, shift are small), writes y         -> x + y
//   (a residual adds one read of y's size to both.)
//   expand 16->96 at 112x112, batch 128: P = 1,605,632; x = 51.4 MB,
//   y = 308.3 MB: unfused 976 MB, fused 360 MB (2.71x fewer bytes).
// Prediction (before any GPU run): on H100 SXM at ~3.0 TB/s achieved DRAM
//   bandwidth the fused kernel takes ~0.12-0.14 ms, GEMM + epilogue ~0.33-0.40 ms
//   (two kernels, 976 MB): about 2.5x faster (expected range 2.0-2.8x; the upper
//   end if cuBLAS's tall-skinny K=16 GEMM runs below bandwidth peak).
// Measured (H100 80GB HBM3; a standalone harness of this file, plus torch.mm for
//   cuBLAS): this kernel 0.216 ms fp16, 0.219 ms bf16 (1.66 TB/s; cudaMemset
//   reaches 3.19 TB/s); cuBLAS mm alone 0.144 ms, the repo's epilogue kernel alone
//   (in place on y) 0.850 ms, so GEMM + epilogue ~0.99 ms: 4.6x. The prediction
//   had the bytes right but both kernels wrong: the old epilogue runs at 725 GB/s,
//   not at bandwidth, and this kernel is issue-bound (ncu: ~50% of issue slots
//   used, stalls on the per-tile barrier and shared-memory scoreboards), slower
//   than cuBLAS's GEMM over the same x + y bytes. Other layers (batch 128):
//   32->16 @112 0.115 ms (mm 0.069 + epilogue 0.281), 24->144 @56 0.103 ms
//   (mm 0.059 + 0.417), 144->24 + residual @56 0.083 ms (epilogue alone 0.084).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <cstdint>

#include "../common.h"
#include "pw_fused.h"

namespace mbx {
namespace {

constexpr int kBM = 128;          // pixels per tile
constexpr int kBN = 64;           // output channels per tile
constexpr int kBK = 32;           // input channels per K chunk
constexpr int kStages = 3;        // cp.async pipeline depth (chunks)
constexpr int kLds = kBK + 8;     // smem row of A/B in elements (80 B: 16 B aligned, conflict-free)
constexpr int kLdw = 32 + 4;      // row of a warp's C scratch in floats (144 B: 16 B aligned)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWarpsM = 4, kWarpsN = 2;  // warp tile 32 x 32
constexpr int kStageA = kBM * kLds;      // elements of one A stage
constexpr int kStageB = kBN * kLds;
constexpr int kWarpC = 16 * kLdw;        // floats of one warp's C scratch (16 rows x 32)
constexpr int kSmemBytes = kStages * (kStageA + kStageB) * 2 + kWarps * (kWarpC + 64) * 4;
static_assert(kWarpsM * kWarpsN == kWarps, "8 warps");
static_assert(kWarpsM * 32 == kBM && kWarpsN * 32 == kBN, "warp tiles cover the tile");
static_assert(kLds % 8 == 0 && kLdw % 4 == 0, "wmma ldm: multiple of 8 (16-bit) / 4 (fp32)");
static_assert((16 * kLds * 2) % 32 == 0, "A/B fragment row offsets keep 256-bit alignment");
static_assert((kStageA * 2) % 128 == 0 && (kStageB * 2) % 128 == 0 && (kWarpC * 4) % 32 == 0,
              "stages and warp scratch stay 256-bit aligned");
static_assert((kStages * (kStageA + kStageB) * 2 + kWarps * kWarpC * 4) % 16 == 0,
              "scale/shift slots are 16-byte aligned");
static_assert(kBM * kBK / 8 == 2 * kThreads && kBN * kBK / 8 == kThreads, "vector load split");
static_assert(kStages >= 2, "the pipeline overwrites the stage read one step earlier");

// Device code below needs sm_80 (bf16 WMMA, cp.async); older device passes compile
// an empty kernel, which pw_fused_supported() keeps from being launched.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// 16-bit element helpers; the tiles are moved as raw bits (uint16_t), so zero is 0.
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __half2float(__ushort_as_half(b));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Two adjacent elements packed in a 32-bit word (lo at the lower address) <-> float2;
// one F2FP / HADD2.F32 instruction each.
__device__ __forceinline__ uint32_t pack2(__half, float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ float2 unpack2(__half, uint32_t u) {
  __half2 h;
  memcpy(&h, &u, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(__nv_bfloat16, uint32_t u) {
  __nv_bfloat162 h;
  memcpy(&h, &u, 4);
  return __bfloat1622float2(h);
}

// 16-byte global -> shared copy, bypassing L1; src_bytes = 0 writes 16 zero bytes
// and reads nothing (src must still be a valid address, so callers pass a base).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Loads the K chunk [k0, k0 + 32) of the block's X rows [row0, row0 + 128) and
// W rows [col0, col0 + 64) into one stage; out-of-bounds elements are zero.
__device__ __forceinline__ void load_stage(const PwFusedArgs& a, bool vec, int64_t row0, int col0,
                                           int k0, uint16_t* As, uint16_t* Bs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  const int tid = threadIdx.x;
  if (vec) {
    // Cin % 8 == 0 and 16-byte aligned bases: an 8-element chunk at k % 8 == 0 is
    // wholly in bounds (k < Cin) or wholly out.
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // A: 128 rows x 4 chunks
      const int idx = tid + i * kThreads;
      const int r = idx >> 2, c = (idx & 3) * 8;
      const int64_t gr = row0 + r;
      const int k = k0 + c;
      const bool ok = gr < a.P && k < a.Cin;
      cp_async16(As + r * kLds + c, ok ? x + gr * a.Cin + k : x, ok);
    }
    {  // B: 64 rows x 4 chunks
      const int r = tid >> 2, c = (tid & 3) * 8;
      const int n = col0 + r;
      const int k = k0 + c;
      const bool ok = n < a.Cout && k < a.Cin;
      cp_async16(Bs + r * kLds + c, ok ? w + int64_t(n) * a.Cin + k : w, ok);
    }
  } else {
    // consecutive threads take consecutive k of a row (coalesced when Cin is large);
    // unrolled further than 2, sm_80 spills at the 80-register cap
#pragma unroll 2
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int r = idx / kBK, c = idx % kBK;
      const int64_t gr = row0 + r;
      const int k = k0 + c;
      As[r * kLds + c] = (gr < a.P && k < a.Cin) ? x[gr * a.Cin + k] : uint16_t(0);
    }
#pragma unroll 2
    for (int idx = tid; idx < kBN * kBK; idx += kThreads) {
      const int r = idx / kBK, c = idx % kBK;
      const int n = col0 + r;
      const int k = k0 + c;
      Bs[r * kLds + c] = (n < a.Cout && k < a.Cin) ? w[int64_t(n) * a.Cin + k] : uint16_t(0);
    }
  }
}

// The per-warp epilogue of one tile: y for the warp's 32 x 32 sub-tile.
template <typename T, int ACT>
__device__ __forceinline__ void warp_epilogue(
    const PwFusedArgs& a, bool vec_out, int64_t r0, int c0, float* cw, float* ssc, float* ssh,
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[2][2]) {
  using namespace nvcuda;
  const int lane = threadIdx.x & 31;
  // the warp's 32 scale/shift values, staged in its own shared slots (read below
  // after the __syncwarp of the first half; the previous tile's reads precede it)
  __syncwarp();
  ssc[lane] = c0 + lane < a.Cout ? a.scale[c0 + lane] : 0.f;
  ssh[lane] = c0 + lane < a.Cout ? a.shift[c0 + lane] : 0.f;
  const uint16_t* res = static_cast<const uint16_t*>(a.residual);
  uint16_t* y = static_cast<uint16_t*>(a.y);
  if (vec_out) {
    // Cout % 8 == 0: lane owns channels c .. c+7 (c < Cout implies c + 7 < Cout);
    // 4 lanes write one pixel's 32 channels (64 contiguous bytes), 8 pixels per access
    const int cg = (lane & 3) * 8;
    const int c = c0 + cg;
    const bool c_ok = c < a.Cout;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 16-row halves of the warp tile
      __syncwarp();  // the previous half's (or tile's) reads of cw are done
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cw + j * 16, acc[i][j], kLdw, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int r = (lane >> 2) + 8 * it;
        const int64_t gr = r0 + i * 16 + r;
        if (!c_ok || gr >= a.P) continue;
        const float4 v0 = *reinterpret_cast<const float4*>(cw + r * kLdw + cg);
        const float4 v1 = *reinterpret_cast<const float4*>(cw + r * kLdw + cg + 4);
        // 16-byte shared loads of scale/shift (32-bit ones were the most L1 wavefronts)
        const float4 s0 = *reinterpret_cast<const float4*>(ssc + cg);
        const float4 s1 = *reinterpret_cast<const float4*>(ssc + cg + 4);
        const float4 h0 = *reinterpret_cast<const float4*>(ssh + cg);
        const float4 h1 = *reinterpret_cast<const float4*>(ssh + cg + 4);
        float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        const float sc[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
        const float sh[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = act_fwd<float>(ACT, v[e] * sc[e] + sh[e]);
        const int64_t off = gr * a.Cout + c;
        if (res != nullptr) {
          const uint4 rv = *reinterpret_cast<const uint4*>(res + off);
          const uint32_t rw[4] = {rv.x, rv.y, rv.z, rv.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = unpack2(T(), rw[e]);
            v[2 * e] += f.x;
            v[2 * e + 1] += f.y;
          }
        }
        uint4 o;
        o.x = pack2(T(), v[0], v[1]);
        o.y = pack2(T(), v[2], v[3]);
        o.z = pack2(T(), v[4], v[5]);
        o.w = pack2(T(), v[6], v[7]);
        *reinterpret_cast<uint4*>(y + off) = o;
      }
    }
  } else {
    // lane owns channel c; one element per access, a warp writes 32 consecutive channels
    const int c = c0 + lane;
    const bool c_ok = c < a.Cout;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cw + j * 16, acc[i][j], kLdw, wmma::mem_row_major);
      __syncwarp();
      if (!c_ok) continue;
#pragma unroll 4
      for (int r = 0; r < 16; ++r) {
        const int64_t gr = r0 + i * 16 + r;
        if (gr >= a.P) break;
        float v = act_fwd<float>(ACT, cw[r * kLdw + lane] * ssc[lane] + ssh[lane]);
        const int64_t off = gr * a.Cout + c;
        if (res != nullptr) v += Elem<T>::to_float(res[off]);
        y[off] = Elem<T>::from_float(v);
      }
    }
  }
}

#endif  // sm_80+

template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    pw_fused_kernel(const PwFusedArgs a, int64_t ptile0, int n_ctiles, int n_tiles, bool vec_in,
                    bool vec_out) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t* As = reinterpret_cast<uint16_t*>(smem);  // [kStages][kBM][kLds]
  uint16_t* Bs = As + kStages * kStageA;             // [kStages][kBN][kLds]
  const int warp = threadIdx.x >> 5;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  float* cw = reinterpret_cast<float*>(Bs + kStages * kStageB) + warp * kWarpC;  // [16][kLdw]
  // the warp's scale, shift slots: [32] each, 16-byte aligned (read as float4)
  float* ssc = reinterpret_cast<float*>(Bs + kStages * kStageB) + kWarps * kWarpC + warp * 64;
  float* ssh = ssc + 32;

  // The block's work: tiles t = blockIdx.x + i * gridDim.x (pixel tile ptile0 +
  // t / n_ctiles, channel tile t % n_ctiles), each n_k K chunks, streamed as one
  // sequence of items through the stages (item j -> stage j % kStages).
  const int n_k = a.Cin > 0 ? (a.Cin + kBK - 1) / kBK : 1;  // Cin == 0: one zero chunk
  // blockIdx.x < gridDim.x <= n_tiles <= INT_MAX: no overflow in int
  const int my_tiles = (n_tiles - 1 - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x) + 1;
  // load cursor: the next item to issue (tile ordinal li, chunk lkc, stage lst)
  int li = 0, lkc = 0, lst = 0, l_col0 = 0;
  int64_t l_row0 = 0;
  auto issue = [&]() {
    if (li < my_tiles) {
      if (lkc == 0) {
        const int t = static_cast<int>(blockIdx.x) + li * static_cast<int>(gridDim.x);
        l_row0 = (ptile0 + t / n_ctiles) * kBM;
        l_col0 = (t % n_ctiles) * kBN;
      }
      load_stage(a, vec_in, l_row0, l_col0, lkc * kBK, As + lst * kStageA, Bs + lst * kStageB);
      if (++lkc == n_k) lkc = 0, ++li;
      lst = lst + 1 == kStages ? 0 : lst + 1;
    }
    cp_async_commit();  // always (possibly empty): group g holds item g
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue();

  int st = 0;  // stage of the item being computed
  for (int i = 0; i < my_tiles; ++i) {
    const int t = static_cast<int>(blockIdx.x) + i * static_cast<int>(gridDim.x);
    const int64_t row0 = (ptile0 + t / n_ctiles) * kBM;
    const int col0 = (t % n_ctiles) * kBN;
    // warp-uniform: a warp whose 32x32 sub-tile is wholly outside (P, Cout) idles
    const bool warp_live = row0 + wm * 32 < a.P && col0 + wn * 32 < a.Cout;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n) wmma::fill_fragment(acc[m][n], 0.f);

    for (int kc = 0; kc < n_k; ++kc, st = st + 1 == kStages ? 0 : st + 1) {
      cp_async_wait<kStages - 2>();  // this thread's copies of this item have landed
      // the item is visible to all; every warp is done with the previous item,
      // whose stage the issue below overwrites
      __syncthreads();
      issue();
      if (!warp_live) continue;
      const T* At = reinterpret_cast<const T*>(As + st * kStageA);
      const T* Bt = reinterpret_cast<const T*>(Bs + st * kStageB);
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        if (kc * kBK + kk >= a.Cin) break;  // the rest of the chunk is zero padding
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int m = 0; m < 2; ++m)
          wmma::load_matrix_sync(fa[m], At + (wm * 32 + m * 16) * kLds + kk, kLds);
        // B[k][n] = W[n][k]: W rows in smem are B's columns
#pragma unroll
        for (int n = 0; n < 2; ++n)
          wmma::load_matrix_sync(fb[n], Bt + (wn * 32 + n * 16) * kLds + kk, kLds);
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int n = 0; n < 2; ++n) wmma::mma_sync(acc[m][n], fa[m], fb[n], acc[m][n]);
      }
    }
    if (!warp_live) continue;
    const int64_t r0 = row0 + wm * 32;
    const int c0 = col0 + wn * 32;
    switch (a.act) {  // block-uniform; hoisted out of the element loops
      case kReLU6: warp_epilogue<T, kReLU6>(a, vec_out, r0, c0, cw, ssc, ssh, acc); break;
      case kReLU: warp_epilogue<T, kReLU>(a, vec_out, r0, c0, cw, ssc, ssh, acc); break;
      case kHardSwish: warp_epilogue<T, kHardSwish>(a, vec_out, r0, c0, cw, ssc, ssh, acc); break;
      case kSiLU: warp_epilogue<T, kSiLU>(a, vec_out, r0, c0, cw, ssc, ssh, acc); break;
      default: warp_epilogue<T, kIdentity>(a, vec_out, r0, c0, cw, ssc, ssh, acc); break;
    }
  }
  cp_async_wait<0>();  // nothing real is pending (issues past the end are empty); tidy exit
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int gcd(int a, int b) {
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Resident blocks per SM x SMs of pw_fused_kernel<T> on device dev (the current
// one), after opting in to kSmemBytes of dynamic shared memory (> 48 KiB); cached
// per device (0: not yet known; a racing first call only repeats the queries).
template <typename T>
int resident_blocks(int dev) {
  static std::atomic<int> cache[64];
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0, per_sm = 0;
  const bool ok =
      cudaFuncSetAttribute(pw_fused_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           kSmemBytes) == cudaSuccess &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pw_fused_kernel<T>, kThreads,
                                                    kSmemBytes) == cudaSuccess;
  // a failed query is reported by the launch itself (C10_CUDA_KERNEL_LAUNCH_CHECK) if
  // it matters; clear it so that it is not taken for the launch's own error
  if (!ok) cudaGetLastError();
  int v = ok ? sms * per_sm : 0;
  if (v <= 0) v = 1024;  // unknown: still correct (tiles are strided over the grid)
  if (cached) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

template <typename T>
void launch(const PwFusedArgs& a, cudaStream_t stream) {
  const bool vec_in = a.Cin > 0 && a.Cin % 8 == 0 && aligned16(a.x) && aligned16(a.w);
  const bool vec_out =
      a.Cout % 8 == 0 && aligned16(a.y) && (a.residual == nullptr || aligned16(a.residual));
  const int n_ctiles = (a.Cout + kBN - 1) / kBN;
  const int64_t n_ptiles = (a.P + kBM - 1) / kBM;
  int dev = 0;
  cudaGetDevice(&dev);
  const int resident = resident_blocks<T>(dev);
  // tile indices are int in the kernel: at most INT_MAX tiles per launch (one launch
  // unless y has more than ~2^44 elements)
  const int64_t per_launch = ((int64_t(1) << 31) - 1) / n_ctiles;  // >= 1: n_ctiles < 2^26
  for (int64_t p0 = 0; p0 < n_ptiles; p0 += per_launch) {
    const int n_tiles = static_cast<int>((n_ptiles - p0 < per_launch ? n_ptiles - p0 : per_launch) *
                                         n_ctiles);
    int grid = n_tiles < resident ? n_tiles : resident;
    // Tiles are dealt round-robin: with gcd(grid, n_ctiles) > 1 a block would get the
    // same channel tile every time, and the blocks holding a partial last channel
    // tile (Cout = 96: half their warps idle) would finish long before the others
    // (H100, 16->96 @112 batch 128: 0.298 ms with grid 396, 0.217 ms with 395).
    // A coprime grid cycles every block through all channel tiles.
    if (grid < n_tiles)
      while (grid > 1 && gcd(grid, n_ctiles) != 1) --grid;
    pw_fused_kernel<T><<<static_cast<unsigned>(grid), kThreads, kSmemBytes, stream>>>(
        a, p0, n_ctiles, n_tiles, vec_in, vec_out);
  }
}

}  // namespace

bool pw_fused_supported() {
  // per device: 0 not yet asked, 1 no, 2 yes; devices past the table are asked every call
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v != 0) return v == 2;
  }
  cudaFuncAttributes fa{};
  // binaryVersion: the arch of the SASS (or JIT-compiled PTX) this device runs
  const cudaError_t err = cudaFuncGetAttributes(&fa, pw_fused_kernel<__half>);
  if (err != cudaSuccess) cudaGetLastError();  // an answer (no), not a pending error
  const bool ok = err == cudaSuccess && fa.binaryVersion >= 80;
  if (cached) cache[dev].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

void pw_fused_launch(const PwFusedArgs& a, bool bf16, cudaStream_t stream) {
  if (a.P <= 0 || a.Cout <= 0) return;
  if (bf16)
    launch<__nv_bfloat16>(a, stream);
  else
    launch<__half>(a, stream);
}

}  // namespace mbx
