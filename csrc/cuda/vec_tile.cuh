// Vectorised channels_last kernels of the shared BatchNorm + activation epilogue
// (the fast path of epilogue.cuh's kernels, same math, same workspaces).
//
// A thread owns V = 16 / sizeof(T) adjacent channels (one 16-byte load or store
// per pixel) and an *item*: a strip of R output pixels. For the depthwise conv
// the strip is R adjacent output columns of one row, so the (R-1)*S + K input
// columns it needs are loaded once per kernel row and reused by every output
// they touch (4.5 loads per output for K=3, S=1, R=4 instead of 9); for the
// pointwise op (a GEMM result) it is R consecutive pixels. Block: (bx, by),
// threadIdx.x = channel group, threadIdx.y = item; gridDim.x tiles the channel
// groups, gridDim.y the items (a grid-stride loop). Reductions sum over the
// thread's items, then over threadIdx.y in shared memory, and write one partial
// per (gridDim.y chunk, channel) in the layout of epilogue.cuh's partials, so
// its finalize kernels combine them unchanged.
//
// Used when x is channels_last, T is fp32/fp16/bf16 (A = float), C % V == 0 and
// every tensor is 16-byte aligned (vec_aligned, checked by dw_vec_launch and
// pw_conv.cu); everything else takes epilogue.cuh's scalar kernels. dw_tile.cu's
// depthwise kernels (input tiles in shared memory) share the strip math (load_wrow,
// strip_fma, taps_fma), the epilogues (apply_store, sums_strip, dc_store) and the
// block reductions and partial layouts (block_welford_y, block_sum_vec, store_*_partial).
#pragma once

#include <cstdint>
#include <cstdlib>

#include "epilogue.cuh"

namespace mbx {
namespace {

constexpr int kVecThreads = 256;

template <typename T>
struct Vec {
  static constexpr int V = 16 / int(sizeof(T));
};

// out[0..N) = float(p[0..N)), p 16-byte aligned; U is T or float.
template <int N, typename U>
__device__ __forceinline__ void vload(const U* p, float (&out)[N]) {
  static_assert((N * sizeof(U)) % 16 == 0, "whole 16-byte words only");
  constexpr int kWords = N * int(sizeof(U)) / 16, kPer = 16 / int(sizeof(U));
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    const uint4 u = reinterpret_cast<const uint4*>(p)[k];
    const U* e = reinterpret_cast<const U*>(&u);
#pragma unroll
    for (int v = 0; v < kPer; ++v) out[k * kPer + v] = to_acc<float>(e[v]);
  }
}

// p[0..N) = T(in[0..N)), p 16-byte aligned.
template <int N, typename T>
__device__ __forceinline__ void vstore(T* p, const float (&in)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte words only");
  constexpr int kWords = N * int(sizeof(T)) / 16, kPer = 16 / int(sizeof(T));
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    alignas(16) T e[kPer];
#pragma unroll
    for (int v = 0; v < kPer; ++v) e[v] = from_acc<T>(in[k * kPer + v]);
    reinterpret_cast<uint4*>(p)[k] = *reinterpret_cast<const uint4*>(e);
  }
}

// Block shape and grid of the vector kernels for C channels of V each: the
// channel groups split evenly into blocks of at most 32, the rest of the 256
// threads over items. Shared by the host (workspace sizes) and the launches.
struct VecGrid {
  int bx, by, gx;
  __host__ __device__ static VecGrid make(int C, int V) {
    const int groups = (C + V - 1) / V;
    const int parts = groups > 0 ? (groups + 31) / 32 : 1;
    VecGrid g;
    g.bx = groups > 0 ? (groups + parts - 1) / parts : 1;
    g.by = kVecThreads / g.bx;
    g.gx = parts;
    return g;
  }
};

// Chunks (gridDim.y) of a reduction whose grid is `width` blocks wide: about 4 blocks
// per SM in all, at most `most`, within [1, 65535].
inline int reduce_chunks(int width, int64_t most) {
  const int64_t want = (int64_t(sm_count()) * 4 + width - 1) / width;
  int64_t k = want < most ? want : most;
  if (k < 1) k = 1;
  if (k > 65535) k = 65535;
  return static_cast<int>(k);
}

// Chunks of a vector-path reduction over `items` items: each thread owning at least 2.
inline int vec_reduce_chunks(const VecGrid& g, int64_t items) {
  return reduce_chunks(g.gx, (items + 2 * int64_t(g.by) - 1) / (2 * int64_t(g.by)));
}

// Parameters of one vector launch (the conv geometry lives in the source).
struct VecArgs {
  int C, act;
  const float* scale;  // null: no BatchNorm (y = act(conv))
  const float* shift;
  const float* mean;
  const float* coef;   // (3, C): BnBwdCoef a, b, d
  const void* residual;
  void* y;
  const void* dy;
  void* dc;
  float* part;
};

// ---------------------------------------------------------------- depthwise strip math

