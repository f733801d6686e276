"""Public functional ops, their fake kernels and autograd, and the backend choice.

The registered ops (`torch.ops.mobilenet_ext.*`) are functional: they return the
statistics they normalised with, and the public wrappers below update the running
buffers from them, in place and without grad, exactly as `nn.BatchNorm2d` does.
"""
from __future__ import annotations

import inspect
import operator
import os

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _backend, reference
from .reference import ACTIVATIONS

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Same rule as csrc/dw_conv_host.cpp::is_channels_last."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_out(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _check_param(t, name, x, c):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != c:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape ({c},) to match the channels of x, got {shape}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} like x, got {t.device}")
    if t.dtype not in (x.dtype, _acc_dtype(x.dtype)):
        raise ValueError(f"{name}: expected dtype {x.dtype} or {_acc_dtype(x.dtype)} for x of "
                         f"dtype {x.dtype}, got {t.dtype}")


def _check_x_weight(x, weight):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got "
                         f"{x.dim() if isinstance(x, torch.Tensor) else type(x).__name__}-D")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype (float64/32/16, bfloat16), got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("weight: expected a 4-D tensor")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: expected dtype {x.dtype} like x, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} like x, got {weight.device}")


def _check_eps(training, eps):
    if training and not eps > 0:  # as F.batch_norm: 1/sqrt(var + eps) of a constant channel
        raise ValueError(f"eps: must be positive when training, got {eps}")


def _as_int(v, name):
    """v as a Python int (an int-like: numpy's too), None as None; ValueError naming the
    argument otherwise (2.5 would reach the op's int schema, or the default padding)."""
    if v is None or type(v) is int:
        return v
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {v!r}") from None


def _check_bn_act(x, c_out, out_count, bn_weight, bn_bias, running_mean, running_var, training,
                  momentum, act):
    """Checks shared by both ops: BN parameters of c_out channels, act, training batch."""
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"),
                    (running_mean, "running_mean"), (running_var, "running_var")):
        _check_param(t, name, x, c_out)
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    if training:
        if out_count == 1:  # 0 (an empty batch) runs the reference (_pick_backend)
            raise ValueError(f"x: expected more than 1 value per channel when training, got "
                             f"{out_count} (input shape {tuple(x.shape)})")
        if momentum is None:
            raise ValueError("momentum: None (cumulative average) needs num_batches_tracked; "
                             "pass momentum=1/num_batches_tracked, as nn.BatchNorm2d does")
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean/running_var: required when training=False")


def _check_dw(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
              dilation, training, momentum, act):
    _check_x_weight(x, weight)
    n, c, h, w = x.shape
    if weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight: expected shape ({c}, 1, k, k) for a depthwise conv of x with "
                         f"{c} channels, got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k not in (3, 5, 7):
        raise ValueError(f"weight: kernel size must be 3, 5 or 7, got {k}")
    if stride not in (1, 2):
        raise ValueError(f"stride: must be 1 or 2, got {stride}")
    if not 1 <= dilation <= 8:
        raise ValueError(f"dilation: must be in [1, 8], got {dilation}")
    if not 0 <= padding <= dilation * (k - 1):
        raise ValueError(f"padding: must be in [0, dilation*(k-1)] = [0, {dilation * (k - 1)}], "
                         f"got {padding}")
    if h == 0 or w == 0:
        raise ValueError(f"x: spatial size must be non-zero, got {tuple(x.shape)}")
    if min(h, w) + 2 * padding < dilation * (k - 1) + 1:
        raise ValueError(f"x: spatial size ({h}, {w}) is smaller than the padded kernel")
    count = n * _conv_out(h, k, stride, padding, dilation) * \
        _conv_out(w, k, stride, padding, dilation)
    _check_bn_act(x, c, count, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                  act)


