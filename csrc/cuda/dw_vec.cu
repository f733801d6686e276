// The depthwise op's vectorised channels_last path: the strip source of
// vec_tile.cuh instantiated for every (dtype, kernel size, stride), and the
// dispatch that tells the caller (dw_conv.cu) when to take the scalar kernels
// (the shared-memory tile variants of the stages are dw_tile.cu).
#include <cstdlib>
#include <cstring>

#include "vec_tile.cuh"

namespace mbx {

bool vec_enabled() {
  const char* env = std::getenv("MOBILENET_EXT_VEC");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

namespace {

int vec_width(int dtype) { return dtype == kF32 ? 4 : 8; }

template <typename T, int K, int S>
using Strip = DwStrip<T, K, S, kDwR>;

template <typename T, int K, int S>
cudaError_t run_stage(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
  VecArgs a = vec_args(p);
  const VecGrid g = VecGrid::make(p.C, Vec<T>::V);
  const dim3 block(g.bx, g.by), reduce_grid(g.gx, p.chunks);
  const Strip<T, K, S> src(p.x, p.wt, p.N, p.C, p.H, p.W, p.Ho, p.Wo, p.pad);
  // the shared-memory tile kernels, when asked for, before every strip variant
  if (env_int("MOBILENET_EXT_DW_TILE", 0) == 1) {
    const cudaError_t err = dw_tile_launch<T, K, S>(stage, p, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  switch (stage) {
    case kVecApply:
      // the measured variants (knobs: vec_tile.cuh, env_int)
      if constexpr (K == 3) {
        if (env_int("MOBILENET_EXT_VEC_R", kDwR) == 2) {
          const DwStrip<T, K, S, 2> src2(p.x, p.wt, p.N, p.C, p.H, p.W, p.Ho, p.Wo, p.pad);
          return vec_launch_apply<T>(p, a, src2, stream);
        }
        if (env_int("MOBILENET_EXT_VEC_OCC", 3) >= 3) {
          vec_apply_kernel<T, Strip<T, K, S>, 3><<<vec_apply_grid(g, src), block, 0, stream>>>(a, src);
          MBX_LAUNCH_CHECK();
          return cudaSuccess;
        }
      }
      return vec_launch_apply<T>(p, a, src, stream);
    case kVecBwdDc:
      // K*K*V weight-gradient accumulators per thread: registers for K == 3 only (the
      // tile path's dw_tile_dc_dweight_kernel, before this switch, takes every K)
      if constexpr (K != 3) {
        return cudaErrorNotSupported;
      } else if (env_int("MOBILENET_EXT_DW_SPLIT", S == 1 ? 1 : 0) == 1) {
        const cudaError_t err = vec_launch_dc<T>(p, a, NoTaps<Strip<T, K, S>>(src), stream);
        if (err != cudaSuccess) return err;
        vec_dweight_kernel<T><<<reduce_grid, block, 0, stream>>>(a, src);
        MBX_LAUNCH_CHECK();
        return cudaSuccess;
      } else {
        return vec_launch_dc<T>(p, a, src, stream);
      }
    case kVecDx:
      a.scale = a.shift = nullptr;  // dx: a conv of dc, no BN, no activation
      a.residual = nullptr;
      a.y = p.dx;
      if constexpr (S == 1) {
        if (p.pad <= K - 1) {  // a conv of dc with the taps reversed and padding K-1-pad
          const Strip<T, K, 1> tsrc(p.dc, p.wt_flip, p.N, p.C, p.Ho, p.Wo, p.H, p.W,
                                    K - 1 - p.pad);
          return vec_launch_apply<T>(p, a, tsrc, stream);
        }
      }
      return vec_launch_apply<T>(
          p, a, DwGatherStrip<T, K, S, kDwR>(p.dc, p.wt, p.N, p.C, p.Ho, p.Wo, p.H, p.W, p.pad),
          stream);
    default:
      return vec_launch_stage<T>(stage, p, a, src, stream);
  }
}

template <typename T>
cudaError_t dispatch_ks(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
#define MBX_VEC_KS(K_)                                           \
  case K_:                                                       \
    return p.stride == 1 ? run_stage<T, K_, 1>(stage, p, stream) \
                         : run_stage<T, K_, 2>(stage, p, stream);
  switch (p.K) {
    MBX_VEC_KS(3)
    MBX_VEC_KS(5)
    MBX_VEC_KS(7)
    default: return cudaErrorNotSupported;
  }
#undef MBX_VEC_KS
}

}  // namespace

bool dw_vec_geometry(const ConvLaunch& p) {
  return vec_enabled() && p.channels_last && p.dtype != kF64 && p.dil == 1 &&
         (p.stride == 1 || p.stride == 2) && (p.K == 3 || p.K == 5 || p.K == 7) && p.C > 0 &&
         p.C % vec_width(p.dtype) == 0;
}

int dw_vec_chunks(const ConvLaunch& p) {
  // the tile kernels' reductions loop over tiles, not strips: as many chunks as fill
  // the GPU, at most one per tile (the strip and scalar kernels take any count)
  if (env_int("MOBILENET_EXT_DW_TILE", 0) == 1) {
    const int k = dw_tile_chunks(p);
    if (k > 0) return k;
  }
  const int64_t items = int64_t(p.N) * p.Ho * ((p.Wo + kDwR - 1) / kDwR);
  return vec_reduce_chunks(VecGrid::make(p.C, vec_width(p.dtype)), items);
}

cudaError_t dw_vec_launch(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
  if (!dw_vec_geometry(p) || p.wt == nullptr ||
      (stage == kVecDx && p.stride == 1 && p.wt_flip == nullptr) ||
      !vec_aligned({p.x, p.wt, p.wt_flip, p.y, p.dy, p.dc, p.dx, p.scale, p.shift, p.mean,
                    p.coef}))
    return cudaErrorNotSupported;
  switch (p.dtype) {
    case kF32: return dispatch_ks<float>(stage, p, stream);
    case kF16: return dispatch_ks<__half>(stage, p, stream);
    case kBF16: return dispatch_ks<__nv_bfloat16>(stage, p, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace mbx
