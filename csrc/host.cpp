#include "host.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace mbx {

int parse_act(c10::string_view act) {
  static const char* names[kNumActs] = {"relu6", "relu", "identity", "hardswish", "silu"};
  for (int i = 0; i < kNumActs; ++i)
    if (act == names[i]) return i;
  TORCH_CHECK_VALUE(false, "act: unknown activation '", std::string(act),
                    "'; expected one of relu6, relu, identity, hardswish, silu");
}

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

static void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t C) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, ": expected shape (", C,
                    ",) to match the channels of x, got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " like x, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc_type(x.scalar_type()),
                    name, ": expected dtype ", x.scalar_type(), " or ", acc_type(x.scalar_type()),
                    " for x of dtype ", x.scalar_type(), ", got ", t.scalar_type());
}

static void check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  auto st = x.scalar_type();
  TORCH_CHECK_VALUE(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                    "x: expected a floating dtype (float64/32/16, bfloat16), got ", st);
}

static void check_weight_like_x(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ",
                    x.scalar_type(), " like x, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: expected device ", x.device(),
                    " like x, got ", weight.device());
}

static void check_bn(const at::Tensor& x, int64_t C, const at::Tensor& bn_weight,
                     const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                     const c10::optional<at::Tensor>& running_var, bool training) {
  check_param(bn_weight, "bn_weight", x, C);
  check_param(bn_bias, "bn_bias", x, C);
  if (!training) {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                      "running_mean/running_var: required when training=False");
  }
  if (running_mean.has_value()) check_param(*running_mean, "running_mean", x, C);
  if (running_var.has_value()) check_param(*running_var, "running_var", x, C);
}

static void check_count(bool training, int64_t count, at::IntArrayRef y_sizes) {
  if (training) {
    TORCH_CHECK_VALUE(count > 1, "x: expected more than 1 value per channel when training, "
                      "got output size ", y_sizes);
  }
}

DwGeom dw_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
                int64_t dilation, bool training, c10::string_view act) {
  check_x(x);
  check_weight_like_x(weight, x);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    "weight: expected shape (", C, ", 1, k, k) for a depthwise conv of x with ", C,
                    " channels, got ", weight.sizes());
  const int64_t K = weight.size(2);
  TORCH_CHECK_VALUE(K == 3 || K == 5 || K == 7, "weight: kernel size must be 3, 5 or 7, got ", K);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "stride: must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= 8, "dilation: must be in [1, 8], got ", dilation);
  TORCH_CHECK_VALUE(padding >= 0 && padding <= dilation * (K - 1),
                    "padding: must be in [0, dilation*(k-1)] = [0, ", dilation * (K - 1), "], got ",
                    padding);
  check_bn(x, C, bn_weight, bn_bias, running_mean, running_var, training);
  DwGeom g;
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, "x: spatial size must be non-zero, got ",
                    x.sizes());
  g.N = x.size(0);
  g.C = C;
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = static_cast<int>(K);
  g.stride = static_cast<int>(stride);
  g.pad = static_cast<int>(padding);
  g.dil = static_cast<int>(dilation);
  TORCH_CHECK_VALUE(g.H + 2 * padding >= dilation * (K - 1) + 1 &&
                        g.W + 2 * padding >= dilation * (K - 1) + 1,
                    "x: spatial size (", g.H, ", ", g.W, ") is smaller than the padded kernel");
  g.Ho = conv_out_size(g.H, g.K, g.stride, g.pad, g.dil);
  g.Wo = conv_out_size(g.W, g.K, g.stride, g.pad, g.dil);
  g.act = parse_act(act);
  g.channels_last = is_channels_last(x);
  check_count(training, g.N * g.Ho * g.Wo, {g.N, g.C, g.Ho, g.Wo});
  TORCH_CHECK_VALUE(g.C * g.H * g.W < (int64_t(1) << 31) && g.C * g.Ho * g.Wo < (int64_t(1) << 31),
                    "x: one image must have fewer than 2^31 elements");
  return g;
}

