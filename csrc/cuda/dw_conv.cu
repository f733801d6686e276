// CUDA kernels of the fused depthwise conv + BatchNorm + activation.
//
// Every kernel maps a 2-D block onto (channels x pixels): blockDim.x channels,
// blockDim.y pixels. channels_last uses (32, 8) so a warp reads 32 adjacent
// channels of one pixel; NCHW uses (1, 256) so a warp reads 32 adjacent pixels
// of one channel. gridDim.x tiles the channels, gridDim.y splits the N*H*W
// pixels into `chunks`; reductions (batch statistics, dgamma/dbeta, dweight)
// are summed over blockDim.y in shared memory, written as one partial per
// (chunk, channel) and combined per channel by a small finalize kernel, in a
// fixed order (deterministic, no atomics).
//
// Backward recomputes the conv output from x (nothing but x, weight and the
// per-channel statistics is saved by the forward) in three passes:
//   sums: per channel sum(dz), sum(dz*(c-mean))            -> dgamma, dbeta, BN coefs
//   dc:   dc = a*dz + b*c + d written once; dweight partials
//   dx:   transposed conv of dc (a gather: no atomics)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "dw_conv_launch.h"

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

template <typename T, typename A, int K>
__device__ __forceinline__ void load_weights(const DwLaunch& p, int c, A (&wr)[K * K]) {
  const T* w = static_cast<const T*>(p.w) + int64_t(c) * K * K;
#pragma unroll
  for (int t = 0; t < K * K; ++t) wr[t] = to_acc<A>(w[t]);
}

// conv output at (n, c, ho, wo); xb points at x[n, c, 0, 0].
template <typename T, typename A, int K>
__device__ __forceinline__ A conv_at(const DwLaunch& p, const Layout& lx, const T* __restrict__ xb,
                                     const A (&wr)[K * K], int ho, int wo) {
  A acc = A(0);
  const int h0 = ho * p.stride - p.pad, w0 = wo * p.stride - p.pad;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const int h = h0 + i * p.dil;
    if (h < 0 || h >= p.H) continue;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int w = w0 + j * p.dil;
      if (w < 0 || w >= p.W) continue;
      acc += wr[i * K + j] * to_acc<A>(xb[h * lx.sh + w * lx.sw]);
    }
  }
  return acc;
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

template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dw_apply_kernel(const DwLaunch p) {
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  if (!wk.active) return;  // no block-level sync in this kernel
  A wr[K * K];
  load_weights<T, A, K>(p, wk.c, wr);
  const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
  const Layout lx(p.channels_last, p.C, p.H, p.W), ly(p.channels_last, p.C, p.Ho, p.Wo);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
    int n, ho, wo;
    split_pixel(q, p.Ho, p.Wo, &n, &ho, &wo);
    const A v = conv_at<T, A, K>(p, lx, x + lx(n, wk.c, 0, 0), wr, ho, wo);
    y[ly(n, wk.c, ho, wo)] = from_acc<T>(act_fwd<A>(p.act, v * sc + sh));
  }
}

