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

// The BatchNorm fold (bn_fold_launch) into a (3, C) tensor of the accumulation type of
// mean: scale, shift, gamma; bn_fold_row(out, i) points at row i. With running
// statistics (eval), mean and invstd (new contiguous tensors of that type) are written
// from them first; else they are read.
inline at::Tensor bn_fold_cuda(const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const at::Tensor* running_mean = nullptr,
                               const at::Tensor* running_var = nullptr, double eps = 0.0) {
  const int64_t C = mean.numel();
  TORCH_INTERNAL_ASSERT(invstd.scalar_type() == mean.scalar_type() && invstd.numel() == C &&
                        mean.is_contiguous() && invstd.is_contiguous() &&
                        (running_mean == nullptr) == (running_var == nullptr));
  auto out = at::empty({3, C}, mean.options());
  // contiguous() is a no-op for the usual 1-D parameters and buffers
  at::Tensor w = bn_weight.contiguous(), b = bn_bias.contiguous(), rm, rv;
  BnFoldArgs a{};
  a.C = C;
  a.acc = dtype_code(mean.scalar_type());
  a.eps = eps;
  if (running_mean != nullptr) {
    rm = running_mean->contiguous();
    rv = running_var->contiguous();
    a.running_mean = rm.const_data_ptr();
    a.running_var = rv.const_data_ptr();
    a.rm_dtype = dtype_code(rm.scalar_type());
    a.rv_dtype = dtype_code(rv.scalar_type());
  }
  a.gamma = w.const_data_ptr();
  a.beta = b.const_data_ptr();
  a.gamma_dtype = dtype_code(w.scalar_type());
  a.beta_dtype = dtype_code(b.scalar_type());
  a.mean = mean.data_ptr();
  a.invstd = invstd.data_ptr();
  a.out = out.data_ptr();
  C10_CUDA_CHECK(bn_fold_launch(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Row i of bn_fold_cuda's (3, C) result (a pointer: no view through the dispatcher).
inline void* bn_fold_row(const at::Tensor& folded, int i) {
  return static_cast<char*>(folded.data_ptr()) + i * folded.size(1) * folded.element_size();
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
  at::Tensor mean, invstd, scale, shift, folded;
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
    mean = at::empty({p.C}, opts);
    invstd = at::empty({p.C}, opts);
    folded = bn_fold_cuda(bn_weight, bn_bias, mean, invstd, &*running_mean, &*running_var, eps);
    p.scale = bn_fold_row(folded, 0);
    p.shift = bn_fold_row(folded, 1);
  }
  if (!empty) C10_CUDA_CHECK(apply(p, stream));
  return {mean, invstd};
}

// Backward epilogue inputs and outputs: sets every per-channel pointer and
// workspace of p (dc laid out like dy) and returns the tensors that must stay
// alive until the launches are queued: {dgamma, dbeta, dc, <folded BN, workspaces>}.
inline std::vector<at::Tensor> backward_epilogue_args(ConvLaunch& p, const at::Tensor& dy,
                                                      const at::Tensor& bn_weight,
                                                      const at::Tensor& bn_bias,
                                                      const at::Tensor& mean,
                                                      const at::Tensor& invstd) {
  const auto acc = mean.scalar_type();
  const auto opts = dy.options().dtype(acc);
  auto folded = bn_fold_cuda(bn_weight, bn_bias, mean, invstd);  // scale, shift, gamma
  auto dgamma = at::zeros({p.C}, opts), dbeta = at::zeros({p.C}, opts);
  auto dc = at::empty_like(dy);
  auto coef = at::empty({3, p.C}, opts);
  auto part = at::empty({p.chunks, std::max(3, p.K * p.K), p.C}, opts);
  p.dy = dy.const_data_ptr();
  p.dc = dc.data_ptr();
  p.gamma = bn_fold_row(folded, 2);
  p.mean = const_cast<void*>(mean.const_data_ptr());
  p.invstd = const_cast<void*>(invstd.const_data_ptr());
  p.scale = bn_fold_row(folded, 0);
  p.shift = bn_fold_row(folded, 1);
  p.dgamma = dgamma.data_ptr();
  p.dbeta = dbeta.data_ptr();
  p.coef = coef.data_ptr();
  p.part = part.data_ptr();
  return {dgamma, dbeta, dc, folded, coef, part};
}

}  // namespace mbx
