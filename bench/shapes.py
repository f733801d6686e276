"""MobileNetV2 layer shapes, read off torchvision's model so that they cannot drift.

Both tables run torchvision's `mobilenet_v2()` (width 1.0) once on the meta device with
forward hooks on the convolutions of interest: shapes only, no compute. Each table lists
the distinct shapes in network order with their number of occurrences (`count`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

# activation modules as torchvision builds them <-> mobilenet_ext's `act` names
ACTS: dict[str, type[nn.Module]] = {"relu6": nn.ReLU6, "relu": nn.ReLU, "identity": nn.Identity,
                                    "hardswish": nn.Hardswish, "silu": nn.SiLU}
ACT_NAMES = {cls: name for name, cls in ACTS.items()}


@dataclass(frozen=True)
class DWLayer:
    """One distinct depthwise layer: c channels, h x w input, k x k kernel, 'same' padding."""
    c: int
    h: int
    w: int
    stride: int
    k: int = 3
    count: int = 1  # how many times the network runs this shape
    net: str = "v2"  # MobileNet version whose layer this is

    @property
    def padding(self) -> int:
        return (self.k - 1) // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.k) // self.stride + 1 for s in (self.h, self.w))

    @property
    def name(self) -> str:
        return ("" if self.net == "v2" else f"{self.net} ") + \
            f"{self.c}@{self.h}x{self.w} s{self.stride}" + ("" if self.k == 3 else f" k{self.k}")

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The module's inputs in call order, then its output y."""
        return {"x": (batch, self.c, self.h, self.w), "y": (batch, self.c, *self.out_hw)}

    def macs(self, batch: int) -> int:
        """Multiply-adds of one forward conv."""
        ho, wo = self.out_hw
        return batch * self.c * ho * wo * self.k * self.k


@dataclass(frozen=True)
class PWLayer:
    """One distinct pointwise (1x1, stride 1) layer: cin -> cout channels on h x w, then BN,
    `act` and, when `residual`, the block input added (MobileNetV2's linear bottleneck).
    kind: "expand" (before the depthwise conv of a block), "project" (after it) or "last"
    (the 1x1 conv after the blocks) in MobileNetV2; "pointwise" in MobileNetV1."""
    kind: str
    cin: int
    cout: int
    h: int
    w: int
    act: str
    residual: bool = False
    count: int = 1
    net: str = "v2"

    @property
    def name(self) -> str:
        return ("" if self.net == "v2" else f"{self.net} ") + \
            f"{self.kind} {self.cin}->{self.cout}@{self.h}x{self.w}" + \
            (" +res" if self.residual else "")

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The module's inputs in call order (x, then the residual if any), then y."""
        out = (batch, self.cout, self.h, self.w)
        return {"x": (batch, self.cin, self.h, self.w),
                **({"residual": out} if self.residual else {}), "y": out}

    def macs(self, batch: int) -> int:
        return batch * self.h * self.w * self.cin * self.cout


def _model() -> nn.Module:
    import torchvision

    with torch.device("meta"):
        return torchvision.models.mobilenet_v2()


