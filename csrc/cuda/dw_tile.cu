// The depthwise apply stage (y = act(conv * scale + shift), vec_apply_kernel's
// semantics) and statistics stage (vec_stats_kernel's partials) with each block's
// input tile staged through shared memory: the variants behind
// MOBILENET_EXT_DW_TILE=1 (dw_vec.cu), for the vector path's geometries
// (channels_last, C % V == 0, 16-byte aligned tensors). Both kernels share the
// staging (stage_tile) and the strip conv from shared memory (tile_strip_conv); the
// apply kernel runs one tile per block, the statistics kernel a grid-stride loop
// of tiles per chunk.
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
// left unwritten where the pixel lies outside the image (the conv skips those
// taps). skew = CG for CG < 8, else 0: a warp's LDS.128 of one strip column
// reads, for strip s and group g, unit s * (R*S*CG + skew) + g + const. Without
// the skew the strip stride R*S*CG is a multiple of 8 units (128 bytes, all 32
// banks), so for CG = 2 or 4 the 32 lanes would hit only 2 or 4 of the 8 bank
// quads (4- or 2-way conflicts); with it the stride is CG mod 8 and the lanes
// spread over all 8 quads, 4 each: the minimum of 4 wavefronts per LDS.128.
// CG = 8 or 16 covers the 8 quads with the groups alone. The skew costs CG units
// per R*S columns (+25% for CG = 4 at S = 1).
//
// The conv accumulates exactly as DwStrip::conv (load_wrow, strip_fma: kernel
// rows ascending, input columns ascending, fp32 FMA out += w * x, taps outside
// the image skipped) and the epilogue is the same apply_store, so y is
// bit-identical to vec_apply_kernel's. The statistics are the same strip values
// merged in another order (see dw_tile_stats_kernel).
#include <climits>

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
  // dw_tile_stats_kernel keeps a Welford state (2V + 1 floats) live across the conv:
  // at K=3 S=1, fp16/bf16, 101-105 registers, and capped at 80 for 3 blocks it spills
  // 80 B; 2 blocks, no spills, until a GPU run compares the two
  static constexpr int kStatsMinBlocks = S == 1 && K == 3 ? 2 : kMinBlocks;
  static constexpr int kRows = (kTH - 1) * S + K;  // input rows of the tile
};

// The shared-memory layout of one launch's tiles (the header's formula), in
// 16-byte units.
struct TileLayout {
  int cg;     // channel groups per block; 32 / cg strips per tile row
  int cols;   // input columns per tile row: (TW - 1) * S + K
  int skew;   // units after every R*S columns
  int pitch;  // units per input row
};

template <int K, int S>
TileLayout tile_layout(int cg) {
  TileLayout l;
  l.cg = cg;
  l.cols = (32 / cg * kDwR - 1) * S + K;
  l.skew = cg < 8 ? cg : 0;
  l.pitch = l.cols * cg + (l.cols - 1) / (kDwR * S) * l.skew;
  return l;
}

// One launch, passed by value: x (N, Hin, Win, C) and the weights (K*K, C) in T
// (y is in VecArgs), the layout and the grid's tile counts.
template <typename T>
struct DwTile {
  const T* x;
  const T* wt;
  int C, Hin, Win, Hout, Wout, pad;
  TileLayout l;
  int cg_blocks, tiles_w, tiles_h;
};

