// The fused BatchNorm + activation (+ residual) epilogue kernels, shared by the
// depthwise and pointwise ops. A kernel is templated on a conv *source*: the
// depthwise op computes the conv output from x in registers (DwSource in
// dw_conv.cu), the pointwise op reads it from a GEMM result (BufSource in
// pw_conv.cu); everything after the conv value is this file.
//
// Every kernel maps a 2-D block onto (channels x pixels): blockDim.x channels,
// blockDim.y pixels. channels_last uses (32, 8) so a warp reads 32 adjacent
// channels of one pixel; NCHW uses (1, 256) so a warp reads 32 adjacent pixels
// of one channel. gridDim.x tiles the channels, gridDim.y splits the N*Ho*Wo
// pixels into `chunks`; reductions (batch statistics, dgamma/dbeta, dweight)
// are summed over blockDim.y in shared memory, written as one partial per
// (chunk, channel) and combined per channel by a small finalize kernel, in a
// fixed order (deterministic, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.h"

namespace mbx {
namespace {

template <typename A>
__device__ __forceinline__ A to_acc(double v) { return A(v); }
template <typename A>
__device__ __forceinline__ A to_acc(float v) { return A(v); }
template <typename A>
__device__ __forceinline__ A to_acc(__half v) { return A(__half2float(v)); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return A(__bfloat162float(v)); }

template <typename T>
__device__ __forceinline__ T from_acc(double v) { return T(v); }
template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int kMaxThreads = 256;

// Element offset of (n, c, h, w) in a contiguous tensor of spatial size (h_, w_)
// in NCHW or channels_last order.
struct Layout {
  int64_t sn, sc, sh, sw;
  __device__ __forceinline__ Layout(bool cl, int C, int h_, int w_) {
    sw = cl ? C : 1;
    sh = int64_t(w_) * sw;
    sc = cl ? 1 : int64_t(h_) * w_;
    sn = int64_t(C) * h_ * w_;
  }
  __device__ __forceinline__ int64_t operator()(int n, int c, int h, int w) const {
    return n * sn + c * sc + h * sh + w * sw;
  }
};

// The (channel, pixel range) a thread owns; pixels are flattened (n, h, w).
struct Work {
  int c, p_begin, p_end, p_step;
  bool active;  // c < C; inactive threads still join the block reductions
  __device__ __forceinline__ Work(int C, int P, int chunks) {
    c = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk_len = (P + chunks - 1) / chunks;
    const int start = blockIdx.y * chunk_len;
    const int stop = min(P, start + chunk_len);
    p_begin = start + threadIdx.y;
    p_end = stop;
    p_step = blockDim.y;
    active = c < C;
  }
};

__device__ __forceinline__ void split_pixel(int p, int h_, int w_, int* n, int* h, int* w) {
  *w = p % w_;
  const int t = p / w_;
  *h = t % h_;
  *n = t / h_;
}

// Sum of v over threadIdx.y for each threadIdx.x; valid in every thread.
template <typename A>
__device__ __forceinline__ A block_sum_y(A v, A* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, bc = blockDim.x;
  smem[ty * bc + tx] = v;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) smem[ty * bc + tx] += smem[(ty + s) * bc + tx];
    __syncthreads();
  }
  const A r = smem[tx];
  __syncthreads();
  return r;
}

// A pixel of the output: its coordinates and its offset in y (and dy, dc, conv).
struct Pix {
  int n, h, w;
  int64_t off;
};

__device__ __forceinline__ Pix pixel(const ConvLaunch& p, const Layout& ly, int c, int q) {
  Pix px;
  split_pixel(q, p.Ho, p.Wo, &px.n, &px.h, &px.w);
  px.off = ly(px.n, c, px.h, px.w);
  return px;
}

