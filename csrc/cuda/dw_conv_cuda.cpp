// CUDA implementation of mobilenet_ext::dw_fwd / dw_bwd: checks, allocation and
// the launch parameters; the kernels are in dw_conv.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../host.h"
#include "dw_conv_launch.h"

namespace mbx {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK_VALUE(false, "x: unsupported dtype ", t);
  }
}

DwLaunch make_launch(const DwGeom& g, const at::Tensor& x, const at::Tensor& w, bool training,
                     double eps) {
  TORCH_CHECK_VALUE(g.N * g.H * g.W < (int64_t(1) << 31) - 65536 &&
                        g.N * g.Ho * g.Wo < (int64_t(1) << 31) - 65536,
                    "x: N*H*W and N*Ho*Wo must be below 2^31 for the CUDA kernels, got ",
                    g.N * g.H * g.W, " and ", g.N * g.Ho * g.Wo);
  // per-channel buffers are indexed in int: part/coef rows (3*C, 2*C + c) and K*K*C
  TORCH_CHECK_VALUE(g.C * std::max(3, g.K * g.K) < (int64_t(1) << 31) - 256,
                    "x: C*max(3, k*k) must be below 2^31 for the CUDA kernels, got C=", g.C);
  DwLaunch p{};
  p.N = g.N;
  p.C = g.C;
  p.H = g.H;
  p.W = g.W;
  p.Ho = g.Ho;
  p.Wo = g.Wo;
  p.K = g.K;
  p.stride = g.stride;
  p.pad = g.pad;
  p.dil = g.dil;
  p.act = g.act;
  p.channels_last = g.channels_last;
  p.training = training;
  p.dtype = dtype_code(x.scalar_type());
  p.eps = eps;
  p.x = x.const_data_ptr();
  p.w = w.const_data_ptr();
  p.chunks = dw_num_chunks(p);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, bool training, double eps, c10::string_view act) {
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, training, act);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto w = weight.contiguous();
  auto y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format()));
  auto opts = x.options().dtype(acc);
  at::Tensor mean, invstd, scale, shift;
  DwLaunch p = make_launch(g, x, w, training, eps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (training) {
    mean = at::empty({g.C}, opts);
    invstd = at::empty({g.C}, opts);
    if (y.numel() == 0) return {y, mean, invstd};  // C == 0 (count > 1 was checked)
    scale = at::empty({g.C}, opts);
    shift = at::empty({g.C}, opts);
    auto gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
    auto part = at::empty({p.chunks, 3, g.C}, opts);
    p.gamma = gamma.const_data_ptr();
    p.beta = beta.const_data_ptr();
    p.mean = mean.data_ptr();
    p.invstd = invstd.data_ptr();
    p.scale = scale.data_ptr();
    p.shift = shift.data_ptr();
    p.part = part.data_ptr();
    C10_CUDA_CHECK(dw_stats_launch(p, stream));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
    std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
    p.scale = scale.data_ptr();
    p.shift = shift.data_ptr();
  }
  if (y.numel() == 0) return {y, mean, invstd};
  p.y = y.data_ptr();
  C10_CUDA_CHECK(dw_apply_launch(p, stream));
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_,
    const at::Tensor& invstd_, int64_t stride, int64_t padding, int64_t dilation, bool training,
    c10::string_view act) {
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, mean_, invstd_, stride, padding, dilation,
                      false, act);
  const auto acc = acc_type(x_.scalar_type());
  check_bwd_args(grad_y, x_, mean_, invstd_, {g.N, g.C, g.Ho, g.Wo});
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(g.format());
  auto w = weight.contiguous();
  auto dy = grad_y.contiguous(g.format());
  auto mean = mean_.contiguous(), invstd = invstd_.contiguous();
  auto opts = x.options().dtype(acc);
  auto dx = at::empty(x.sizes(), x.options().memory_format(g.format()));
  auto dweight = at::zeros({g.C, g.K * g.K}, opts);
  auto dgamma = at::zeros({g.C}, opts);
  auto dbeta = at::zeros({g.C}, opts);
  // x may be empty while y is not (H or W == 0, all taps in the padding): the
  // kernels handle it (conv == 0, dbeta = sum(dz) != 0), so only skip on empty dy.
  if (dy.numel() == 0) {
    dx.zero_();
  } else {
    at::Tensor scale, shift;
    std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
    auto gamma = bn_weight.to(acc).contiguous();
    DwLaunch p = make_launch(g, x, w, training, /*eps=*/0.0);
    auto dc = at::empty(dy.sizes(), dy.options().memory_format(g.format()));
    auto coef = at::empty({3, g.C}, opts);
    auto part = at::empty({p.chunks, std::max(3, g.K * g.K), g.C}, opts);
    p.dy = dy.const_data_ptr();
    p.dx = dx.data_ptr();
    p.dc = dc.data_ptr();
    p.gamma = gamma.const_data_ptr();
    p.mean = mean.data_ptr();
    p.invstd = invstd.data_ptr();
    p.scale = scale.data_ptr();
    p.shift = shift.data_ptr();
    p.dgamma = dgamma.data_ptr();
    p.dbeta = dbeta.data_ptr();
    p.dweight = dweight.data_ptr();
    p.coef = coef.data_ptr();
    p.part = part.data_ptr();
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
