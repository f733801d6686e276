"""Parameter and mult-add counts: the MobileNet paper's cost formulas, and a per-layer
profile of any model.

For a D_K x D_K convolution from M to N channels on a D_F x D_F output:
  standard   D_K*D_K*M*N*D_F*D_F mult-adds, D_K*D_K*M*N parameters
  depthwise  D_K*D_K*M*D_F*D_F,              D_K*D_K*M
  pointwise  M*N*D_F*D_F,                    M*N
and depthwise separable / standard = 1/N + 1/D_K^2. The width multiplier alpha
scales M and N, the resolution multiplier rho scales D_F.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["standard_conv", "depthwise_conv", "pointwise_conv", "separable_ratio", "Cost",
           "LayerCost", "Profile", "profile"]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


def _scale(m, n, df, alpha, rho):
    return int(round(alpha * m)), int(round(alpha * n)), int(round(rho * df))


def standard_conv(dk: int, m: int, n: int, df: int, alpha: float = 1.0, rho: float = 1.0) -> Cost:
    m, n, df = _scale(m, n, df, alpha, rho)
    return Cost(dk * dk * m * n, dk * dk * m * n * df * df)


def depthwise_conv(dk: int, m: int, df: int, alpha: float = 1.0, rho: float = 1.0) -> Cost:
    m, _, df = _scale(m, m, df, alpha, rho)
    return Cost(dk * dk * m, dk * dk * m * df * df)


def pointwise_conv(m: int, n: int, df: int, alpha: float = 1.0, rho: float = 1.0) -> Cost:
    m, n, df = _scale(m, n, df, alpha, rho)
    return Cost(m * n, m * n * df * df)


def separable_ratio(dk: int, n: int) -> float:
    """(depthwise + pointwise) / standard mult-adds = 1/N + 1/D_K^2."""
    return 1.0 / n + 1.0 / (dk * dk)


@dataclass
class LayerCost:
    name: str
    kind: str  # "standard", "depthwise", "pointwise", "grouped" or "linear"
    params: int
    macs: int


@dataclass
class Profile:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.layers)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'kind':<9}  {'params':>10}  {'mult-adds':>14}"]
        lines += [f"{r.name:<{w}}  {r.kind:<9}  {r.params:>10,}  {r.macs:>14,}"
                  for r in self.layers]
        lines.append(f"{'total':<{w}}  {'':<9}  {self.params:>10,}  {self.macs:>14,}")
        return "\n".join(lines)


def _conv_cost(conv: nn.Conv2d, out_hw) -> tuple[str, int, int]:
    kh, kw = conv.kernel_size
    per_out = kh * kw * conv.in_channels // conv.groups
    params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    macs = per_out * conv.out_channels * out_hw[0] * out_hw[1]
    if conv.groups == 1:
        kind = "pointwise" if (kh, kw) == (1, 1) else "standard"
    elif conv.groups == conv.in_channels == conv.out_channels:
        kind = "depthwise"
    else:
        kind = "grouped"
    return kind, params, macs


def _out_hw(conv: nn.Conv2d, in_hw):
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                 zip(in_hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation))


@torch.no_grad()
def profile(model: nn.Module, input_size=(1, 3, 224, 224)) -> Profile:
    """Parameters and mult-adds of every Conv2d and Linear of `model` (per batch
    element), found by running it once on zeros of `input_size` on the model's device. Convolutions inside fused modules (whose
    forward does not call the Conv2d itself) are counted from the fused module's
    input shape."""
    names = {m: n for n, m in model.named_modules()}
    seen: dict[nn.Module, LayerCost] = {}

    def count_conv(conv, in_hw):
        if conv not in seen:
            kind, params, macs = _conv_cost(conv, _out_hw(conv, in_hw))
            seen[conv] = LayerCost(names.get(conv, "?"), kind, params, macs)

    def hook(mod, inp, out):
        x = inp[0] if inp else None
        if isinstance(mod, nn.Conv2d):
            count_conv(mod, x.shape[-2:])
        elif isinstance(mod, nn.Linear) and mod not in seen:
            params = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
            seen[mod] = LayerCost(names.get(mod, "?"), "linear", params,
                                  mod.in_features * mod.out_features)
        elif hasattr(mod, "_mbx_fused_convs") and isinstance(x, torch.Tensor):
            for conv, in_hw in mod._mbx_fused_convs(x.shape[-2:], out.shape[-2:]):
                count_conv(conv, in_hw)

    # nn.Module's own method: a hook registered through a convert() stand-in's own
    # method would make its layer run unfused; this one keeps it fused, and
    # _mbx_fused_convs says which conv each stand-in runs
    handles = [nn.Module.register_forward_hook(m, hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Profile(list(seen.values()))  # in execution order
