#include "dw_conv.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

DwGeom dw_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
                int64_t dilation, bool training, c10::string_view act) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  auto st = x.scalar_type();
  TORCH_CHECK_VALUE(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                    "x: expected a floating dtype (float64/32/16, bfloat16), got ", st);
  TORCH_CHECK_VALUE(weight.scalar_type() == st, "weight: expected dtype ", st,
                    " like x, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: expected device ", x.device(),
                    " like x, got ", weight.device());
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
  check_param(bn_weight, "bn_weight", x, C);
  check_param(bn_bias, "bn_bias", x, C);
  if (!training) {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                      "running_mean/running_var: required when training=False");
  }
  if (running_mean.has_value()) check_param(*running_mean, "running_mean", x, C);
  if (running_var.has_value()) check_param(*running_var, "running_var", x, C);
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
  if (training) {
    TORCH_CHECK_VALUE(g.N * g.Ho * g.Wo > 1,
                      "x: expected more than 1 value per channel when training, got output size ",
                      at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}));
  }
  TORCH_CHECK_VALUE(g.C * g.H * g.W < (int64_t(1) << 31) && g.C * g.Ho * g.Wo < (int64_t(1) << 31),
                    "x: one image must have fewer than 2^31 elements");
  return g;
}

std::tuple<at::Tensor, at::Tensor> eval_stats(const at::Tensor& running_mean,
                                              const at::Tensor& running_var, double eps,
                                              at::ScalarType acc) {
  auto mean = running_mean.to(acc, /*non_blocking=*/false, /*copy=*/true);
  auto invstd = (running_var.to(acc) + eps).rsqrt_();
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> fold_bn(const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                           const at::Tensor& mean, const at::Tensor& invstd) {
  auto scale = bn_weight.to(invstd.scalar_type()) * invstd;
  auto shift = bn_bias.to(invstd.scalar_type()) - mean * scale;
  return {scale.contiguous(), shift.contiguous()};
}

}  // namespace mbx