template <typename T, typename A, typename Src>
__global__ void __launch_bounds__(kMaxThreads) apply_kernel(const ConvLaunch p) {
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  if (!wk.active) return;  // no block-level sync in this kernel
  Src src(p, wk.c);
  const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
  const Layout ly(p.channels_last, p.C, p.Ho, p.Wo);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);  // may alias the pointwise conv buffer: same element, same thread
  for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
    const Pix px = pixel(p, ly, wk.c, q);
    A v = act_fwd<A>(p.act, src(p, px, wk.c) * sc + sh);
    if (res != nullptr) v += to_acc<A>(res[px.off]);
    y[px.off] = from_acc<T>(v);
  }
}

template <typename T, typename A, typename Src>
__global__ void __launch_bounds__(kMaxThreads) stats_kernel(const ConvLaunch p) {
  __shared__ A s_mean[kMaxThreads], s_m2[kMaxThreads], s_n[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  Welford<A> acc;
  if (wk.active) {
    Src src(p, wk.c);
    const Layout ly(p.channels_last, p.C, p.Ho, p.Wo);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step)
      acc.push(src(p, pixel(p, ly, wk.c, q), wk.c));
  }
  const int tx = threadIdx.x, ty = threadIdx.y, bc = blockDim.x;
  s_mean[ty * bc + tx] = acc.mean;
  s_m2[ty * bc + tx] = acc.m2;
  s_n[ty * bc + tx] = acc.n;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int a = ty * bc + tx, b = (ty + s) * bc + tx;
      Welford<A> w;
      w.mean = s_mean[a];
      w.m2 = s_m2[a];
      w.n = s_n[a];
      w.merge(s_mean[b], s_m2[b], s_n[b]);
      s_mean[a] = w.mean;
      s_m2[a] = w.m2;
      s_n[a] = w.n;
    }
    __syncthreads();
  }
  if (ty == 0 && wk.active) {
    A* part = static_cast<A*>(p.part) + int64_t(blockIdx.y) * 3 * p.C;
    part[wk.c] = s_mean[tx];
    part[p.C + wk.c] = s_m2[tx];
    part[2 * p.C + wk.c] = s_n[tx];
  }
}

// The finalize kernels combine the per-chunk partials of a reduction: one warp
// per output value (the lanes take chunks lane, lane+32, ..., then a shuffle tree
// in fixed order: deterministic). A thread per value looping over hundreds of
// chunks cost 290-430 us per call on the H200 (GPU run 2's profile).
constexpr int kFinWarps = 8;  // values (warps) per finalize block

inline dim3 finalize_grid(int64_t values) {
  return dim3(static_cast<unsigned>((values + kFinWarps - 1) / kFinWarps));
}
inline dim3 finalize_block() { return dim3(32 * kFinWarps); }

template <typename A>
__device__ __forceinline__ A shfl_down(A v, int off) {
  return __shfl_down_sync(0xffffffffu, v, off);
}

// Sum over the warp's lanes, valid in lane 0.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += shfl_down(v, off);
  return v;
}