template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dw_stats_kernel(const DwLaunch p) {
  __shared__ A s_mean[kMaxThreads], s_m2[kMaxThreads], s_n[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  Welford<A> acc;
  if (wk.active) {
    A wr[K * K];
    load_weights<T, A, K>(p, wk.c, wr);
    const Layout lx(p.channels_last, p.C, p.H, p.W);
    const T* x = static_cast<const T*>(p.x);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
      int n, ho, wo;
      split_pixel(q, p.Ho, p.Wo, &n, &ho, &wo);
      acc.push(conv_at<T, A, K>(p, lx, x + lx(n, wk.c, 0, 0), wr, ho, wo));
    }
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

// One thread per channel: combine the chunk partials in chunk order.
template <typename A>
__global__ void dw_stats_finalize_kernel(const DwLaunch p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const A* part = static_cast<const A*>(p.part);
  Welford<A> w;
  for (int k = 0; k < p.chunks; ++k) {
    const A* pk = part + int64_t(k) * 3 * p.C;
    w.merge(pk[c], pk[p.C + c], pk[2 * p.C + c]);
  }
  const A invstd = A(1) / sqrt(w.m2 / w.n + A(p.eps));
  const A scale = static_cast<const A*>(p.gamma)[c] * invstd;
  static_cast<A*>(p.mean)[c] = w.mean;
  static_cast<A*>(p.invstd)[c] = invstd;
  static_cast<A*>(p.scale)[c] = scale;
  static_cast<A*>(p.shift)[c] = static_cast<const A*>(p.beta)[c] - w.mean * scale;
}

// dz = act'(conv*scale + shift) * dy at one output pixel; also returns the conv value.
template <typename T, typename A, int K>
__device__ __forceinline__ A grad_z(const DwLaunch& p, const Layout& lx, const Layout& ly, int c,
                                    const A (&wr)[K * K], A sc, A sh, int q, int* n, int* ho,
                                    int* wo, A* conv) {
  split_pixel(q, p.Ho, p.Wo, n, ho, wo);
  const A v = conv_at<T, A, K>(p, lx, static_cast<const T*>(p.x) + lx(*n, c, 0, 0), wr, *ho, *wo);
  *conv = v;
  const A dy = to_acc<A>(static_cast<const T*>(p.dy)[ly(*n, c, *ho, *wo)]);
  return act_bwd<A>(p.act, v * sc + sh, dy);
}

template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dw_bwd_sums_kernel(const DwLaunch p) {
  __shared__ A smem[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  A s_dz = A(0), s_dzx = A(0);
  if (wk.active) {
    A wr[K * K];
    load_weights<T, A, K>(p, wk.c, wr);
    const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
    const A mean = static_cast<const A*>(p.mean)[wk.c];
    const Layout lx(p.channels_last, p.C, p.H, p.W), ly(p.channels_last, p.C, p.Ho, p.Wo);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
      int n, ho, wo;
      A v;
      const A dz = grad_z<T, A, K>(p, lx, ly, wk.c, wr, sc, sh, q, &n, &ho, &wo, &v);
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

template <typename A>
__global__ void dw_bwd_finalize_kernel(const DwLaunch p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  const A* part = static_cast<const A*>(p.part);
  A s1 = A(0), s2 = A(0);
  for (int k = 0; k < p.chunks; ++k) {
    s1 += part[int64_t(k) * 2 * p.C + c];
    s2 += part[int64_t(k) * 2 * p.C + p.C + c];
  }
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

template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dw_bwd_dc_kernel(const DwLaunch p) {
  __shared__ A smem[kMaxThreads];
  const Work wk(p.C, p.N * p.Ho * p.Wo, p.chunks);
  A dwacc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) dwacc[t] = A(0);
  if (wk.active) {
    A wr[K * K];
    load_weights<T, A, K>(p, wk.c, wr);
    const A sc = static_cast<const A*>(p.scale)[wk.c], sh = static_cast<const A*>(p.shift)[wk.c];
    const A* coef = static_cast<const A*>(p.coef);
    const BnBwdCoef<A> k{coef[wk.c], coef[p.C + wk.c], coef[2 * p.C + wk.c]};
    const Layout lx(p.channels_last, p.C, p.H, p.W), ly(p.channels_last, p.C, p.Ho, p.Wo);
    const T* x = static_cast<const T*>(p.x);
    T* dc = static_cast<T*>(p.dc);
    for (int q = wk.p_begin; q < wk.p_end; q += wk.p_step) {
      int n, ho, wo;
      A v;
      const A dz = grad_z<T, A, K>(p, lx, ly, wk.c, wr, sc, sh, q, &n, &ho, &wo, &v);
      const A g = k(dz, v);
      dc[ly(n, wk.c, ho, wo)] = from_acc<T>(g);
      const T* xb = x + lx(n, wk.c, 0, 0);
      const int h0 = ho * p.stride - p.pad, w0 = wo * p.stride - p.pad;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int h = h0 + i * p.dil;
        if (h < 0 || h >= p.H) continue;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int w = w0 + j * p.dil;
          if (w < 0 || w >= p.W) continue;
          dwacc[i * K + j] += g * to_acc<A>(xb[h * lx.sh + w * lx.sw]);
        }
      }
    }
  }
  A* part = static_cast<A*>(p.part) + int64_t(blockIdx.y) * K * K * p.C;
#pragma unroll
  for (int t = 0; t < K * K; ++t) {
    const A s = block_sum_y(dwacc[t], smem);
    if (threadIdx.y == 0 && wk.active) part[int64_t(t) * p.C + wk.c] = s;
  }
}

// One thread per (tap, channel), channel fastest: dweight[c][t] = sum over chunks.
template <typename A, int K>
__global__ void dw_dweight_finalize_kernel(const DwLaunch p) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= K * K * p.C) return;
  const int t = e / p.C, c = e % p.C;
  const A* part = static_cast<const A*>(p.part);
  A s = A(0);
  for (int k = 0; k < p.chunks; ++k) s += part[int64_t(k) * K * K * p.C + e];
  static_cast<A*>(p.dweight)[int64_t(c) * K * K + t] = s;
}

// dx[n,c,h,w] = sum over taps (i,j) with h = ho*s - pad + i*dil (same for w) of
// dc[n,c,ho,wo] * weight[c,i,j].
template <typename T, typename A, int K>
__global__ void __launch_bounds__(kMaxThreads) dw_bwd_dx_kernel(const DwLaunch p, int chunks) {
  const Work wk(p.C, p.N * p.H * p.W, chunks);
  if (!wk.active) return;  // no block-level sync in this kernel
  A wr[K * K];
  load_weights<T, A, K>(p, wk.c, wr);
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
        acc += wr[i * K + j] * to_acc<A>(db[ho * ly.sh + wo * ly.sw]);
      }
    }
    dx[lx(n, wk.c, h, w)] = from_acc<T>(acc);
  }
}

