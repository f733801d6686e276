"""Fused modules and MobileNet blocks.

`DWConvBNAct` and `PWConvBNAct` hold a real `nn.Conv2d` and `nn.BatchNorm2d` as
children "0" and "1" (torchvision's `Conv2dNormActivation` layout), so
parameters, buffers, optimizers, `.to()`, `.half()`, DDP and state_dicts behave
as with plain torch modules and torchvision checkpoints load unchanged; their
forward runs the fused op. After `nn.SyncBatchNorm.convert_sync_batchnorm` (or any
other swap of child "1") they run conv, that norm layer and the activation as
separate modules, so cross-process statistics are never silently dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .reference import ACTIVATIONS, activation

__all__ = ["DWConvBNAct", "PWConvBNAct", "DepthwiseSeparable", "InvertedResidual",
           "fused_conv_bn_act"]


def _bn_state(training, running_mean, running_var, num_batches_tracked, momentum, track):
    """(running_mean, running_var, training, momentum) to call a fused op with, doing
    what `nn.BatchNorm2d.forward` does: count num_batches_tracked, momentum=None as a
    cumulative average, batch statistics when it tracks no running stats."""
    m = 0.0 if momentum is None else momentum
    if training and track and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            m = 1.0 / float(num_batches_tracked)
    use_batch = training or (running_mean is None and running_var is None)
    keep = not training or track
    return running_mean if keep else None, running_var if keep else None, use_batch, m


def fused_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var,
                      num_batches_tracked, momentum, track_running_stats, training, eps, act,
                      stride=None, padding=0, dilation=1, residual=None):
    """A conv + BatchNorm2d (+ activation, + residual) module's fused forward: depthwise
    with stride/padding/dilation, or pointwise when stride is None. The BatchNorm's
    buffers and settings are passed in, and the module bookkeeping (num_batches_tracked,
    momentum=None) happens here at run time, so that under `torch.fx.wrap` (below) FX
    tracing (`torch.fx.symbolic_trace`, torchvision's `create_feature_extractor`)
    records the whole step as one call instead of failing on the checks."""
    rm, rv, use_batch, m = _bn_state(training, running_mean, running_var, num_batches_tracked,
                                     momentum, track_running_stats)
    if stride is None:
        return ops.pw_conv_bn_act(x, weight, bn_weight, bn_bias, rm, rv, residual=residual,
                                  training=use_batch, momentum=m, eps=eps, act=act)
    return ops.dw_conv_bn_act(x, weight, bn_weight, bn_bias, rm, rv, stride=stride,
                              padding=padding, dilation=dilation, training=use_batch,
                              momentum=m, eps=eps, act=act)


torch.fx.wrap("fused_conv_bn_act")


def _bn_call(bn, x, weight, act, **conv):
    """fused_conv_bn_act for BatchNorm2d module `bn`, in bn's own mode (a BN put in eval
    alone, as fine-tuning does, normalises with its running statistics as in eager);
    FX records it as one call. Its parameters and buffers come straight from the
    module's dicts: the tensors bn.weight etc. return (bn is an nn.BatchNorm2d,
    _runs_fused, which registers all five, None included), without
    nn.Module.__getattr__ (~0.6 us each); FX records them as the same get_attr nodes."""
    p, b = bn._parameters, bn._buffers
    return fused_conv_bn_act(x, weight, p["weight"], p["bias"], b["running_mean"],
                             b["running_var"], b["num_batches_tracked"], bn.momentum,
                             bn.track_running_stats, bn.training, bn.eps, act, **conv)


def _conv_kind(conv: nn.Conv2d):
    """('depthwise' | 'pointwise', None) for a conv the fused ops compute, else
    (None, why not): no bias, zero padding given as numbers, depthwise k x k with k in
    3/5/7, one stride of 1 or 2, one padding and one dilation (at most 8) for both
    dimensions, or a plain 1x1."""
    if conv._parameters.get("bias") is not None or "bias" in conv._modules.get(
            "parametrizations", ()):  # _parameters: ~0.6 us less than nn.Module.__getattr__
        return None, "conv has a bias"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None, f"padding {conv.padding!r} / mode {conv.padding_mode!r} not supported"
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if k == (1, 1) and s == (1, 1) and p == (0, 0) and conv.groups == 1:
        return "pointwise", None
    if conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1] and \
            k[0] in (3, 5, 7) and s[0] == s[1] and s[0] in (1, 2) and p[0] == p[1] and \
            d[0] == d[1] and 1 <= d[0] <= 8 and 0 <= p[0] <= d[0] * (k[0] - 1):
        return "depthwise", None
    return None, (f"not a supported depthwise (k 3/5/7, stride 1/2, dilation <= 8) or "
                  f"pointwise conv (k={k}, stride={s}, dilation={d}, groups={conv.groups})")


def _has_hooks(m) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or
                m._backward_pre_hooks)


def _not_plain(m, what):
    """Why module m cannot run inside a fused op, or None: hooks would not run (pruning
    and the legacy weight_norm/spectral_norm are forward pre-hooks), and a parametrized
    weight would not be computed."""
    if "parametrizations" in m._modules:  # parametrize.is_parametrized, ~2 us faster
        return f"{what} is parametrized (torch.nn.utils.parametrize)"
    if _has_hooks(m):
        return f"{what} has hooks (pruning, weight_norm, user hooks), which would not run"
    return None


def _runs_fused(conv, bn, kind) -> bool:
    """Whether the fused op computes a module's conv + bn, checked at every call (the
    children are ordinary modules a user may change): an nn.Conv2d of that kind
    (_conv_kind) and an nn.BatchNorm2d, neither with hooks or parametrizations. Anything
    else runs as separate modules (_unfused), e.g. after
    `nn.SyncBatchNorm.convert_sync_batchnorm` swapped in a SyncBatchNorm (whose
    statistics are reduced across processes), pruning, or a conv with a bias: slower,
    never silently different. An nn.DataParallel replica (its parameters plain
    attributes) runs unfused too."""
    return type(bn) is nn.BatchNorm2d and type(conv) is nn.Conv2d and \
        "_is_replica" not in bn.__dict__ and \
        _not_plain(conv, "") is None and _not_plain(bn, "") is None and \
        _conv_kind(conv)[0] == kind


def _unfused(conv, bn, act, x, residual=None):
    """act(bn(conv(x))) (+ residual) as separate modules, for what the fused op does not
    compute (_runs_fused)."""
    y = activation(bn(conv(x)), act)
    return y if residual is None else y + residual


def _check_act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    return act


class _ConvBNAct(nn.Sequential):
    """Conv2d ("0") + BatchNorm2d ("1") run as one fused op."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str):
        super().__init__(conv, bn)
        self.act = _check_act(act)

    # _modules directly: Sequential's self[0] walks an iterator, ~5 us per access
    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def _check_input(self, x):
        if isinstance(x, torch.fx.Proxy):  # FX tracing: the op checks it when it runs
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.conv.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: expected input (N, {self.conv.in_channels}, "
                             f"H, W), got {shape}")

    def extra_repr(self) -> str:
        return f"act={self.act!r}"

    def _mbx_fused_convs(self, in_hw, out_hw):
        """(conv, input size) of the convolution this module runs, for cost.profile."""
        return [(self.conv, in_hw)]