constexpr int kDwR = 4;  // depthwise output columns per strip (dw_vec.cu, dw_tile.cu)

// wrow[j] = w(i, j) for the V channels from c0, weights transposed to (K*K, C).
template <int K, typename T, int V>
__device__ __forceinline__ void load_wrow(const T* wt, int C, int c0, int i,
                                          float (&wrow)[K][V]) {
#pragma unroll
  for (int j = 0; j < K; ++j) vload<V>(wt + int64_t(i * K + j) * C + c0, wrow[j]);
}

// out[r] += w(i, j) * x for the strip's outputs r that read strip input column col
// of kernel row i (j = col - r*S), x that column's values, wrow row i's weights.
// Every depthwise strip conv (DwStrip, dw_tile.cu's tile kernel) accumulates
// through this, kernel rows then columns ascending, so that they agree bit for bit.
template <int K, int S, int R, int V>
__device__ __forceinline__ void strip_fma(int col, const float (&wrow)[K][V],
                                          const float (&xv)[V], float (&out)[R][V]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int j = col - r * S;
    if (j < 0 || j >= K) continue;
#pragma unroll
    for (int v = 0; v < V; ++v) out[r][v] += wrow[j][v] * xv[v];
  }
}

// dw[i*K + j] += g[r] * x for the strip's pixels r < nv that read strip input column
// col of kernel row i (j = col - r*S), x that column's values. Pixels past the strip's
// end are skipped, not multiplied by zero: the x columns only they read may hold inf.
// Both depthwise weight gradients (DwStrip::accumulate_taps, dw_tile.cu's tile kernel)
// accumulate through this.
template <int K, int S, int R, int V>
__device__ __forceinline__ void taps_fma(int i, int col, int nv, const float (&g)[R][V],
                                         const float (&xv)[V], float (&dw)[K * K][V]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int j = col - r * S;
    if (j < 0 || j >= K || r >= nv) continue;
#pragma unroll
    for (int v = 0; v < V; ++v) dw[i * K + j][v] += g[r][v] * xv[v];
  }
}

// ---------------------------------------------------------------- sources

// The depthwise conv of a strip of R output columns, from x (N, Hin, Win, C)
// and weights transposed to (K*K, C): out(n, ho, wo) = sum over taps (i, j)
// of x(n, ho*S - pad + i, wo*S - pad + j) * w(i, j), zero outside x.
// The items of the depthwise sources: strips of R adjacent columns of an output
// (N, Hout, Wout, C) computed from an input (N, Hin, Win, C) of T with the weights
// (K*K, C); item = (n * Hout + row) * wblocks + strip.
template <typename T, int R>
struct RowStrips {
  static constexpr int V = Vec<T>::V, kR = R;
  const T* in;
  const T* wt;
  int C, Hin, Win, Hout, Wout, pad, wblocks, items;

  __host__ RowStrips(const void* in_, const void* wt_, int N, int C_, int Hin_, int Win_,
                     int Hout_, int Wout_, int pad_)
      : in(static_cast<const T*>(in_)), wt(static_cast<const T*>(wt_)), C(C_), Hin(Hin_),
        Win(Win_), Hout(Hout_), Wout(Wout_), pad(pad_) {
    wblocks = (Wout + R - 1) / R;
    items = N * Hout * wblocks;
  }
  __device__ __forceinline__ int nvalid(int item) const {
    const int wo0 = (item % wblocks) * R;
    return Wout - wo0 < R ? Wout - wo0 : R;
  }
  // flat (n, ho, wo) index of the strip's first pixel
  __device__ __forceinline__ int64_t pix0(int item) const {
    const int row = item / wblocks;  // n * Hout + ho
    return int64_t(row) * Wout + (item % wblocks) * R;
  }
};

template <typename T, int K, int S, int R>
struct DwStrip : RowStrips<T, R> {
  using Base = RowStrips<T, R>;
  using Base::Base;
  using Base::V;
  static constexpr int kTaps = K * K, kCols = (R - 1) * S + K;

