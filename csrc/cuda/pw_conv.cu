// CUDA epilogue of the fused pointwise (1x1) conv + BatchNorm + activation
// (+ residual): the conv output comes from a GEMM (cuBLAS, issued by
// pw_conv_cuda.cpp) laid out like y; these kernels are the shared epilogue
// (epilogue.cuh) reading it.
#include "epilogue.cuh"

namespace mbx {
namespace {

// The conv output at a pixel, read from the GEMM result: in T (forward, where it
// becomes y in place) or in A (backward, where dgamma sums dz*(conv - mean)).
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

}  // namespace

cudaError_t pw_stats_launch(const ConvLaunch& p, cudaStream_t stream) {
  return launch_stats<BufSrc>(p, stream);
}

cudaError_t pw_apply_launch(const ConvLaunch& p, cudaStream_t stream) {
  return launch_apply<BufSrc>(p, stream);
}

cudaError_t pw_bwd_launch(const ConvLaunch& p, cudaStream_t stream) {
  return launch_bwd_epilogue<BufSrc>(p, stream);
}

}  // namespace mbx