// Per channel: merge the chunk statistics [chunk][mean, M2, count][C] into mean,
// invstd and the folded scale, shift.
template <typename A>
__global__ void __launch_bounds__(32 * kFinWarps) stats_finalize_kernel(const ConvLaunch p) {
  const int c = blockIdx.x * kFinWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (c >= p.C) return;  // the whole warp: no partial-warp shuffles
  const A* part = static_cast<const A*>(p.part);
  Welford<A> w;
  for (int k = lane; k < p.chunks; k += 32) {
    const A* pk = part + int64_t(k) * 3 * p.C;
    w.merge(pk[c], pk[p.C + c], pk[2 * p.C + c]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A om = shfl_down(w.mean, off), o2 = shfl_down(w.m2, off), on = shfl_down(w.n, off);
    w.merge(om, o2, on);  // lanes >= off merge junk; lane 0 only ever reads real lanes
  }
  if (lane != 0) return;
  const A invstd = bn_invstd(w.m2 / w.n, A(p.eps));
  const auto f = BnFold<A>::make(static_cast<const A*>(p.gamma)[c],
                                 static_cast<const A*>(p.beta)[c], w.mean, invstd);
  static_cast<A*>(p.mean)[c] = w.mean;
  static_cast<A*>(p.invstd)[c] = invstd;
  static_cast<A*>(p.scale)[c] = f.scale;
  static_cast<A*>(p.shift)[c] = f.shift;
}

// dz = act'(conv*scale + shift) * dy at one output pixel.
template <typename T, typename A>
__device__ __forceinline__ A grad_z(const ConvLaunch& p, const Pix& px, A conv, A sc, A sh) {
  const A dy = to_acc<A>(static_cast<const T*>(p.dy)[px.off]);
  return act_bwd<A>(p.act, conv * sc + sh, dy);
}

template <typename T, typename A, typename Src>
__global__ void __launch_bounds__(kMaxThreads) bwd_sums_kernel(const ConvLaunch p) {
  __shared__ A smem[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  A s_dz = A(0), s_dzx = A(0);
  if (wk.active) {
    Src src(p, wk.c);
    const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
    const A mean = static_cast<const A*>(p.mean)[wk.c];
    const Layout ly(p.channels_last, p.C, p.Ho, p.Wo);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
      const Pix px = pixel(p, ly, wk.c, q);
      const A v = src(p, px, wk.c);
      const A dz = grad_z<T, A>(p, px, v, sc, sh);
      s_dz += dz;
      s_dzx += dz * (v - mean);
    }
  }
  s_dz = block_sum_y(s_dz, smem);
  s_dzx = block_sum_y(s_dzx, smem);
  if (threadIdx.y == 0 && wk.active) {
    A* part = static_cast<A*>(p.part) + int64_t(blockIdx.y) * 2 * p.C;
    part[wk.c] = s_dz;
    part[p.C + wk.c] = s_dzx;
  }
}

// Per channel: sum(dz), sum(dz*(c-mean)) from the chunk partials [chunk][2][C] ->
// dbeta, dgamma and the coefficients of dc.
template <typename A>
__global__ void __launch_bounds__(32 * kFinWarps) bwd_finalize_kernel(const ConvLaunch p) {
  const int c = blockIdx.x * kFinWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (c >= p.C) return;
  const A* part = static_cast<const A*>(p.part);
  A s1 = A(0), s2 = A(0);
  for (int k = lane; k < p.chunks; k += 32) {
    s1 += part[int64_t(k) * 2 * p.C + c];
    s2 += part[int64_t(k) * 2 * p.C + p.C + c];
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if (lane != 0) return;
  const A invstd = static_cast<const A*>(p.invstd)[c];
  const A dgamma = s2 * invstd;
  static_cast<A*>(p.dbeta)[c] = s1;
  static_cast<A*>(p.dgamma)[c] = dgamma;
  const auto k = BnBwdCoef<A>::make(p.training, static_cast<const A*>(p.gamma)[c],
                                    static_cast<const A*>(p.mean)[c], invstd, s1, dgamma,
                                    A(p.N) * p.Ho * p.Wo);
  A* coef = static_cast<A*>(p.coef);
  coef[c] = k.a;
  coef[p.C + c] = k.b;
  coef[2 * p.C + c] = k.d;
}

// dc = a*dz + b*conv + d, written once (dtype T: the precision eager autograd
// keeps it in). A source with taps (depthwise) also accumulates its weight
// gradient sum(dc * x(tap)) and writes per-chunk partials [chunk][tap][C].
template <typename T, typename A, typename Src>
__global__ void __launch_bounds__(kMaxThreads) bwd_dc_kernel(const ConvLaunch p) {
  constexpr int kTaps = Src::kTaps;
  __shared__ A smem[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  A dwacc[kTaps > 0 ? kTaps : 1];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) dwacc[t] = A(0);
  if (wk.active) {
    Src src(p, wk.c);
    const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
    const A* coef = static_cast<const A*>(p.coef);
    const BnBwdCoef<A> k{coef[wk.c], coef[p.C + wk.c], coef[2 * p.C + wk.c]};
    const Layout ly(p.channels_last, p.C, p.Ho, p.Wo);
    T* dc = static_cast<T*>(p.dc);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
      const Pix px = pixel(p, ly, wk.c, q);
      const A v = src(p, px, wk.c);
      const A g = k(grad_z<T, A>(p, px, v, sc, sh), v);
      dc[px.off] = from_acc<T>(g);
      if constexpr (kTaps > 0) src.accumulate_taps(p, px, wk.c, g, dwacc);
    }
  }
  if constexpr (kTaps > 0) {
    A* part = static_cast<A*>(p.part) + int64_t(blockIdx.y) * kTaps * p.C;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const A s = block_sum_y(dwacc[t], smem);
      if (threadIdx.y == 0 && wk.active) part[int64_t(t) * p.C + wk.c] = s;
    }
  }
}