  // For every kernel row i inside x: row(i), then col(i, col, x values) for every
  // strip input column col inside x (taps in the padding contribute zero).
  template <typename RowF, typename ColF>
  __device__ __forceinline__ void for_inputs(int item, int c0, RowF&& row_fn,
                                             ColF&& col_fn) const {
    const int row = item / this->wblocks, wb = item % this->wblocks;
    const int ho = row % this->Hout, n = row / this->Hout;
    const int Hin = this->Hin, Win = this->Win, C = this->C;
    const int hi0 = ho * S - this->pad, wi0 = wb * R * S - this->pad;
    const T* xb = this->in + int64_t(n) * Hin * Win * C + c0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int hi = hi0 + i;
      if (hi < 0 || hi >= Hin) continue;
      row_fn(i);
      const T* xr = xb + int64_t(hi) * Win * C;
#pragma unroll
      for (int col = 0; col < kCols; ++col) {
        const int wi = wi0 + col;
        if (wi < 0 || wi >= Win) continue;
        float xv[V];
        vload<V>(xr + int64_t(wi) * C, xv);
        col_fn(i, col, xv);
      }
    }
  }

  __device__ __forceinline__ void conv(int item, int c0, float (&out)[R][V]) const {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < V; ++v) out[r][v] = 0.f;
    float wrow[K][V];  // the weights of kernel row i
    for_inputs(
        item, c0, [&](int i) { load_wrow<K>(this->wt, this->C, c0, i, wrow); },
        [&](int, int col, const float (&xv)[V]) { strip_fma<K, S>(col, wrow, xv, out); });
  }

  // dw[i*K + j][v] += sum over the strip's first nv pixels r of g[r][v] * x(tap (i, j)
  // of r) (taps_fma).
  __device__ __forceinline__ void accumulate_taps(int item, int c0, int nv,
                                                  const float (&g)[R][V],
                                                  float (&dw)[kTaps][V]) const {
    for_inputs(
        item, c0, [](int) {},
        [&](int i, int col, const float (&xv)[V]) { taps_fma<K, S>(i, col, nv, g, xv, dw); });
  }
};

// The depthwise conv's input gradient for a strip of R input columns, as a gather
// over the output gradient dc (N, Hout, Wout, C) with the weights (K*K, C):
// dx(n, h, w) = sum over taps (i, j) with h + pad - i = ho*S, w + pad - j = wo*S
// inside dc of dc(n, ho, wo) * w(i, j). Any stride; the forward-shaped DwStrip
// with reversed taps is cheaper at stride 1. Hin/Win: dc's size; Hout/Wout: dx's.
template <typename T, int K, int S, int R>
struct DwGatherStrip : RowStrips<T, R> {
  using Base = RowStrips<T, R>;
  using Base::Base;
  using Base::V;
  static constexpr int kTaps = 0;

  __device__ __forceinline__ void conv(int item, int c0, float (&out)[R][V]) const {
    const int Hin = this->Hin, Win = this->Win, C = this->C, pad = this->pad;
    const int row = item / this->wblocks, w0 = (item % this->wblocks) * R;
    const int h = row % this->Hout, n = row / this->Hout;
    const T* db = this->in + int64_t(n) * Hin * Win * C + c0;
    const T* wt = this->wt;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < V; ++v) out[r][v] = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int hn = h + pad - i;
      if (hn < 0 || hn % S != 0 || hn / S >= Hin) continue;
      const T* dr = db + int64_t(hn / S) * Win * C;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        float wv[V];
        bool loaded = false;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int wn = w0 + r + pad - j;
          if (wn < 0 || wn % S != 0 || wn / S >= Win) continue;
          if (!loaded) {
            vload<V>(wt + int64_t(i * K + j) * C + c0, wv);
            loaded = true;
          }
          float dv[V];
          vload<V>(dr + int64_t(wn / S) * C, dv);
#pragma unroll
          for (int v = 0; v < V; ++v) out[r][v] += wv[v] * dv[v];
        }
      }
    }
  }
};

// A source with its weight-gradient taps hidden: vec_bwd_dc_kernel then writes dc
// only (the depthwise backward's split variant, vec_dweight_kernel does the taps).
template <class Src>
struct NoTaps : Src {
  static constexpr int kTaps = 0;
  __host__ explicit NoTaps(const Src& s) : Src(s) {}
};

// The pointwise conv output read from the GEMM result (P, C): in T, or in float
// when `acc` (the backward's recomputed conv).
template <typename T, int R>
struct BufStrip {
  static constexpr int V = Vec<T>::V, kR = R, kTaps = 0;
  const void* buf;
  bool acc;
  int C, P, items;

  __host__ BufStrip(const void* buf_, bool acc_, int C_, int64_t P_)
      : buf(buf_), acc(acc_), C(C_), P(static_cast<int>(P_)) {
    items = static_cast<int>((P_ + R - 1) / R);
  }
  __device__ __forceinline__ int nvalid(int item) const {
    return P - item * R < R ? P - item * R : R;
  }
  __device__ __forceinline__ int64_t pix0(int item) const { return int64_t(item) * R; }
  __device__ __forceinline__ void conv(int item, int c0, float (&out)[R][V]) const {
    const int nv = nvalid(item);
    const int64_t base = pix0(item) * C + c0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < nv) {
        if (acc) vload<V>(static_cast<const float*>(buf) + base + int64_t(r) * C, out[r]);
        else vload<V>(static_cast<const T*>(buf) + base + int64_t(r) * C, out[r]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) out[r][v] = 0.f;
      }
    }
  }
};

// ---------------------------------------------------------------- kernels

