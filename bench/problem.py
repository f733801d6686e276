"""What every op family's benchmark shares: the problem description (`Op`), parameters,
inputs, the timed step, its named outputs, and the byte and flop counts.

A layer (shapes.DWLayer, shapes.PWLayer) gives its tensor shapes and multiply-adds; an op
module (dw, pw) gives the layer table, the eager template and the providers built from it.
Everything else, here and in cli.bench_case, is the same for every op: a provider is an
nn.Module called as module(*inputs) with the layer's inputs (x, then the residual if any),
whose parameters are (conv weight, BN weight, BN bias) in that order and whose buffers
include running_mean and running_var.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

MODES = ("infer", "train")
PARAM_GRADS = ("dweight", "dbn_weight", "dbn_bias")
RUNNING = ("running_mean", "running_var")


@dataclass(frozen=True)
class Op:
    """One op family: its layers, the --quick subset, the eager template, the providers."""
    name: str
    layers: Callable[[], list]
    quick: Callable[[object], bool]
    # template(layer, dtype, memory_format, device) -> the eager module with the parameters
    template: Callable[..., nn.Module]
    # provider name -> builder(template, parts, ctx) (bench/providers.py)
    providers: dict[str, Callable]
    # template -> (conv, bn, act) modules
    parts: Callable[[nn.Module], tuple]


def input_names(layer) -> tuple[str, ...]:
    return tuple(name for name in layer.shapes(1) if name != "y")


def output_names(layer, mode: str) -> tuple[str, ...]:
    """What a step returns (and the check compares): y; in training also the gradients of
    every input and parameter, then the running statistics the step left behind."""
    if mode == "infer":
        return ("y",)
    return ("y", *(f"d{name}" for name in input_names(layer)), *PARAM_GRADS, *RUNNING)


def slack(name: str) -> float:
    """Allowed error relative to eager's (the kernel tests' rule): 2x forward, 3x gradients."""
    return 3.0 if name.startswith("d") else 2.0


def layer_bytes(layer, batch: int, dtype: torch.dtype, mode: str) -> int:
    """Minimal HBM traffic of one call, the GB/s numerator for every provider: every input
    read and y written (infer); in training also dy read and every input's gradient written,
    i.e. twice that. Parameters (< 1% on these layers) left out."""
    once = sum(math.prod(s) for s in layer.shapes(batch).values()) * dtype.itemsize
    return once if mode == "infer" else 2 * once


def layer_flops(layer, batch: int, mode: str) -> int:
    """2 x the conv's multiply-adds for the forward; training adds the input and weight
    gradients, each as many again (3x). BN and activation (a few flops per element) left out."""
    return 2 * layer.macs(batch) * (1 if mode == "infer" else 3)


def init_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, seed: int = 0) -> None:
    """Random parameters scaled so that the conv output has unit variance for unit-variance
    input, and BN parameters and statistics away from the trivial ones."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = conv.weight[0].numel()
    with torch.no_grad():
        conv.weight.normal_(0, fan_in ** -0.5, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.normal_(0, 0.1, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)


class FusedBase(nn.Module):
    """A mobilenet_ext op holding a copy of an eager conv + BatchNorm's parameters, in the
    order every provider has them (conv weight, BN weight, BN bias)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.momentum, self.eps = bn.momentum, bn.eps
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bn_weight = nn.Parameter(bn.weight.detach().clone())
        self.bn_bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())

    def call(self, fn, x, **kwargs):
        """fn(x, weight, BN parameters and buffers, training, momentum, eps, **kwargs)."""
        return fn(x, self.weight, self.bn_weight, self.bn_bias, self.running_mean,
                  self.running_var, training=self.training, momentum=self.momentum,
                  eps=self.eps, **kwargs)


def make_inputs(layer, batch: int, dtype: torch.dtype, fmt: torch.memory_format,
                device: torch.device, mode: str, copies: int, seed: int = 1) -> list[tuple]:
    """`copies` identical (inputs, dy) pairs (dy None for infer) in memory format fmt."""
    gen = torch.Generator(device).manual_seed(seed)
    shapes = layer.shapes(batch)
    x = tuple(torch.randn(shapes[name], generator=gen, device=device, dtype=dtype)
              for name in input_names(layer))
    dy = torch.randn(shapes["y"], generator=gen, device=device, dtype=dtype) \
        if mode == "train" else None
    return [cast_inputs(x, dy, dtype, fmt, mode) for _ in range(copies)]


def cast_inputs(inputs, dy, dtype, fmt, mode) -> tuple:
    """New (inputs, dy) in dtype and memory format fmt; the inputs leaves that require grad
    when training."""
    inputs = tuple(t.detach().to(dtype, memory_format=fmt, copy=True)
                   .requires_grad_(mode == "train") for t in inputs)
    return inputs, None if dy is None else dy.to(dtype, memory_format=fmt, copy=True)


def make_step(module: nn.Module, mode: str) -> Callable:
    """step(inputs, dy): the timed work. infer: y without grad; train: y and the gradients of
    the inputs and parameters for output gradient dy (nothing accumulates). Inside the
    module's bench_context() when it has one (a backend, or cuDNN off)."""
    context = getattr(module, "bench_context", contextlib.nullcontext)
    if mode == "infer":
        def step(inputs, dy):
            with context(), torch.no_grad():
                return (module(*inputs),)
    else:
        params = tuple(module.parameters())

        def step(inputs, dy):
            with context():
                y = module(*inputs)
                return (y, *torch.autograd.grad(y, (*inputs, *params), dy))
    return step


def outputs(module: nn.Module, layer, inputs, dy, mode: str) -> dict[str, torch.Tensor]:
    """One step on (inputs, dy), named as output_names(layer, mode); in training mode with
    the running statistics it left behind."""
    got = make_step(module, mode)(inputs, dy)
    if mode == "train":
        buffers = dict(module.named_buffers())
        got += tuple(next(v for k, v in buffers.items() if k.endswith(name)) for name in RUNNING)
    return dict(zip(output_names(layer, mode), got, strict=True))
