"""convert() / revert(): swap fused conv + BatchNorm + activation into existing models.

A fusable pattern is a Conv2d immediately followed, in its parent's registration
order, by a BatchNorm2d (torchvision `Conv2dNormActivation` and any
`nn.Sequential`; timm blocks, whose `BatchNormAct2d` carries the activation) or by
torchvision's `FrozenBatchNorm2d` (the detection backbones' BatchNorm, fixed
statistics and affine: the fused op in eval mode whatever the module's mode), and
optionally an activation module. `nn.SyncBatchNorm` is left alone (its batch
statistics are reduced across processes), and so is every other norm layer, and so
are modules with hooks or a parametrized weight. The Conv2d is replaced by a slot
that keeps its `weight` and passes its input on; the BatchNorm by a module that keeps the
BatchNorm's parameters and buffers under the same names and runs the fused op on
the conv's input, and is an `nn.BatchNorm2d` to isinstance checks (code that puts
BatchNorms in eval mode or exempts them from weight decay finds it); a following
activation module by a pass-through slot. State-dict keys, parameters (the same
`Parameter` objects) and buffers are unchanged, so checkpoints load both ways and
optimizers keep working. The inverted-residual blocks of torchvision and timm
(_RESIDUAL_BLOCKS) also get their residual add fused into the projection. A stand-in
swapped for another module after convert() (`nn.SyncBatchNorm.convert_sync_batchnorm`,
timm's `freeze_batch_norm_2d`, a hand-written swap) leaves that layer to run unfused,
the new module included: slower, never silently different.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .nn import InvertedResidual as _OurInvertedResidual
from .nn import _conv_kind, _ConvBNAct, _not_plain, fused_conv_bn_act
from .reference import activation

torch.fx.wrap("fused_conv_bn_act")  # see nn.fused_conv_bn_act

__all__ = ["convert", "revert", "ConvertReport"]

_ACTS = {nn.ReLU6: "relu6", nn.ReLU: "relu", nn.Identity: "identity", nn.Hardswish: "hardswish",
         nn.SiLU: "silu"}
# Parents (besides nn.Sequential) whose forward calls their children in
# registration order, so a Conv2d followed by a BatchNorm is run back to back.
_ORDERED_PARENTS = {
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
    "timm.models._efficientnet_blocks.InvertedResidual",
    "timm.models._efficientnet_blocks.ConvBnAct",
    "timm.models._efficientnet_blocks.EdgeResidual",
    "timm.models.efficientnet.EfficientNet",
    "timm.models.efficientnet.EfficientNetFeatures",
    "timm.models.mobilenetv3.MobileNetV3",
    "timm.layers.conv_bn_act.ConvNormAct",  # MobileNetV4's blocks: conv, bn, then aa
}
_FROZEN_BN = "torchvision.ops.misc.FrozenBatchNorm2d"
_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"


def _qualname(m) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _is_frozen(m) -> bool:
    """torchvision's FrozenBatchNorm2d (not imported: torchvision is optional)."""
    return _qualname(m) == _FROZEN_BN


@dataclass
class ConvertReport:
    fused: list = field(default_factory=list)  # (module name, "depthwise"/"pointwise", act)
    residual: list = field(default_factory=list)  # blocks whose residual add was fused
    left: list = field(default_factory=list)  # (module name, why it was not fused)

    def __str__(self) -> str:
        if not self.fused:
            lines = ["mobilenet_ext.convert: nothing to fuse; the model is unchanged"]
        else:
            lines = [f"mobilenet_ext.convert: fused {len(self.fused)} conv+BN(+act) "
                     f"({sum(k == 'depthwise' for _, k, _ in self.fused)} depthwise, "
                     f"{sum(k == 'pointwise' for _, k, _ in self.fused)} pointwise), "
                     f"{len(self.residual)} residual adds"]
            lines += [f"  fused  {n}: {k}, act={a}" for n, k, a in self.fused]
            lines += [f"  fused  {n}: residual add" for n in self.residual]
        lines += [f"  left   {n}: {why}" for n, why in self.left]
        return "\n".join(lines)