def _check_pw(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training,
              momentum, act):
    _check_x_weight(x, weight)
    n, c, h, w = x.shape
    if weight.shape[1] != c or weight.shape[2] != 1 or weight.shape[3] != 1:
        raise ValueError(f"weight: expected shape (Cout, {c}, 1, 1) for a 1x1 conv of x with {c} "
                         f"channels, got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if h == 0 or w == 0:  # eager's conv2d rejects it too
        raise ValueError(f"x: spatial size must be non-zero, got {tuple(x.shape)}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != (n, c_out, h, w):
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual
            raise ValueError(f"residual: expected shape {(n, c_out, h, w)} like the output, "
                             f"got {shape}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual: expected dtype {x.dtype} like x, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual: expected device {x.device} like x, got "
                             f"{residual.device}")
    _check_bn_act(x, c_out, n * h * w, bn_weight, bn_bias, running_mean, running_var, training,
                  momentum, act)


# The compiled kernels check their arguments in C++ with the same ValueError messages
# (csrc/host.cpp). Run eagerly, the wrappers leave those checks to them (~7 us a call
# in Python) and look only at what C++ cannot see: Python types, momentum, and every
# tensor's device (the dispatcher picks the kernel from all of them: a weight on "meta"
# would reach the fake kernel, which checks nothing). Anything unusual, the Triton and
# reference backends, and torch.compile's tracing take the full checks below.
_COMPILED = ("cpu", "cuda")
# Whether a tensor is on the backend's device type: the is_cpu/is_cuda flags, where
# building a torch.device per tensor cost ~0.6 us each. The C++ entry points compare
# the device indices.
_ON_DEVICE = {"cpu": operator.attrgetter("is_cpu"), "cuda": operator.attrgetter("is_cuda")}


def _checks_left_to_cpp(backend, x, weight, training, momentum, *tensors) -> bool:
    if backend not in _COMPILED or (training and momentum is None) or \
            torch.compiler.is_compiling():
        return False
    on = _ON_DEVICE[backend]
    if not (x.dim() == 4 and isinstance(weight, torch.Tensor) and weight.dim() == 4 and
            on(weight)):
        return False
    for t in tensors:  # a loop, not all(<generator>): ~2 us less per call
        if t is not None and not (isinstance(t, torch.Tensor) and on(t)):
            return False
    return True


def _update_running(running_mean, running_var, mean, invstd, eps, count, momentum):
    """nn.BatchNorm2d's update: running = (1-m)*running + m*batch, unbiased variance.
    The compiled op does it in one call (one loop on CPU); these ATen ops where the
    extension is not built, and under torch.compile."""
    if _backend._C_ERROR is None and not torch.compiler.is_compiling():
        with torch.no_grad():
            torch.ops.mobilenet_ext._update_running.default(
                running_mean, running_var, mean, invstd, eps, count / (count - 1), momentum)
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(_as(mean, running_mean.dtype), momentum)
        if running_var is not None:
            var = invstd.pow(-2).sub_(eps).clamp_(min=0).mul_(count / (count - 1))
            running_var.lerp_(_as(var, running_var.dtype), momentum)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


# One cheap test per call for the usual case (no autocast anywhere); torch.compile traces it.
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(x, *tensors):
    """Under `torch.autocast` for x's device type, x, the conv weight and the residual in
    the autocast dtype, as autocast casts conv2d's input and weight (a lower-precision op)
    and the block input that eager adds to a lower-precision result; float64 and
    non-floating tensors stay as they are, as autocast leaves them. The BN parameters
    and running buffers stay as given (fp32 in a mixed-precision model), as eager
    batch_norm takes them. Outside autocast: the arguments unchanged."""
    if not _ANY_AUTOCAST() or not isinstance(x, torch.Tensor):
        return (x, *tensors)
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype not in (dtype, torch.float64) else t for t in (x, *tensors))


_peek_interpreter = torch._C._functorch.peek_interpreter_stack


def _transformed() -> bool:
    """Under a torch.func transform (jvp, vmap, grad, ...) or forward-mode AD
    (`torch.autograd.forward_ad.dual_level`): the fused ops have no forward-AD formula
    and no batching rule (a dual tensor whose primal needs no gradient would reach the
    kernel and lose its tangent), so the wrappers run the reference composition, which
    has both, as eager does. ~0.3 us a call."""
    if torch.compiler.is_compiling():
        return False
    return _peek_interpreter() is not None or _forward_ad._current_level >= 0


def _pick_backend(x, training):
    """The backend for a call on x (None when x is not a tensor: the checks raise): the
    selected one, or the reference composition, which is eager, where the fused ops
    have nothing to offer: under a transform (_transformed), and for a training batch
    of zero images, which has no statistics to normalise with (eager `F.batch_norm`
    returns an empty output and leaves the running buffers as they are; the fused ops
    need more than 1 value per channel). An empty eval call runs the fused kernels."""
    backend = _backend.pick(x) if isinstance(x, torch.Tensor) else None
    if backend is not None and (_transformed() or training and x.dim() == 4 and
                                x.shape[0] == 0):
        return "reference"
    return backend


def _run_fused(name, backend, x, c_out, bn_weight, bn_bias, running_mean, running_var, training,
               momentum, eps, args):
    """Calls a registered fused op (`name` on `backend`) and updates the running buffers
    from its statistics."""
    if bn_weight is None:
        bn_weight = torch.ones(c_out, dtype=_acc_dtype(x.dtype), device=x.device)
    if bn_bias is None:
        bn_bias = torch.zeros(c_out, dtype=_acc_dtype(x.dtype), device=x.device)
    update = None
    if training:
        def update(out):
            y, mean, invstd = out[:3]
            count = y.shape[0] * y.shape[2] * y.shape[3]
            _update_running(running_mean, running_var, mean, invstd, eps, count, momentum)
    return _call(name + ("_triton" if backend == "triton" else ""), update,
                 x.contiguous(memory_format=_memory_format(x)), args[0], bn_weight, bn_bias,
                 running_mean, running_var, *args[1:])[0]


def dw_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                   padding=None, dilation=1, training=False, momentum=0.1, eps=1e-5,
                   act="relu6"):
    """Fused depthwise conv + BatchNorm + activation.

    x (N, C, H, W), weight (C, 1, k, k) with k in {3, 5, 7}; stride 1 or 2; padding
    defaults to (k-1)//2*dilation. bn_weight/bn_bias may be None (affine=False).
    Eval: y = act(conv(x)*scale + shift) with BN folded in fp32. Training:
    normalises with batch statistics and updates running_mean/running_var in place
    (when given) as `F.batch_norm` does. Returns y in x's memory format. Under
    `torch.autocast`, x and weight run in the autocast dtype, as eager conv2d does.
    """
    if not (type(stride) is int and type(dilation) is int and
            (padding is None or type(padding) is int)):
        stride, padding, dilation = (_as_int(stride, "stride"), _as_int(padding, "padding"),
                                     _as_int(dilation, "dilation"))
    if padding is None and isinstance(weight, torch.Tensor):
        padding = reference.default_padding(weight.shape[-1], dilation)
    x, weight = _autocast(x, weight)
    _check_eps(training, eps)
    backend = _pick_backend(x, training)
    if not _checks_left_to_cpp(backend, x, weight, training, momentum, bn_weight, bn_bias,
                               running_mean, running_var):
        _check_dw(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                  dilation, training, momentum, act)
    if backend == "reference":
        return reference.dw_conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, dilation=dilation, training=training, momentum=momentum, eps=eps,
            act=act)
    return _run_fused("dw_fwd", backend, x, x.shape[1], bn_weight, bn_bias,
                      running_mean, running_var, training, momentum, eps,
                      (weight, stride, padding, dilation, training, eps, act))


