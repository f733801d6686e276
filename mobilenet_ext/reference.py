"""Pure-PyTorch compositions of every op: the truth for tests and the last fallback.

Each function computes exactly what the fused op promises, with PyTorch's own
modules run one after the other (conv, then BatchNorm, then the activation), the
way torchvision's MobileNets run them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu6", "relu", "identity", "hardswish", "silu")


def activation(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu6":
        return F.relu6(y)
    if act == "relu":
        return F.relu(y)
    if act == "identity":
        return y
    if act == "hardswish":
        if y.dtype == torch.float64:
            # PyTorch's CUDA hardswish multiplies by a float 1/6 even in float64 (relative
            # error 2**-25, measured on an H200): the float64 truth divides exactly, with
            # hardswish_backward's gradients at the kinks (0 at -3, 1 at 3)
            return torch.where(y <= -3, 0.0, torch.where(y >= 3, y, y * (y + 3) / 6))
        return F.hardswish(y)
    if act == "silu":
        return F.silu(y)
    raise ValueError(f"act: unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def default_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size - 1) // 2 * dilation


def dw_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                   padding=None, dilation=1, training=False, momentum=0.1, eps=1e-5,
                   act="relu6"):
    """act(BatchNorm(depthwise_conv(x))); updates the running buffers when training."""
    if padding is None:
        padding = default_padding(weight.shape[-1], dilation)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return activation(y, act)


def dw_fwd(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
           training, eps, act):
    """Reference of the registered op `mobilenet_ext::dw_fwd`: (y, mean, invstd).

    Statistics in float64 for float64 input, float32 otherwise; the running buffers
    are not touched (the op is functional).
    """
    conv = F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])
    y, mean, invstd = _bn_act(conv, bn_weight, bn_bias, running_mean, running_var, training, eps,
                              act)
    return y.to(x.dtype), mean, invstd


def pw_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, residual=None,
                   training=False, momentum=0.1, eps=1e-5, act="relu6"):
    """act(BatchNorm(conv1x1(x))) + residual; updates the running buffers when training."""
    y = F.conv2d(x, weight)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    y = activation(y, act)
    return y if residual is None else y + residual


def pw_fwd(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training, eps,
           act, save_conv=False):
    """Reference of the registered op `mobilenet_ext::pw_fwd`: (y, mean, invstd, conv), conv
    the conv output in the accumulation dtype when save_conv (the CPU kernels' dtype; the
    CUDA kernels keep x's), else an empty tensor."""
    conv = F.conv2d(x, weight)
    y, mean, invstd = _bn_act(conv, bn_weight, bn_bias, running_mean, running_var, training, eps,
                              act)
    if residual is not None:
        y = y + residual
    saved = conv.to(mean.dtype) if save_conv else mean.new_empty((0,))
    return y.to(x.dtype), mean, invstd, saved


def _bn_act(conv, bn_weight, bn_bias, running_mean, running_var, training, eps, act):
    """act(BN(conv)) in the accumulation dtype, and the statistics it used."""
    acc = torch.float64 if conv.dtype == torch.float64 else torch.float32
    c = conv.to(acc)
    if training:
        var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    z = (c - mean[:, None, None]) * (invstd * bn_weight.to(acc))[:, None, None]
    z = z + bn_bias.to(acc)[:, None, None]
    return activation(z, act), mean, invstd
