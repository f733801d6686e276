// CUDA epilogue of the fused pointwise (1x1) conv + BatchNorm + activation
// (+ residual): the conv output comes from a GEMM (cuBLAS, issued by
// pw_conv_cuda.cpp) laid out like y; these kernels are the shared epilogue
// (epilogue.cuh) reading it, vectorised (vec_tile.cuh) for channels_last.
#include "vec_tile.cuh"

namespace mbx {
namespace {

// The conv output at a pixel, read from the GEMM result: in T (the forward, where it
// is y's own buffer unless saved, and a saved one in the backward) or in A (the
// backward's fp32 recompute, conv_acc).
template <typename T, typename A>
struct BufSrc {
  static constexpr int kTaps = 0;
  const void* conv;
  bool acc;
  __device__ __forceinline__ BufSrc(const ConvLaunch& p, int) : conv(p.conv), acc(p.conv_acc) {}
  __device__ __forceinline__ A operator()(const ConvLaunch&, const Pix& px, int) const {
    return acc ? static_cast<const A*>(conv)[px.off]
               : to_acc<A>(static_cast<const T*>(conv)[px.off]);
  }
  template <typename Acc>
  __device__ __forceinline__ void accumulate_taps(const ConvLaunch&, const Pix&, int, A, Acc&) const {}
};

constexpr int kPwR = 4;  // pixels per item of the vector path

int vec_width(int dtype) { return dtype == kF32 ? 4 : 8; }

bool pw_vec_geometry(const ConvLaunch& p) {
  return vec_enabled() && p.channels_last && p.dtype != kF64 && p.C > 0 &&
         p.C % vec_width(p.dtype) == 0;
}

template <typename T>
cudaError_t pw_vec_stage(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
  const BufStrip<T, kPwR> src(p.conv, p.conv_acc, p.C, int64_t(p.N) * p.Ho * p.Wo);
  if (stage == kVecBwdDc) return vec_launch_dc<T>(p, vec_args(p), src, stream);
  return vec_launch_stage<T>(stage, p, vec_args(p), src, stream);
}

// The vector path where it applies, else cudaErrorNotSupported.
cudaError_t pw_vec_launch(VecStage stage, const ConvLaunch& p, cudaStream_t stream) {
  if (!pw_vec_geometry(p) ||
      !vec_aligned({p.conv, p.residual, p.y, p.dy, p.dc, p.scale, p.shift, p.mean, p.coef}))
    return cudaErrorNotSupported;
  switch (p.dtype) {
    case kF32: return pw_vec_stage<float>(stage, p, stream);
    case kF16: return pw_vec_stage<__half>(stage, p, stream);
    case kBF16: return pw_vec_stage<__nv_bfloat16>(stage, p, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace

int pw_num_chunks(const ConvLaunch& p) {
  if (pw_vec_geometry(p)) {
    const int64_t items = (int64_t(p.N) * p.Ho * p.Wo + kPwR - 1) / kPwR;
    return vec_reduce_chunks(VecGrid::make(p.C, vec_width(p.dtype)), items);
  }
  return chunks_for(p.channels_last, p.C, int64_t(p.N) * p.Ho * p.Wo);
}

cudaError_t pw_stats_launch(const ConvLaunch& p, cudaStream_t stream) {
  const cudaError_t vec = pw_vec_launch(kVecStats, p, stream);
  if (vec != cudaErrorNotSupported) return vec;
  return launch_stats<BufSrc>(p, stream);
}

cudaError_t pw_apply_launch(const ConvLaunch& p, cudaStream_t stream) {
  const cudaError_t vec = pw_vec_launch(kVecApply, p, stream);
  if (vec != cudaErrorNotSupported) return vec;
  return launch_apply<BufSrc>(p, stream);
}

cudaError_t pw_bwd_launch(const ConvLaunch& p, cudaStream_t stream) {
  // the vector path takes both passes or neither (same geometry and pointers)
  cudaError_t vec = pw_vec_launch(kVecBwdSums, p, stream);
  if (vec == cudaErrorNotSupported) return launch_bwd_epilogue<BufSrc>(p, stream);
  if (vec != cudaSuccess) return vec;
  bwd_finalize_kernel<float><<<finalize_grid(p.C), finalize_block(), 0, stream>>>(p);
  MBX_LAUNCH_CHECK();
  vec = pw_vec_launch(kVecBwdDc, p, stream);
  if (vec != cudaErrorNotSupported) return vec;
  // MOBILENET_EXT_VEC changed between the two passes: the scalar dc pass (same partials)
  const dim3 grid = grid_dims(p, p.chunks), block = block_dims(p.channels_last);
  MBX_DISPATCH_T(p.dtype, bwd_dc_kernel<T, A, BufSrc<T, A>><<<grid, block, 0, stream>>>(p));
  MBX_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace mbx