// The CG (and its layout) with the fewest blocks per image row of tiles,
// ceil(Wout / TW) * ceil(groups / CG), among those whose tile fits in 48 KB; on a
// tie the wider tile (less halo). E.g. fp16: 144@56x56 -> CG 2 (TW 64, 9 blocks),
// 32@112x112 -> CG 2 (2 x 2), 576@14x14 -> CG 8 (TW 16, 9 blocks).
template <int K, int S>
bool pick_tile(int groups, int Wout, TileLayout* best) {
  int64_t best_cost = -1;
  for (int cg = 2; cg <= 16; cg *= 2) {
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
// staging).
__device__ __forceinline__ void copy16(uint4* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
#else
  *dst = *static_cast<const uint4*>(src);
#endif
}

// Every copy16 of this thread has landed (the block barrier follows).
__device__ __forceinline__ void copy16_wait() {
#if __CUDA_ARCH__ >= 800
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
// Tile pixel q = rr * cols + cc for q = threadIdx.x / CG, stepping by kThreads / CG
// (CG divides 32, so the thread's group stays g); consecutive threads copy
// consecutive groups, then columns: whole 16-byte vectors, CG of them contiguous per
// pixel.
template <typename T, int K, int S>
__device__ __forceinline__ void stage_tile(const DwTile<T>& t, const TileOrigin& o,
                                           const TileThread& th, uint4* tile) {
  using Shape = TileShape<K, S>;
  constexpr int V = Vec<T>::V, RS = kDwR * S;
  const int CG = t.l.cg, cols = t.l.cols, C = t.C;
  if (th.active) {
    const T* xg = t.x + int64_t(o.n) * t.Hin * t.Win * C + th.g * V;
    const int step = Shape::kThreads / CG, drow = step / cols, dcol = step % cols;
    int rr = int(threadIdx.x) / CG / cols, cc = int(threadIdx.x) / CG % cols;
    uint4* dst_g = tile + th.gl;
    while (rr < Shape::kRows) {
      const int hi = o.hi0 + rr, wi = o.wi0 + cc;
      const bool inside = hi >= 0 && hi < t.Hin && wi >= 0 && wi < t.Win;
      if (inside)  // outside pixels stay unwritten: the conv skips their taps
        copy16(dst_g + rr * t.l.pitch + cc * CG + cc / RS * t.l.skew,
               xg + (int64_t(hi) * t.Win + wi) * C);
      rr += drow;
      cc += dcol;
      if (cc >= cols) {
        cc -= cols;
        ++rr;
      }
    }
  }
  copy16_wait();
}

// c = the conv of this thread's strip from the staged tile, accumulated as
// DwStrip::conv (the header). Its input window: tile row row*S, tile column
// strip*R*S, image pixel (hs, ws).
template <typename T, int K, int S>
__device__ __forceinline__ void tile_strip_conv(const DwTile<T>& t, const TileOrigin& o,
                                                const TileThread& th, const uint4* tile,
                                                float (&c)[kDwR][Vec<T>::V]) {
  constexpr int V = Vec<T>::V, R = kDwR, RS = R * S, kCols = (R - 1) * S + K;
  const int CG = t.l.cg, skew = t.l.skew, pitch = t.l.pitch;
  const uint4* xs = tile + th.row * S * pitch + th.strip * (RS * CG + skew) + th.gl;
  const int hs = o.hi0 + th.row * S, ws = o.wi0 + th.strip * RS;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int v = 0; v < V; ++v) c[r][v] = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (hs + i < 0 || hs + i >= t.Hin) continue;
    float wrow[K][V];
    load_wrow<K>(t.wt, t.C, th.g * V, i, wrow);
    const uint4* xr = xs + i * pitch;
#pragma unroll
    for (int col = 0; col < kCols; ++col) {
      if (ws + col < 0 || ws + col >= t.Win) continue;
      float xv[V];
      vload<V>(reinterpret_cast<const T*>(xr + col * CG + col / RS * skew), xv);
      strip_fma<K, S>(col, wrow, xv, c);
    }
  }
}

// One block per tile and channel block: blockIdx.x = tile * cg_blocks + channel
// block, so the channel blocks of one tile run side by side (whole pixels from DRAM),
// then the neighbouring tiles (their halos hit L2).
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kMinBlocks)
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
  tile_strip_conv<T, K, S>(t, o, th, tile, c);
  const int c0 = th.g * V;
  float sc[V], sh[V];
  if (a.scale != nullptr) {
    vload<V>(a.scale + c0, sc);
    vload<V>(a.shift + c0, sh);
  }
  const int nv = t.Wout - wo < R ? t.Wout - wo : R;
  apply_store<T>(a, sc, sh, ((int64_t(o.n) * t.Hout + ho) * t.Wout + wo) * t.C + c0, nv, c);
}