def pw_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, residual=None,
                   training=False, momentum=0.1, eps=1e-5, act="relu6"):
    """Fused pointwise (1x1) conv + BatchNorm + activation (+ residual).

    x (N, Cin, H, W), weight (Cout, Cin, 1, 1); y = act(BN(conv1x1(x))) + residual,
    residual (N, Cout, H, W) or None. MobileNetV2's linear bottleneck is
    act="identity" with the block input as residual. BN handling as in
    `dw_conv_bn_act`. Returns y in x's memory format.
    """
    x, weight, residual = _autocast(x, weight, residual)
    _check_eps(training, eps)
    backend = _pick_backend(x, training)
    if not _checks_left_to_cpp(backend, x, weight, training, momentum, bn_weight, bn_bias,
                               running_mean, running_var, residual):
        _check_pw(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training,
                  momentum, act)
    if backend == "reference":
        return reference.pw_conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean, running_var, residual=residual,
            training=training, momentum=momentum, eps=eps, act=act)
    # The CPU kernels keep the conv output for the backward op when it will run (a
    # gradient of x, weight or the BN parameters is needed): one GEMM fewer there. The
    # CUDA kernels keep it (in x's dtype) when MOBILENET_EXT_PW_SAVE=1, else recompute
    # it: which is faster is for a GPU run to say (bench/NOTES.md). Read at every call,
    # and once per trace under torch.compile. The Triton backwards recompute it.
    keeps_conv = backend == "cpu" or (
        backend == "cuda" and os.environ.get("MOBILENET_EXT_PW_SAVE") == "1")
    # not under torch.jit.trace: one graph whether or not the trace records gradients
    save_conv = keeps_conv and torch.is_grad_enabled() and not torch.jit.is_tracing() and \
        _requires_grad((x, weight, bn_weight, bn_bias))
    return _run_fused("pw_fwd", backend, x, weight.shape[0], bn_weight, bn_bias,
                      running_mean, running_var, training, momentum, eps,
                      (weight, residual, training, eps, act, save_conv))


