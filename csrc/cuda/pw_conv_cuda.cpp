// CUDA implementation of mobilenet_ext::pw_fwd / pw_bwd. The 1x1 conv is a
// cuBLAS GEMM (pw_conv_gemm) written straight into y's buffer and layout; the
// fused epilogue (pw_conv.cu) then applies BatchNorm, activation and residual in
// place, so y = act(BN(conv)) + residual costs one GEMM and one elementwise pass
// (eager: conv, BN, activation and add, four kernels). Training adds one
// statistics pass over the conv output.
//
// Backward recomputes the conv output with one more GEMM (in fp32, written as
// such) unless pw_fwd saved it (save_conv, which ops.py asks for on CUDA only with
// MOBILENET_EXT_PW_SAVE=1): then the forward's GEMM writes the conv output into a
// tensor of its own in x's dtype, as eager keeps it, the epilogue writes y out of
// place, and the backward reads it. Recomputing keeps x, weight and two
// per-channel vectors only; saving keeps one y-sized tensor more (eager keeps the
// conv and BN outputs) and saves the backward a GEMM and the 4-byte conv buffer's
// traffic. Which is faster is unmeasured (bench/NOTES.md); the CPU kernels always
// save it, there the GEMMs are most of a training step.
//
// Eval forward in fp16/bf16 channels_last takes one fused kernel instead
// (pw_fused.cu: GEMM on tensor cores with the epilogue applied in registers/shared
// memory, reading x once and writing y once); MOBILENET_EXT_PW_FUSED=0 turns it off.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../host.h"
#include "launch.h"
#include "launch_host.h"
#include "pw_fused.h"

