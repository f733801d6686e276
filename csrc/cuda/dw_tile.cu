// The depthwise stages of the vector path with each block's input tile staged
// through shared memory: the variants behind MOBILENET_EXT_DW_TILE=1 (dw_vec.cu), for
// the vector path's geometries (channels_last, C % V == 0, 16-byte aligned tensors).
// Kernels of one tile per block: apply (y = act(conv * scale + shift), vec_apply_kernel's
// semantics; also dx at stride 1, the conv of dc with the taps reversed) and dc (the
// backward's dc = a*dz + b*conv + d, vec_bwd_dc_kernel without taps). Kernels of a
// grid-stride loop of tiles per chunk, writing the strip kernels' partials: batch
// statistics (vec_stats_kernel), backward sums (vec_bwd_sums_kernel), the weight
// gradient from the stored dc (vec_dweight_kernel), and dc with the weight gradient
// from a second shared buffer (dw_tile_dc_dweight_kernel: every K, the default dc
// stage). All of them stage the tile alike (stage_tile) and walk a strip's input
// window in it alike (tile_for_inputs).
//
// Why: vec_apply_kernel loads each thread's (R-1)*S + K input columns per kernel
// row straight from global memory into registers, so the bytes in flight per SM
// are bounded by registers (GPU run 3: the register-capped variant with more warps
// was the fastest although it spills). Here every thread issues its share of the
// block's input tile as 16-byte cp.async copies, which hold no registers, waits
// once, and computes its strip from shared memory.
//
// Block: TH output rows x TW = (32 / CG) * R output columns x CG channel groups
// (a group: V = 16 / sizeof(T) channels, one 16-byte vector) of one image.
// Thread t: channel group t % CG, strip (t % 32) / CG of R adjacent output
// columns, output row t / 32; so a warp is one tile row, its consecutive lanes
// take consecutive channel groups, then consecutive strips (16-byte stores of
// adjacent channels, then of adjacent pixels). CG is picked per launch from
// {2, 4, 8, 16} for the fewest blocks (small images take few strips per row and
// many groups; see pick_tile); TH and the occupancy are per (K, S) (TileShape).
//
// Shared memory, in 16-byte units: input tile row rr (image row hi0 + rr),
// column cc (image column wi0 + cc), group g at
//   rr * pitch + cc * CG + (cc / (R*S)) * skew + g,
// zero where the pixel lies outside the image (cp.async's zero fill: the conv then
// reads every tap without a bounds check; tile_for_inputs). skew = CG for CG < 8,
// else 0: a warp's LDS.128 of one strip column reads, for strip s and group g, unit
// s * (R*S*CG + skew) + g + const. Without
// the skew the strip stride R*S*CG is a multiple of 8 units (128 bytes, all 32
// banks), so for CG = 2 or 4 the 32 lanes would hit only 2 or 4 of the 8 bank
// quads (4- or 2-way conflicts); with it the stride is CG mod 8 and the lanes
// spread over all 8 quads, 4 each: the minimum of 4 wavefronts per LDS.128.
// CG = 8 or 16 covers the 8 quads with the groups alone. The skew costs CG units
// per R*S columns (+25% for CG = 4 at S = 1). tests/test_cuda_emu_profile.py counts
// the wavefronts of the emulated kernel (the minimum at every CG; 4x and 2x at CG 2
// and 4 without the skew).
//
// The conv accumulates as DwStrip::conv (load_wrow, strip_fma: kernel rows
// ascending, input columns ascending, fp32 FMA out += w * x) but adds w * 0 for the
// taps outside the image that DwStrip skips, and the epilogues are the strip
// kernels' (apply_store, dc_store), so with finite weights y, dx and dc equal the
// strip kernels' (tile_for_inputs says when a zero's sign may differ). The reductions
// (statistics, backward sums, weight-gradient taps) add the same strip values grouped
// in another order (see dw_tile_stats_kernel).
#include <climits>
#include <type_traits>

#include "vec_tile.cuh"

