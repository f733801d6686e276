"""MobileNetV2 layer shapes, read off torchvision's model so that they cannot drift."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DWLayer:
    """One distinct depthwise layer: c channels, h x w input, k x k kernel, 'same' padding."""
    c: int
    h: int
    w: int
    stride: int
    k: int = 3
    count: int = 1  # how many times the network runs this shape

    @property
    def padding(self) -> int:
        return (self.k - 1) // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.k) // self.stride + 1 for s in (self.h, self.w))

    @property
    def name(self) -> str:
        return f"{self.c}@{self.h}x{self.w} s{self.stride}" + ("" if self.k == 3 else f" k{self.k}")


def mobilenet_v2_dw_layers(input_size: int = 224) -> list[DWLayer]:
    """The distinct depthwise shapes of torchvision's `mobilenet_v2()` (width 1.0), in network
    order, with their number of occurrences. Runs on the meta device: shapes only, no compute."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2()
        x = torch.empty(1, 3, input_size, input_size)
    seen: Counter = Counter()

    def record(conv: nn.Conv2d, args, _out):
        k, s = conv.kernel_size[0], conv.stride[0]
        if conv.kernel_size != (k, k) or conv.stride != (s, s) or conv.dilation != (1, 1) \
                or conv.padding != ((k - 1) // 2,) * 2:
            raise RuntimeError(f"unexpected depthwise conv in mobilenet_v2: {conv}")
        _, c, h, w = args[0].shape
        seen[(c, h, w, s, k)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [DWLayer(c, h, w, s, k, n) for (c, h, w, s, k), n in seen.items()]
