// Host-side helpers shared by the CUDA implementations (dw_conv_cuda.cpp,
// pw_conv_cuda.cpp): the launch struct from the checked geometry, and the
// BatchNorm epilogue flows around the kernels (statistics, folding, workspaces).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "../host.h"
#include "launch.h"

namespace mbx {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK_VALUE(false, "x: unsupported dtype ", t);
  }
}

// Launch parameters for an output (N, C, Ho, Wo) computed from x (N, *, H, W).
inline ConvLaunch make_launch(const DwGeom& g, const at::Tensor& x, const at::Tensor& w,
                              bool training, double eps) {
  TORCH_CHECK_VALUE(g.N * g.H * g.W < (int64_t(1) << 31) - 65536 &&
                        g.N * g.Ho * g.Wo < (int64_t(1) << 31) - 65536,
                    "x: N*H*W and N*Ho*Wo must be below 2^31 for the CUDA kernels, got ",
                    g.N * g.H * g.W, " and ", g.N * g.Ho * g.Wo);
  // per-channel buffers are indexed in int: part/coef rows (3*C, 2*C + c) and K*K*C
  TORCH_CHECK_VALUE(g.C * std::max(3, g.K * g.K) < (int64_t(1) << 31) - 256,
                    "x: C*max(3, k*k) must be below 2^31 for the CUDA kernels, got C=", g.C);
  ConvLaunch p{};
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
  p.chunks = num_chunks(p);
  return p;
}

// Forward epilogue: the statistics (batch ones from `stats`, else the running
// ones) folded into scale/shift, then `apply` writes y (p.y set by the caller).
// Returns (mean, invstd).
template <typename Stats, typename Apply>
std::tuple<at::Tensor, at::Tensor> forward_epilogue(
    ConvLaunch& p, const at::Tensor& x, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, double eps, bool empty, Stats&& stats, Apply&& apply) {
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor mean, invstd, scale, shift;
  if (training) {
    mean = at::empty({p.C}, opts);
    invstd = at::empty({p.C}, opts);
    if (empty) return {mean, invstd};  // C == 0 (count > 1 was checked)
    scale = at::empty({p.C}, opts);
    shift = at::empty({p.C}, opts);
    auto gamma = bn_weight.to(acc).contiguous(), beta = bn_bias.to(acc).contiguous();
    auto part = at::empty({p.chunks, 3, p.C}, opts);
    p.gamma = gamma.const_data_ptr();
    p.beta = beta.const_data_ptr();
    p.mean = mean.data_ptr();
    p.invstd = invstd.data_ptr();
    p.scale = scale.data_ptr();
    p.shift = shift.data_ptr();
    p.part = part.data_ptr();
    C10_CUDA_CHECK(stats(p, stream));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
    std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
    p.scale = scale.data_ptr();
    p.shift = shift.data_ptr();
  }
  if (!empty) C10_CUDA_CHECK(apply(p, stream));
  return {mean, invstd};
}

// Backward epilogue inputs and outputs: sets every per-channel pointer and
// workspace of p (dc laid out like dy) and returns the tensors that must stay
// alive until the launches are queued: {dgamma, dbeta, dc, <workspaces>}.
inline std::vector<at::Tensor> backward_epilogue_args(ConvLaunch& p, const at::Tensor& dy,
                                                      const at::Tensor& bn_weight,
                                                      const at::Tensor& bn_bias,
                                                      const at::Tensor& mean,
                                                      const at::Tensor& invstd) {
  const auto acc = mean.scalar_type();
  const auto opts = dy.options().dtype(acc);
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  auto gamma = bn_weight.to(acc).contiguous();
  auto dgamma = at::zeros({p.C}, opts), dbeta = at::zeros({p.C}, opts);
  auto dc = at::empty_like(dy);
  auto coef = at::empty({3, p.C}, opts);
  auto part = at::empty({p.chunks, std::max(3, p.K * p.K), p.C}, opts);
  p.dy = dy.const_data_ptr();
  p.dc = dc.data_ptr();
  p.gamma = gamma.const_data_ptr();
  p.mean = const_cast<void*>(mean.const_data_ptr());
  p.invstd = const_cast<void*>(invstd.const_data_ptr());
  p.scale = scale.data_ptr();
  p.shift = shift.data_ptr();
  p.dgamma = dgamma.data_ptr();
  p.dbeta = dbeta.data_ptr();
  p.coef = coef.data_ptr();
  p.part = part.data_ptr();
  return {dgamma, dbeta, dc, scale, shift, gamma, coef, part};
}

}  // namespace mbx