namespace mbx {
namespace {

// Output rows (= warps) per block and the occupancy asked of __launch_bounds__, per
// (K, S). The rows keep the input tile, (TH-1)*S + K rows of (TW-1)*S + K columns x
// CG groups (about 128*S columns x groups, plus the skew), under the 48 KB of
// dynamic shared memory a launch gets without an opt-in: 8 rows at stride 1
// (22-41 KB), 4/3/2 at stride 2 for K = 3/5/7 (37-47 KB). kMinBlocks: K=3 S=1, 3
// blocks of 256 threads (80 registers: at fp16 R*V = 32 accumulators, K*V = 24
// weights and V inputs fit without spilling); stride 2, as many as the shared memory
// allows per SM (228 KB: 5, 5, 4); K=5, 7 at stride 1, 2 (a kernel row's K*V weight
// floats take them to ~100-120 registers at fp16).
template <int K, int S>
struct TileShape {
  static constexpr int kTH = S == 1 ? 8 : (K == 3 ? 4 : (K == 5 ? 3 : 2));
  static constexpr int kThreads = 32 * kTH;
  static constexpr int kMinBlocks = S == 1 ? (K == 3 ? 3 : 2) : (K == 7 ? 4 : 5);
  // The statistics kernel keeps a Welford state (2V + 1 floats) live across the conv:
  // at K=3 S=1, fp16/bf16, 101-105 registers, and capped at 80 for 3 blocks it spills
  // 80 B; 2 blocks, no spills, until a GPU run compares the two.
  static constexpr int kRedMinBlocks = S == 1 && K == 3 ? 2 : kMinBlocks;
  // The backward kernels keep more (sums: two V-float sums and the BN factors; dc: dz
  // and five V-float factors; weight gradient: K*K*V tap sums, 72 floats at K=3 fp16):
  // 128-165 registers at fp16 (ptxas, sm_90). 2 blocks of 256 threads at stride 1 (128
  // registers: no spills at K=3, 28-144 B at K=5, 7), 3 of 64-128 at stride 2 (170+).
  static constexpr int kBwdMinBlocks = S == 1 ? 2 : 3;
  static constexpr int kRows = (kTH - 1) * S + K;  // input rows of the tile
};

// The shared-memory layout of one launch's tiles (the header's formula), in
// 16-byte units.
struct TileLayout {
  int cg;     // channel groups per block; 32 / cg strips per tile row
  int cols;   // input columns per tile row: (TW - 1) * S + K
  int skew;   // units after every R*S columns
  int pitch;  // units per input row
  int colsp;  // cols rounded up to a multiple of 4: stage_tile's pixels per row
  unsigned colsp_magic;  // ceil(2^32 / colsp): q / colsp = (q * colsp_magic) >> 32
};

// Units from the start of a tile row to its column cc >= 0 (or from a strip window's
// first column, which starts a skew group, to its column cc): the header's
// cc * CG + (cc / (R*S)) * skew.
template <int S>
__host__ __device__ __forceinline__ int tile_col_unit(const TileLayout& l, int cc) {
  return cc * l.cg + int(unsigned(cc) / (kDwR * S)) * l.skew;
}

template <int K, int S>
TileLayout tile_layout(int cg) {
  TileLayout l;
  l.cg = cg;
  l.cols = (32 / cg * kDwR - 1) * S + K;
  l.skew = cg < 8 ? cg : 0;
  l.pitch = tile_col_unit<S>(l, l.cols - 1) + cg;
  l.colsp = (l.cols + 3) & ~3;
  // exact for q * (colsp_magic * colsp - 2^32) < 2^32: q < kRows * colsp < 2^11 and
  // the error term < colsp < 2^8
  l.colsp_magic = static_cast<unsigned>(((uint64_t(1) << 32) + l.colsp - 1) / l.colsp);
  return l;
}

// One launch, passed by value: the conv's input x (N, Hin, Win, C; for dx: dc) and
// its weights (K*K, C; for dx: reversed) in T (outputs are in VecArgs), the layout and
// the grid's tile counts.
template <typename T>
struct DwTile {
  const T* x;
  const T* wt;
  int C, Hin, Win, Hout, Wout, pad;
  TileLayout l;
  int cg_blocks, tiles_w, tiles_h;
};

// The CG in {2, 4, 8, 16}, at most max_cg, (and its layout) with the fewest blocks per
// image row of tiles,
// ceil(Wout / TW) * ceil(groups / CG), among those whose tile fits in 48 KB; on a
// tie the wider tile (less halo). E.g. fp16: 144@56x56 -> CG 2 (TW 64, 9 blocks),
// 32@112x112 -> CG 2 (2 x 2), 576@14x14 -> CG 8 (TW 16, 9 blocks).
template <int K, int S>
bool pick_tile(int groups, int Wout, TileLayout* best, int max_cg) {
  int64_t best_cost = -1;
  for (int cg = 2; cg <= 16 && cg <= max_cg; cg *= 2) {
    const TileLayout l = tile_layout<K, S>(cg);
    if (int64_t(TileShape<K, S>::kRows) * l.pitch * 16 > 48 * 1024) continue;
    const int tw = 32 / cg * kDwR;
    const int64_t cost = int64_t((Wout + tw - 1) / tw) * ((groups + cg - 1) / cg);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      *best = l;
    }
  }
  return best_cost >= 0;
}

// 16 bytes global -> shared, asynchronous from sm_80 (cp.async, no register
// staging); with inside false, 16 zero bytes and nothing read (cp.async's zero fill:
// src must still be a valid address). The cp.async code is also what a host
// compilation sees (no __CUDA_ARCH__): the CPU emulator of tests/cuda_emu runs it,
// with its copies landing late.
// dst: unit `unit` of the shared buffer `base` (its shared address taken once per
// buffer, not once per copy).
__device__ __forceinline__ void copy16(uint4* base, int unit, const void* src, bool inside) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(base)) + 16u * unsigned(unit);
  const int n = inside ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
#else
  base[unit] = inside ? *static_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// Every copy16 of this thread has landed (the block barrier follows).
__device__ __forceinline__ void copy16_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// This thread's place in a block (the header's thread map): channel group g (lane
// gl of the block's CG), tile row `row` (its warp), strip `strip` of that row.
struct TileThread {
  int gl, g, row, strip;
  bool active;  // g * V < C: groups past C neither load, nor compute, nor store
  __device__ __forceinline__ TileThread(int cg, int cg_block, int C, int V) {
    gl = int(threadIdx.x) % cg;
    g = cg_block * cg + gl;
    row = int(threadIdx.x) / 32;
    strip = int(threadIdx.x) % 32 / cg;
    active = g * V < C;
  }
};

// Tile `tile` = (n * tiles_h + tile row) * tiles_w + tile column of image n: its
// first output pixel (ho0, wo0) and the image pixel (hi0, wi0) at tile (0, 0).
struct TileOrigin {
  int n, ho0, wo0, hi0, wi0;
};