// Sum of v[0..V) over ty for each tx of a bx x by arrangement of the block's threads
// (thread (tx, ty) at smem slot ty * bx + tx), returned to every thread; smem holds
// bx * by * V floats. Fixed order: deterministic. Every thread of the block calls it.
template <int V>
__device__ __forceinline__ void block_sum_vec(int tx, int ty, int bx, int by, float (&v)[V],
                                              float* smem) {
  float* mine = smem + (ty * bx + tx) * V;
#pragma unroll
  for (int k = 0; k < V; ++k) mine[k] = v[k];
  __syncthreads();
  int s = 1;
  while (s < by) s <<= 1;
  for (s >>= 1; s > 0; s >>= 1) {
    if (ty < s && ty + s < by) {
      const float* other = smem + ((ty + s) * bx + tx) * V;
#pragma unroll
      for (int k = 0; k < V; ++k) mine[k] += other[k];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = smem[tx * V + k];
  __syncthreads();
}

// block_sum_vec over the block's own (threadIdx.x, threadIdx.y).
template <int V>
__device__ __forceinline__ void block_sum_y_vec(float (&v)[V], float* smem) {
  block_sum_vec<V>(threadIdx.x, threadIdx.y, blockDim.x, blockDim.y, v, smem);
}

// The weight-gradient taps dw[tap][0..V) of every thread summed over ty (block_sum_vec)
// and stored by the threads with ty == 0 and `store` as chunk `chunk`'s partials of
// channels c0..c0+V, layout [chunk][tap][C] (dweight_finalize_kernel sums them).
template <int kTaps, int V>
__device__ __forceinline__ void store_taps_partial(int tx, int ty, int bx, int by,
                                                   float (&dw)[kTaps][V], float* smem,
                                                   float* part, int C, int chunk, int c0,
                                                   bool store) {
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
    block_sum_vec<V>(tx, ty, bx, by, dw[t], smem);
    if (ty == 0 && store) {
      float* pt = part + (int64_t(chunk) * kTaps + t) * C;
#pragma unroll
      for (int v = 0; v < V; ++v) pt[c0 + v] = dw[t][v];
    }
  }
}

// The apply epilogue of the first nv pixels of a strip of R (pixel r at element
// offset base + r*C) for the V channels whose scale and shift are sc, sh:
// y = act(c * scale + shift) (+ residual); no BN and no activation when a.scale is
// null (sc, sh unused). Shared by vec_apply_kernel and dw_tile.cu's tile kernel.
template <typename T, int R, int V>
__device__ __forceinline__ void apply_store(const VecArgs& a, const float (&sc)[V],
                                            const float (&sh)[V], int64_t base, int nv,
                                            const float (&c)[R][V]) {
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);  // may alias the pointwise conv buffer: same elements, same thread
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nv) continue;
    float o[V];
#pragma unroll
    for (int v = 0; v < V; ++v)
      o[v] = a.scale != nullptr ? act_fwd<float>(a.act, c[r][v] * sc[v] + sh[v]) : c[r][v];
    if (res != nullptr) {
      float rv[V];
      vload<V>(res + base + int64_t(r) * a.C, rv);
#pragma unroll
      for (int v = 0; v < V; ++v) o[v] += rv[v];
    }
    vstore<V>(y + base + int64_t(r) * a.C, o);
  }
}

// y = act(conv * scale + shift) (+ residual); no BN when a.scale is null.
// kMinBlocks > 1 caps the registers so that many blocks fit on an SM (occupancy).
template <typename T, class Src, int kMinBlocks = 1>
__global__ void __launch_bounds__(kVecThreads, kMinBlocks)
    vec_apply_kernel(const VecArgs a, const Src src) {
  constexpr int V = Src::V, R = Src::kR;
  const int cg = blockIdx.x * blockDim.x + threadIdx.x;
  if (cg * V >= a.C) return;  // no block-level sync in this kernel
  const int c0 = cg * V;
  float sc[V], sh[V];
  if (a.scale != nullptr) {
    vload<V>(a.scale + c0, sc);
    vload<V>(a.shift + c0, sh);
  }
  for (int item = blockIdx.y * blockDim.y + threadIdx.y; item < src.items;
       item += gridDim.y * blockDim.y) {
    float c[R][V];
    src.conv(item, c0, c);
    const int nv = src.nvalid(item);
    const int64_t base = src.pix0(item) * a.C + c0;
    apply_store<T>(a, sc, sh, base, nv, c);
  }
}

// Chan's merge of a strip's first nv >= 1 values c[0..nv) into a thread's running
// (mean, m2, n) per channel: the strip's own mean and M2 first, then one merge (one
// division per strip). Values past nv are selected out, not multiplied by zero: the
// conv there may have read inf from columns no output uses.
template <int R, int V>
__device__ __forceinline__ void welford_strip(const float (&c)[R][V], int nv, float (&mean)[V],
                                              float (&m2)[V], float& n) {
  const float inv = 1.f / float(nv), tot = n + float(nv), w = float(nv) / tot;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) s += r < nv ? c[r][v] : 0.f;
    const float m = s * inv;
    float q = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) q += r < nv ? (c[r][v] - m) * (c[r][v] - m) : 0.f;
    const float d = m - mean[v];
    mean[v] += d * w;
    m2[v] += q + d * d * n * w;
  }
  n = tot;
}