namespace mbx {
namespace {

// The pointwise op as a K=1 output geometry for the shared launch parameters.
DwGeom out_geom(const PwGeom& g) {
  DwGeom o;
  o.N = g.N;
  o.C = g.Cout;
  o.H = o.Ho = g.H;
  o.W = o.Wo = g.W;
  o.K = o.stride = o.dil = 1;
  o.pad = 0;
  o.act = g.act;
  o.channels_last = g.channels_last;
  return o;
}

// The single-kernel eval path (pw_fused.cu): fp16/bf16 channels_last, taken where
// the output is at least as wide as the input (expand layers). There it won 2-3x
// over eager on the H200 (GPU run 1) because the wide conv output never goes to
// memory; on projections (Cin > Cout) it lost to cuBLAS's GEMM (0.5-0.8x eager),
// so those take cuBLAS + the vectorised epilogue. MOBILENET_EXT_PW_FUSED=0 never
// takes it, =1 always (read on every call).
bool use_pw_fused(const PwGeom& g, const at::Tensor& x, bool training) {
  if (training || !g.channels_last) return false;
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  const char* env = std::getenv("MOBILENET_EXT_PW_FUSED");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const bool always = env != nullptr && std::strcmp(env, "1") == 0;
  if (!always && g.Cout < g.Cin) return false;
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;  // channels are int in the kernel
  if (g.Cin > kIntMax || g.Cout > kIntMax) return false;
  return pw_fused_supported();  // the current device is x's (CUDAGuard)
}

// Eval forward in one kernel: y = act(conv(x) * scale + shift) + residual with
// (mean, invstd) from the running statistics (bn_fold_cuda), returned like
// forward_epilogue's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pw_fwd_fused(
    const PwGeom& g, const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
    const c10::optional<at::Tensor>& residual, double eps) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  auto x = x_.contiguous(cl);
  auto w2 = weight.reshape({g.Cout, g.Cin}).contiguous();
  const auto opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({g.Cout}, opts), invstd = at::empty({g.Cout}, opts);
  auto folded = bn_fold_cuda(bn_weight, bn_bias, mean, invstd, &running_mean, &running_var, eps);
  auto y = at::empty({g.N, g.Cout, g.H, g.W}, x.options().memory_format(cl));
  if (y.numel() == 0) return {y, mean, invstd};  // P == 0 or Cout == 0: no launch
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous(cl);
  PwFusedArgs a{};
  a.x = x.const_data_ptr();
  a.w = w2.const_data_ptr();
  a.scale = static_cast<const float*>(bn_fold_row(folded, 0));
  a.shift = static_cast<const float*>(bn_fold_row(folded, 1));
  a.residual = res.defined() ? res.const_data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.P = g.N * g.H * g.W;
  a.Cin = static_cast<int>(g.Cin);  // Cin == 0: no K steps, y = act(shift) + residual
  a.Cout = static_cast<int>(g.Cout);
  a.act = g.act;
  pw_fused_launch(a, x.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& residual,
    bool training, double eps, c10::string_view act, bool save_conv) {
  const NoAutocast no_autocast;
  PwGeom g = pw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                      training, act);
  c10::cuda::CUDAGuard guard(x_.device());
  if (!save_conv && use_pw_fused(g, x_, training)) {  // the fused kernel has no conv output
    auto out = pw_fwd_fused(g, x_, weight, bn_weight, bn_bias, *running_mean, *running_var,
                            residual, eps);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), pw_conv_not_saved(x_)};
  }
  auto x = x_.contiguous(g.format());
  auto w2 = weight.reshape({g.Cout, g.Cin}).contiguous();
  // the conv output, written by the GEMM into y's own buffer (not a view of a
  // temporary: autograd forbids in-place ops on such outputs) and overwritten in place;
  // when saved, into a tensor of its own
  auto y = at::empty({g.N, g.Cout, g.H, g.W}, x.options().memory_format(g.format()));
  auto conv = save_conv ? at::empty_like(y) : y;
  pw_conv_gemm_out(g, x, w2, conv);
  at::Tensor res;
  ConvLaunch p = make_launch(out_geom(g), x, w2, training, eps);
  if (residual.has_value()) {
    res = residual->contiguous(g.format());
    p.residual = res.const_data_ptr();
  }
  p.conv = conv.const_data_ptr();
  p.y = y.data_ptr();
  auto stats = forward_epilogue(p, x, bn_weight, bn_bias, running_mean, running_var, training,
                                eps, y.numel() == 0, pw_stats_launch, pw_apply_launch);
  return {y, std::get<0>(stats), std::get<1>(stats), save_conv ? conv : pw_conv_not_saved(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pw_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean_,
    const at::Tensor& invstd_, const c10::optional<at::Tensor>& saved_conv, bool training,
    c10::string_view act) {
  const NoAutocast no_autocast;
  PwGeom g = pw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean_, invstd_, act);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(g.format());
  auto dy = grad_y.contiguous(g.format());
  auto mean = mean_.contiguous(), invstd = invstd_.contiguous();
  auto w2 = weight.reshape({g.Cout, g.Cin}).contiguous();
  if (dy.numel() == 0) {
    return {at::zeros(x.sizes(), x.options().memory_format(g.format())), at::zeros_like(weight),
            at::zeros_like(bn_weight), at::zeros_like(bn_bias)};
  }
  // the saved conv output (x's dtype, as eager keeps it), or recomputed in the
  // accumulation dtype: dgamma sums dz*(conv - mean) over every pixel, and a conv
  // rounded to fp16 costs it several times eager's error (measured with the Triton
  // kernels under the interpreter; eager's cuDNN BN backward reads its rounded conv
  // output too)
  at::Tensor conv = saved_conv.has_value()
                        ? pw_check_saved_conv(g, x, *saved_conv, x.scalar_type())
                        : pw_conv_gemm(g, x, w2, acc_type(x.scalar_type()));
  ConvLaunch p = make_launch(out_geom(g), x, w2, training, /*eps=*/0.0);
  p.conv = conv.const_data_ptr();
  p.conv_acc = conv.scalar_type() != x.scalar_type();
  auto held = backward_epilogue_args(p, dy, bn_weight, bn_bias, mean, invstd);
  C10_CUDA_CHECK(pw_bwd_launch(p, c10::cuda::getCurrentCUDAStream()));
  const at::Tensor& dc = held[2];
  return {pw_dx_gemm(g, dc, w2).contiguous(g.format()),
          pw_dweight_gemm(g, dc, x).reshape(weight.sizes()).contiguous(),
          held[0].to(bn_weight.scalar_type()), held[1].to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CUDA, m) {
  m.impl("pw_fwd", &pw_fwd_cuda);
  m.impl("pw_bwd", &pw_bwd_cuda);
}

}  // namespace mbx
