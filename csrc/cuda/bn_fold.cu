// The BatchNorm fold of the CUDA ops in one launch: (mean, invstd) from the running
// statistics in eval, and scale/shift (and gamma in the accumulation type) from
// them. As ATen ops on the host this was up to six launches per op call, each a few
// microseconds of host time and a tiny kernel: at batch 1 a layer is launch-bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.h"

namespace mbx {
namespace {

// Element i of a per-channel tensor of dtype `code` (DType) in the accumulation type.
template <typename A>
__device__ __forceinline__ A load_as(const void* t, int code, int64_t i) {
  switch (code) {
    case kF64: return A(static_cast<const double*>(t)[i]);
    case kF32: return A(static_cast<const float*>(t)[i]);
    case kF16: return A(__half2float(static_cast<const __half*>(t)[i]));
    default: return A(__bfloat162float(static_cast<const __nv_bfloat16*>(t)[i]));
  }
}

template <typename A>
__global__ void bn_fold_kernel(const BnFoldArgs a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  A* mean = static_cast<A*>(a.mean);
  A* invstd = static_cast<A*>(a.invstd);
  A m, is;
  if (a.running_mean != nullptr) {
    m = load_as<A>(a.running_mean, a.rm_dtype, c);
    is = bn_invstd(load_as<A>(a.running_var, a.rv_dtype, c), A(a.eps));
    mean[c] = m;
    invstd[c] = is;
  } else {
    m = mean[c];
    is = invstd[c];
  }
  const A gamma = load_as<A>(a.gamma, a.gamma_dtype, c);
  const auto f = BnFold<A>::make(gamma, load_as<A>(a.beta, a.beta_dtype, c), m, is);
  A* out = static_cast<A*>(a.out);  // (3, C): scale, shift, gamma
  out[c] = f.scale;
  out[a.C + c] = f.shift;
  out[2 * a.C + c] = gamma;  // a.C is int64_t: no overflow at any channel count
}

}  // namespace

cudaError_t bn_fold_launch(const BnFoldArgs& a, cudaStream_t stream) {
  if (a.C == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned>((a.C + kThreads - 1) / kThreads);
  if (a.acc == kF64)
    bn_fold_kernel<double><<<blocks, kThreads, 0, stream>>>(a);
  else
    bn_fold_kernel<float><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace mbx
