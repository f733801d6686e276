"""The providers every op family is compared across, built from its eager template.

A provider builder takes (template, parts, ctx) -- parts = (conv, bn, act) of the template,
ctx = ProviderContext (device, mode, ours' backend) -- and returns the module to check and
time, or raises Unavailable with the reason, which the row reports (never a silent drop).

  eager        the template as torchvision runs it: conv, BatchNorm, activation (+ add)
  folded       inference as deployment runs it: BN folded into the conv (weight and bias),
               then the activation (+ add); training has no folded form
  native       PyTorch's own convolution kernel (cuDNN, or oneDNN on CPU, disabled)
  ours         mobilenet_ext with the --backend (cuda on a GPU, cpu on a CPU)
  triton       mobilenet_ext with the triton backend (GPU only: on a CPU Triton only
               interprets)
  compile      torch.compile(eager), default mode
  compile-max  torch.compile(eager, mode="max-autotune-no-cudagraphs")
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import mobilenet_ext


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


@dataclass(frozen=True)
class ProviderContext:
    device: torch.device
    mode: str
    backend: str  # mobilenet_ext backend of "ours"


ORDER = ("eager", "folded", "native", "ours", "triton", "compile", "compile-max")
# run unless --providers says otherwise; the others are listed as skipped with the reason
DEFAULT = {"cuda": ("eager", "folded", "native", "ours", "triton", "compile"),
           "cpu": ("eager", "folded", "native", "ours")}
NOT_DEFAULT = {
    "compile-max": "not in the default set (max-autotune tunes every layer for minutes): "
                   "--providers compile-max",
    "compile": "not in the CPU default set (inductor compiles each layer for tens of "
               "seconds): --providers compile",
    "triton": "on a CPU Triton only interprets (TRITON_INTERPRET=1): not a benchmark",
}


def eager(template, parts, ctx):
    return copy.deepcopy(template)


class Folded(nn.Module):
    """act(conv'(x)) (+ residual) with conv' = the conv with BN's affine map folded into its
    weight and a bias, in the conv's dtype (as exported inference graphs run it)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module):
        super().__init__()
        self.conv = copy.deepcopy(conv)
        with torch.no_grad():
            w = self.conv.weight
            acc = torch.promote_types(w.dtype, torch.float32)  # fold in fp32 (or fp64)
            scale = bn.weight.to(acc) * (bn.running_var.to(acc) + bn.eps).rsqrt()
            shift = bn.bias.to(acc) - bn.running_mean.to(acc) * scale
            w.copy_((w.to(acc) * scale.view(-1, 1, 1, 1)).to(w.dtype))
            self.conv.bias = nn.Parameter(shift.to(w.dtype))
        self.act = copy.deepcopy(act)

    def forward(self, x, residual=None):
        y = self.act(self.conv(x))
        return y if residual is None else residual + y


def folded(template, parts, ctx):
    if ctx.mode == "train":
        raise Unavailable("BN folding is for inference (training normalises with batch "
                          "statistics)")
    return Folded(*parts)


class Native(nn.Module):
    """The eager template with cuDNN (GPU) or oneDNN (CPU) convolutions disabled, forward
    and backward (bench_context wraps the whole timed step)."""

    def __init__(self, template: nn.Module, device: torch.device):
        super().__init__()
        self.inner = copy.deepcopy(template)
        self.device_type = device.type

    def bench_context(self):
        if self.device_type == "cuda":
            return torch.backends.cudnn.flags(enabled=False)
        return torch.backends.mkldnn.flags(enabled=False)

    def forward(self, *inputs):
        return self.inner(*inputs)


def native(template, parts, ctx):
    return Native(template, ctx.device)


@contextlib.contextmanager
def using_backend(name: str):
    saved = mobilenet_ext.get_backend()
    mobilenet_ext.set_backend(name)
    try:
        yield
    finally:
        mobilenet_ext.set_backend(saved)


def ours_with(backend_of: Callable[[ProviderContext], str], fused: Callable[[nn.Module],
              nn.Module]):
    """A builder of the op's fused module (fused(template)) running on a given backend."""
    def build(template, parts, ctx):
        backend = backend_of(ctx)
        info = mobilenet_ext.backends().get(backend)
        if info is None or not info.available:
            raise Unavailable(f"backend {backend!r}: "
                              + (info.detail if info else "unknown backend"))
        if backend in ("cuda", "cpu") and backend != ctx.device.type:
            raise Unavailable(f"backend {backend!r} cannot run tensors on {ctx.device.type}")
        if backend == "triton" and ctx.device.type != "cuda":
            raise Unavailable(NOT_DEFAULT["triton"])
        module = fused(template)
        module.bench_context = lambda: using_backend(backend)
        return module
    return build


def compiled(mode: str | None):
    def build(template, parts, ctx):
        if ctx.device.type == "cuda" and not mobilenet_ext.backends()["triton"].available:
            raise Unavailable("torch.compile needs triton on a GPU")
        return torch.compile(copy.deepcopy(template), mode=mode)
    return build


def standard(fused: Callable[[nn.Module], nn.Module], *, with_native: bool) -> dict:
    """The provider table of an op whose fused module is fused(template)."""
    table = {"eager": eager, "folded": folded}
    if with_native:
        table["native"] = native
    table.update({"ours": ours_with(lambda ctx: ctx.backend, fused),
                  "triton": ours_with(lambda ctx: "triton", fused),
                  "compile": compiled(None),
                  "compile-max": compiled("max-autotune-no-cudagraphs")})
    return table


def select(table: dict, requested: list[str] | None, device: torch.device) -> dict[str, str]:
    """provider -> None (run it) or the reason it does not run, over the op's providers in
    ORDER: the requested ones, or (requested None) all, those outside the device's default
    set with the reason."""
    out = {}
    for name in ORDER:
        if name not in table or (requested is not None and name not in requested):
            continue
        if requested is not None or name in DEFAULT[device.type]:
            out[name] = None
        else:
            out[name] = NOT_DEFAULT.get(name, "not in the default set")
    return out