template <int K, int S, typename T>
__device__ __forceinline__ TileOrigin tile_origin(const DwTile<T>& t, int tile) {
  TileOrigin o;
  o.wo0 = tile % t.tiles_w * (32 / t.l.cg * kDwR);
  tile /= t.tiles_w;
  o.ho0 = tile % t.tiles_h * TileShape<K, S>::kTH;
  o.n = tile / t.tiles_h;
  o.hi0 = o.ho0 * S - t.pad;
  o.wi0 = o.wo0 * S - t.pad;
  return o;
}

// This thread's share of the tile's input copied into `tile` (the header's layout),
// waited for; the block barrier that makes the whole tile visible is the caller's.
// Tile pixel q = rr * colsp + cc (rows padded to colsp pixels, below) for q =
// threadIdx.x / CG, stepping by kThreads / CG (CG divides 32, so the thread's group
// stays g); consecutive threads copy consecutive groups, then columns: whole 16-byte
// vectors, CG of them contiguous per pixel.
template <typename T, int K, int S>
__device__ __forceinline__ void stage_tile(const DwTile<T>& t, const TileOrigin& o,
                                           const TileThread& th, uint4* tile) {
  using Shape = TileShape<K, S>;
  constexpr int V = Vec<T>::V;
  const int CG = t.l.cg, cols = t.l.cols, C = t.C;
  if (th.active) {
    const T* xg = t.x + int64_t(o.n) * t.Hin * t.Win * C + th.g * V;
    // Rows walked as if padded to colsp, a multiple of 4 pixels: a phase of 8 lanes
    // (128 bytes of shared writes) is then 8 / CG <= 4 pixels of one row and one skew
    // group (R * S >= 4 pixels), contiguous units, so conflict-free. Unpadded (rows of 66
    // pixels stepped by 128 at CG 2) phases crossed skew boundaries and row ends: 1.48x
    // the minimum wavefronts (tests/cuda_emu/memprofile.py). Per copy: the pixel's row
    // by a multiply-high, its offset in 32 bits (tile_args: an image's elements fit an
    // int), the shared address from the buffer's: 31 SASS instructions per copy, where
    // recomputing the 64-bit address took 46 (bench/sass.py, sm_90, K = 3 fp16).
    const int colsp = t.l.colsp, nq = Shape::kRows * colsp, step = Shape::kThreads / CG;
    for (int q = int(threadIdx.x) / CG; q < nq; q += step) {
      const int rr = int((uint64_t(unsigned(q)) * t.l.colsp_magic) >> 32), cc = q - rr * colsp;
      if (cc >= cols) continue;
      // pixels outside the image: zeros, so the conv reads every tap unchecked
      const int hi = o.hi0 + rr, wi = o.wi0 + cc;
      const bool inside = unsigned(hi) < unsigned(t.Hin) && unsigned(wi) < unsigned(t.Win);
      copy16(tile + th.gl, rr * t.l.pitch + tile_col_unit<S>(t.l, cc),
             xg + unsigned(inside ? (hi * t.Win + wi) * C : 0), inside);
    }
  }
  copy16_wait();
}

// For every kernel row i: row_fn(i), then col_fn(i, col, x values) for every column
// col of this thread's strip window, from the staged tile, in DwStrip::for_inputs'
// order (the window: tile row row*S, tile column strip*R*S). No bounds checks: the
// tile holds zeros where the window leaves the image (stage_tile), so a tap there
// adds w * 0, where DwStrip skips it. With finite weights that is the same sum: acc +
// (+-0) = acc bit for bit unless acc is -0, which an FFMA gives only when every
// product so far was zero and one negative underflowed (|w * x| < 2^-150); then the
// zero tap can turn -0 into +0, equal as values.
//
// kRollRows: the kernel rows as a loop, not unrolled (col_fn must then not index
// registers by i). The conv takes it: unrolled and without the bounds checks' branches
// ptxas hoists every row's loads and conversions (apply at K = 3 fp16: 256 B of
// spills under its 80-register cap, ptxas sm_90).
template <typename T, int K, int S, bool kRollRows, typename RowF, typename ColF>
__device__ __forceinline__ void tile_for_inputs(const DwTile<T>& t, const TileThread& th,
                                                const uint4* tile, RowF&& row_fn,
                                                ColF&& col_fn) {
  constexpr int V = Vec<T>::V, RS = kDwR * S, kCols = (kDwR - 1) * S + K;
  const int CG = t.l.cg, skew = t.l.skew, pitch = t.l.pitch;
  const uint4* xs = tile + th.row * S * pitch + th.strip * (RS * CG + skew) + th.gl;
#pragma unroll(kRollRows ? 1 : K)
  for (int i = 0; i < K; ++i) {
    row_fn(i);
    const uint4* xr = xs + i * pitch;
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      float xv[V];
      vload<V>(reinterpret_cast<const T*>(xr + tile_col_unit<S>(t.l, col)), xv);
      col_fn(i, col, xv);
    }
  }
}

// c = the conv of this thread's strip from the staged tile, accumulated as
// DwStrip::conv (the header).
template <typename T, int K, int S>
__device__ __forceinline__ void tile_strip_conv(const DwTile<T>& t, const TileThread& th,
                                                const uint4* tile,
                                                float (&c)[kDwR][Vec<T>::V]) {
  constexpr int V = Vec<T>::V;
#pragma unroll
  for (int r = 0; r < kDwR; ++r)
#pragma unroll
    for (int v = 0; v < V; ++v) c[r][v] = 0.f;
  float wrow[K][V];
  tile_for_inputs<T, K, S, true>(
      t, th, tile, [&](int i) { load_wrow<K>(t.wt, t.C, th.g * V, i, wrow); },
      [&](int, int col, const float (&xv)[V]) { strip_fma<K, S>(col, wrow, xv, c); });
}