class _WarnsOnHooks:
    """For the stand-ins of fused layers (_ConvSlot, _FusedNorm, _ActSlot): a forward hook registered
    on one after convert() runs, but around the fused op's stand-in, not the layer it
    replaced (a conv position's hook sees the conv's input as its output), so it warns.
    Hooks registered before convert() keep their layer unfused and exact."""

    def _warn_hook(self):
        warnings.warn(f"mobilenet_ext: {type(self).__name__} stands in for a "
                      f"{type(self._orig).__name__} fused by convert(); a hook on it sees the "
                      "fused op's input, not that layer's own tensors. Register the hook before "
                      "convert() (the layer is then left unfused) or revert() the model first.",
                      stacklevel=3)

    def register_forward_hook(self, *args, **kwargs):
        self._warn_hook()
        return super().register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args, **kwargs):
        self._warn_hook()
        return super().register_forward_pre_hook(*args, **kwargs)


# A site is (parent, name, module): it holds while module is still parent's child
# `name`, `site[0]._modules.get(site[1]) is site[2]` (written out where it is checked:
# ~0.15 us, a function call would double that). The stand-ins of one fused layer check
# each other's sites at every call, so that a swap of one of them after convert() is
# never silently ignored.


class _ConvSlot(_WarnsOnHooks, nn.Module):
    """Where a fused Conv2d was: keeps its weight and passes its input on to the fused
    BatchNorm after it, which runs the conv. Should that BatchNorm have been swapped
    since convert() (the stand-in is an nn.BatchNorm2d, so
    `nn.SyncBatchNorm.convert_sync_batchnorm`, timm's `freeze_batch_norm_2d` and
    hand-written swaps find it), the slot runs the conv itself and the new module gets
    the conv's output: slower, never silently different."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        object.__setattr__(self, "_orig", conv)  # for revert(); not a submodule
        object.__setattr__(self, "_bn_site", None)  # (parent, name, fused BN): _fuse

    def forward(self, x):
        site = self._bn_site
        if site[0]._modules.get(site[1]) is site[2]:
            return x
        c = self._orig
        return F.conv2d(x, self.weight, None, c.stride, c.padding, c.dilation, c.groups)

    def extra_repr(self) -> str:
        c = self._orig
        return f"{c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size} (fused into the next)"


class _ActSlot(_WarnsOnHooks, nn.Identity):
    """Where an activation module fused into the BatchNorm before it was: passes its
    input on, or runs the activation while that BatchNorm is swapped out (see _ConvSlot)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        object.__setattr__(self, "_orig", act)
        object.__setattr__(self, "_bn_site", None)

    def forward(self, x):
        site = self._bn_site
        return x if site[0]._modules.get(site[1]) is site[2] else self._orig(x)

    def extra_repr(self) -> str:
        return f"{type(self._orig).__name__} (fused into the BatchNorm before it)"


