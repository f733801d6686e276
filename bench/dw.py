"""The depthwise conv + BatchNorm + ReLU6 problem: its providers, inputs, bytes and outputs.

Both providers are built from one eager template holding the layer's parameters, so they
start from identical values. The eager template is what torchvision runs under autocast:
the conv in the compute dtype, BatchNorm with fp32 parameters (cuDNN's mixed-precision
BN), ReLU6 in place.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

import mobilenet_ext

from .shapes import DWLayer

MODES = ("infer", "train")
OUTPUTS = {"infer": ("y",),
           "train": ("y", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean",
                     "running_var")}
# allowed error relative to eager's (the kernel tests' rule): 2x forward, 3x gradients
SLACK = {name: 3.0 if name.startswith("d") else 2.0 for name in OUTPUTS["train"]}


def eager_template(layer: DWLayer, dtype: torch.dtype, fmt: torch.memory_format,
                   device: torch.device, seed: int = 0) -> nn.Sequential:
    """Conv2d(groups=C, bias=False) + BatchNorm2d + ReLU6(inplace) with random parameters
    scaled so that the conv output has unit variance for unit-variance input."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(layer.c, layer.c, layer.k, layer.stride, layer.padding, groups=layer.c,
                     bias=False)
    bn = nn.BatchNorm2d(layer.c)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / layer.k, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.normal_(0, 0.1, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    conv.to(dtype)
    return nn.Sequential(conv, bn, nn.ReLU6(inplace=True)).to(device, memory_format=fmt)


class Fused(nn.Module):
    """mobilenet_ext.dw_conv_bn_act holding a copy of an eager template's parameters."""

    def __init__(self, template: nn.Sequential):
        super().__init__()
        conv, bn = template[0], template[1]
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.momentum, self.eps = bn.momentum, bn.eps
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bn_weight = nn.Parameter(bn.weight.detach().clone())
        self.bn_bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())

    def forward(self, x):
        return mobilenet_ext.dw_conv_bn_act(
            x, self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var,
            stride=self.stride, padding=self.padding, training=self.training,
            momentum=self.momentum, eps=self.eps, act="relu6")


# name -> builds the provider's module from the eager template
PROVIDERS: dict[str, Callable[[nn.Sequential], nn.Module]] = {
    "eager": copy.deepcopy,
    "ours": Fused,
}


def layer_bytes(layer: DWLayer, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Minimal HBM traffic of one call, the GB/s numerator for every provider: x read and y
    written (infer); plus dy read and dx written (train). Parameters (< 0.1%) left out."""
    ho, wo = layer.out_hw
    x = batch * layer.c * layer.h * layer.w * dtype.itemsize
    y = batch * layer.c * ho * wo * dtype.itemsize
    return x + y if mode == "infer" else 2 * (x + y)


def make_inputs(layer: DWLayer, batch: int, dtype: torch.dtype, fmt: torch.memory_format,
                device: torch.device, mode: str, copies: int, seed: int = 1) -> list[tuple]:
    """`copies` identical (x, dy) pairs (dy None for infer) in memory format fmt."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, layer.c, layer.h, layer.w, generator=gen, device=device, dtype=dtype)
    dy = None
    if mode == "train":
        dy = torch.randn(batch, layer.c, *layer.out_hw, generator=gen, device=device, dtype=dtype)
    return [cast_inputs(x, dy, dtype, fmt, mode) for _ in range(copies)]


def cast_inputs(x, dy, dtype, fmt, mode) -> tuple:
    """New (x, dy) in dtype and memory format fmt; x a leaf that requires grad when training."""
    x = x.detach().to(dtype, memory_format=fmt, copy=True).requires_grad_(mode == "train")
    return x, None if dy is None else dy.to(dtype, memory_format=fmt, copy=True)


def make_step(module: nn.Module, mode: str) -> Callable:
    """step(x, dy): the timed work. infer: y without grad; train: y and the gradients of
    x, conv weight, BN weight and bias for output gradient dy (nothing accumulates)."""
    if mode == "infer":
        def step(x, dy):
            with torch.no_grad():
                return (module(x),)
    else:
        params = tuple(module.parameters())

        def step(x, dy):
            y = module(x)
            return (y, *torch.autograd.grad(y, (x, *params), dy))
    return step


def outputs(module: nn.Module, x, dy, mode: str) -> dict[str, torch.Tensor]:
    """One step on (x, dy), named as OUTPUTS[mode]; in training mode with the running
    statistics it left behind."""
    got = make_step(module, mode)(x, dy)
    if mode == "train":
        stats = dict(module.named_buffers())
        got += tuple(next(v for k, v in stats.items() if k.endswith(name))
                     for name in ("running_mean", "running_var"))
    return dict(zip(OUTPUTS[mode], got))