PwGeom pw_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var,
                const c10::optional<at::Tensor>& residual, bool training, c10::string_view act) {
  check_x(x);
  check_weight_like_x(weight, x);
  const int64_t Cin = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == Cin && weight.size(2) == 1 &&
                        weight.size(3) == 1,
                    "weight: expected shape (Cout, ", Cin, ", 1, 1) for a 1x1 conv of x with ", Cin,
                    " channels, got ", weight.sizes());
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, "x: spatial size must be non-zero, got ",
                    x.sizes());  // eager's conv2d rejects it too
  PwGeom g;
  g.N = x.size(0);
  g.Cin = Cin;
  g.Cout = weight.size(0);
  g.H = x.size(2);
  g.W = x.size(3);
  g.act = parse_act(act);
  g.channels_last = is_channels_last(x);
  check_bn(x, g.Cout, bn_weight, bn_bias, running_mean, running_var, training);
  const std::vector<int64_t> y_sizes = {g.N, g.Cout, g.H, g.W};
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK_VALUE(r.sizes() == at::IntArrayRef(y_sizes), "residual: expected shape ",
                      at::IntArrayRef(y_sizes), " like the output, got ", r.sizes());
    TORCH_CHECK_VALUE(r.scalar_type() == x.scalar_type(), "residual: expected dtype ",
                      x.scalar_type(), " like x, got ", r.scalar_type());
    TORCH_CHECK_VALUE(r.device() == x.device(), "residual: expected device ", x.device(),
                      " like x, got ", r.device());
  }
  check_count(training, g.N * g.H * g.W, y_sizes);
  return g;
}

void check_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                    const at::Tensor& invstd, at::IntArrayRef y_sizes) {
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK_VALUE(mean.scalar_type() == acc && invstd.scalar_type() == acc,
                    "mean/invstd: expected dtype ", acc, " (the statistics the forward returns)");
  TORCH_CHECK_VALUE(grad_y.sizes() == y_sizes, "grad_y: expected shape ", y_sizes, ", got ",
                    grad_y.sizes());
  TORCH_CHECK_VALUE(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
                    "grad_y: expected dtype ", x.scalar_type(), " on ", x.device(), ", got ",
                    grad_y.scalar_type(), " on ", grad_y.device());
}

DwGeom dw_bwd_check(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                    const at::Tensor& mean, const at::Tensor& invstd, int64_t stride,
                    int64_t padding, int64_t dilation, c10::string_view act) {
  DwGeom g = dw_check(x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                      false, act);
  check_bwd_args(grad_y, x, mean, invstd, {g.N, g.C, g.Ho, g.Wo});
  return g;
}

PwGeom pw_bwd_check(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                    const at::Tensor& mean, const at::Tensor& invstd, c10::string_view act) {
  PwGeom g = pw_check(x, weight, bn_weight, bn_bias, mean, invstd, c10::nullopt, false, act);
  check_bwd_args(grad_y, x, mean, invstd, {g.N, g.Cout, g.H, g.W});
  return g;
}

at::Tensor pw_conv_not_saved(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(acc_type(x.scalar_type())));
}

at::Tensor pw_check_saved_conv(const PwGeom& g, const at::Tensor& x, const at::Tensor& conv,
                               at::ScalarType dtype) {
  const std::vector<int64_t> y_sizes{g.N, g.Cout, g.H, g.W};
  TORCH_CHECK_VALUE(conv.sizes() == at::IntArrayRef(y_sizes) && conv.scalar_type() == dtype &&
                        conv.device() == x.device(),
                    "conv: expected the conv output pw_fwd saved (shape ", at::IntArrayRef(y_sizes),
                    ", dtype ", dtype, ", on ", x.device(), "), got shape ", conv.sizes(), ", dtype ",
                    conv.scalar_type(), " on ", conv.device());
  return conv.contiguous(g.format());
}