class _FusedNorm(_WarnsOnHooks):
    """Where the BatchNorm was: its parameters and buffers (and a BatchNormAct2d's act
    and drop children) under the same names, and the fused conv + BN + activation
    (+ residual) on the conv's input. Each instance is of _fused_class(type(bn)), a
    subclass of the replaced BatchNorm's own class (whose __init__ is not run), so
    code that finds BatchNorms by isinstance (to put them in eval mode for
    fine-tuning, to leave them out of weight decay, to set their momentum, to swap
    them: see _ConvSlot) finds it, as it found the BatchNorm."""

    __repr__ = nn.Module.__repr__  # FrozenBatchNorm2d has a __repr__ of its own

    def __init__(self, bn: nn.Module, slot: _ConvSlot, kind: str, act: str):
        nn.Module.__init__(self)
        for name in ("weight", "bias"):
            if name in bn._buffers:  # FrozenBatchNorm2d: buffers
                self.register_buffer(name, bn._buffers[name])
            else:
                setattr(self, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))
        for name, child in bn._modules.items():  # BatchNormAct2d's act and drop
            self.add_module(name, child)
        # those children as fused (fused_act); swapped later, the layer runs unfused
        object.__setattr__(self, "_kids", tuple(bn._modules.items()))
        self.num_features = self._buffers["running_mean"].numel()
        self.eps, self.momentum = bn.eps, getattr(bn, "momentum", None)
        self.affine = self._parameters.get("weight", self._buffers.get("weight")) is not None
        self.track_running_stats = getattr(bn, "track_running_stats", True)
        self.kind, self.fused_act = kind, act
        conv = slot._orig
        self.stride, self.padding, self.dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
        object.__setattr__(self, "_slot", slot)
        object.__setattr__(self, "_orig", bn)
        object.__setattr__(self, "_slot_site", None)  # (parent, name, slot): _fuse_children
        object.__setattr__(self, "_act_site", None)  # (parent, name, _ActSlot) or None
        self.train(bn.training)

    def forward(self, x, residual=None, scale=None):
        """scale: a per-channel layer scale gamma after the BN (identity act only),
        applied to the BN's weight and bias."""
        act, site = self.fused_act, self._act_site
        act_here = site is None or site[0]._modules.get(site[1]) is site[2]
        if not act_here:
            act = "identity"  # the module that replaced the _ActSlot runs instead
        site = self._slot_site
        slot_here = site[0]._modules.get(site[1]) is site[2]
        if not slot_here or self._kids and any(self._modules.get(n) is not m
                                               for n, m in self._kids):
            return self._unfused(x, slot_here, act, residual, scale)
        conv = dict(stride=self.stride, padding=self.padding, dilation=self.dilation) \
            if self.kind == "depthwise" else dict(residual=residual)
        # FrozenBatchNorm2d: eval-mode BN whatever the module's mode
        training = self.training and not self.frozen
        # straight from the dicts, without nn.Module.__getattr__ (~0.6 us each): the
        # statistics are registered buffers (None included); weight and bias are
        # parameters, buffers (FrozenBatchNorm2d) or a plain None (affine=False)
        p, b = self._parameters, self._buffers
        weight, bias = p.get("weight", b.get("weight")), p.get("bias", b.get("bias"))
        if scale is not None:
            weight = scale if weight is None else weight * scale
            bias = None if bias is None else bias * scale
        conv_weight = self._slot._parameters.get("weight")
        if conv_weight is None:  # parametrized after convert(): computed by its property
            conv_weight = self._slot.weight
        return fused_conv_bn_act(x, conv_weight, weight, bias,
                                 b["running_mean"], b["running_var"], b["num_batches_tracked"],
                                 self.momentum, self.track_running_stats, training, self.eps,
                                 act, **conv)

    def _unfused(self, x, slot_here, act, residual, scale):
        """What the fused op computes, as separate steps on the current modules: the conv
        (unless the slot was swapped: x is then the new module's output), the
        BatchNorm's own forward (a BatchNormAct2d's with its current act and drop), the
        act slot's activation (act) and the layer scale and residual."""
        if slot_here:
            c = self._slot._orig
            x = F.conv2d(x, self._slot.weight, None, c.stride, c.padding, c.dilation, c.groups)
        y = self._base.forward(self, x)
        if self._act_site is not None:
            y = activation(y, act)
        y = y if scale is None else y * scale
        return y if residual is None else y + residual

    def _mbx_fused_convs(self, in_hw, out_hw):
        return [(self._slot._orig, in_hw)]

    def extra_repr(self) -> str:
        if self.frozen:
            return f"{self.kind}, act={self.fused_act!r}, eps={self.eps}, frozen"
        return f"{self.kind}, act={self.fused_act!r}, eps={self.eps}, momentum={self.momentum}"

    def __reduce_ex__(self, protocol):
        # pickled (torch.save of a whole model) and deep-copied by its BatchNorm class
        return _new_fused, (self._base,), self.__dict__