// ------------------------------------------------------------------ launch

// SM count of the current device, queried once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= kMaxDevices) return 108;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();  // clear it: the launches check cudaGetLastError
      return 108;
    }
    cache[dev] = n;
  }
  return cache[dev];
}

inline dim3 block_dims(bool channels_last) {
  return channels_last ? dim3(32, 8) : dim3(1, 256);
}

// Chunks so that about 8 blocks per SM run, each thread owning >= 4 pixels.
inline int chunks_for(bool channels_last, int C, int64_t P) {
  const dim3 b = block_dims(channels_last);
  const int64_t gx = C > 0 ? (C + b.x - 1) / b.x : 1;  // C == 0: no launch, but no div by 0
  const int64_t want = (int64_t(sm_count()) * 8 + gx - 1) / gx;
  const int64_t most = (P + int64_t(b.y) * 4 - 1) / (int64_t(b.y) * 4);
  int64_t k = want < most ? want : most;
  if (k < 1) k = 1;
  if (k > 65535) k = 65535;
  return static_cast<int>(k);
}

inline dim3 grid_dims(const ConvLaunch& p, int chunks) {
  const dim3 b = block_dims(p.channels_last);
  return dim3((p.C + b.x - 1) / b.x, chunks);
}

#define MBX_DISPATCH_T(DT_, ...)                                                  \
  switch (DT_) {                                                                  \
    case kF64: { using T = double; using A = double; __VA_ARGS__; } break;        \
    case kF32: { using T = float; using A = float; __VA_ARGS__; } break;          \
    case kF16: { using T = __half; using A = float; __VA_ARGS__; } break;         \
    case kBF16: { using T = __nv_bfloat16; using A = float; __VA_ARGS__; } break; \
    default: return cudaErrorInvalidValue;                                        \
  }

#define MBX_DISPATCH_ACC(DT_, ...)                                          \
  if (DT_ == kF64) { using A = double; __VA_ARGS__; } else { using A = float; __VA_ARGS__; }

#define MBX_LAUNCH_CHECK()                                   \
  do {                                                       \
    const cudaError_t err_ = cudaGetLastError();             \
    if (err_ != cudaSuccess) return err_;                    \
  } while (0)

// Batch statistics then their per-channel finalize (mean, invstd, scale, shift).
template <template <typename, typename> class SrcT>
cudaError_t launch_stats(const ConvLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, using S = SrcT<T, A>; stats_kernel<T, A, S><<<grid, block, 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  MBX_DISPATCH_ACC(p.dtype, stats_finalize_kernel<A><<<finalize_grid(p.C), finalize_block(), 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

template <template <typename, typename> class SrcT>
cudaError_t launch_apply(const ConvLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, using S = SrcT<T, A>; apply_kernel<T, A, S><<<grid, block, 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

// sums -> coefficients, dgamma, dbeta -> dc (+ weight-gradient partials for taps).
template <template <typename, typename> class SrcT>
cudaError_t launch_bwd_epilogue(const ConvLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, using S = SrcT<T, A>; bwd_sums_kernel<T, A, S><<<grid, block, 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  MBX_DISPATCH_ACC(p.dtype, bwd_finalize_kernel<A><<<finalize_grid(p.C), finalize_block(), 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  MBX_DISPATCH_T(p.dtype, using S = SrcT<T, A>; bwd_dc_kernel<T, A, S><<<grid, block, 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace
}  // namespace mbx