// The grid-stride loop of the reduction kernels: grid (cg_blocks, chunks), blockIdx.y
// the chunk, whose block takes tiles blockIdx.y, blockIdx.y + chunks, ... (concurrent
// chunks on neighbouring tiles, the channel blocks of a tile side by side as in the
// one-tile kernels), so every chunk the host sized the workspace for writes its
// partial (zero when it got no tile). For each tile: stage it, then f(origin, ho, wo,
// nv) for this thread's strip (output row ho, first column wo, nv valid columns) when
// its group is active and the strip inside the output; every thread passes both
// barriers.
// With a second phase `then` (dw_tile_dc_dweight_kernel): then(origin) by every thread
// after every strip's f, between two more barriers' worth of ordering (it reads what f
// left in shared memory; the next tile's copies wait for it).
struct NoPhase {
  __device__ __forceinline__ void operator()(const TileOrigin&) const {}
};

template <typename T, int K, int S, typename F, typename G = NoPhase>
__device__ __forceinline__ void for_block_tiles(const DwTile<T>& t, const TileThread& th,
                                                int tiles, uint4* tile, F&& f, G&& then = G()) {
  for (int k = blockIdx.y; k < tiles; k += gridDim.y) {
    const TileOrigin o = tile_origin<K, S>(t, k);
    stage_tile<T, K, S>(t, o, th, tile);
    __syncthreads();
    const int ho = o.ho0 + th.row, wo = o.wo0 + th.strip * kDwR;
    if (th.active && ho < t.Hout && wo < t.Wout)
      f(o, ho, wo, t.Wout - wo < kDwR ? t.Wout - wo : kDwR);
    __syncthreads();  // every read of this tile done: the next copies (or the merge) reuse it
    if constexpr (!std::is_same<std::decay_t<G>, NoPhase>::value) {
      then(o);
      __syncthreads();
    }
  }
}

// Element offset of channel c0 of output pixel (n, ho, wo).
template <typename T>
__device__ __forceinline__ int64_t out_offset(const DwTile<T>& t, int n, int ho, int wo, int c0) {
  return ((int64_t(n) * t.Hout + ho) * t.Wout + wo) * t.C + c0;
}

// One block per tile and channel block: blockIdx.x = tile * cg_blocks + channel
// block, so the channel blocks of one tile run side by side (whole pixels from DRAM),
// then the neighbouring tiles (their halos hit L2). kDc false: y = apply_store(conv)
// (a.y; dx when the tile's input is dc); true: the backward's dc (dc_store, a.dc).
template <typename T, int K, int S, bool kDc>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads,
                                  kDc ? TileShape<K, S>::kBwdMinBlocks : TileShape<K, S>::kMinBlocks)
    dw_tile_apply_kernel(const VecArgs a, const DwTile<T> t) {
  constexpr int V = Vec<T>::V, R = kDwR;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, int(blockIdx.x) % t.cg_blocks, t.C, V);
  const TileOrigin o = tile_origin<K, S>(t, int(blockIdx.x) / t.cg_blocks);
  stage_tile<T, K, S>(t, o, th, tile);
  __syncthreads();

  const int ho = o.ho0 + th.row, wo = o.wo0 + th.strip * R;
  if (!th.active || ho >= t.Hout || wo >= t.Wout) return;  // after the only barrier
  float c[R][V];
  tile_strip_conv<T, K, S>(t, th, tile, c);
  const int c0 = th.g * V;
  const int nv = t.Wout - wo < R ? t.Wout - wo : R;
  const int64_t base = out_offset(t, o.n, ho, wo, c0);
  if constexpr (kDc) {
    DcCoef<V> k;
    k.load(a, c0);
    float g[R][V];
    dc_store<T>(a, k, base, nv, c, g);
  } else {
    float sc[V], sh[V];
    if (a.scale != nullptr) {
      vload<V>(a.scale + c0, sc);
      vload<V>(a.shift + c0, sh);
    }
    apply_store<T>(a, sc, sh, base, nv, c);
  }
}

// The statistics stage (vec_stats_kernel's semantics and partials) from staged tiles
// (for_block_tiles). Per thread: Welford over its strips' valid pixels
// (welford_strip); then merged over the CG-strided threads of each group
// (block_welford_y with tx = lane gl, ty = threadIdx.x / CG, fixed tree order:
// deterministic). The partials are not bit-identical to vec_stats_kernel's (another
// grouping of the same strips), the finalized statistics agree to rounding.
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kRedMinBlocks)
    dw_tile_stats_kernel(const VecArgs a, const DwTile<T> t, int tiles) {
  constexpr int V = Vec<T>::V, R = kDwR;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, blockIdx.x, t.C, V);
  float mean[V], m2[V], n = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.f;
  for_block_tiles<T, K, S>(t, th, tiles, tile, [&](const TileOrigin& o, int, int, int nv) {
    float c[R][V];
    tile_strip_conv<T, K, S>(t, th, tile, c);
    welford_strip(c, nv, mean, m2, n);
  });
  const int CG = t.l.cg;
  block_welford_y<V>(th.gl, int(threadIdx.x) / CG, CG, int(blockDim.x) / CG, mean, m2, n,
                     reinterpret_cast<float*>(tile));
  if (int(threadIdx.x) < CG && th.active)
    store_stats_partial(a.part, t.C, blockIdx.y, th.g * V, mean, m2, n);
}

