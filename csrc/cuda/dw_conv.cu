// CUDA kernels of the fused depthwise conv + BatchNorm + activation: the conv
// source of the shared epilogue kernels (epilogue.cuh), and dx.
//
// Backward recomputes the conv output from x (the forward saves nothing but x,
// weight and the per-channel statistics) in three passes:
//   sums: per channel sum(dz), sum(dz*(c-mean))       -> dgamma, dbeta, BN coefs
//   dc:   dc = a*dz + b*c + d written once; dweight partials per chunk
//   dx:   transposed conv of dc (a gather: no atomics)
#include "epilogue.cuh"

namespace mbx {
namespace {

// The depthwise conv output at a pixel, computed from x with the channel's K*K
// weights held in registers.
template <int K>
struct DwSrc {
  template <typename T, typename A>
  struct type {
    static constexpr int kTaps = K * K;
    A wr[K * K];
    const T* __restrict__ x;
    Layout lx;
    __device__ __forceinline__ type(const ConvLaunch& p, int c)
        : x(static_cast<const T*>(p.x)), lx(p.channels_last, p.C, p.H, p.W) {
      const T* w = static_cast<const T*>(p.w) + int64_t(c) * K * K;
#pragma unroll
      for (int t = 0; t < K * K; ++t) wr[t] = to_acc<A>(w[t]);
    }
    // Calls f(tap, x value) for every tap of output pixel px inside the input.
    template <typename F>
    __device__ __forceinline__ void taps(const ConvLaunch& p, const Pix& px, int c, F&& f) const {
      const T* xb = x + lx(px.n, c, 0, 0);
      const int h0 = px.h * p.stride - p.pad, w0 = px.w * p.stride - p.pad;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int h = h0 + i * p.dil;
        if (h < 0 || h >= p.H) continue;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int w = w0 + j * p.dil;
          if (w < 0 || w >= p.W) continue;
          f(i * K + j, to_acc<A>(xb[h * lx.sh + w * lx.sw]));
        }
      }
    }
    __device__ __forceinline__ A operator()(const ConvLaunch& p, const Pix& px, int c) const {
      A acc = A(0);
      taps(p, px, c, [&](int t, A xv) { acc += wr[t] * xv; });
      return acc;
    }
    __device__ __forceinline__ void accumulate_taps(const ConvLaunch& p, const Pix& px, int c, A g,
                                                    A (&dwacc)[K * K]) const {
      taps(p, px, c, [&](int t, A xv) { dwacc[t] += g * xv; });
    }
  };
};

// dweight[c][t] = sum over chunks of the partials [chunk][t][C]: one warp per
// (tap, channel) (epilogue.cuh's finalize scheme).
template <typename A, int K>
__global__ void __launch_bounds__(32 * kFinWarps) dweight_finalize_kernel(const ConvLaunch p) {
  const int e = blockIdx.x * kFinWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (e >= K * K * p.C) return;
  const int t = e / p.C, c = e % p.C;
  const A* part = static_cast<const A*>(p.part);
  A s = A(0);
  for (int k = lane; k < p.chunks; k += 32) s += part[int64_t(k) * K * K * p.C + e];
  s = warp_sum(s);
  if (lane == 0) static_cast<A*>(p.dweight)[int64_t(c) * K * K + t] = s;
}

// dx[n,c,h,w] = sum over taps (i,j) with h = ho*s - pad + i*dil (same for w) of
// dc[n,c,ho,wo] * weight[c,i,j].
template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dx_kernel(const ConvLaunch p, int chunks) {
  const Work wk(p.C, p.N * p.H * p.W, chunks);
  if (!wk.active) return;  // no block-level sync in this kernel
  const typename DwSrc<K>::template type<T, A> src(p, wk.c);
  const Layout lx(p.channels_last, p.C, p.H, p.W), ly(p.channels_last, p.C, p.Ho, p.Wo);
  const T* dc = static_cast<const T*>(p.dc);
  T* dx = static_cast<T*>(p.dx);
  for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
    int n, h, w;
    split_pixel(q, p.H, p.W, &n, &h, &w);
    const T* db = dc + ly(n, wk.c, 0, 0);
    A acc = A(0);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int hn = h + p.pad - i * p.dil;
      if (hn < 0 || hn % p.stride != 0) continue;
      const int ho = hn / p.stride;
      if (ho >= p.Ho) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int wn = w + p.pad - j * p.dil;
        if (wn < 0 || wn % p.stride != 0) continue;
        const int wo = wn / p.stride;
        if (wo >= p.Wo) continue;
        acc += src.wr[i * K + j] * to_acc<A>(db[ho * ly.sh + wo * ly.sw]);
      }
    }
    dx[lx(n, wk.c, h, w)] = from_acc<T>(acc);
  }
}