def _conv_calls(model: nn.Module, convs, input_size: int) -> list[tuple[nn.Conv2d, torch.Size]]:
    """(conv, input shape) for every call of `convs` in one forward pass, in network order."""
    calls = []
    hooks = [c.register_forward_hook(lambda m, args, _out: calls.append((m, args[0].shape)))
             for c in convs]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, input_size, input_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return calls


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def mobilenet_v2_dw_layers(input_size: int = 224) -> list[DWLayer]:
    """The distinct depthwise shapes of torchvision's `mobilenet_v2()` (width 1.0)."""
    model = _model()
    seen: Counter = Counter()
    for conv, (_, c, h, w) in _conv_calls(model, filter(_is_depthwise, model.modules()),
                                          input_size):
        k, s = conv.kernel_size[0], conv.stride[0]
        if conv.kernel_size != (k, k) or conv.stride != (s, s) or conv.dilation != (1, 1) \
                or conv.padding != ((k - 1) // 2,) * 2:
            raise RuntimeError(f"unexpected depthwise conv in mobilenet_v2: {conv}")
        seen[(c, h, w, s, k)] += 1
    return [DWLayer(c, h, w, s, k, n) for (c, h, w, s, k), n in seen.items()]


def mobilenet_v3_dw_layers(input_size: int = 224, k: int = 5) -> list[DWLayer]:
    """The distinct k x k depthwise shapes of torchvision's `mobilenet_v3_large()`
    (width 1.0; net "v3"): the 5x5 layers that MobileNetV2 and V1 lack. Not in the
    benchmark's tables (its time is budgeted on a GPU run); `python -m bench.sweep` and
    `bench.profile` take them by name, e.g. "v3 120@28x28 s1 k5"."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.mobilenet_v3_large()
    seen: Counter = Counter()
    for conv, (_, c, h, w) in _conv_calls(model, filter(_is_depthwise, model.modules()),
                                          input_size):
        if conv.kernel_size == (k, k):
            seen[(c, h, w, conv.stride[0])] += 1
    return [DWLayer(c, h, w, s, k, n, net="v3") for (c, h, w, s), n in seen.items()]


def _activations(model: nn.Module) -> dict[nn.Conv2d, str]:
    """conv -> the activation after its BatchNorm among its siblings ("identity" when the
    container ends after the BN, as in MobileNetV2's linear projection)."""
    acts = {}
    for parent in model.modules():
        kids = list(parent.children())
        for j, conv in enumerate(kids):
            if not _is_pointwise(conv):
                continue
            if j + 1 >= len(kids) or not isinstance(kids[j + 1], nn.BatchNorm2d):
                raise RuntimeError(f"mobilenet_v2: 1x1 conv not followed by BatchNorm2d: {conv}")
            after = type(kids[j + 2]) if j + 2 < len(kids) else nn.Identity
            if after not in ACT_NAMES:
                raise RuntimeError(f"mobilenet_v2: unexpected {after.__name__} after 1x1 conv+BN")
            acts[conv] = ACT_NAMES[after]
    return acts


def mobilenet_v2_pw_layers(input_size: int = 224) -> list[PWLayer]:
    """The distinct pointwise shapes of torchvision's `mobilenet_v2()` (width 1.0): in each
    inverted residual block the expansion before the depthwise conv and the projection after
    it (with the residual when the block's `use_res_connect`), and the final 1x1 conv."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    model = _model()
    role: dict[nn.Conv2d, tuple[str, bool]] = {}  # conv -> (kind, residual)
    for block in model.modules():
        if isinstance(block, InvertedResidual):
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            depthwise = [i for i, m in enumerate(convs) if _is_depthwise(m)]
            if len(depthwise) != 1:
                raise RuntimeError(f"mobilenet_v2: block without one depthwise conv: {block}")
            for i, conv in enumerate(convs):
                if _is_pointwise(conv):
                    project = i > depthwise[0]
                    role[conv] = ("project" if project else "expand",
                                  project and bool(block.use_res_connect))
    outside = [m for m in model.modules() if _is_pointwise(m) and m not in role]
    role.update((m, ("last", False)) for m in outside)
    acts = _activations(model)
    calls = _conv_calls(model, role, input_size)
    if len(outside) != 1 or calls[-1][0] is not outside[0]:
        raise RuntimeError("mobilenet_v2: expected one 1x1 conv after the blocks, run last")
    seen: Counter = Counter()
    for conv, (_, cin, h, w) in calls:
        if conv.stride != (1, 1) or conv.padding != (0, 0) or conv.bias is not None:
            raise RuntimeError(f"unexpected pointwise conv in mobilenet_v2: {conv}")
        kind, residual = role[conv]
        seen[(kind, cin, conv.out_channels, h, w, acts[conv], residual)] += 1
    return [PWLayer(*key, count=n) for key, n in seen.items()]


# MobileNetV1 (width 1.0, 224x224), Table 1 of the paper: after the stem (32 ch at 112x112)
# 13 depthwise separable blocks (c_in, c_out, stride); the last depthwise conv keeps 7x7
# (stride 1, as every implementation runs it; the table's "s2" there would give 4x4).
MOBILENET_V1_BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                       (256, 512, 2)) + ((512, 512, 1),) * 5 + ((512, 1024, 2), (1024, 1024, 1))


def _v1_blocks(input_size: int = 224):
    """(c_in, c_out, input side, stride) of each MobileNetV1 block."""
    h = (input_size + 1) // 2  # the stem's 3x3 stride-2 conv
    for cin, cout, s in MOBILENET_V1_BLOCKS:
        yield cin, cout, h, s
        h = (h + 2 - 3) // s + 1


def mobilenet_v1_dw_layers(input_size: int = 224) -> list[DWLayer]:
    """The distinct depthwise shapes of MobileNetV1 (width 1.0): 3x3, BN, ReLU6."""
    seen: Counter = Counter((cin, h, s) for cin, _, h, s in _v1_blocks(input_size))
    return [DWLayer(c, h, h, s, count=n, net="v1") for (c, h, s), n in seen.items()]


def mobilenet_v1_pw_layers(input_size: int = 224) -> list[PWLayer]:
    """The distinct pointwise shapes of MobileNetV1 (width 1.0): 1x1, BN, ReLU6, at the
    depthwise conv's output size."""
    seen: Counter = Counter((cin, cout, (h + 2 - 3) // s + 1)
                            for cin, cout, h, s in _v1_blocks(input_size))
    return [PWLayer("pointwise", cin, cout, h, h, "relu6", count=n, net="v1")
            for (cin, cout, h), n in seen.items()]