_FUSED_CLASSES = {}


def _fused_class(base: type) -> type:
    """The stand-in class for BatchNorm class `base` (_FusedNorm), made once per class."""
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        frozen = f"{base.__module__}.{base.__qualname__}" == _FROZEN_BN
        cls = type(f"Fused{base.__name__}", (_FusedNorm, base),
                   {"__module__": __name__, "_base": base, "frozen": frozen})
        _FUSED_CLASSES[base] = cls
    return cls


def _new_fused(base: type):
    """An empty stand-in for BatchNorm class `base`, for unpickling (_FusedNorm)."""
    cls = _fused_class(base)
    return cls.__new__(cls)


# Blocks whose forward is `drop(body(x)) + x` when `flag` is set: the children named
# in `body`, called in that order (absent ones, None in the block, skipped), and the
# child `drop` (stochastic depth / drop path, None where the block has none) between
# the body and the add. Their residual add goes into the body's last fused BN.
@dataclass(frozen=True)
class _ResidualSpec:
    body: tuple
    flag: str
    drop: str | None = None


_TIMM = "timm.models._efficientnet_blocks."
_STOCHASTIC_DEPTH = "torchvision.ops.stochastic_depth.StochasticDepth"  # p
_DROP_PATH = "timm.layers.drop.DropPath"  # drop_prob
_RESIDUAL_BLOCKS = {
    "torchvision.models.mobilenetv2.InvertedResidual": _ResidualSpec(("conv",), "use_res_connect"),
    "torchvision.models.mobilenetv3.InvertedResidual": _ResidualSpec(("block",),
                                                                     "use_res_connect"),
    "torchvision.models.mnasnet._InvertedResidual": _ResidualSpec(("layers",), "apply_residual"),
    "torchvision.models.efficientnet.MBConv": _ResidualSpec(("block",), "use_res_connect",
                                                            "stochastic_depth"),
    _TIMM + "InvertedResidual": _ResidualSpec(
        ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"),
        "has_skip", "drop_path"),
    _TIMM + "DepthwiseSeparableConv": _ResidualSpec(
        ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"), "has_skip",
        "drop_path"),
    _TIMM + "EdgeResidual": _ResidualSpec(("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2"),
                                          "has_skip", "drop_path"),
    # MobileNetV4; the hybrid models' layer scale is folded into the projection (_LAYER_SCALE)
    _TIMM + "UniversalInvertedResidual": _ResidualSpec(
        ("dw_start", "pw_exp", "dw_mid", "se", "pw_proj", "dw_end", "layer_scale"), "has_skip",
        "drop_path"),
    _TIMM + "ConvBnAct": _ResidualSpec(("conv", "bn1", "aa"), "has_skip", "drop_path"),
}
# Modules whose forward runs their children in registration order (nn.Sequential, and
# timm's ConvNormAct: conv, bn, aa when not None), opened up at the end of a residual
# chain so that its last module is the projection's fused BN.
_RUNS_CHILDREN = ("timm.layers.conv_bn_act.ConvNormAct",)
# timm's per-channel layer scale (MobileNetV4 hybrid blocks): y * gamma after the
# projection's BN, before the add. The projection has no activation, so the fused op
# runs it as the BN's affine parameters times gamma (in eval and in training: the
# batch statistics are the conv output's either way).
_LAYER_SCALE = "timm.layers.layer_scale.LayerScale2d"


def _runs_children(m) -> bool:
    return type(m).forward is nn.Sequential.forward or _qualname(m) in _RUNS_CHILDREN


