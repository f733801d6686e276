// The CPU kernels are compiled twice from the same source (kernels_impl.h): for
// baseline x86-64 / any CPU (namespace base) and, on x86-64 with GCC, for AVX2+FMA
// (namespace avx2, csrc/cpu/kernels_avx2.cpp). kernels() picks one at run time
// from what the CPU supports; MOBILENET_EXT_CPU_ISA=base|avx2 forces one (tests
// run both).
#pragma once

#include <ATen/core/Tensor.h>

#include "../host.h"

namespace mbx {
namespace cpu {

struct Kernels {
  const char* name;
  // y = act(BN(dwconv(x))); training fills mean/invstd with the batch statistics.
  // wt: weight as [K*K][C] in the accumulation dtype.
  void (*dw_fwd)(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt, bool training,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                 at::Tensor& invstd, double eps, at::Tensor& y);
  // dx, dw_taps ([K*K][C]), dgamma, dbeta (all preallocated; the last three zeroed).
  void (*dw_bwd)(const DwGeom& g, const at::Tensor& dy, const at::Tensor& x,
                 const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                 at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta);
  // Pointwise epilogue over the GEMM output conv (accumulation dtype, laid out
  // like y): statistics (training), then y = act(conv*scale+shift) (+ residual).
  void (*pw_fwd)(const PwGeom& g, const at::Tensor& conv, bool training, double eps,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                 at::Tensor& invstd, const at::Tensor& residual, at::Tensor& y);
  // Pointwise epilogue backward: the gradient at the conv output into dc (laid out
  // like conv, in its dtype; dc may be conv itself, overwritten in place), and
  // dgamma, dbeta (zeroed).
  void (*pw_bwd)(const PwGeom& g, const at::Tensor& conv, const at::Tensor& dy, bool training,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
                 const at::Tensor& invstd, at::Tensor& dgamma, at::Tensor& dbeta,
                 at::Tensor& dc);
};

namespace base {
const Kernels* table();
}
namespace avx2 {
const Kernels* table();  // nullptr where not compiled
}

// The kernels for this CPU and MOBILENET_EXT_CPU_ISA (read at every call).
const Kernels& kernels();

}  // namespace cpu
}  // namespace mbx
