// CPU implementations of the depthwise ops: checks, allocation and layout here;
// the kernels (dw_kernels.h, compiled per ISA) come from cpu::kernels().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../host.h"
#include "isa.h"

namespace mbx {
namespace {

// NCHW input with narrow rows runs on the channels_last kernels, through a
// channels_last copy of x (and dy) and an NCHW copy of y (and dx). The NCHW kernels
// work one (image, channel) plane at a time through a padded copy of it: on small
// planes that per-plane cost dominates. Measured (bench/NOTES.md, session 6, raw op,
// batch 1 and 8, eval and training): the copies won at 7 columns (1.1-1.7x) and at
// stride 2 up to 28 columns (1.04-1.85x); the planes won at stride 1 from 14 columns
// on (1.05-1.3x at 14, 1.15-1.9x at 28, 1.8-8x at 56 and 112).
// In eval, those narrow planes skip the copies: blocks of channel planes of one image
// are transposed into a channels_last tile in cache, run on the same row kernels and
// transposed back (nchw_tiles; session 8: the two whole-tensor copies cost more than
// the channels_last kernel itself, bench/NOTES.md). Training and the backward keep the
// copies. MOBILENET_EXT_CPU_NCHW=native|channels_last|tiles forces a path (tests run
// each; tiles applies to the eval forward and means the copies elsewhere).
enum class NchwPath { Native, Copies, Tiles };

// How NCHW input runs (channels_last input: Native, its own layout). eval_fwd: the
// eval forward, the only op the tiles cover.
NchwPath nchw_path(const DwGeom& g, bool eval_fwd) {
  if (g.channels_last) return NchwPath::Native;
  const char* env = std::getenv("MOBILENET_EXT_CPU_NCHW");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
    if (std::strcmp(env, "native") == 0) return NchwPath::Native;
    if (std::strcmp(env, "tiles") == 0) return eval_fwd ? NchwPath::Tiles : NchwPath::Copies;
    TORCH_CHECK_VALUE(std::strcmp(env, "channels_last") == 0, "MOBILENET_EXT_CPU_NCHW must be "
                      "auto, native, channels_last or tiles, got '", env, "'");
    return NchwPath::Copies;
  }
  if (g.W > (g.stride == 2 ? 32 : 8)) return NchwPath::Native;
  return eval_fwd ? NchwPath::Tiles : NchwPath::Copies;
}

// The geometry the kernels run: channels_last through the copies, the tile flag.
DwGeom kernel_geom(DwGeom g, NchwPath path) {
  g.channels_last = g.channels_last || path == NchwPath::Copies;
  g.nchw_tiles = path == NchwPath::Tiles;
  return g;
}

// Weight (C,1,K,K) -> [K*K][C] in the accumulation type, so that the channel loop
// of channels_last rows reads it contiguously. One loop over the weight's strides:
// reshape/t/to/contiguous took half of a tiny eval call's C++ time (a TensorIterator
// copy of a transposed view, bench/NOTES.md, session 10).
at::Tensor weight_taps(const at::Tensor& weight, at::ScalarType acc) {
  const int64_t C = weight.size(0), K = weight.size(2);
  auto wt = at::empty({K * K, C}, weight.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "weight_taps",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(wt.scalar_type() == c10::CppTypeToScalarType<A>::value);
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    A* out = wt.data_ptr<A>();
    const int64_t s0 = weight.stride(0), s2 = weight.stride(2), s3 = weight.stride(3);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j)
          out[(i * K + j) * C + c] = static_cast<A>(w[c * s0 + i * s2 + j * s3]);
  });
  return wt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, bool training, double eps, c10::string_view act) {
  const NoAutocast no_autocast;
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, training, act);
  const auto acc = acc_type(x_.scalar_type());
  const DwGeom gk = kernel_geom(g, nchw_path(g, !training));
  auto x = x_.contiguous(gk.format());
  auto y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(gk.format()));
  at::Tensor mean, invstd;
  if (training) {
    mean = at::empty({g.C}, x.options().dtype(acc));
    invstd = at::empty({g.C}, x.options().dtype(acc));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (y.numel() == 0) return {y.contiguous(g.format()), mean, invstd};
  auto wt = weight_taps(weight, acc);
  cpu::kernels().dw_fwd(gk, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  return {y.contiguous(g.format()), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t stride, int64_t padding, int64_t dilation, bool training,
    c10::string_view act) {
  const NoAutocast no_autocast;
  DwGeom g = dw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean, invstd, stride, padding,
                          dilation, act);
  const auto acc = acc_type(x_.scalar_type());
  const DwGeom gk = kernel_geom(g, nchw_path(g, false));
  auto x = x_.contiguous(gk.format());
  auto dy = grad_y.contiguous(gk.format());
  auto dx = at::empty(x.sizes(), x.options().memory_format(gk.format()));
  auto dw_taps = at::zeros({g.K * g.K, g.C}, x.options().dtype(acc));
  auto dgamma = at::zeros({g.C}, x.options().dtype(acc));
  auto dbeta = at::zeros({g.C}, x.options().dtype(acc));
  if (dy.numel() == 0) {
    dx.zero_();
  } else {
    auto wt = weight_taps(weight, acc);
    cpu::kernels().dw_bwd(gk, dy, x, wt, bn_weight, bn_bias, mean.contiguous(),
                          invstd.contiguous(), training, dx, dw_taps, dgamma, dbeta);
  }
  auto dweight = dw_taps.t().contiguous().reshape(weight.sizes()).to(weight.scalar_type());
  return {dx.contiguous(g.format()), dweight, dgamma.to(bn_weight.scalar_type()),
          dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CPU, m) {
  m.impl("dw_fwd", &dw_fwd_cpu);
  m.impl("dw_bwd", &dw_bwd_cpu);
}

}  // namespace mbx
