"""The depthwise conv + BatchNorm + ReLU6 problem: its eager template and providers.

Every provider is built from one eager template holding the layer's parameters, so they
start from identical values. The eager template is what torchvision runs under autocast:
the conv in the compute dtype, BatchNorm with fp32 parameters (cuDNN's mixed-precision
BN), ReLU6 in place.
"""
from __future__ import annotations

import torch
from torch import nn

import mobilenet_ext

from . import providers
from .problem import FusedBase, Op, init_conv_bn
from .shapes import DWLayer, mobilenet_v1_dw_layers, mobilenet_v2_dw_layers

QUICK = ((144, 56, 2),)  # (c, h, stride) of the --quick layer: a stride-2 one


def eager_template(layer: DWLayer, dtype: torch.dtype, fmt: torch.memory_format,
                   device: torch.device, seed: int = 0) -> nn.Sequential:
    """Conv2d(groups=C, bias=False) + BatchNorm2d + ReLU6(inplace), random parameters."""
    conv = nn.Conv2d(layer.c, layer.c, layer.k, layer.stride, layer.padding, groups=layer.c,
                     bias=False)
    bn = nn.BatchNorm2d(layer.c)
    init_conv_bn(conv, bn, seed)
    conv.to(dtype)
    return nn.Sequential(conv, bn, nn.ReLU6(inplace=True)).to(device, memory_format=fmt)


class Fused(FusedBase):
    """mobilenet_ext.dw_conv_bn_act with a copy of an eager template's parameters."""

    def __init__(self, template: nn.Sequential):
        conv, bn = template[0], template[1]
        super().__init__(conv, bn)
        self.stride, self.padding = conv.stride[0], conv.padding[0]

    def forward(self, x):
        return self.call(mobilenet_ext.dw_conv_bn_act, x, stride=self.stride,
                         padding=self.padding, act="relu6")


OP = Op("dw", lambda: mobilenet_v2_dw_layers() + mobilenet_v1_dw_layers(),
        lambda lay: lay.net == "v2" and (lay.c, lay.h, lay.stride) in QUICK,
        eager_template, providers.standard(Fused, with_native=True),
        lambda t: (t[0], t[1], t[2]))
