// CPU kernels of the fused pointwise (1x1) conv + BatchNorm + activation
// (+ residual). The 1x1 conv is ATen's: oneDNN's convolution for large channels_last
// float32 problems, else an MKL GEMM (pw_conv_gemm in host.cpp), in the accumulation dtype
// and in the layout of y. The shared epilogue (epilogue.h, via cpu::kernels())
// then does the BatchNorm, activation, residual and cast in one pass.
//
// Training keeps the conv output (save_conv, asked for by ops.py when a backward
// will follow) instead of recomputing it in the backward: on CPU the GEMMs are most
// of a training step, and the recompute was one GEMM in four (pointwise training
// 0.87x eager at batch 1 with it, bench/NOTES.md). The saved conv output is one
// y-sized tensor in the accumulation dtype; eager PyTorch keeps the conv output and
// the BN output. Without it (save_conv false, or the raw op called with conv None)
// the backward recomputes it with one more GEMM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../host.h"
#include "isa.h"

namespace mbx {
namespace {

// oneDNN's convolution instead of MKL's GEMM for the 1x1 conv: channels_last float32
// with at least 16384 pixels. There it was 1.3-1.45x faster on the MobileNetV2
// layers; with fewer pixels (14x14 and 7x7 at batch 8, anything at batch 1) it was
// up to 1.3x slower, on NCHW up to 8x slower, and fp64 has no oneDNN kernel
// (bench/NOTES.md).
bool use_onednn(const PwGeom& g, at::ScalarType acc) {
  return g.channels_last && acc == at::kFloat && g.N * g.H * g.W >= 16384 &&
         at::globalContext().userEnabledMkldnn();
}

// The conv output in the accumulation dtype, a new tensor in x's layout (xa, w2
// already in that dtype).
at::Tensor conv1x1(const PwGeom& g, const at::Tensor& xa, const at::Tensor& weight,
                   const at::Tensor& w2) {
  if (use_onednn(g, xa.scalar_type()))
    return at::conv2d(xa, weight.to(xa.scalar_type())).contiguous(g.format());
  return pw_conv_gemm(g, xa, w2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double eps, c10::string_view act, bool save_conv) {
  const NoAutocast no_autocast;
  PwGeom g = pw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                      training, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  const auto y_opts = x.options().memory_format(g.format());
  at::Tensor mean, invstd;
  if (training) {
    mean = at::empty({g.Cout}, x.options().dtype(acc));
    invstd = at::empty({g.Cout}, x.options().dtype(acc));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (g.N * g.Cout * g.H * g.W == 0) {
    return {at::empty({g.N, g.Cout, g.H, g.W}, y_opts), mean, invstd,
            save_conv ? at::empty({g.N, g.Cout, g.H, g.W}, y_opts.dtype(acc))
                      : pw_conv_not_saved(x)};
  }
  auto w2 = weight.reshape({g.Cout, g.Cin}).to(acc);
  // Not saved and in the accumulation dtype, the conv output is y itself and the
  // epilogue runs in place: no second y-sized allocation (its page faults cost
  // more than the epilogue on CPU).
  const bool in_place = x.scalar_type() == acc && !save_conv;
  at::Tensor conv, y;
  if (in_place && !use_onednn(g, acc)) {
    y = at::empty({g.N, g.Cout, g.H, g.W}, y_opts);
    pw_conv_gemm_out(g, x, w2, y);
    conv = y;
  } else {
    conv = conv1x1(g, x.to(acc), weight, w2);
    y = in_place ? conv : at::empty({g.N, g.Cout, g.H, g.W}, y_opts);
  }
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous(g.format());
  cpu::kernels().pw_fwd(g, conv, training, eps, bn_weight, bn_bias, mean, invstd, res, y);
  return {y, mean, invstd, save_conv ? conv : pw_conv_not_saved(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_,
    const at::Tensor& invstd_, const c10::optional<at::Tensor>& saved_conv, bool training,
    c10::string_view act) {
  const NoAutocast no_autocast;
  PwGeom g = pw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean_, invstd_, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto dy = grad_y.contiguous(g.format());
  auto mean = mean_.contiguous(), invstd = invstd_.contiguous();
  auto w2 = weight.reshape({g.Cout, g.Cin}).to(acc);
  auto dgamma = at::zeros({g.Cout}, x.options().dtype(acc));
  auto dbeta = at::zeros({g.Cout}, x.options().dtype(acc));
  if (dy.numel() == 0) {
    return {at::zeros(x.sizes(), x.options().memory_format(g.format())), at::zeros_like(weight),
            dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
  }
  auto xa = x.to(acc);
  at::Tensor conv, dc;
  if (saved_conv.has_value()) {
    conv = pw_check_saved_conv(g, x, *saved_conv, acc);
    dc = at::empty_like(conv);  // the saved tensor stays as it is (retain_graph)
  } else {
    conv = conv1x1(g, xa, weight, w2);
    dc = conv;  // the epilogue backward overwrites the recomputed conv with dc in place
  }
  cpu::kernels().pw_bwd(g, conv, dy, training, bn_weight, bn_bias, mean, invstd, dgamma, dbeta,
                        dc);
  auto dx = pw_dx_gemm(g, dc, w2);
  auto dw2 = pw_dweight_gemm(g, dc, xa);
  return {dx.to(x.scalar_type()).contiguous(g.format()),
          dw2.reshape(weight.sizes()).to(weight.scalar_type()).contiguous(),
          dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CPU, m) {
  m.impl("pw_fwd", &pw_fwd_cpu);
  m.impl("pw_bwd", &pw_bwd_cpu);
}

}  // namespace mbx