// The backward sums (vec_bwd_sums_kernel's partials [chunk][2][C]) from staged tiles:
// per thread sums_strip over its strips, merged over the CG-strided threads of each
// group (block_sum_vec, fixed order).
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kBwdMinBlocks)
    dw_tile_sums_kernel(const VecArgs a, const DwTile<T> t, int tiles) {
  constexpr int V = Vec<T>::V, R = kDwR;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, blockIdx.x, t.C, V);
  const int c0 = th.g * V;
  float s_dz[V], s_dzx[V], sc[V], sh[V], mean[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s_dz[v] = s_dzx[v] = sc[v] = sh[v] = mean[v] = 0.f;
  if (th.active) {
    vload<V>(a.scale + c0, sc);
    vload<V>(a.shift + c0, sh);
    vload<V>(a.mean + c0, mean);
  }
  for_block_tiles<T, K, S>(t, th, tiles, tile, [&](const TileOrigin& o, int ho, int wo, int nv) {
    float c[R][V];
    tile_strip_conv<T, K, S>(t, th, tile, c);
    sums_strip<T>(a, sc, sh, mean, out_offset(t, o.n, ho, wo, c0), nv, c, s_dz, s_dzx);
  });
  const int CG = t.l.cg, ty = int(threadIdx.x) / CG, by = int(blockDim.x) / CG;
  float* smem = reinterpret_cast<float*>(tile);
  block_sum_vec<V>(th.gl, ty, CG, by, s_dz, smem);
  block_sum_vec<V>(th.gl, ty, CG, by, s_dzx, smem);
  if (ty == 0 && th.active) store_sums_partial(a.part, t.C, blockIdx.y, c0, s_dz, s_dzx);
}

// The weight gradient (vec_dweight_kernel's partials [chunk][tap][C]) from the stored
// dc and staged x tiles: per thread, over its strips' valid pixels, dc * x(tap)
// (taps_fma, from the tile), merged over the CG-strided threads of each group
// (store_taps_partial, fixed order).
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kBwdMinBlocks)
    dw_tile_dweight_kernel(const VecArgs a, const DwTile<T> t, int tiles) {
  constexpr int V = Vec<T>::V, R = kDwR;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, blockIdx.x, t.C, V);
  const int c0 = th.g * V;
  float dw[K * K][V];
#pragma unroll
  for (int k = 0; k < K * K; ++k)
#pragma unroll
    for (int v = 0; v < V; ++v) dw[k][v] = 0.f;
  for_block_tiles<T, K, S>(t, th, tiles, tile, [&](const TileOrigin& o, int ho, int wo, int nv) {
    float g[R][V];
    load_dc_strip<T>(a, out_offset(t, o.n, ho, wo, c0), nv, g);
    tile_for_inputs<T, K, S, false>(
        t, th, tile, [](int) {},
        [&](int i, int col, const float (&xv)[V]) { taps_fma<K, S>(i, col, nv, g, xv, dw); });
  });
  const int CG = t.l.cg;
  store_taps_partial<K * K>(th.gl, int(threadIdx.x) / CG, CG, int(blockDim.x) / CG, dw,
                            reinterpret_cast<float*>(tile), a.part, t.C, blockIdx.y, c0,
                            th.active);
}

// Threads per (kernel row, channel group) of the weight-gradient phase of
// dw_tile_dc_dweight_kernel: kThreads / (K * CG) parts, each a share of the tile's
// pixels; at least 1 for CG <= kThreads / K, which its launch asks pick_tile for (K = 7
// at stride 2, 64 threads: CG 8 at most).
template <int K, int S>
__host__ __device__ __forceinline__ int dweight_parts(int cg) {
  return TileShape<K, S>::kThreads / (K * cg);
}

// Where dw_tile_dc_dweight_kernel keeps each thread's K*V weight-gradient sums
// between tiles: in shared memory at stride 1, where 2 blocks of 256 threads cap the
// kernel at 128 registers and sums held in registers across the dc phase spilled
// 450-2700 B at fp16 (ptxas, sm_90); in registers at stride 2 (64-128 threads per
// block: 117-218 registers, at most 64 B of spills).
template <int K, int S>
struct DcDweightShape {
  static constexpr bool kSmemSums = S == 1;
  // units (16 bytes) of the dc buffer: the tile's TH x TW output pixels x CG units
  static constexpr int kDcUnits = TileShape<K, S>::kTH * 32 * kDwR;
  // bytes of the per-thread sums (kThreads x K * V floats)
  template <typename T>
  static constexpr size_t sums_bytes() {
    return size_t(TileShape<K, S>::kThreads) * K * Vec<T>::V * sizeof(float);
  }
};

