"""convert() / revert(): swap fused conv + BatchNorm + activation into existing models.

A fusable pattern is a Conv2d immediately followed, in its parent's registration
order, by a BatchNorm2d (torchvision `Conv2dNormActivation` and any
`nn.Sequential`; timm blocks, whose `BatchNormAct2d` carries the activation) or by
torchvision's `FrozenBatchNorm2d` (the detection backbones' BatchNorm, fixed
statistics and affine: the fused op in eval mode whatever the module's mode), and
optionally an activation module. `nn.SyncBatchNorm` is left alone (its batch
statistics are reduced across processes), and so is every other norm layer, and so
are modules with hooks or a parametrized weight. The Conv2d is replaced by a slot
that keeps its `weight` and passes its input on; the BatchNorm by a stand-in of its own
class (isinstance finds it where it found the BatchNorm) that keeps the BatchNorm's
parameters and buffers under the same names and runs the fused op on the conv's
input; a following activation module by a pass-through slot. State-dict keys,
parameters (the same `Parameter` objects) and buffers are unchanged, so checkpoints
load both ways and optimizers keep working. The inverted-residual blocks of
torchvision and timm (_RESIDUAL_BLOCKS) also get their residual add fused into the
projection. A stand-in swapped for another module after convert()
(`nn.SyncBatchNorm.convert_sync_batchnorm`, timm's `freeze_batch_norm_2d`, by hand)
or given a hook makes its layer run unfused (_Layer): slower, never silently
different.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .nn import InvertedResidual as _OurInvertedResidual
from .nn import _bn_state, _conv_kind, _ConvBNAct, _has_hooks, _not_plain, fused_conv_bn_act

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


def _global_hooks() -> bool:
    """Hooks registered for every module (register_module_forward_hook, ...)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or
                _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                track_running_stats, training, eps):
    """nn.BatchNorm2d's forward as one function (recorded as one call by FX tracing:
    torch.fx.wrap below), for a fused norm that runs unfused."""
    rm, rv, use_batch, m = _bn_state(training, running_mean, running_var, num_batches_tracked,
                                     momentum, track_running_stats)
    return F.batch_norm(x, rm, rv, weight, bias, use_batch, m, eps)


torch.fx.wrap("_batch_norm")


class _Layer:
    """One fused layer: its stand-ins (conv slot, fused norm, activation slot or None),
    where convert() put them (children of `parent`) and the fused norm's own children
    (a BatchNormAct2d's act and drop) as they were. Each stand-in asks fused() at every
    call (~0.3 us) and, while it says no, runs its own part unfused: the slot the conv,
    the norm its BatchNorm's own forward, the activation slot the activation. So a
    stand-in swapped for another module after convert() (found by isinstance:
    `nn.SyncBatchNorm.convert_sync_batchnorm`, timm's `freeze_batch_norm_2d`; or by
    hand), a hook registered on one, or a parametrized BatchNorm weight gives what the
    model without convert() computes, and the fused op runs again once that is undone;
    so do hooks registered for every module, or on the norm's own children. A replica
    made by nn.DataParallel runs unfused (_StandIn._runs_fused). Not seen: stand-ins
    moved into another module (a new nn.Sequential of a model's children) and swapped
    there; their old parent still holds them."""

    __slots__ = ("parent", "slot_name", "slot", "bn_name", "bn", "act_name", "act", "kids",
                 "hooked", "altered")

    def __init__(self, parent, slot_name, slot, bn_name, bn, act_name, act):
        self.parent, self.slot_name, self.slot = parent, slot_name, slot
        self.bn_name, self.bn, self.act_name, self.act = bn_name, bn, act_name, act
        self.kids = tuple(bn._modules.items())
        self.hooked = False  # set by a hook registration on a stand-in, cleared lazily
        self.altered = False  # a slot's settings changed: unfused for good

    def fused(self) -> bool:
        if self.altered:
            return False
        m = self.parent._modules
        if m.get(self.bn_name) is not self.bn or m.get(self.slot_name) is not self.slot or \
                (self.act is not None and m.get(self.act_name) is not self.act):
            return False
        if self.hooked:  # still hooked, or were the hooks removed?
            self.hooked = any(_has_hooks(s) for s in (self.slot, self.bn, self.act)
                              if s is not None)
            if self.hooked:
                return False
        own = self.bn._modules
        if self.kids and any(own.get(n) is not k or _has_hooks(k) for n, k in self.kids):
            return False
        return "parametrizations" not in own and not _global_hooks()

    @staticmethod
    def detached():
        """The record of a stand-in copied alone: never fused."""
        return _Layer(_DETACHED, None, None, None, _DETACHED, None, None)


_DETACHED = nn.Module()  # no children: its bn is never where a detached record expects it


