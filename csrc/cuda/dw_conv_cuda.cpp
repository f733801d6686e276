// CUDA implementation of mobilenet_ext::dw_fwd / dw_bwd: checks, allocation and
// the launch parameters; the kernels are in dw_conv.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../host.h"
#include "launch.h"
#include "launch_host.h"

namespace mbx {
namespace {

// The weights as the vector kernels read them: (K*K, C) in x's dtype, and with
// the taps reversed for dx (backward). Set in p only where dw_vec_geometry holds;
// the returned tensors must outlive the launches.
std::vector<at::Tensor> vec_weights(ConvLaunch& p, const at::Tensor& w, bool flipped) {
  if (!dw_vec_geometry(p)) return {};
  auto wt = w.reshape({p.C, p.K * p.K}).t().contiguous();
  p.wt = wt.const_data_ptr();
  if (!flipped || p.stride != 1) return {wt};  // dx as a conv of dc: stride 1 only
  auto wt_flip = wt.flip({0});
  p.wt_flip = wt_flip.const_data_ptr();
  return {wt, wt_flip};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, bool training, double eps, c10::string_view act) {
  const NoAutocast no_autocast;
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, training, act);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(g.format());
  auto w = weight.contiguous();
  auto y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format()));
  ConvLaunch p = make_launch(g, x, w, training, eps);
  p.y = y.data_ptr();
  const auto held_w = vec_weights(p, w, /*flipped=*/false);
  auto stats = forward_epilogue(p, x, bn_weight, bn_bias, running_mean, running_var, training,
                                eps, y.numel() == 0, dw_stats_launch, dw_apply_launch);
  return {y, std::get<0>(stats), std::get<1>(stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_,
    const at::Tensor& invstd_, int64_t stride, int64_t padding, int64_t dilation, bool training,
    c10::string_view act) {
  const NoAutocast no_autocast;
  DwGeom g = dw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean_, invstd_, stride,
                          padding, dilation, act);
  const auto acc = acc_type(x_.scalar_type());
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(g.format());
  auto w = weight.contiguous();
  auto dy = grad_y.contiguous(g.format());
  auto mean = mean_.contiguous(), invstd = invstd_.contiguous();
  auto dx = at::empty(x.sizes(), x.options().memory_format(g.format()));
  auto dweight = at::zeros({g.C, g.K * g.K}, x.options().dtype(acc));
  at::Tensor dgamma, dbeta;
  // x may be empty while y is not (H or W == 0, all taps in the padding): the
  // kernels handle it (conv == 0, dbeta = sum(dz) != 0), so only skip on empty dy.
  if (dy.numel() == 0) {
    dx.zero_();
    dgamma = at::zeros({g.C}, x.options().dtype(acc));
    dbeta = at::zeros({g.C}, x.options().dtype(acc));
  } else {
    ConvLaunch p = make_launch(g, x, w, training, /*eps=*/0.0);
    const auto held_w = vec_weights(p, w, /*flipped=*/true);
    auto held = backward_epilogue_args(p, dy, bn_weight, bn_bias, mean, invstd);
    dgamma = held[0];
    dbeta = held[1];
    p.dx = dx.data_ptr();
    p.dweight = dweight.data_ptr();
    C10_CUDA_CHECK(dw_bwd_launch(p, c10::cuda::getCurrentCUDAStream()));
  }
  return {dx, dweight.reshape(weight.sizes()).to(weight.scalar_type()),
          dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CUDA, m) {
  m.impl("dw_fwd", &dw_fwd_cuda);
  m.impl("dw_bwd", &dw_bwd_cuda);
}

}  // namespace mbx