void update_running(const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_var, const at::Tensor& mean,
                    const at::Tensor& invstd, double eps, double unbias, double momentum) {
  const at::Tensor* rm = running_mean.has_value() ? &*running_mean : nullptr;
  const at::Tensor* rv = running_var.has_value() ? &*running_var : nullptr;
  TORCH_CHECK_VALUE(invstd.sizes() == mean.sizes() && mean.dim() == 1,
                    "mean/invstd: expected two 1-D tensors of one shape, got ", mean.sizes(),
                    " and ", invstd.sizes());
  for (const at::Tensor* buf : {rm, rv}) {
    if (buf) {
      TORCH_CHECK_VALUE(buf->sizes() == mean.sizes(), "running buffers: expected shape ",
                        mean.sizes(), " like the statistics, got ", buf->sizes());
      // the dispatcher does not count a C++ op's in-place writes: as lerp_ did, so
      // that autograd still catches a buffer saved elsewhere and changed here
      buf->unsafeGetTensorImpl()->bump_version();
    }
  }
  // One loop on CPU where every tensor is contiguous in the statistics' dtype: as
  // tensor expressions this was 6 ATen ops, ~60 us of a small layer's training step.
  auto fast = [&](const at::Tensor* b) {
    return !b || (b->is_cpu() && b->is_contiguous() && b->scalar_type() == mean.scalar_type());
  };
  const auto st = mean.scalar_type();
  if ((st == at::kFloat || st == at::kDouble) && mean.is_cpu() && invstd.is_cpu() &&
      mean.is_contiguous() && invstd.is_contiguous() && invstd.scalar_type() == st && fast(rm) &&
      fast(rv)) {
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running", [&] {
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* is = invstd.const_data_ptr<scalar_t>();
      scalar_t* pm = rm ? rm->data_ptr<scalar_t>() : nullptr;
      scalar_t* pv = rv ? rv->data_ptr<scalar_t>() : nullptr;
      const auto mo = static_cast<scalar_t>(momentum), keep = static_cast<scalar_t>(1 - momentum);
      for (int64_t c = 0; c < mean.numel(); ++c) {
        if (pm) pm[c] = mo * m[c] + keep * pm[c];
        if (pv) {
          const scalar_t var = std::max(scalar_t(1) / (is[c] * is[c]) - scalar_t(eps), scalar_t(0));
          pv[c] = mo * (var * static_cast<scalar_t>(unbias)) + keep * pv[c];
        }
      }
    });
    return;
  }
  if (rm) rm->mul_(1 - momentum).add_(mean.to(rm->scalar_type()), momentum);
  if (rv) {
    auto var = invstd.pow(-2).sub_(eps).clamp_min_(0).mul_(unbias);
    rv->mul_(1 - momentum).add_(var.to(rv->scalar_type()), momentum);
  }
}

// Both per-channel helpers are one loop (CPU tensors; the CUDA code folds in one
// kernel, bn_fold.cu): as tensor expressions they were ~8 ATen ops per call, tens of
// microseconds, a tenth of a small layer at batch 1.
std::tuple<at::Tensor, at::Tensor> eval_stats(const at::Tensor& running_mean,
                                              const at::Tensor& running_var, double eps,
                                              at::ScalarType acc) {
  TORCH_INTERNAL_ASSERT(running_mean.is_cpu() && running_var.is_cpu());
  auto rm = running_mean.to(acc).contiguous(), rv = running_var.to(acc).contiguous();
  auto mean = at::empty({rm.numel()}, rm.options());
  auto invstd = at::empty({rm.numel()}, rm.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "eval_stats", [&] {
    const scalar_t* m = rm.const_data_ptr<scalar_t>();
    const scalar_t* v = rv.const_data_ptr<scalar_t>();
    scalar_t* mo = mean.data_ptr<scalar_t>();
    scalar_t* io = invstd.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < rm.numel(); ++c) {
      mo[c] = m[c];
      io[c] = bn_invstd(v[c], e);
    }
  });
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> fold_bn(const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                           const at::Tensor& mean, const at::Tensor& invstd) {
  TORCH_INTERNAL_ASSERT(bn_weight.is_cpu() && bn_bias.is_cpu() && mean.is_cpu() &&
                        invstd.is_cpu());
  const auto acc = invstd.scalar_type();
  auto w = bn_weight.to(acc).contiguous(), b = bn_bias.to(acc).contiguous();
  auto m = mean.contiguous(), is = invstd.contiguous();
  auto scale = at::empty({is.numel()}, is.options());
  auto shift = at::empty({is.numel()}, is.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "fold_bn", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    scalar_t* sc = scale.data_ptr<scalar_t>();
    scalar_t* sh = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < is.numel(); ++c) {
      const auto f = BnFold<scalar_t>::make(wp[c], bp[c], mp[c], ip[c]);
      sc[c] = f.scale;
      sh[c] = f.shift;
    }
  });
  return {scale, shift};
}