// The (mean, m2, n) of every thread (tx, ty) of a bx x by arrangement merged over ty
// for each tx, in a fixed tree order (deterministic); the result is returned to the
// threads with ty == 0. smem: bx * by * (2V + 1) floats, thread (tx, ty) at slot
// ty * bx + tx of the three arrays mean [slot][V], m2 [slot][V], n [slot]. No
// barrier after the last read: the caller syncs before reusing smem.
template <int V>
__device__ __forceinline__ void block_welford_y(int tx, int ty, int bx, int by, float (&mean)[V],
                                                float (&m2)[V], float& n, float* smem) {
  float* s_mean = smem;
  float* s_m2 = smem + bx * by * V;
  float* s_n = smem + 2 * bx * by * V;
  const int me = ty * bx + tx;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    s_mean[me * V + v] = mean[v];
    s_m2[me * V + v] = m2[v];
  }
  s_n[me] = n;
  __syncthreads();
  int s = 1;
  while (s < by) s <<= 1;
  for (s >>= 1; s > 0; s >>= 1) {
    if (ty < s && ty + s < by) {
      const int o = (ty + s) * bx + tx;
      const float on = s_n[o], mn = s_n[me];
      if (on > 0.f) {
        const float tot = mn + on, w = on / tot;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float d = s_mean[o * V + v] - s_mean[me * V + v];
          s_mean[me * V + v] += d * w;
          s_m2[me * V + v] += s_m2[o * V + v] + d * d * mn * w;
        }
        s_n[me] = tot;
      }
    }
    __syncthreads();
  }
  if (ty != 0) return;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    mean[v] = s_mean[tx * V + v];
    m2[v] = s_m2[tx * V + v];
  }
  n = s_n[tx];
}

// One chunk's statistics partial of channels c0..c0+V, in epilogue.cuh's layout
// [chunk][mean, m2, n][C] (stats_finalize_kernel merges them).
template <int V>
__device__ __forceinline__ void store_stats_partial(float* part, int C, int chunk, int c0,
                                                    const float (&mean)[V], const float (&m2)[V],
                                                    float n) {
  float* pk = part + int64_t(chunk) * 3 * C;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    pk[c0 + v] = mean[v];
    pk[C + c0 + v] = m2[v];
    pk[2 * C + c0 + v] = n;
  }
}

// Batch statistics: per-thread Welford over its items (each strip merged as one
// (mean, M2, count) block), merged over threadIdx.y, one partial per chunk.
template <typename T, class Src>
__global__ void __launch_bounds__(kVecThreads) vec_stats_kernel(const VecArgs a, const Src src) {
  constexpr int V = Src::V, R = Src::kR;
  __shared__ float smem[kVecThreads * (2 * V + 1)];
  const int cg = blockIdx.x * blockDim.x + threadIdx.x, c0 = cg * V;
  float mean[V], m2[V], n = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.f;
  if (c0 < a.C) {
    for (int item = blockIdx.y * blockDim.y + threadIdx.y; item < src.items;
         item += gridDim.y * blockDim.y) {
      float c[R][V];
      src.conv(item, c0, c);
      welford_strip(c, src.nvalid(item), mean, m2, n);
    }
  }
  block_welford_y<V>(threadIdx.x, threadIdx.y, blockDim.x, blockDim.y, mean, m2, n, smem);
  if (threadIdx.y == 0 && c0 < a.C) store_stats_partial(a.part, a.C, blockIdx.y, c0, mean, m2, n);
}

// dz = act'(conv*scale + shift) * dy at one pixel, d its dy values.
template <int V>
__device__ __forceinline__ void pixel_dz(int act, const float (&c)[V], const float (&sc)[V],
                                         const float (&sh)[V], const float (&d)[V],
                                         float (&dz)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) dz[v] = act_bwd<float>(act, c[v] * sc[v] + sh[v], d[v]);
}

// dz = act'(conv*scale + shift) * dy for a strip (pixel_dz); zero past the strip's end.
template <typename T, int R, int V>
__device__ __forceinline__ void strip_dz(const VecArgs& a, int64_t base, int nv,
                                         const float (&c)[R][V], const float (&sc)[V],
                                         const float (&sh)[V], float (&dz)[R][V]) {
  const T* dy = static_cast<const T*>(a.dy);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < nv) {
      float d[V];
      vload<V>(dy + base + int64_t(r) * a.C, d);
      pixel_dz(a.act, c[r], sc, sh, d, dz[r]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) dz[r][v] = 0.f;
    }
  }
}