// ------------------------------------------------------------------ launch

// SM count of the current device, queried once per device.
int sm_count() {
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

dim3 block_dims(bool channels_last) { return channels_last ? dim3(32, 8) : dim3(1, 256); }

// Chunks so that about 8 blocks per SM run, each thread owning >= 4 pixels.
int num_chunks(bool channels_last, int C, int64_t P) {
  const dim3 b = block_dims(channels_last);
  const int64_t gx = C > 0 ? (C + b.x - 1) / b.x : 1;  // C == 0: no launch, but no div by 0
  const int64_t want = (int64_t(sm_count()) * 8 + gx - 1) / gx;
  const int64_t most = (P + int64_t(b.y) * 4 - 1) / (int64_t(b.y) * 4);
  int64_t k = want < most ? want : most;
  if (k < 1) k = 1;
  if (k > 65535) k = 65535;
  return static_cast<int>(k);
}

dim3 grid_dims(const DwLaunch& p, int chunks) {
  const dim3 b = block_dims(p.channels_last);
  return dim3((p.C + b.x - 1) / b.x, chunks);
}

#define MBX_DISPATCH_K(K_, ...)                    \
  switch (K_) {                                    \
    case 3: { constexpr int KS = 3; __VA_ARGS__; } break; \
    case 5: { constexpr int KS = 5; __VA_ARGS__; } break; \
    case 7: { constexpr int KS = 7; __VA_ARGS__; } break; \
    default: return cudaErrorInvalidValue;         \
  }

#define MBX_DISPATCH_T(DT_, ...)                                                        \
  switch (DT_) {                                                                        \
    case kF64: { using T = double; using A = double; __VA_ARGS__; } break;              \
    case kF32: { using T = float; using A = float; __VA_ARGS__; } break;                \
    case kF16: { using T = __half; using A = float; __VA_ARGS__; } break;               \
    case kBF16: { using T = __nv_bfloat16; using A = float; __VA_ARGS__; } break;       \
    default: return cudaErrorInvalidValue;                                              \
  }

#define MBX_DISPATCH_ACC(DT_, ...)                                          \
  if (DT_ == kF64) { using A = double; __VA_ARGS__; } else { using A = float; __VA_ARGS__; }

}  // namespace

int dw_num_chunks(const DwLaunch& p) {
  return num_chunks(p.channels_last, p.C, int64_t(p.N) * p.Ho * p.Wo);
}

cudaError_t dw_apply_launch(const DwLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, MBX_DISPATCH_K(p.K, dw_apply_kernel<T, A, KS><<<grid, block, 0, stream>>>(p)));
  return cudaGetLastError();
}

cudaError_t dw_stats_launch(const DwLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, MBX_DISPATCH_K(p.K, dw_stats_kernel<T, A, KS><<<grid, block, 0, stream>>>(p)));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  MBX_DISPATCH_ACC(p.dtype, dw_stats_finalize_kernel<A><<<(p.C + 127) / 128, 128, 0, stream>>>(p));
  return cudaGetLastError();
}

cudaError_t dw_bwd_launch(const DwLaunch& p, cudaStream_t stream) {
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  const int cblocks = (p.C + 127) / 128;
  cudaError_t err;
  MBX_DISPATCH_T(p.dtype, MBX_DISPATCH_K(p.K, dw_bwd_sums_kernel<T, A, KS><<<grid, block, 0, stream>>>(p)));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  MBX_DISPATCH_ACC(p.dtype, dw_bwd_finalize_kernel<A><<<cblocks, 128, 0, stream>>>(p));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  MBX_DISPATCH_T(p.dtype, MBX_DISPATCH_K(p.K, dw_bwd_dc_kernel<T, A, KS><<<grid, block, 0, stream>>>(p)));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int nw = p.K * p.K * p.C;
  MBX_DISPATCH_ACC(p.dtype, MBX_DISPATCH_K(p.K, dw_dweight_finalize_kernel<A, KS><<<(nw + 255) / 256, 256, 0, stream>>>(p)));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int dx_chunks = num_chunks(p.channels_last, p.C, int64_t(p.N) * p.H * p.W);
  MBX_DISPATCH_T(p.dtype, MBX_DISPATCH_K(p.K, dw_bwd_dx_kernel<T, A, KS><<<grid_dims(p, dx_chunks), block, 0, stream>>>(p, dx_chunks)));
  return cudaGetLastError();
}

}  // namespace mbx