class _StandIn:
    """The stand-ins of a fused layer (_ConvSlot, _FusedNorm, _ActSlot), which share
    one _Layer record (`_layer`)."""

    _layer = None

    def _mark_hooked(self):
        if self._layer is not None:
            self._layer.hooked = True

    def _runs_fused(self) -> bool:
        """_Layer.fused(), and this stand-in is not an nn.DataParallel replica (whose
        parameters are plain attributes, its record the original modules')."""
        return "_is_replica" not in self.__dict__ and self._layer.fused()

    def __deepcopy__(self, memo):
        """Deep-copied with the module holding it (the model), the copy's record points
        into the copied model; copied alone, the copy runs unfused wherever it is put,
        even in the place of the stand-in it copies (and the parent is not copied)."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        state = dict(self.__dict__)
        layer = state.pop("_layer", None)
        state = copy.deepcopy(state, memo)
        if layer is not None:
            layer = copy.deepcopy(layer, memo) if id(layer.parent) in memo else \
                _Layer.detached()
            state["_layer"] = layer
        new.__setstate__(state)
        return new

    def __reduce_ex__(self, protocol):
        # pickled (torch.save of a whole model) by its two classes: _new_fused
        return _new_fused, (self._kind, self._base), self.__dict__


def _marks_hooked(name):
    """nn.Module's hook registration `name`, noting the hook in the stand-in's _Layer."""
    def register(self, *args, **kwargs):
        self._mark_hooked()
        return getattr(super(_StandIn, self), name)(*args, **kwargs)
    register.__name__ = register.__qualname__ = name
    return register


for _name in ("register_forward_hook", "register_forward_pre_hook", "register_backward_hook",
              "register_full_backward_hook", "register_full_backward_pre_hook"):
    setattr(_StandIn, _name, _marks_hooked(_name))


def _is_setting(key: str) -> bool:
    """Whether `key` of a module's __dict__ is one of its own settings (a Conv2d's
    in_channels ... padding_mode, an activation's inplace), not nn.Module state."""
    return not key.startswith("_") or key == "_reversed_padding_repeated_twice"


def _copy_settings(stand_in, orig):
    """The replaced module's settings, which the stand-in's class (a subclass of the
    replaced one, whose __init__ is not run) reads."""
    for k, v in orig.__dict__.items():
        if k not in stand_in.__dict__ and _is_setting(k):
            object.__setattr__(stand_in, k, v)


class _ConvSlot(_StandIn):
    """Where a fused Conv2d was: an instance of the conv's own class (isinstance finds
    it where it found the conv: weight init, freezing, swaps) with its weight and
    settings, passing its input on to the fused norm after it, which runs the conv;
    runs the conv itself while its layer is not fused (_Layer). Setting its geometry
    (stride, padding, dilation, groups, padding_mode, bias) after convert() unfuses the
    layer for good."""

    _GEOMETRY = frozenset(("stride", "padding", "dilation", "groups", "padding_mode", "bias",
                           "kernel_size", "_reversed_padding_repeated_twice"))

    def __init__(self, conv: nn.Conv2d):
        nn.Module.__init__(self)
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        _copy_settings(self, conv)
        object.__setattr__(self, "_orig", conv)  # for revert(); not a submodule

    def __setattr__(self, name, value):
        if name in self._GEOMETRY and self._layer is not None:
            self._layer.altered = True
        super().__setattr__(name, value)

    def forward(self, x):
        if self._runs_fused():
            return x
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}" \
            " (fused into the next)"


class _ActSlot(_StandIn):
    """Where an activation module fused into the norm before it was: an instance of
    its class, passing its input on, or running the activation while its layer is not
    fused (_Layer). Setting one of its settings but `inplace` unfuses the layer."""

    def __init__(self, act: nn.Module, name: str):
        nn.Module.__init__(self)
        _copy_settings(self, act)
        self.fused_act = name
        object.__setattr__(self, "_orig", act)

    def __setattr__(self, name, value):
        if name not in ("inplace", "training") and self._layer is not None:
            self._layer.altered = True
        super().__setattr__(name, value)

    def forward(self, x):
        if self._runs_fused() or self.fused_act == "identity":
            return x
        # the module's function, in place where it was (F.relu6, F.hardswish, ...)
        return getattr(F, self.fused_act)(x, inplace=getattr(self, "inplace", False))

    def extra_repr(self) -> str:
        return f"{type(self._orig).__name__} (fused into the BatchNorm before it)"