// s_dz += dz and s_dzx += dz * (conv - mean) over a strip's first nv pixels (pixel r
// at element offset base + r*C), dz = act'(conv*scale + shift) * dy (strip_dz). Shared
// by vec_bwd_sums_kernel and dw_tile.cu's tile kernel.
template <typename T, int R, int V>
__device__ __forceinline__ void sums_strip(const VecArgs& a, const float (&sc)[V],
                                           const float (&sh)[V], const float (&mean)[V],
                                           int64_t base, int nv, const float (&c)[R][V],
                                           float (&s_dz)[V], float (&s_dzx)[V]) {
  float dz[R][V];
  strip_dz<T>(a, base, nv, c, sc, sh, dz);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nv) continue;  // the conv there may read inf from columns no output uses
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s_dz[v] += dz[r][v];
      s_dzx[v] += dz[r][v] * (c[r][v] - mean[v]);
    }
  }
}

// One chunk's backward-sums partial of channels c0..c0+V, layout [chunk][2][C]
// (bwd_finalize_kernel merges them).
template <int V>
__device__ __forceinline__ void store_sums_partial(float* part, int C, int chunk, int c0,
                                                   const float (&s_dz)[V],
                                                   const float (&s_dzx)[V]) {
  float* pk = part + int64_t(chunk) * 2 * C;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    pk[c0 + v] = s_dz[v];
    pk[C + c0 + v] = s_dzx[v];
  }
}

// Per channel sum(dz) and sum(dz * (conv - mean)): partials [chunk][2][C].
template <typename T, class Src>
__global__ void __launch_bounds__(kVecThreads) vec_bwd_sums_kernel(const VecArgs a, const Src src) {
  constexpr int V = Src::V, R = Src::kR;
  __shared__ float smem[kVecThreads * V];
  const int cg = blockIdx.x * blockDim.x + threadIdx.x, c0 = cg * V;
  float s_dz[V], s_dzx[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s_dz[v] = s_dzx[v] = 0.f;
  if (c0 < a.C) {
    float sc[V], sh[V], mean[V];
    vload<V>(a.scale + c0, sc);
    vload<V>(a.shift + c0, sh);
    vload<V>(a.mean + c0, mean);
    for (int item = blockIdx.y * blockDim.y + threadIdx.y; item < src.items;
         item += gridDim.y * blockDim.y) {
      float c[R][V];
      src.conv(item, c0, c);
      sums_strip<T>(a, sc, sh, mean, src.pix0(item) * a.C + c0, src.nvalid(item), c, s_dz,
                    s_dzx);
    }
  }
  block_sum_y_vec<V>(s_dz, smem);
  block_sum_y_vec<V>(s_dzx, smem);
  if (threadIdx.y == 0 && c0 < a.C) store_sums_partial(a.part, a.C, blockIdx.y, c0, s_dz, s_dzx);
}

// The per-channel factors of the dc pass for V channels from c0: BN scale and shift
// (for dz) and BnBwdCoef's a, b, d (coef rows).
template <int V>
struct DcCoef {
  float sc[V], sh[V], ka[V], kb[V], kd[V];
  __device__ __forceinline__ void load(const VecArgs& a, int c0) {
    vload<V>(a.scale + c0, sc);
    vload<V>(a.shift + c0, sh);
    vload<V>(a.coef + c0, ka);
    vload<V>(a.coef + a.C + c0, kb);
    vload<V>(a.coef + 2 * a.C + c0, kd);
  }
};

// dc = a*dz + b*conv + d of one pixel's V channels, in place of dz.
template <int V>
__device__ __forceinline__ void pixel_dc(const DcCoef<V>& k, const float (&c)[V], float (&g)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) g[v] = k.ka[v] * g[v] + k.kb[v] * c[v] + k.kd[v];
}

// dc (pixel_dc) for a strip's first nv pixels (pixel r at element offset base + r*C),
// stored to a.dc and returned in g (zero past nv). Shared by vec_bwd_dc_kernel and
// dw_tile.cu's one-tile dc kernel.
template <typename T, int R, int V>
__device__ __forceinline__ void dc_store(const VecArgs& a, const DcCoef<V>& k, int64_t base,
                                         int nv, const float (&c)[R][V], float (&g)[R][V]) {
  strip_dz<T>(a, base, nv, c, k.sc, k.sh, g);
  T* dc = static_cast<T*>(a.dc);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nv) continue;  // g stays zero there
    pixel_dc(k, c[r], g[r]);
    vstore<V>(dc + base + int64_t(r) * a.C, g[r]);
  }
}

