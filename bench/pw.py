"""The pointwise (1x1) conv + BatchNorm + activation (+ residual) problem: its eager
template and providers.

The eager template is what torchvision runs: a 1x1 Conv2d(bias=False) in the compute dtype,
BatchNorm2d with fp32 parameters, ReLU6 in place for the expansion and the last conv,
nothing for the linear projection, and the block's `x + out` when it has a residual.
"""
from __future__ import annotations

import torch
from torch import nn

import mobilenet_ext

from . import providers
from .problem import FusedBase, Op, init_conv_bn
from .shapes import ACT_NAMES, ACTS, PWLayer, mobilenet_v1_pw_layers, mobilenet_v2_pw_layers

QUICK = (("project", 960, 160, 7),)  # (kind, cin, cout, h) of the --quick layer: a residual one


class Eager(nn.Module):
    """act(BN(conv1x1(x))), plus the residual when given: torchvision's 1x1
    Conv2dNormActivation, or its linear projection and InvertedResidual's `x + conv(x)`."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x, residual=None):
        y = self.act(self.bn(self.conv(x)))
        return y if residual is None else residual + y


def eager_template(layer: PWLayer, dtype: torch.dtype, fmt: torch.memory_format,
                   device: torch.device, seed: int = 0) -> Eager:
    conv = nn.Conv2d(layer.cin, layer.cout, 1, bias=False)
    bn = nn.BatchNorm2d(layer.cout)
    init_conv_bn(conv, bn, seed)
    conv.to(dtype)
    act = ACTS[layer.act]
    return Eager(conv, bn, act() if act is nn.Identity else act(inplace=True)) \
        .to(device, memory_format=fmt)


class Fused(FusedBase):
    """mobilenet_ext.pw_conv_bn_act with a copy of an eager template's parameters."""

    def __init__(self, template: Eager):
        super().__init__(template.conv, template.bn)
        self.act = ACT_NAMES[type(template.act)]

    def forward(self, x, residual=None):
        return self.call(mobilenet_ext.pw_conv_bn_act, x, residual=residual, act=self.act)


OP = Op("pw", lambda: mobilenet_v2_pw_layers() + mobilenet_v1_pw_layers(),
        lambda lay: lay.net == "v2" and (lay.kind, lay.cin, lay.cout, lay.h) in QUICK,
        eager_template, providers.standard(Fused, with_native=False),
        lambda t: (t.conv, t.bn, t.act))