// The backward's dc and the weight gradient in one kernel, for every K and stride:
// the split pair (dw_tile_apply_kernel<..., true>, then dw_tile_dweight_kernel) without
// its second read of x and dc. Grid-stride over tiles like the reduction kernels
// (for_block_tiles, grid (cg_blocks, chunks)). Shared memory: the x tile, then the dc
// buffer (kDcUnits), then at stride 1 the sums (kSmemSums). Per tile:
// 1. stage x; each strip thread computes its strip's dc as the one-tile kernel does
//    (tile conv, then dc_store_each: dc_store's values, bit-identical, with fewer
//    registers) and also writes it, in T, to the dc buffer: pixel q = row * TW + column
//    at unit q * CG + group;
// 2. after a barrier, the weight-gradient phase from shared memory: thread t takes
//    channel group t % CG (its own group), part t / CG % parts (dweight_parts) and
//    kernel row i = t / (CG * parts) < K; it walks the pixels q = part, part + parts,
//    ... inside the output, loads dc(q) once and x(q's tap row i, taps j = 0..K-1) from
//    the staged tile (taps outside the image read the tile's zeros), and adds into
//    its K * V sums (K * V per thread instead of the K * K * V a strip thread would
//    need: why the strip path has no vector dc at
//    K = 5, 7, whose dc then runs on the scalar kernel).
// At the end the parts of each (i, group) are summed in a fixed order (part 0 first:
// deterministic) into chunk blockIdx.y's partials [chunk][tap][C], tap = i * K + j.
// The dc values are the stored ones (in T), as the split dweight kernel reads them;
// the sums group them differently (close to the split pair's, not bit-identical).
// The sums of thread t, float e of its K * V, live at float4 unit (e / 4) * kThreads + t
// (consecutive threads, consecutive units: no bank conflicts).
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kBwdMinBlocks)
    dw_tile_dc_dweight_kernel(const VecArgs a, const DwTile<T> t, int tiles) {
  using Shape = DcDweightShape<K, S>;
  constexpr int V = Vec<T>::V, R = kDwR, TH = TileShape<K, S>::kTH;
  constexpr int kThreads = TileShape<K, S>::kThreads, kUnits = K * V / 4;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, blockIdx.x, t.C, V);
  const int CG = t.l.cg, TW = 32 / CG * R, c0 = th.g * V;
  uint4* dcs = tile + TileShape<K, S>::kRows * t.l.pitch;
  // the sums: after the dc buffer (stride 1), or the tile's own buffer once the loop is
  // done (stride 2: the final merge only)
  float4* sums = reinterpret_cast<float4*>(Shape::kSmemSums ? dcs + Shape::kDcUnits : tile) +
                 threadIdx.x;
  const int parts = dweight_parts<K, S>(CG);
  // kernel row slowest: where CG * parts >= 32 (stride 1; stride 2 at small CG) a
  // warp's lanes mostly share it, so their x loads of one tap are consecutive pixels'
  // units (with rows a pitch apart in one warp, 4 mod 8 units at CG 2, two rows' loads
  // would share bank quads); with CG * parts < 32 a warp spans several rows either way
  const int part = int(threadIdx.x) / CG % parts, ki = int(threadIdx.x) / (CG * parts);
  const bool summer = th.active && ki < K;
  float dw[K][V];
  auto zero = [&] {
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) dw[j][v] = 0.f;
  };
  // dw <-> the shared sums (float e = j * V + v at unit e / 4)
  auto add_to_sums = [&] {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      float4 q = Shape::kSmemSums ? sums[u * kThreads] : make_float4(0.f, 0.f, 0.f, 0.f);
      q.x += dw[u * 4 / V][u * 4 % V];
      q.y += dw[u * 4 / V][u * 4 % V + 1];
      q.z += dw[u * 4 / V][u * 4 % V + 2];
      q.w += dw[u * 4 / V][u * 4 % V + 3];
      sums[u * kThreads] = q;
    }
  };
  zero();
  if (Shape::kSmemSums) {
    if (summer) {
#pragma unroll
      for (int u = 0; u < kUnits; ++u) sums[u * kThreads] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __syncthreads();  // zeroed before any merge, also in a block that gets no tile
  }
  for_block_tiles<T, K, S>(
      t, th, tiles, tile,
      [&](const TileOrigin& o, int ho, int wo, int nv) {
        float c[R][V];
        tile_strip_conv<T, K, S>(t, th, tile, c);
        DcCoef<V> k;  // loaded per tile: fewer registers live across the loop
        k.load(a, c0);
        uint4* mine = dcs + (th.row * TW + th.strip * R) * CG + th.gl;
        dc_store_each<T>(a, k, out_offset(t, o.n, ho, wo, c0), nv, c,
                         [&](int r, const float (&d)[V]) {
                           vstore<V>(reinterpret_cast<T*>(mine + r * CG), d);
                         });
      },
      [&](const TileOrigin& o) {
        if (!summer) return;
        if (Shape::kSmemSums) zero();
        for (int q = part; q < TH * TW; q += parts) {
          const int row = q / TW, col = q % TW;
          if (o.ho0 + row >= t.Hout || o.wo0 + col >= t.Wout) continue;  // no dc there
          float g[V];
          vload<V>(reinterpret_cast<const T*>(dcs + q * CG + th.gl), g);
          const uint4* xr = tile + (row * S + ki) * t.l.pitch + th.gl;
#pragma unroll
          for (int j = 0; j < K; ++j) {  // taps outside the image: x = 0 in the tile
            const int cc = col * S + j;
            float xv[V];
            vload<V>(reinterpret_cast<const T*>(xr + tile_col_unit<S>(t.l, cc)), xv);
#pragma unroll
            for (int v = 0; v < V; ++v) dw[j][v] += g[v] * xv[v];
          }
        }
        if (Shape::kSmemSums) add_to_sums();
      });
  // the loop's last barrier is behind every read of the tile and the dc buffer
  if (!Shape::kSmemSums) {
    if (summer) add_to_sums();
    __syncthreads();
  }
  if (!summer || part != 0) return;
  const float4* all = sums - threadIdx.x;
  for (int p = Shape::kSmemSums ? 0 : 1; p < parts; ++p) {
    if (Shape::kSmemSums && p == 0) zero();
    const int other = int(threadIdx.x) + p * CG;  // part p of this (kernel row, group)
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const float4 q = all[u * kThreads + other];
      dw[u * 4 / V][u * 4 % V] += q.x;
      dw[u * 4 / V][u * 4 % V + 1] += q.y;
      dw[u * 4 / V][u * 4 % V + 2] += q.z;
      dw[u * 4 / V][u * 4 % V + 3] += q.w;
    }
  }