#define MBX_DISPATCH_K(K_, ...)                                \
  switch (K_) {                                                \
    case 3: { constexpr int KS = 3; __VA_ARGS__; } break;      \
    case 5: { constexpr int KS = 5; __VA_ARGS__; } break;      \
    case 7: { constexpr int KS = 7; __VA_ARGS__; } break;      \
    default: return cudaErrorInvalidValue;                     \
  }

}  // namespace

int num_chunks(const ConvLaunch& p) {
  if (p.K == 1) return pw_num_chunks(p);
  if (dw_vec_geometry(p)) return dw_vec_chunks(p);
  return chunks_for(p.channels_last, p.C, int64_t(p.N) * p.Ho * p.Wo);
}

// Each stage takes the vector path (dw_vec.cu) where it applies, else the scalar
// kernels; both read and write the same workspaces, so they mix freely.
#define MBX_TRY_VEC(STAGE_)                                          \
  do {                                                               \
    const cudaError_t vec_ = dw_vec_launch(STAGE_, p, stream);       \
    if (vec_ != cudaErrorNotSupported) {                             \
      if (vec_ != cudaSuccess) return vec_;                          \
      vec_done_ = true;                                              \
    }                                                                \
  } while (0)

cudaError_t dw_stats_launch(const ConvLaunch& p, cudaStream_t stream) {
  bool vec_done_ = false;
  MBX_TRY_VEC(kVecStats);
  if (vec_done_) return cudaSuccess;
  MBX_DISPATCH_K(p.K, return launch_stats<DwSrc<KS>::type>(p, stream));
  return cudaSuccess;
}

cudaError_t dw_apply_launch(const ConvLaunch& p, cudaStream_t stream) {
  bool vec_done_ = false;
  MBX_TRY_VEC(kVecApply);
  if (vec_done_) return cudaSuccess;
  MBX_DISPATCH_K(p.K, return launch_apply<DwSrc<KS>::type>(p, stream));
  return cudaSuccess;
}

cudaError_t dw_bwd_launch(const ConvLaunch& p, cudaStream_t stream) {
  MBX_DISPATCH_K(p.K, {
    const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
    using Src = DwSrc<KS>;
    bool vec_done_ = false;
    MBX_TRY_VEC(kVecBwdSums);
    if (!vec_done_) {
      MBX_DISPATCH_T(p.dtype, bwd_sums_kernel<T, A, Src::type<T, A>><<<grid, block, 0, stream>>>(p));
      MBX_LAUNCH_CHECK();
    }
    MBX_DISPATCH_ACC(p.dtype, bwd_finalize_kernel<A><<<finalize_grid(p.C), finalize_block(), 0, stream>>>(p));
    MBX_LAUNCH_CHECK();
    vec_done_ = false;
    MBX_TRY_VEC(kVecBwdDc);
    if (!vec_done_) {
      MBX_DISPATCH_T(p.dtype, bwd_dc_kernel<T, A, Src::type<T, A>><<<grid, block, 0, stream>>>(p));
      MBX_LAUNCH_CHECK();
    }
    const int nw = KS * KS * p.C;
    MBX_DISPATCH_ACC(p.dtype, dweight_finalize_kernel<A, KS><<<finalize_grid(nw), finalize_block(), 0, stream>>>(p));
    MBX_LAUNCH_CHECK();
    vec_done_ = false;
    MBX_TRY_VEC(kVecDx);
    if (!vec_done_) {
      const int dx_chunks = chunks_for(p.channels_last, p.C, int64_t(p.N) * p.H * p.W);
      const dim3 dx_grid = grid_dims(p, dx_chunks);
      MBX_DISPATCH_T(p.dtype, dx_kernel<T, A, KS><<<dx_grid, block, 0, stream>>>(p, dx_chunks));
      MBX_LAUNCH_CHECK();
    }
  });
  return cudaSuccess;
}

}  // namespace mbx
