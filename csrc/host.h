// Host-side contract of the ops shared by the CPU and CUDA implementations:
// argument checks (done once, before any launch), layout, and the per-channel
// BatchNorm folding.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace mbx {

int parse_act(c10::string_view act);

// Held for the whole body of every op implementation (CPU and CUDA), so that the ATen
// calls inside run as written. Under torch.autocast the autocast keys stay in the
// thread's dispatch set while the op runs (it has no autocast kernel: ops.py casts its
// inputs), and the GEMMs and oneDNN conv2d inside would return the autocast dtype: a
// bf16 conv output that the fp32 epilogue rejects (CPU, channels_last, 16384+ pixels).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

struct DwGeom {
  int64_t N, C, H, W, Ho, Wo;
  int K, stride, pad, dil, act;
  bool channels_last;  // memory format of x, and so of y, dy and dx
  // CPU, NCHW eval forward only: channels_last row kernels on in-cache tiles of channel
  // planes (dw_fwd_tiles in cpu/dw_kernels.h) instead of whole-tensor copies
  bool nchw_tiles = false;
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// Layout rule shared with mobilenet_ext/ops.py::_memory_format: channels_last
// only when x is channels_last-contiguous and not plain contiguous.
bool is_channels_last(const at::Tensor& x);

// Checks every argument of dw_fwd and returns the geometry. Throws
// ValueError/TypeError-mapped c10 errors naming the bad argument.
DwGeom dw_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
                int64_t dilation, bool training, c10::string_view act);

// Statistics used to normalise in eval mode: (running_mean, 1/sqrt(running_var+eps)),
// as new tensors in the accumulation dtype. CPU tensors (CUDA: bn_fold_cuda).
std::tuple<at::Tensor, at::Tensor> eval_stats(const at::Tensor& running_mean,
                                              const at::Tensor& running_var, double eps,
                                              at::ScalarType acc);

// scale = gamma*invstd, shift = beta - mean*scale, in the accumulation dtype. CPU
// tensors (CUDA: bn_fold_cuda).
std::tuple<at::Tensor, at::Tensor> fold_bn(const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                           const at::Tensor& mean, const at::Tensor& invstd);

// nn.BatchNorm2d's running-buffer update from a fused op's batch statistics, in
// place: running = (1 - momentum)*running + momentum*batch, with the variance
// 1/invstd^2 - eps made unbiased (times `unbias` = count/(count-1)). Either buffer
// may be absent. The op mobilenet_ext::_update_running.
void update_running(const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_var, const at::Tensor& mean,
                    const at::Tensor& invstd, double eps, double unbias, double momentum);

at::ScalarType acc_type(at::ScalarType t);

// Checks of the backward ops' extra arguments: grad_y of shape y_sizes in x's
// dtype and device, and (mean, invstd) in the accumulation dtype.
void check_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                    const at::Tensor& invstd, at::IntArrayRef y_sizes);

// dw_check for the backward op (the statistics stand in for the running buffers)
// plus check_bwd_args.
DwGeom dw_bwd_check(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                    const at::Tensor& mean, const at::Tensor& invstd, int64_t stride,
                    int64_t padding, int64_t dilation, c10::string_view act);

struct PwGeom {
  int64_t N, Cin, Cout, H, W;
  int act;
  bool channels_last;
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// Checks every argument of pw_fwd (residual may be absent) and returns the geometry.
PwGeom pw_check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& running_var,
                const c10::optional<at::Tensor>& residual, bool training, c10::string_view act);

// pw_check for the backward op plus check_bwd_args.
PwGeom pw_bwd_check(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                    const at::Tensor& mean, const at::Tensor& invstd, c10::string_view act);

// pw_fwd's fourth output when the conv output is not saved: an empty tensor in
// the accumulation dtype of x.
at::Tensor pw_conv_not_saved(const at::Tensor& x);

// pw_bwd's conv argument (the conv output pw_fwd saved, in `dtype`: the accumulation
// dtype on CPU, x's on CUDA): checked against the geometry, returned contiguous in the
// layout of y.
at::Tensor pw_check_saved_conv(const PwGeom& g, const at::Tensor& x, const at::Tensor& conv,
                               at::ScalarType dtype);

// The three GEMMs of the 1x1 conv, in the dtype of their inputs, with no layout
// conversion: channels_last is [N*H*W, Cin] x [Cin, Cout], NCHW is
// [Cout, Cin] x [Cin, H*W] per image (one batched GEMM).
// conv (N, Cout, H, W) in x's memory format, contiguous, in out_dtype (default x's;
// fp32 from fp16/bf16 inputs is a cuBLAS GEMM with fp32 output, CUDA only).
at::Tensor pw_conv_gemm(const PwGeom& g, const at::Tensor& x, const at::Tensor& w2,
                        c10::optional<at::ScalarType> out_dtype = c10::nullopt);
// The same GEMM written into out (N, Cout, H, W), contiguous in x's memory format and
// x's dtype: no view of a temporary escapes (autograd forbids in-place ops on those).
void pw_conv_gemm_out(const PwGeom& g, const at::Tensor& x, const at::Tensor& w2,
                      at::Tensor& out);
// dx (N, Cin, H, W) in x's memory format from dc laid out like y.
at::Tensor pw_dx_gemm(const PwGeom& g, const at::Tensor& dc, const at::Tensor& w2);
// dweight (Cout, Cin) from dc laid out like y.
at::Tensor pw_dweight_gemm(const PwGeom& g, const at::Tensor& dc, const at::Tensor& x);

}  // namespace mbx
