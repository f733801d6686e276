// CPU kernels of the fused pointwise (1x1) conv + BatchNorm + activation
// (+ residual). The 1x1 conv is a GEMM (ATen's, i.e. MKL/oneDNN; pw_conv_gemm in
// host.cpp) computed in the accumulation dtype straight into the layout of y. The
// shared epilogue (epilogue.h, via cpu::kernels()) then does the BatchNorm,
// activation, residual and cast in one pass.
//
// Backward recomputes the conv output with one more GEMM instead of saving it:
// the saved state stays x, weight and two per-channel vectors (eager PyTorch
// keeps the conv output and the BN output), at the cost of a third of the
// backward's GEMM flops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../host.h"
#include "isa.h"

namespace mbx {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pw_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double eps, c10::string_view act) {
  PwGeom g = pw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                      training, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto y = at::empty({g.N, g.Cout, g.H, g.W}, x.options().memory_format(g.format()));
  at::Tensor mean, invstd;
  if (training) {
    mean = at::empty({g.Cout}, x.options().dtype(acc));
    invstd = at::empty({g.Cout}, x.options().dtype(acc));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (y.numel() == 0) return {y, mean, invstd};
  auto w2 = weight.reshape({g.Cout, g.Cin}).to(acc);
  // In the accumulation dtype the GEMM writes y and the epilogue runs in place:
  // no second y-sized allocation (its page faults cost more than the epilogue on CPU).
  at::Tensor conv = y;
  if (x.scalar_type() == acc) {
    pw_conv_gemm_out(g, x, w2, y);
  } else {
    conv = pw_conv_gemm(g, x.to(acc), w2);
  }
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous(g.format());
  cpu::kernels().pw_fwd(g, conv, training, eps, bn_weight, bn_bias, mean, invstd, res, y);
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_,
    const at::Tensor& invstd_, bool training, c10::string_view act) {
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
  auto conv = pw_conv_gemm(g, xa, w2);
  auto dc = conv;  // the epilogue backward overwrites the conv output with dc in place
  cpu::kernels().pw_bwd(g, dc, dy, training, bn_weight, bn_bias, mean, invstd, dgamma, dbeta);
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
