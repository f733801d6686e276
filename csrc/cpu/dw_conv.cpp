// CPU implementations of the depthwise ops: checks, allocation and layout here;
// the kernels (dw_kernels.h, compiled per ISA) come from cpu::kernels().
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../host.h"
#include "isa.h"

namespace mbx {
namespace {

// Weight (C,1,K,K) -> [K*K][C] in the accumulation type, so that the channel loop
// of channels_last rows reads it contiguously.
at::Tensor weight_taps(const at::Tensor& weight, at::ScalarType acc) {
  return weight.reshape({weight.size(0), -1}).t().to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, bool training, double eps, c10::string_view act) {
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, training, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format()));
  at::Tensor mean, invstd;
  if (training) {
    mean = at::empty({g.C}, x.options().dtype(acc));
    invstd = at::empty({g.C}, x.options().dtype(acc));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (y.numel() == 0) return {y, mean, invstd};
  auto wt = weight_taps(weight, acc);
  cpu::kernels().dw_fwd(g, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t stride, int64_t padding, int64_t dilation, bool training,
    c10::string_view act) {
  DwGeom g = dw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean, invstd, stride, padding,
                          dilation, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto dy = grad_y.contiguous(g.format());
  auto dx = at::empty(x.sizes(), x.options().memory_format(g.format()));
  auto dw_taps = at::zeros({g.K * g.K, g.C}, x.options().dtype(acc));
  auto dgamma = at::zeros({g.C}, x.options().dtype(acc));
  auto dbeta = at::zeros({g.C}, x.options().dtype(acc));
  if (dy.numel() == 0) {
    dx.zero_();
  } else {
    auto wt = weight_taps(weight, acc);
    cpu::kernels().dw_bwd(g, dy, x, wt, bn_weight, bn_bias, mean.contiguous(),
                          invstd.contiguous(), training, dx, dw_taps, dgamma, dbeta);
  }
  auto dweight = dw_taps.t().contiguous().reshape(weight.sizes()).to(weight.scalar_type());
  return {dx, dweight, dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CPU, m) {
  m.impl("dw_fwd", &dw_fwd_cpu);
  m.impl("dw_bwd", &dw_bwd_cpu);
}

}  // namespace mbx