#pragma unroll
  for (int j = 0; j < K; ++j) {
    float* pt = a.part + (int64_t(blockIdx.y) * K * K + ki * K + j) * t.C + c0;
#pragma unroll
    for (int v = 0; v < V; ++v) pt[v] = dw[j][v];
  }
}

// The launch arguments and tile count of a conv of `in` (N, Hin, Win, C) with the
// weights wt (K*K, C) into (N, Hout, Wout, C): false where no tile fits in 48 KB, the
// tile count does not fit an int, or one image's elements do not (stage_tile's 32-bit
// offsets). max_cg: the largest CG allowed (pick_tile).
template <typename T, int K, int S>
bool tile_args(const void* in, const void* wt, int N, int C, int Hin, int Win, int Hout,
               int Wout, int pad, DwTile<T>* t, int* tiles, int max_cg = 16) {
  using Shape = TileShape<K, S>;
  const int groups = C / Vec<T>::V;
  TileLayout l;
  if (!pick_tile<K, S>(groups, Wout, &l, max_cg)) return false;
  const int tw = 32 / l.cg * kDwR;
  *t = DwTile<T>{static_cast<const T*>(in), static_cast<const T*>(wt), C, Hin, Win, Hout, Wout,
                 pad, l, (groups + l.cg - 1) / l.cg, (Wout + tw - 1) / tw,
                 (Hout + Shape::kTH - 1) / Shape::kTH};
  const int64_t n = int64_t(t->tiles_w) * t->tiles_h * N;
  if (n > INT_MAX - 65535) return false;  // tile indices plus a grid stride fit an int
  if (int64_t(Hin) * Win * C > INT_MAX) return false;  // stage_tile's 32-bit offsets
  *tiles = static_cast<int>(n);
  return true;
}

// Bytes of the input tile of one block.
template <int K, int S>
size_t tile_bytes(const TileLayout& l) {
  return size_t(TileShape<K, S>::kRows) * l.pitch * 16;
}