def _drops(drop) -> bool:
    """Whether a block's stochastic depth / drop path module changes its input now."""
    if drop is None or type(drop) is nn.Identity or not drop.training:
        return False
    return (drop.p if _qualname(drop) == _STOCHASTIC_DEPTH else drop.drop_prob) > 0


def _residual_chain(block, spec):
    """(chain, sites, scale, None): the modules a residual block's body runs, in order,
    with the trailing containers (_runs_children: torchvision's Conv2dNormActivation,
    timm's ConvNormAct) opened up so that the last one is the projection's fused BN;
    the (parent, name, module) of every module of the body the fused forward depends
    on (block as the parent of its own children); the layer scale after that BN
    (_LAYER_SCALE) or None. Or (None, None, None, why not). Only nn.Identity, the
    BN's own _ActSlot and one layer scale may follow that BN."""
    names = [n for n in spec.body if getattr(block, n, None) is not None]
    kids = dict(_children(block))
    if set(kids) != set(names) | ({spec.drop} if spec.drop else set()):
        return None, None, None, "children differ from the forward mobilenet_ext knows"
    drop = kids.get(spec.drop) if spec.drop else None
    if drop is not None and type(drop) is not nn.Identity and \
            _qualname(drop) not in (_STOCHASTIC_DEPTH, _DROP_PATH):
        return None, None, None, f"{spec.drop} is a {type(drop).__name__}"
    chain = [(block, n, kids[n]) for n in names]
    sites, scale = [], None
    while chain:  # open up trailing containers, drop trailing nn.Identity
        site = chain[-1]
        last = site[2]
        if _runs_children(last):
            if _not_plain(last, ""):
                return None, None, None, "a module of its body has hooks"
            sites.append(chain.pop())
            chain += [(last, n, m) for n, m in _children(last)]
        elif (type(last) is nn.Identity and _not_plain(last, "") is None) or \
                (isinstance(last, _ActSlot) and len(chain) > 1 and
                 last._bn_site[2] is chain[-2][2]):
            sites.append(chain.pop())
        elif scale is None and _qualname(last) == _LAYER_SCALE and _not_plain(last, "") is None:
            sites.append(chain.pop())
            scale = last  # folded into the projection's BN (_ResidualBlock)
        else:
            break
    end = chain[-1][2] if chain else None
    if not isinstance(end, _FusedNorm) or end.kind != "pointwise":
        ends = f" (it ends in {type(end).__name__})" if chain else ""
        return None, None, None, f"its body does not end in a fused pointwise conv + BN{ends}"
    return [m for _, _, m in chain], sites + chain, scale, None