// The statistics stage (vec_stats_kernel's semantics and partials) from staged tiles.
// Grid (cg_blocks, chunks): blockIdx.y is the chunk, whose block takes tiles
// blockIdx.y, blockIdx.y + chunks, ... (concurrent chunks on neighbouring tiles, the
// channel blocks of a tile side by side as in the apply kernel), so every chunk the
// host sized the workspace for writes one partial per channel (count 0 when it got
// no tile). Per thread: Welford over its strips' valid pixels (welford_strip; strips
// past Hout/Wout and groups past C add nothing); then merged over the CG-strided
// threads of each group (block_welford_y with tx = lane gl, ty = threadIdx.x / CG,
// fixed tree order: deterministic). The partials are not bit-identical to
// vec_stats_kernel's (another grouping of the same strips), the finalized statistics
// agree to rounding.
template <typename T, int K, int S>
__global__ void __launch_bounds__(TileShape<K, S>::kThreads, TileShape<K, S>::kStatsMinBlocks)
    dw_tile_stats_kernel(const VecArgs a, const DwTile<T> t, int tiles) {
  constexpr int V = Vec<T>::V, R = kDwR;
  extern __shared__ uint4 tile[];
  const TileThread th(t.l.cg, blockIdx.x, t.C, V);
  float mean[V], m2[V], n = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) mean[v] = m2[v] = 0.f;
  for (int k = blockIdx.y; k < tiles; k += gridDim.y) {
    const TileOrigin o = tile_origin<K, S>(t, k);
    stage_tile<T, K, S>(t, o, th, tile);
    __syncthreads();
    const int ho = o.ho0 + th.row, wo = o.wo0 + th.strip * R;
    if (th.active && ho < t.Hout && wo < t.Wout) {
      float c[R][V];
      tile_strip_conv<T, K, S>(t, o, th, tile, c);
      welford_strip(c, t.Wout - wo < R ? t.Wout - wo : R, mean, m2, n);
    }
    __syncthreads();  // every read of this tile done: the next copies (or the merge) reuse it
  }
  const int CG = t.l.cg;
  block_welford_y<V>(th.gl, int(threadIdx.x) / CG, CG, int(blockDim.x) / CG, mean, m2, n,
                     reinterpret_cast<float*>(tile));
  if (int(threadIdx.x) < CG && th.active)
    store_stats_partial(a.part, t.C, blockIdx.y, th.g * V, mean, m2, n);
}

// The launch arguments and tile count of p: false where no tile fits in 48 KB, or
// the tile count does not fit an int.
template <typename T, int K, int S>
bool tile_args(const ConvLaunch& p, DwTile<T>* t, int* tiles) {
  using Shape = TileShape<K, S>;
  const int groups = p.C / Vec<T>::V;
  TileLayout l;
  if (!pick_tile<K, S>(groups, p.Wo, &l)) return false;
  const int tw = 32 / l.cg * kDwR;
  *t = DwTile<T>{static_cast<const T*>(p.x), static_cast<const T*>(p.wt), p.C, p.H, p.W, p.Ho,
                 p.Wo, p.pad, l, (groups + l.cg - 1) / l.cg, (p.Wo + tw - 1) / tw,
                 (p.Ho + Shape::kTH - 1) / Shape::kTH};
  const int64_t n = int64_t(t->tiles_w) * t->tiles_h * p.N;
  if (n > INT_MAX) return false;
  *tiles = static_cast<int>(n);
  return true;
}

// Bytes of the input tile of one block.
template <int K, int S>
size_t tile_bytes(const TileLayout& l) {
  return size_t(TileShape<K, S>::kRows) * l.pitch * 16;
}

}  // namespace

template <typename T, int K, int S>
cudaError_t dw_tile_apply(const ConvLaunch& p, cudaStream_t stream) {
  DwTile<T> t;
  int tiles;
  if (!tile_args<T, K, S>(p, &t, &tiles)) return cudaErrorNotSupported;
  const int64_t blocks = int64_t(t.cg_blocks) * tiles;
  if (blocks > INT_MAX) return cudaErrorNotSupported;
  if (blocks == 0) return cudaSuccess;
  dw_tile_apply_kernel<T, K, S>
      <<<static_cast<unsigned>(blocks), TileShape<K, S>::kThreads, tile_bytes<K, S>(t.l),
         stream>>>(vec_args(p), t);
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T, int K, int S>
cudaError_t dw_tile_stats(const ConvLaunch& p, cudaStream_t stream) {
  using Shape = TileShape<K, S>;
  DwTile<T> t;
  int tiles;
  if (!tile_args<T, K, S>(p, &t, &tiles)) return cudaErrorNotSupported;
  // the block merge reuses the tile's buffer: kThreads * (mean, m2: V floats; n), at
  // most 17 KB, the tiles 22-48 KB (pick_tile)
  const size_t merge = size_t(Shape::kThreads) * (2 * Vec<T>::V + 1) * sizeof(float);
  const size_t smem = tile_bytes<K, S>(t.l) > merge ? tile_bytes<K, S>(t.l) : merge;
  dw_tile_stats_kernel<T, K, S><<<dim3(t.cg_blocks, p.chunks), Shape::kThreads, smem, stream>>>(
      vec_args(p), t, tiles);
  MBX_LAUNCH_CHECK();
  return vec_stats_finalize(p, stream);
}

#define MBX_TILE_INST_KS(T, K, S)                                            \
  template cudaError_t dw_tile_apply<T, K, S>(const ConvLaunch&, cudaStream_t); \
  template cudaError_t dw_tile_stats<T, K, S>(const ConvLaunch&, cudaStream_t);
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
