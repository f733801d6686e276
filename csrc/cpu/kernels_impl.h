// The CPU kernels of both ops, compiled once per ISA: the including file defines
// MBX_ISA (the namespace) and, for the AVX2 build, MBX_ISA_AVX2. Library headers
// come first, with the default target; only this project's kernels below the
// target pragma are compiled for the ISA, so no inline function of torch or the
// standard library is ever emitted with instructions the CPU may lack.
//
// Each ISA is split in two translation units that compile in parallel (the
// depthwise templates alone took most of a 3-minute compile): MBX_PART_DW=1 gives
// dw_forward / dw_backward (kernels_<isa>_dw.cpp), otherwise the pointwise
// epilogues and the table (kernels_<isa>.cpp).
#ifndef MBX_ISA
#error "define MBX_ISA before including kernels_impl.h"
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../host.h"
#include "isa.h"

#ifdef MBX_ISA_AVX2
#include <immintrin.h>  // the masked loads of vec.h (each intrinsic carries its own target)

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "vec.h"
#include "epilogue.h"

#if defined(MBX_PART_DW) && MBX_PART_DW
#include "dw_kernels.h"
#else

namespace mbx {
namespace cpu {
namespace MBX_ISA {

// In kernels_<isa>_dw.cpp (dw_kernels.h).
void dw_forward(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt, bool training,
                const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                at::Tensor& invstd, double eps, at::Tensor& y);
void dw_backward(const DwGeom& g, const at::Tensor& dy, const at::Tensor& x,
                 const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                 at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta);

namespace {

// The pointwise epilogue's rows: NCHW channel planes are contiguous, so a whole plane is
// one row (one scale/shift, full vectors), where an image row of a 14x14 plane was 14
// values and the per-row cost made the epilogue ~6x a clamp over the same tensor.
OutRows pw_rows(const PwGeom& g) {
  return g.channels_last ? OutRows(g.N, g.Cout, g.H, g.W, true)
                         : OutRows(g.N, g.Cout, 1, g.H * g.W, false);
}

void pw_forward(const PwGeom& g, const at::Tensor& conv, bool training, double eps,
                const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                at::Tensor& invstd, const at::Tensor& residual, at::Tensor& y) {
  const OutRows rw = pw_rows(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pw_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* cp = conv.const_data_ptr<A>();
    auto row = [&](int64_t r, A*) -> const A* { return cp + r * rw.row_len; };
    if (training) batch_stats<A>(rw, row, eps, mean.data_ptr<A>(), invstd.data_ptr<A>());
    at::Tensor scale, shift;
    std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
    apply_rows<scalar_t, A>(rw, row, g.act, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
                            residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                            y.data_ptr<scalar_t>());
  });
}

void pw_backward(const PwGeom& g, const at::Tensor& conv, const at::Tensor& dy, bool training,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
                 const at::Tensor& invstd, at::Tensor& dgamma, at::Tensor& dbeta,
                 at::Tensor& dc) {
  const OutRows rw = pw_rows(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "pw_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* cp = conv.const_data_ptr<A>();
    at::Tensor scale, shift;
    std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
    auto gamma = bn_weight.to(mean.scalar_type()).contiguous();
    bn_act_backward<scalar_t, A>(
        rw, [&](int64_t r, A*) -> const A* { return cp + r * rw.row_len; }, g.act, training,
        scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), gamma.const_data_ptr<A>(),
        mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), dy.const_data_ptr<scalar_t>(),
        dc.data_ptr<A>(), dgamma.data_ptr<A>(), dbeta.data_ptr<A>(), [](int64_t, const A*, int) {});
  });
}

}  // namespace

const Kernels* table() {
#define MBX_STR2(x) #x
#define MBX_STR(x) MBX_STR2(x)
  static const Kernels k{MBX_STR(MBX_ISA), dw_forward, dw_backward, pw_forward, pw_backward};
  return &k;
}

}  // namespace MBX_ISA
}  // namespace cpu
}  // namespace mbx

#endif  // MBX_PART_DW

#ifdef MBX_ISA_AVX2
#pragma GCC pop_options
#endif