class _FusedNorm(_StandIn):
    """Where the BatchNorm was: its parameters and buffers (and a BatchNormAct2d's act
    and drop children) under the same names, and the fused conv + BN + activation
    (+ residual) on the conv's input. Each instance is of _fused_class(_FusedNorm,
    type(bn)), a subclass of the replaced BatchNorm's own class (whose __init__ is not
    run), so code that finds BatchNorms by isinstance (to put them in eval mode for
    fine-tuning, to leave them out of weight decay, to set their momentum, to swap
    them: _Layer) finds it, as it found the BatchNorm."""

    def __init__(self, bn: nn.Module, conv: nn.Conv2d, kind: str, act: str):
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
        self.num_features = getattr(bn, "num_features", None) or bn.weight.numel()
        self.eps, self.momentum = bn.eps, getattr(bn, "momentum", None)
        self.affine = getattr(bn, "affine", True)
        self.track_running_stats = getattr(bn, "track_running_stats", True)
        self.kind, self.fused_act = kind, act
        self.stride, self.padding, self.dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
        object.__setattr__(self, "_orig", bn)
        self.train(bn.training)

    def forward(self, x, residual=None, scale=None):
        """scale: a per-channel layer scale gamma after the BN (identity act only),
        applied to the BN's weight and bias."""
        layer = self._layer
        if not self._runs_fused():  # x: the conv's output (the slot's or its replacement's)
            return self._unfused(x, residual, scale)
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
        slot = layer.slot
        conv_weight = slot._parameters.get("weight")
        if conv_weight is None:  # parametrized after convert(): computed by its property
            conv_weight = slot.weight
        return fused_conv_bn_act(x, conv_weight, weight, bias,
                                 b["running_mean"], b["running_var"], b["num_batches_tracked"],
                                 self.momentum, self.track_running_stats, training, self.eps,
                                 self.fused_act, **conv)

    def _unfused(self, x, residual, scale):
        """The BatchNorm's own forward (a BatchNormAct2d's drop and act after it); its
        tensors by attribute: a pruned or parametrized weight, a replica's copies."""
        b = self._buffers
        y = _batch_norm(x, self.weight, self.bias, b["running_mean"], b["running_var"],
                        b.get("num_batches_tracked"), self.momentum, self.track_running_stats,
                        self.training and not self.frozen, self.eps)
        for name in ("drop", "act"):  # BatchNormAct2d: y = act(drop(bn(x)))
            if name in self._modules:
                y = self._modules[name](y)
        y = y if scale is None else y * scale
        return y if residual is None else y + residual

    def _mbx_fused_convs(self, in_hw, out_hw):
        """cost.profile: the conv, when this norm runs it."""
        return [(self._layer.slot, in_hw)] if self._runs_fused() else []

    def extra_repr(self) -> str:
        if self.frozen:
            return f"{self.kind}, act={self.fused_act!r}, eps={self.eps}, frozen"
        return f"{self.kind}, act={self.fused_act!r}, eps={self.eps}, momentum={self.momentum}"


_FUSED_CLASSES = {}


def _fused_class(kind: type, base: type) -> type:
    """The stand-in class `kind` (_ConvSlot, _FusedNorm, _ActSlot) for a module of class
    `base`: a subclass of both, made once per pair."""
    cls = _FUSED_CLASSES.get((kind, base))
    if cls is None:
        frozen = f"{base.__module__}.{base.__qualname__}" == _FROZEN_BN
        cls = type(f"Fused{base.__name__}", (kind, base),
                   {"__module__": __name__, "_kind": kind, "_base": base, "frozen": frozen,
                    "__repr__": nn.Module.__repr__})  # FrozenBatchNorm2d has its own
        _FUSED_CLASSES[kind, base] = cls
    return cls