// dc_store's values, each pixel's passed to sink(r, dc values) after its store, with
// fewer registers (dw_tile_dc_dweight_kernel is at its cap): the strip's dy vectors are
// loaded first as raw 16-byte words (R * 4 registers, not dc_store's R * V floats of
// dz; loaded up front because a.dy and a.dc may alias as far as the compiler knows, so
// a load after a store could not be hoisted above it), then one pixel at a time, so that
// conv(r) and dc(r) die with it.
template <typename T, int R, int V, typename Sink>
__device__ __forceinline__ void dc_store_each(const VecArgs& a, const DcCoef<V>& k,
                                              int64_t base, int nv, const float (&c)[R][V],
                                              Sink&& sink) {
  static_assert(V * sizeof(T) == 16, "one 16-byte word per pixel");
  const T* dy = static_cast<const T*>(a.dy);
  T* dc = static_cast<T*>(a.dc);
  uint4 raw[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r < nv) raw[r] = *reinterpret_cast<const uint4*>(dy + base + int64_t(r) * a.C);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= nv) continue;
    float g[V];
    vload<V>(reinterpret_cast<const T*>(&raw[r]), g);
    pixel_dz(a.act, c[r], k.sc, k.sh, g, g);
    pixel_dc(k, c[r], g);
    vstore<V>(dc + base + int64_t(r) * a.C, g);
    sink(r, g);
  }
}

// dc = a*dz + b*conv + d, written once; a source with taps also writes its
// weight-gradient partials [chunk][tap][C].
template <typename T, class Src>
__global__ void __launch_bounds__(kVecThreads) vec_bwd_dc_kernel(const VecArgs a, const Src src) {
  constexpr int V = Src::V, R = Src::kR, kTaps = Src::kTaps;
  __shared__ float smem[kTaps > 0 ? kVecThreads * V : 1];
  const int cg = blockIdx.x * blockDim.x + threadIdx.x, c0 = cg * V;
  float dw[kTaps > 0 ? kTaps : 1][V];
#pragma unroll
  for (int t = 0; t < (kTaps > 0 ? kTaps : 1); ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) dw[t][v] = 0.f;
  if (c0 < a.C) {
    DcCoef<V> k;
    k.load(a, c0);
    for (int item = blockIdx.y * blockDim.y + threadIdx.y; item < src.items;
         item += gridDim.y * blockDim.y) {
      float c[R][V], g[R][V];
      src.conv(item, c0, c);
      const int nv = src.nvalid(item);
      dc_store<T>(a, k, src.pix0(item) * a.C + c0, nv, c, g);
      if constexpr (kTaps > 0) src.accumulate_taps(item, c0, nv, g, dw);
    }
  }
  if constexpr (kTaps > 0)
    store_taps_partial<kTaps>(threadIdx.x, threadIdx.y, blockDim.x, blockDim.y, dw, smem, a.part,
                              a.C, blockIdx.y, c0, c0 < a.C);
}

// g[r] = dc of a strip's first nv pixels (pixel r at element offset base + r*C), zero
// past nv.
template <typename T, int R, int V>
__device__ __forceinline__ void load_dc_strip(const VecArgs& a, int64_t base, int nv,
                                              float (&g)[R][V]) {
  const T* dc = static_cast<const T*>(a.dc);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < nv) {
      vload<V>(dc + base + int64_t(r) * a.C, g[r]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) g[r][v] = 0.f;
    }
  }
}

// The depthwise weight gradient from the stored dc: partials [chunk][tap][C] of
// sum over pixels of dc * x(tap) (the split variant of vec_bwd_dc_kernel's taps:
// fewer registers per thread, one more read of dc and x).
template <typename T, class Src>
__global__ void __launch_bounds__(kVecThreads) vec_dweight_kernel(const VecArgs a, const Src src) {
  constexpr int V = Src::V, R = Src::kR, kTaps = Src::kTaps;
  __shared__ float smem[kVecThreads * V];
  const int cg = blockIdx.x * blockDim.x + threadIdx.x, c0 = cg * V;
  float dw[kTaps][V];
#pragma unroll
  for (int t = 0; t < kTaps; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) dw[t][v] = 0.f;
  if (c0 < a.C) {
    for (int item = blockIdx.y * blockDim.y + threadIdx.y; item < src.items;
         item += gridDim.y * blockDim.y) {
      const int nv = src.nvalid(item);
      float g[R][V];
      load_dc_strip<T>(a, src.pix0(item) * a.C + c0, nv, g);
      src.accumulate_taps(item, c0, nv, g, dw);
    }
  }
  store_taps_partial<kTaps>(threadIdx.x, threadIdx.y, blockDim.x, blockDim.y, dw, smem, a.part,
                            a.C, blockIdx.y, c0, c0 < a.C);
}

// ---------------------------------------------------------------- launch

// Every pointer the vector kernels touch is 16-byte aligned and C % V == 0.
inline bool vec_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs)
    if (q != nullptr && (reinterpret_cast<uintptr_t>(q) & 15) != 0) return false;
  return true;
}

inline VecArgs vec_args(const ConvLaunch& p) {
  VecArgs a{};
  a.C = p.C;
  a.act = p.act;
  a.scale = static_cast<const float*>(p.scale);
  a.shift = static_cast<const float*>(p.shift);
  a.mean = static_cast<const float*>(p.mean);
  a.coef = static_cast<const float*>(p.coef);
  a.residual = p.residual;
  a.y = p.y;
  a.dy = p.dy;
  a.dc = p.dc;
  a.part = static_cast<float*>(p.part);
  return a;
}