// One block per tile and channel block (dw_tile_apply_kernel).
template <typename T, int K, int S, bool kDc>
cudaError_t launch_per_tile(const VecArgs& a, const DwTile<T>& t, int tiles,
                            cudaStream_t stream) {
  const int64_t blocks = int64_t(t.cg_blocks) * tiles;
  if (blocks > INT_MAX) return cudaErrorNotSupported;
  if (blocks == 0) return cudaSuccess;
  dw_tile_apply_kernel<T, K, S, kDc>
      <<<static_cast<unsigned>(blocks), TileShape<K, S>::kThreads, tile_bytes<K, S>(t.l),
         stream>>>(a, t);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

// Shared memory of a reduction kernel: the tile, or its block merge if larger (which
// reuses the tile's buffer): kThreads * `floats` floats.
template <int K, int S>
size_t reduce_smem(const TileLayout& l, int floats) {
  const size_t merge = size_t(TileShape<K, S>::kThreads) * floats * sizeof(float);
  return tile_bytes<K, S>(l) > merge ? tile_bytes<K, S>(l) : merge;
}

// dw_tile_dc_dweight_kernel over p.chunks chunks. Its shared memory (the tile, the dc
// buffer, the sums at stride 1) mostly passes the 48 KB a launch gets without asking:
// at fp16, stride 1, 62-66 KB at K = 3 (3 blocks per SM fit; the registers allow 2),
// 86-92 KB at K = 5 (2 blocks), 110-113 KB at K = 7 (2 blocks, 1 at CG 4); at stride 2,
// 45-49 KB. So the kernel is allowed that much first; where the device refuses (less
// shared memory per block), the strip path (K = 3) or the scalar kernel runs instead.
template <typename T, int K, int S>
cudaError_t launch_dc_dweight(const VecArgs& a, const DwTile<T>& t, int tiles,
                              const dim3& grid, cudaStream_t stream) {
  using Shape = TileShape<K, S>;
  using DcShape = DcDweightShape<K, S>;
  if (dweight_parts<K, S>(t.l.cg) < 1) return cudaErrorNotSupported;  // no sums would be written
  const size_t sums = DcShape::template sums_bytes<T>();
  const size_t staged = tile_bytes<K, S>(t.l) + size_t(DcShape::kDcUnits) * 16;
  const size_t smem = DcShape::kSmemSums ? staged + sums : (staged > sums ? staged : sums);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(dw_tile_dc_dweight_kernel<T, K, S>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  dw_tile_dc_dweight_kernel<T, K, S><<<grid, Shape::kThreads, smem, stream>>>(a, t, tiles);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

template <typename T, int K, int S>
cudaError_t dw_tile_launch(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
  using Shape = TileShape<K, S>;
  constexpr int V = Vec<T>::V;
  DwTile<T> t;
  int tiles;
  VecArgs a = vec_args(p);
  if (stage == kVecDx) {
    // stride 1: the conv of dc (N, Ho, Wo, C) with the taps reversed and padding
    // K-1-pad, as the strip path's dx; stride 2 keeps the strip path's gather
    if (S != 1 || p.pad > K - 1 || p.wt_flip == nullptr ||
        !tile_args<T, K, S>(p.dc, p.wt_flip, p.N, p.C, p.Ho, p.Wo, p.H, p.W, K - 1 - p.pad, &t,
                            &tiles))
      return cudaErrorNotSupported;
    a.scale = a.shift = nullptr;  // dx: a conv of dc, no BN, no activation
    a.residual = nullptr;
    a.y = p.dx;
    return launch_per_tile<T, K, S, false>(a, t, tiles, stream);
  }
  // dc: CG small enough for a weight-gradient part per (kernel row, group) in
  // dw_tile_dc_dweight_kernel (only K = 7 at stride 2 loses CG 16; K = 3's split pair
  // keeps the other stages' choice). The chunk count stays the host's (dw_tile_chunks):
  // blocks left without a tile write zero partials.
  const int max_cg = stage == kVecBwdDc ? Shape::kThreads / K : 16;
  if (!tile_args<T, K, S>(p.x, p.wt, p.N, p.C, p.H, p.W, p.Ho, p.Wo, p.pad, &t, &tiles, max_cg))
    return cudaErrorNotSupported;
  const dim3 reduce_grid(t.cg_blocks, p.chunks);
  switch (stage) {
    case kVecApply:
      return launch_per_tile<T, K, S, false>(a, t, tiles, stream);
    case kVecStats:
      dw_tile_stats_kernel<T, K, S>
          <<<reduce_grid, Shape::kThreads, reduce_smem<K, S>(t.l, 2 * V + 1), stream>>>(a, t,
                                                                                        tiles);
      MBX_LAUNCH_CHECK();
      return vec_stats_finalize(p, stream);
    case kVecBwdSums:
      dw_tile_sums_kernel<T, K, S>
          <<<reduce_grid, Shape::kThreads, reduce_smem<K, S>(t.l, V), stream>>>(a, t, tiles);
      break;
    case kVecBwdDc:
      // K == 3 with MOBILENET_EXT_DW_TILE_SPLIT=1: dc, then the weight gradient from it
      // (the strip path's split pair; K*K*V tap sums per thread fit in registers for
      // K == 3 only). Else dc and the weight gradient in one kernel, every K.
      if constexpr (K == 3) {
        if (env_int("MOBILENET_EXT_DW_TILE_SPLIT", 0) == 1) {
          const cudaError_t err = launch_per_tile<T, K, S, true>(a, t, tiles, stream);
          if (err != cudaSuccess) return err;
          dw_tile_dweight_kernel<T, K, S>
              <<<reduce_grid, Shape::kThreads, reduce_smem<K, S>(t.l, V), stream>>>(a, t,
                                                                                     tiles);
          break;
        }
      }
      return launch_dc_dweight<T, K, S>(a, t, tiles, reduce_grid, stream);
    default:
      return cudaErrorNotSupported;
  }
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

namespace {

// The reduction kernels' chunk count for a tiled launch (reduce_chunks): at most one
// chunk per tile; 0 where no tile fits.
template <typename T, int K, int S>
int tile_chunks(const ConvLaunch& p) {
  DwTile<T> t;
  int tiles;
  if (!tile_args<T, K, S>(p.x, p.wt, p.N, p.C, p.H, p.W, p.Ho, p.Wo, p.pad, &t, &tiles))
    return 0;
  return reduce_chunks(t.cg_blocks, tiles);
}

template <typename T>
int tile_chunks_k(const ConvLaunch& p) {
  switch (p.K) {
    case 3: return p.stride == 1 ? tile_chunks<T, 3, 1>(p) : tile_chunks<T, 3, 2>(p);
    case 5: return p.stride == 1 ? tile_chunks<T, 5, 1>(p) : tile_chunks<T, 5, 2>(p);
    case 7: return p.stride == 1 ? tile_chunks<T, 7, 1>(p) : tile_chunks<T, 7, 2>(p);
    default: return 0;
  }
}

}  // namespace

int dw_tile_chunks(const ConvLaunch& p) {
  switch (p.dtype) {
    case kF32: return tile_chunks_k<float>(p);
    case kF16: return tile_chunks_k<__half>(p);
    case kBF16: return tile_chunks_k<__nv_bfloat16>(p);
    default: return 0;
  }
}

#define MBX_TILE_INST_KS(T, K, S) \
  template cudaError_t dw_tile_launch<T, K, S>(VecStage, const ConvLaunch&, cudaStream_t);
#define MBX_TILE_INST(T)     \
  MBX_TILE_INST_KS(T, 3, 1)  \
  MBX_TILE_INST_KS(T, 3, 2)  \
  MBX_TILE_INST_KS(T, 5, 1)  \
  MBX_TILE_INST_KS(T, 5, 2)  \
  MBX_TILE_INST_KS(T, 7, 1)  \
  MBX_TILE_INST_KS(T, 7, 2)
MBX_TILE_INST(float)
MBX_TILE_INST(__half)
MBX_TILE_INST(__nv_bfloat16)
#undef MBX_TILE_INST
#undef MBX_TILE_INST_KS

}  // namespace mbx