class DWConvBNAct(_ConvBNAct):
    """Depthwise k x k conv + BatchNorm + activation, fused.

    DWConvBNAct(channels, kernel_size=3, stride=1, padding=None, dilation=1, act="relu6")
    or DWConvBNAct.from_modules(conv, bn, act) around existing modules.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, padding=None,
                 dilation: int = 1, act: str = "relu6", eps: float = 1e-5,
                 momentum: float | None = 0.1, conv: nn.Conv2d | None = None,
                 bn: nn.BatchNorm2d | None = None):
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        conv = conv if conv is not None else nn.Conv2d(
            channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=False)
        bn = bn if bn is not None else nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        super().__init__(conv, bn, act)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu6"):
        return cls(conv.in_channels, conv=conv, bn=bn, act=act)

    def forward(self, x):
        self._check_input(x)
        c, bn = self.conv, self.bn
        if not _runs_fused(c, bn, "depthwise"):
            return _unfused(c, bn, self.act, x)
        return _bn_call(bn, x, c.weight, self.act, stride=c.stride[0], padding=c.padding[0],
                        dilation=c.dilation[0])


class PWConvBNAct(_ConvBNAct):
    """Pointwise 1x1 conv + BatchNorm + activation (+ residual), fused.

    forward(x, residual=None) returns act(BN(conv(x))) + residual.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu6",
                 eps: float = 1e-5, momentum: float | None = 0.1, conv: nn.Conv2d | None = None,
                 bn: nn.BatchNorm2d | None = None):
        conv = conv if conv is not None else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        bn = bn if bn is not None else nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        super().__init__(conv, bn, act)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu6"):
        return cls(conv.in_channels, conv.out_channels, conv=conv, bn=bn, act=act)

    def forward(self, x, residual=None):
        self._check_input(x)
        c, bn = self.conv, self.bn
        if not _runs_fused(c, bn, "pointwise"):
            return _unfused(c, bn, self.act, x, residual)
        return _bn_call(bn, x, c.weight, self.act, residual=residual)


class DepthwiseSeparable(nn.Sequential):
    """MobileNetV1 block: depthwise 3x3 + BN + act, then pointwise 1x1 + BN + act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 act: str = "relu6"):
        super().__init__(DWConvBNAct(in_channels, 3, stride, act=act),
                         PWConvBNAct(in_channels, out_channels, act=act))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional expand 1x1 (ReLU6), depthwise 3x3 (ReLU6), linear
    1x1 projection, and the residual when stride is 1 and in == out, added in the
    projection's epilogue. Children follow torchvision's InvertedResidual
    (`conv.0` ... `conv.3`), so its state_dict loads unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 act: str = "relu6"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(PWConvBNAct(in_channels, hidden, act=act))
        layers += [DWConvBNAct(hidden, 3, stride, act=act),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x):
        # the children from _modules: Sequential's indexing walks an iterator (~5 us)
        *body, proj, bn = self.conv._modules.values()
        h = x
        for m in body:
            h = m(h)
        res = x if self.use_res_connect else None
        if not _runs_fused(proj, bn, "pointwise"):
            return _unfused(proj, bn, "identity", h, res)
        return _bn_call(bn, h, proj.weight, "identity", residual=res)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, residual={self.use_res_connect}"

    def _mbx_fused_convs(self, in_hw, out_hw):
        """The projection 1x1 conv (run inside this module's forward) for cost.profile."""
        return [(self.conv[-2], out_hw)]