// Row-major [rows, C] view of a channels_last (N, C, H, W) tensor. Explicit sizes, not
// -1: a 0-element reshape to {-1, 0} is ambiguous (throws) when C == 0.
static at::Tensor cl_matrix(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// (N, C, rows, cols) channels_last tensor from a row-major [N*rows*cols, C] matrix.
static at::Tensor from_cl_matrix(const at::Tensor& m, int64_t N, int64_t H, int64_t W) {
  return m.view({N, H, W, m.size(1)}).permute({0, 3, 1, 2});
}

at::Tensor pw_conv_gemm(const PwGeom& g, const at::Tensor& x, const at::Tensor& w2,
                        c10::optional<at::ScalarType> out_dtype) {
  if (!out_dtype.has_value() || *out_dtype == x.scalar_type()) {
    auto out = at::empty({g.N, g.Cout, g.H, g.W}, x.options().memory_format(g.format()));
    pw_conv_gemm_out(g, x, w2, out);
    return out;
  }
  if (g.channels_last)
    return from_cl_matrix(at::mm(cl_matrix(x), w2.t(), *out_dtype), g.N, g.H, g.W);
  auto conv = at::bmm(w2.unsqueeze(0).expand({g.N, g.Cout, g.Cin}),
                      x.reshape({g.N, g.Cin, g.H * g.W}), *out_dtype);
  return conv.view({g.N, g.Cout, g.H, g.W});
}

void pw_conv_gemm_out(const PwGeom& g, const at::Tensor& x, const at::Tensor& w2,
                      at::Tensor& out) {
  if (g.channels_last) {
    // [N*H*W, Cout], out's memory (explicit sizes: Cout may be 0)
    auto m = out.permute({0, 2, 3, 1}).view({g.N * g.H * g.W, g.Cout});
    at::mm_out(m, cl_matrix(x), w2.t());
    return;
  }
  auto m = out.view({g.N, g.Cout, g.H * g.W});
  at::bmm_out(m, w2.unsqueeze(0).expand({g.N, g.Cout, g.Cin}),
              x.reshape({g.N, g.Cin, g.H * g.W}));
}

at::Tensor pw_dx_gemm(const PwGeom& g, const at::Tensor& dc, const at::Tensor& w2) {
  if (g.channels_last) return from_cl_matrix(at::mm(cl_matrix(dc), w2), g.N, g.H, g.W);
  auto dx = at::bmm(w2.t().unsqueeze(0).expand({g.N, g.Cin, g.Cout}),
                    dc.reshape({g.N, g.Cout, g.H * g.W}));
  return dx.view({g.N, g.Cin, g.H, g.W});
}

at::Tensor pw_dweight_gemm(const PwGeom& g, const at::Tensor& dc, const at::Tensor& x) {
  if (g.channels_last) return at::mm(cl_matrix(dc).t(), cl_matrix(x));
  // one GEMM over all N*H*W pixels (per-image partial products would be rounded
  // to the low-precision dtype before their sum)
  // explicit sizes, not -1: Cin == 0 makes a 0-element reshape to {0, -1} ambiguous (throws)
  const int64_t P = g.N * g.H * g.W;
  auto dcm = dc.reshape({g.N, g.Cout, g.H * g.W}).transpose(0, 1).reshape({g.Cout, P});
  auto xm = x.reshape({g.N, g.Cin, g.H * g.W}).transpose(0, 1).reshape({g.Cin, P});
  return at::mm(dcm, xm.t());
}

}  // namespace mbx