# ---------------------------------------------------------------- registration
#
# Two sets of ops share one schema, one fake kernel and one autograd formula per op
# family: the compiled ones (`dw_fwd`, ...: CPU and CUDA kernels from _C) and the
# Triton ones (`dw_fwd_triton`, ...: defined here, any device the Triton kernels can
# run on). Only the kernels differ.

DW_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
                 "Tensor? running_mean, Tensor? running_var, int stride, int padding, "
                 "int dilation, bool training, float eps, str act) -> (Tensor, Tensor, Tensor)")
DW_BWD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
                 "Tensor mean, Tensor invstd, int stride, int padding, int dilation, "
                 "bool training, str act) -> (Tensor, Tensor, Tensor, Tensor)")
PW_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
                 "Tensor? running_mean, Tensor? running_var, Tensor? residual, bool training, "
                 "float eps, str act, bool save_conv) -> (Tensor, Tensor, Tensor, Tensor)")
PW_BWD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
                 "Tensor mean, Tensor invstd, Tensor? conv, bool training, str act) -> "
                 "(Tensor, Tensor, Tensor, Tensor)")


def _dw_fwd_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                 dilation, training, eps, act):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = (_conv_out(s, k, stride, padding, dilation) for s in (h, w))
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=_memory_format(x))
    acc = _acc_dtype(x.dtype)
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _pw_fwd_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training,
                 eps, act, save_conv):
    n, _, h, w = x.shape
    c = weight.shape[0]
    fmt = _memory_format(x)
    y = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    acc = _acc_dtype(x.dtype)
    # the saved conv output: in the accumulation dtype on CPU, in x's on CUDA (the GEMM's
    # output as eager keeps it)
    saved = x.dtype if x.device.type == "cuda" else acc
    conv = (torch.empty((n, c, h, w), dtype=saved, device=x.device, memory_format=fmt)
            if save_conv else x.new_empty((0,), dtype=acc))
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), conv


def _bwd_fake(grad_y, x, weight, bn_weight, bn_bias, *_):
    return (torch.empty_like(x, memory_format=_memory_format(x)), weight.new_empty(weight.shape),
            bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape))


def _no_double_backward(ctx, *grads):
    raise RuntimeError("mobilenet_ext: double backward (grad of a grad) is not supported "
                       "by the fused ops; use the 'reference' backend for it")