// Tuning knobs, read at every launch so that one process can compare the variants
// (python -m bench.sweep); the defaults are what GPU run 3 measured best on the H200:
// - MOBILENET_EXT_VEC_ITEMS: items per thread of the apply kernels (default 1; 2 and 4
//   were within 3%).
// - MOBILENET_EXT_VEC_OCC: 3 (default) runs the depthwise K=3 apply kernels capped at
//   80 registers, 3 blocks per SM (they spill ~216 B, and still measured 6-10% faster
//   than uncapped at 117 registers, 2 blocks per SM); 1 turns the cap off.
// - MOBILENET_EXT_VEC_R=2: depthwise K=3 strips of 2 output columns (default 4; 2
//   measured 4-18% slower).
// - MOBILENET_EXT_DW_SPLIT: 1 = depthwise backward dc and dweight in two kernels
//   (default at stride 1: 6-7% faster), 0 = one kernel (default at stride 2, where the
//   split measured 6% slower).
// - MOBILENET_EXT_DW_TILE=1: the depthwise stages through a shared-memory input tile
//   per block (dw_tile.cu): apply, statistics, backward sums, and dc with the weight
//   gradient in one kernel, for every K and stride; dx at stride 1; it overrides the
//   other depthwise knobs where it applies. Default 0 until measured on a GPU.
// - MOBILENET_EXT_DW_TILE_SPLIT=1 (with DW_TILE=1): at K=3, dc and the weight gradient
//   through the tile in two kernels instead (the comparison for the one-kernel
//   variant; default 0).
inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::atoi(v);
}

// `items_per_thread` items per thread: no loop beyond that unless the grid's 65535
// rows run out.
template <typename Src>
dim3 vec_apply_grid(const VecGrid& g, const Src& src) {
  const int items = env_int("MOBILENET_EXT_VEC_ITEMS", 1);
  const int64_t per_row = int64_t(g.by) * (items > 0 ? items : 1);
  const int64_t rows = (int64_t(src.items) + per_row - 1) / per_row;
  return dim3(g.gx, static_cast<unsigned>(rows < 1 ? 1 : (rows > 65535 ? 65535 : rows)));
}

// The statistics stage's second kernel: p.chunks partials per channel -> mean, invstd,
// scale, shift (after vec_stats_kernel or dw_tile.cu's tile statistics kernel).
inline cudaError_t vec_stats_finalize(const ConvLaunch& p, cudaStream_t stream) {
  stats_finalize_kernel<float><<<finalize_grid(p.C), finalize_block(), 0, stream>>>(p);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

// The apply kernel over src (y = a.y), for p.C channels.
template <typename T, class Src>
cudaError_t vec_launch_apply(const ConvLaunch& p, const VecArgs& a, const Src& src,
                             cudaStream_t stream) {
  const VecGrid g = VecGrid::make(p.C, Vec<T>::V);
  vec_apply_kernel<T><<<vec_apply_grid(g, src), dim3(g.bx, g.by), 0, stream>>>(a, src);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

// The dc pass over src (with its weight-gradient taps when it has any): p.chunks
// chunks. Not in vec_launch_stage's switch, so that only the sources whose taps fit in
// registers instantiate it.
template <typename T, class Src>
cudaError_t vec_launch_dc(const ConvLaunch& p, const VecArgs& a, const Src& src,
                          cudaStream_t stream) {
  const VecGrid g = VecGrid::make(p.C, Vec<T>::V);
  vec_bwd_dc_kernel<T><<<dim3(g.gx, p.chunks), dim3(g.bx, g.by), 0, stream>>>(a, src);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

// The stages every source launches alike: apply, statistics + their finalize,
// backward sums (the depthwise op's own variants are dispatched before, in
// dw_vec.cu; dc is vec_launch_dc). a: the stage's arguments; grids from p.C and
// p.chunks.
template <typename T, class Src>
cudaError_t vec_launch_stage(VecStage stage, const ConvLaunch& p, const VecArgs& a,
                             const Src& src, cudaStream_t stream) {
  const VecGrid g = VecGrid::make(p.C, Vec<T>::V);
  const dim3 block(g.bx, g.by), reduce_grid(g.gx, p.chunks);
  switch (stage) {
    case kVecApply:
      return vec_launch_apply<T>(p, a, src, stream);
    case kVecStats:
      vec_stats_kernel<T><<<reduce_grid, block, 0, stream>>>(a, src);
      MBX_LAUNCH_CHECK();
      return vec_stats_finalize(p, stream);
    case kVecBwdSums:
      vec_bwd_sums_kernel<T><<<reduce_grid, block, 0, stream>>>(a, src);
      break;
    default:
      return cudaErrorNotSupported;
  }
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace
}  // namespace mbx
