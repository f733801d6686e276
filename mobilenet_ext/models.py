"""MobileNetV1 / MobileNetV2 built from the fused modules.

`mobilenet_v2` has torchvision's module layout and parameter names, so a
torchvision `mobilenet_v2` state_dict loads unchanged and gives the same outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import DepthwiseSeparable, InvertedResidual, PWConvBNAct

__all__ = ["mobilenet_v1", "mobilenet_v2", "make_divisible"]

# MobileNetV2 (t, c, n, s): expansion, output channels, repeats, first stride
V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
              [6, 160, 3, 2], [6, 320, 1, 1]]
# MobileNetV1 depthwise separable blocks (output channels, stride) after the 32-channel stem
V1_SETTING = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + \
    [(1024, 2), (1024, 1)]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Channel count rounded to a multiple of divisor, never below 90% of v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _stem(out_channels: int, act: nn.Module) -> nn.Sequential:
    """The first, standard 3x3 stride-2 conv (3 input channels: not depthwise)."""
    return nn.Sequential(nn.Conv2d(3, out_channels, 3, 2, 1, bias=False),
                         nn.BatchNorm2d(out_channels), act)


class MobileNet(nn.Module):
    def __init__(self, features: nn.Sequential, last_channels: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(last_channels, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2):
    """MobileNetV2 (Sandler et al. 2018) with fused blocks; any input resolution."""
    if width_mult <= 0:
        raise ValueError(f"width_mult: must be positive, got {width_mult}")
    in_c = make_divisible(32 * width_mult)
    last = make_divisible(1280 * max(1.0, width_mult))
    layers = [_stem(in_c, nn.ReLU6(inplace=True))]
    for t, c, n, s in V2_SETTING:
        out_c = make_divisible(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(in_c, out_c, s if i == 0 else 1, t))
            in_c = out_c
    layers.append(PWConvBNAct(in_c, last, act="relu6"))
    return MobileNet(nn.Sequential(*layers), last, num_classes, dropout)


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.001):
    """MobileNetV1 (Howard et al. 2017) with fused depthwise separable blocks (BN + ReLU
    as in the paper); any input resolution (the resolution multiplier is the input size)."""
    if width_mult <= 0:
        raise ValueError(f"width_mult: must be positive, got {width_mult}")
    in_c = make_divisible(32 * width_mult)
    layers = [_stem(in_c, nn.ReLU(inplace=True))]
    for c, s in V1_SETTING:
        out_c = make_divisible(c * width_mult)
        layers.append(DepthwiseSeparable(in_c, out_c, s, act="relu"))
        in_c = out_c
    return MobileNet(nn.Sequential(*layers), in_c, num_classes, dropout)