class _ResidualBlock(nn.Module):
    """A residual block (_RESIDUAL_BLOCKS) with its add fused into the projection: the
    block's children under their own names, its body run as a chain whose last fused
    BN gets the block input as residual. While stochastic depth / drop path is active
    (training with p > 0) the add runs after it, as in the block's own forward; so does
    all of the block's own forward once a module of the body has been swapped since
    convert() (_residual_chain's sites, checked at every call)."""

    def __init__(self, block: nn.Module, spec: _ResidualSpec, chain: list, sites: list,
                 scale=None):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.drop_name = spec.drop
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_sites", [(self if p is block else p, n, m) for p, n, m in sites])
        for child in self._modules.values():  # the block's own stand-ins now live here
            for attr in ("_bn_site", "_slot_site", "_act_site"):
                site = getattr(child, attr, None) if isinstance(
                    child, (_ConvSlot, _ActSlot, _FusedNorm)) else None
                if site is not None and site[0] is block:
                    object.__setattr__(child, attr, (self,) + site[1:])
        object.__setattr__(self, "_scale", scale)  # a layer scale folded into the last BN
        object.__setattr__(self, "_orig", block)
        self.train(block.training)

    def forward(self, x):
        for site in self._sites:
            if site[0]._modules.get(site[1]) is not site[2]:
                # the block's own forward, on its current children
                return type(self._orig).forward(self, x)
        *head, last = self._chain
        h = x
        for m in head:
            h = m(h)
        gamma = self._scale.gamma if self._scale is not None else None
        drop = self._modules[self.drop_name] if self.drop_name else None
        if _drops(drop):
            return drop(last(h, scale=gamma)) + x
        return last(h, residual=x, scale=gamma)

    def __getattr__(self, name):
        """The replaced block's own attributes (torchvision's use_res_connect,
        out_channels, stride; timm's has_skip, ...), read-only, after the module lookup
        (parameters, buffers, children) has failed: not on the forward's path."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self.__dict__.get("_orig")
            if orig is None or name.startswith("__") or not hasattr(orig, name):
                raise
            return getattr(orig, name)

    def extra_repr(self) -> str:
        scale = " and layer scale" if self._scale is not None else ""
        return f"{type(self._orig).__name__}, residual add{scale} fused"


def _act_name(m):
    for cls, name in _ACTS.items():
        if type(m) is cls:
            return name
    return None


def _bn_act(bn):
    """Activation carried inside a BatchNorm (timm BatchNormAct2d), or 'identity'."""
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return None, "BatchNorm has dropout inside"
    if act is None:
        return "identity", None
    why = _not_plain(act, "its activation") or (_not_plain(drop, "its dropout") if drop is not
                                                 None else None)
    if why:
        return None, f"BatchNorm: {why}"
    name = _act_name(act)
    return (name, None) if name else (None, f"activation {type(act).__name__} not supported")


def _is_bn(m) -> bool:
    """A norm layer the fused op computes: a BatchNorm2d with BatchNorm2d's own forward,
    timm's BatchNormAct2d (the activation after it, _bn_act), or torchvision's
    FrozenBatchNorm2d. Not a subclass with a forward of its own (timm's
    SplitBatchNorm2d, ...): what that computes is not known."""
    return (isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward) or \
        _qualname(m) == _BN_ACT or _is_frozen(m)


def _children(parent):
    """(name, module) of every child in registration order, a module registered twice
    listed twice (named_children lists it once, which would make its neighbours look
    adjacent)."""
    return [(n, m) for n, m in parent._modules.items() if m is not None]


def _fuse_children(parent, prefix, report):
    children = _children(parent)
    i = 0
    while i < len(children):
        name, conv = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(conv, nn.Conv2d) and isinstance(nxt, nn.SyncBatchNorm):
            report.left.append((prefix + name, "followed by SyncBatchNorm, whose batch "
                                "statistics are reduced across processes"))
        elif isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d and _is_bn(nxt):
            report.left.append((prefix + name, _not_plain(conv, "conv") or
                                f"conv is a {type(conv).__name__}, not an nn.Conv2d"))
        elif type(conv) is nn.Conv2d and isinstance(nxt, nn.BatchNorm2d) and not _is_bn(nxt):
            report.left.append((prefix + name, f"followed by {type(nxt).__name__}, a "
                                "BatchNorm2d with a forward of its own"))
        if type(conv) is not nn.Conv2d or not _is_bn(nxt):
            i += 1
            continue
        bn_name, bn = children[i + 1]
        full = prefix + name
        kind, why = _conv_kind(conv)
        why = why or _not_plain(conv, "conv") or _not_plain(bn, "BatchNorm")
        kind = kind if why is None else None
        act, why_act = _bn_act(bn) if kind else (None, None)
        if kind is None or act is None:
            report.left.append((full, why or why_act))
            i += 2
            continue
        act_slot = None
        plain = type(bn) is nn.BatchNorm2d or _is_frozen(bn)
        if act == "identity" and plain and i + 2 < len(children):
            act_name, act_mod = children[i + 2]
            if _act_name(act_mod) is not None and _not_plain(act_mod, "") is None:
                act = _act_name(act_mod)
                act_slot = _ActSlot(act_mod)
                setattr(parent, act_name, act_slot)
        slot = _ConvSlot(conv)
        fused = _fused_class(type(bn))(bn, slot, kind, act)
        setattr(parent, name, slot)
        setattr(parent, bn_name, fused)
        # the stand-ins check each other's sites at every call
        object.__setattr__(slot, "_bn_site", (parent, bn_name, fused))
        object.__setattr__(fused, "_slot_site", (parent, name, slot))
        if act_slot is not None:
            object.__setattr__(act_slot, "_bn_site", (parent, bn_name, fused))
            object.__setattr__(fused, "_act_site", (parent, act_name, act_slot))
        report.fused.append((full, kind, act))
        i += 2 + (act_slot is not None)


def _walk(module, prefix, report):
    for name, child in list(module.named_children()):
        if isinstance(child, (_ConvBNAct, _OurInvertedResidual, _FusedNorm, _ConvSlot,
                              _ActSlot, _ResidualBlock)):
            continue  # already fused
        _walk(child, f"{prefix}{name}.", report)
        spec = _RESIDUAL_BLOCKS.get(_qualname(child))
        if spec is not None and getattr(child, spec.flag, False) is True:
            chain, sites, scale, why = _residual_chain(child, spec)
            why = why or _not_plain(child, "block")
            if why is None:
                setattr(module, name, _ResidualBlock(child, spec, chain, sites, scale))
                report.residual.append(prefix + name)
            else:
                report.left.append((prefix + name, f"residual add not fused: {why}"))
    # _runs_children: nn.Sequential's own forward (a subclass with another forward may
    # not run its children back to back)
    if _runs_children(module) or _qualname(module) in _ORDERED_PARENTS:
        _fuse_children(module, prefix, report)
    else:
        kids = list(module.named_children())
        for (name, a), (_, b) in zip(kids, kids[1:]):
            if type(a) is nn.Conv2d and _is_bn(b):
                report.left.append((prefix + name, f"inside {type(module).__name__}, whose "
                                    "forward order is not known to mobilenet_ext"))


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False,
            return_report: bool = False):
    """Swap every fusable Conv2d + BatchNorm2d or FrozenBatchNorm2d (+ activation) of
    `model` for the fused op. SyncBatchNorm layers are left unfused (their statistics
    are reduced across processes), whether `nn.SyncBatchNorm.convert_sync_batchnorm`
    runs before convert() or after it (it then finds the fused BatchNorms and swaps
    them out: those layers run unfused again).

    Returns the converted model (a deep copy unless inplace=True), or
    (model, ConvertReport) with return_report=True; verbose=True prints the report.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    _walk(model, "", report)
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _revert_child(parent, name, child):
    """Put back the module a proxy stood in for, bound to the proxy's current
    parameters and buffers (they may have moved device or been reloaded)."""
    if not isinstance(child, (_ResidualBlock, _ConvSlot, _FusedNorm, _ActSlot)):
        return child
    orig = child._orig
    if isinstance(child, _ResidualBlock):
        for n, m in child.named_children():
            setattr(orig, n, m)
    elif isinstance(child, _ConvSlot):
        orig.weight = child.weight
    elif isinstance(child, _FusedNorm):
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if hasattr(orig, t):  # FrozenBatchNorm2d has no num_batches_tracked
                setattr(orig, t, getattr(child, t))
        for n, m in child._modules.items():  # BatchNormAct2d's act and drop, as now
            setattr(orig, n, m)
        orig.eps = child.eps
        if not child.frozen:
            orig.momentum = child.momentum
    orig.train(child.training)
    setattr(parent, name, orig)
    return orig


def revert(model: nn.Module) -> nn.Module:
    """Undo convert() in place: plain torch modules holding the current parameters
    and buffers. Returns the model."""
    for name, child in list(model.named_children()):
        child = _revert_child(model, name, child)
        revert(child)
    return model