def _new_fused(kind: type, base: type):
    """An empty stand-in, for unpickling (a stand-in is pickled by its classes)."""
    cls = _fused_class(kind, base)
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
    (_LAYER_SCALE) or None. Or (None, None, None, why not). Only nn.Identity and one
    layer scale may follow that BN."""
    names = [n for n in spec.body if getattr(block, n, None) is not None]
    kids = dict(_children(block))
    drop_site = [(block, spec.drop, kids[spec.drop])] if spec.drop in kids else []
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
        elif type(last) is nn.Identity and _not_plain(last, "") is None:
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
    return [m for _, _, m in chain], sites + chain + drop_site, scale, None


class _ResidualBlock(nn.Module):
    """A residual block (_RESIDUAL_BLOCKS) with its add fused into the projection: the
    block's children under their own names, its body run as a chain whose last fused
    BN gets the block input as residual. While stochastic depth / drop path is active
    (training with p > 0) the add runs after it, as in the block's own forward. The
    block's own forward runs, on its current children, while _changed() says so."""

    def __init__(self, block: nn.Module, spec: _ResidualSpec, chain: list, sites: list,
                 scale=None):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.drop_name, self.flag_name = spec.drop, spec.flag
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_sites", [(self if p is block else p, n, m) for p, n, m in sites])
        # what the fused forward does not call (opened containers, trailing identities,
        # the layer scale, the drop path), and the opened containers' sizes
        called = {id(m) for m in chain}
        object.__setattr__(self, "_uncalled", [m for _, _, m in sites if id(m) not in called])
        object.__setattr__(self, "_opened", [(m, len(m._modules)) for m in self._uncalled
                                             if _runs_children(m)])
        for m in self.modules():  # the block's own stand-ins now live here
            if isinstance(m, _StandIn) and m._layer.parent is block:
                m._layer.parent = self
        object.__setattr__(self, "_scale", scale)  # a layer scale folded into the last BN
        object.__setattr__(self, "_orig", block)
        self.train(block.training)

    def _changed(self) -> bool:
        """Whether the fused forward would differ from the block's own: an
        nn.DataParallel replica; the block's flag (use_res_connect, has_skip) set on
        it; a module of the body or its drop path not the one convert() found
        (_residual_chain's sites); a module appended to a container it opened up; a
        hook on a module it does not call; the projection's layer not fused (_Layer:
        the norm would add the residual inside its hooks)."""
        d = self.__dict__
        if "_is_replica" in d or d.get(self.flag_name, True) is not True:
            return True
        for site in self._sites:
            if site[0]._modules.get(site[1]) is not site[2]:
                return True
        for m, n in self._opened:
            if len(m._modules) != n:
                return True
        if any(_has_hooks(m) for m in self._uncalled):
            return True
        return not self._chain[-1]._layer.fused()

    def forward(self, x):
        if self._changed():
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
        act_slot, act_name = None, None
        plain = type(bn) is nn.BatchNorm2d or _is_frozen(bn)
        if act == "identity" and plain and i + 2 < len(children):
            act_name, act_mod = children[i + 2]
            if _act_name(act_mod) is not None and _not_plain(act_mod, "") is None:
                act = _act_name(act_mod)
                act_slot = _fused_class(_ActSlot, type(act_mod))(act_mod, act)
                setattr(parent, act_name, act_slot)
        slot = _fused_class(_ConvSlot, type(conv))(conv)
        fused = _fused_class(_FusedNorm, type(bn))(bn, conv, kind, act)
        setattr(parent, name, slot)
        setattr(parent, bn_name, fused)
        layer = _Layer(parent, name, slot, bn_name, fused, act_name, act_slot)
        for m in (slot, fused, act_slot):
            if m is not None:
                object.__setattr__(m, "_layer", layer)
        report.fused.append((full, kind, act))
        i += 2 + (act_slot is not None)


def _walk(module, prefix, report):
    for name, child in list(module.named_children()):
        if isinstance(child, (_ConvBNAct, _OurInvertedResidual, _StandIn, _ResidualBlock)):
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
    if not isinstance(child, (_ResidualBlock, _StandIn)):
        return child
    orig = child._orig
    if isinstance(child, _ResidualBlock):
        for n, m in child.named_children():
            setattr(orig, n, m)
        for k, v in child.__dict__.items():  # attributes set on it (use_res_connect, ...)
            if not k.startswith("_") and k not in ("training", "drop_name", "flag_name"):
                setattr(orig, k, v)
    elif isinstance(child, (_ConvSlot, _ActSlot)):  # weight, bias and settings as now
        for k, v in child.__dict__.items():
            if k in orig.__dict__ and k != "training" and _is_setting(k):
                setattr(orig, k, v)
        if isinstance(child, _ConvSlot):
            orig.weight, orig.bias = child.weight, child.bias
    elif isinstance(child, _FusedNorm):
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if hasattr(orig, t):  # FrozenBatchNorm2d has no num_batches_tracked
                setattr(orig, t, getattr(child, t))
        for n, m in child._modules.items():  # BatchNormAct2d's act and drop, as now
            setattr(orig, n, m)
        for a in ("eps", "momentum", "affine", "track_running_stats"):
            if a in orig.__dict__:  # FrozenBatchNorm2d has no momentum
                setattr(orig, a, getattr(child, a))
    orig.train(child.training)
    setattr(parent, name, orig)
    return orig


def revert(model: nn.Module) -> nn.Module:
    """Undo convert() in place: plain torch modules holding the current parameters
    and buffers. Returns the model. A stand-in with hooks or parametrizations
    registered after convert() (pruning is both) cannot be reverted without losing
    them: ValueError, before anything changes."""
    for name, m in model.named_modules():
        why = _not_plain(m, name) if isinstance(m, _StandIn) else None
        if why is not None:
            raise ValueError(f"revert: {why}, registered after convert(); remove it first "
                             "(prune.remove, parametrize.remove_parametrizations, the hook's "
                             "handle.remove()) or keep the converted model")
    _revert(model)
    return model


def _revert(model):
    for name, child in list(model.named_children()):
        child = _revert_child(model, name, child)
        _revert(child)