def _call_bwd(bwd_op, *args):
    """A backward op: straight to the kernel, unless a graph of the backward is being
    recorded (create_graph=True), where its registered autograd raises the
    double-backward error."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return bwd_op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return bwd_op.default(*args)


def _register_family(fwd, bwd, fwd_fake, cfg_index, residual_index, save_conv_index=None):
    """Fake kernels and autograd of one forward/backward op pair. The forward saves
    x, weight, the BN parameters and the statistics, and, where the forward input
    save_conv_index is true, its fourth output (the conv output); the backward op
    recomputes the rest. cfg_index lists the forward's non-tensor arguments the
    backward takes; residual_index is the forward input whose gradient is grad_y
    (or None)."""
    torch.library.register_fake(fwd)(fwd_fake)
    torch.library.register_fake(bwd)(_bwd_fake)
    bwd_op = getattr(torch.ops.mobilenet_ext, bwd.split("::")[1])
    n_inputs = len(inspect.signature(fwd_fake).parameters)

    def setup(ctx, inputs, output):
        saved = [*inputs[:4], output[1], output[2]]
        if save_conv_index is not None:
            saved.append(output[3] if inputs[save_conv_index] else None)
        ctx.save_for_backward(*saved)
        ctx.cfg = tuple(inputs[i] for i in cfg_index)
        ctx.has_residual = residual_index is not None and inputs[residual_index] is not None
        # the backward op's gradients are those of x, weight and the BN parameters:
        # with only the residual needing one, grad_y is all there is to return
        ctx.run_bwd = _requires_grad(inputs[:4])
        # mean/invstd (and the saved conv) feed only the running-buffer update and the
        # backward, both without grad
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, *_grad_stats):
        grads = [None] * n_inputs
        if grad_y is not None:
            if ctx.run_bwd:
                grads[:4] = _call_bwd(bwd_op, grad_y, *ctx.saved_tensors, *ctx.cfg)
            if ctx.has_residual:  # added after the activation
                grads[residual_index] = grad_y
        return tuple(grads)

    torch.library.register_autograd(fwd, backward, setup_context=setup)
    torch.library.register_autograd(bwd, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    name = fwd.split("::")[1]
    _AUTOGRAD[name] = (getattr(torch.ops.mobilenet_ext, name).default, setup, backward)


# The forward ops' autograd, by op name ("pw_fwd", "pw_fwd_triton", ...): the OpOverload
# and the setup_context / backward functions registered for it.
_AUTOGRAD = {}


class _Eager(torch.autograd.Function):
    """A fused forward op with its registered autograd formula (the very setup and
    backward functions above), without torch.library's wrapper around them. On CPU that
    wrapper cost ~150 us per call (half of it torch's fill_defaults, which rebuilds the
    op's argument list once per argument), a tenth of a small layer's training step at
    batch 1. Under
    torch.compile the registered op runs instead (_call)."""

    @staticmethod
    def forward(ctx, name, update, *inputs):
        op, setup, _ = _AUTOGRAD[name]
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*inputs)
        if update is not None:  # before setup saves: see _call
            update(out)
        setup(ctx, inputs, out)
        ctx.name = name
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *_AUTOGRAD[ctx.name][2](ctx, *grads))


def _requires_grad(args) -> bool:
    for t in args:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _call(name, update, *args):
    """The registered forward op `name` on args: through _Eager when a gradient is
    needed, straight to the kernel below autograd when not; the registered op itself
    (and its registered autograd) when torch.compile or torch.jit.trace traces.
    update(out) (the running-buffer update, or None) runs on the op's outputs before
    _Eager's forward saves its tensors, as eager BatchNorm updates its buffers inside
    its op: non-reentrant activation checkpointing stops a recomputed forward at the
    last saved tensor, and eager's layers have updated their buffers by then."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        out = getattr(torch.ops.mobilenet_ext, name)(*args)
    elif torch.is_grad_enabled() and _requires_grad(args):
        return _Eager.apply(name, update, *args)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            out = _AUTOGRAD[name][0](*args)
    if update is not None:
        update(out)
    return out


def _register(suffix):
    _register_family(f"mobilenet_ext::dw_fwd{suffix}", f"mobilenet_ext::dw_bwd{suffix}",
                     _dw_fwd_fake, (6, 7, 8, 9, 11), None)
    _register_family(f"mobilenet_ext::pw_fwd{suffix}", f"mobilenet_ext::pw_bwd{suffix}",
                     _pw_fwd_fake, (7, 9), 6, save_conv_index=10)


def _define_triton_ops():
    """The Triton ops: same schemas, kernels from mobilenet_ext.triton (imported on
    first call, so the package imports without Triton)."""
    lib = torch.library.Library("mobilenet_ext", "FRAGMENT")
    for name, schema in (("dw_fwd", DW_FWD_SCHEMA), ("dw_bwd", DW_BWD_SCHEMA),
                         ("pw_fwd", PW_FWD_SCHEMA), ("pw_bwd", PW_BWD_SCHEMA)):
        lib.define(f"{name}_triton{schema}")

        def impl(*args, _name=name):
            from .triton import dw, pw
            return getattr(dw if _name.startswith("dw") else pw, _name)(*args)

        lib.impl(f"{name}_triton", impl, "CompositeExplicitAutograd")
    return lib


_TRITON_LIB = _define_triton_ops()
_register("_triton")
if _backend._C_ERROR is None:
    _register("")
