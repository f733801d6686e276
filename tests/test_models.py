"""Fused modules, models, convert()/revert() and the cost model."""
import copy
import functools
import io
import sys

import pytest
import torch
import torch.nn.utils.prune
import torchvision
from torch import nn

import mobilenet_ext
from mobilenet_ext import convert, cost, models, revert
from mobilenet_ext.convert import _FusedNorm
from mobilenet_ext.nn import DepthwiseSeparable, DWConvBNAct, InvertedResidual, PWConvBNAct
from conftest import AUTOCAST_DTYPE, err

timm = pytest.importorskip("timm")

BACKENDS = [b for b in ("cpu", "reference") if mobilenet_ext.backends()[b].available]


def randomise_bn(model, bias_std=0.1):
    """Non-trivial BN statistics and affine parameters, so folding errors show; a
    large bias_std shifts BN outputs past 6 so that ReLU6's upper clamp is exercised
    (a shift, unlike a larger BN weight, does not amplify roundoff layer by layer)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * bias_std)
    return model


MODELS = {
    "tv_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(dropout=0.0),
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(dropout=0.0),
    "timm_mobilenetv2_100": lambda: timm.create_model("mobilenetv2_100", drop_rate=0.0),
    "timm_mobilenetv4_conv_small": lambda: timm.create_model("mobilenetv4_conv_small",
                                                             drop_rate=0.0),
    "ours_mobilenet_v2": lambda: models.mobilenet_v2(dropout=0.0),
    "ours_mobilenet_v1": lambda: models.mobilenet_v1(dropout=0.0),
}
# fused conv+BN pairs convert() must find (all but the 3-channel stem), residual adds
EXPECTED = {"tv_mobilenet_v2": (51, 10), "tv_mobilenet_v3_small": (33, 6),
            "timm_mobilenetv2_100": (51, 10), "timm_mobilenetv4_conv_small": (43, 10)}


@pytest.fixture(params=BACKENDS)
def backend(request):
    mobilenet_ext.set_backend(request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_eval_matches(name, channels_last, dtype, backend):
    torch.manual_seed(0)
    # float64 with BN outputs shifted past 6: ReLU6's clamp matters, roundoff does not
    wide = dtype == torch.float64
    model = randomise_bn(MODELS[name](), bias_std=3.0 if wide else 0.1).to(dtype).eval()
    fused, report = convert(model, return_report=True)
    assert isinstance(report, mobilenet_ext.ConvertReport)  # exported at the top level
    if name in EXPECTED:
        assert (len(report.fused), len(report.residual)) == EXPECTED[name], str(report)
    x = torch.randn(2, 3, 64, 48, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        tol = 1e-9 * want.abs().max().item() if wide else 1e-4
        torch.testing.assert_close(fused(x), want, atol=tol, rtol=1e-7 if wide else 1e-4)
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("name", ["tv_mobilenet_v2", "tv_mobilenet_v3_small",
                                  "timm_mobilenetv2_100", "timm_mobilenetv4_conv_small",
                                  "ours_mobilenet_v2"])
def test_convert_training_matches(name, backend):
    """A few SGD steps in float64: loss, every gradient, parameters, running stats and
    num_batches_tracked match the original model."""
    torch.manual_seed(0)
    model = randomise_bn(MODELS[name]()).double().train()
    fused = convert(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    # MobileNetV4's late layers (2x2 pixels here) amplify roundoff through their batch
    # statistics: eager against itself in channels_last drifts past these tolerances by
    # the second step, so one step there
    for _ in range(1 if "mobilenetv4" in name else 3):
        x = torch.randn(3, 3, 40, 40, dtype=torch.float64)
        la, lb = model(x).square().mean(), fused(x).square().mean()
        opt_a.zero_grad()
        opt_b.zero_grad()
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, atol=1e-10, rtol=1e-9)
        for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9, rtol=1e-7, msg=n)
        opt_a.step()
        opt_b.step()
    sa, sb = model.state_dict(), fused.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-9, rtol=1e-7, msg=k)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_empty_batch_matches_eager(training, channels_last, backend):
    """A batch of 0 images, as eager runs it: an empty output in x's layout; in
    training, zero gradients, running buffers unchanged and num_batches_tracked counted
    (the fused ops cannot normalise without values, so the wrappers run the reference)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = randomise_bn(MODELS["tv_mobilenet_v2"]()).double().train(training)
    model = model.to(memory_format=fmt)
    fused = convert(copy.deepcopy(model))
    x = torch.randn(0, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=fmt)
    ya, yb = model(x), fused(x)
    assert yb.shape == ya.shape == (0, 1000)
    fa, fb = model.features(x), fused.features(x)
    assert fb.shape == fa.shape and fb.is_contiguous(memory_format=fmt)
    ya.sum().backward()
    yb.sum().backward()
    for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=0, rtol=0, msg=n)
    sa, sb = model.state_dict(), fused.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=0, rtol=0, msg=k)
    assert sb["features.1.conv.2.num_batches_tracked"].item() == (2 if training else 0)


@pytest.mark.parametrize("training", [False, True])
def test_convert_under_autocast(device, training):
    """Mixed precision as users train: a converted torchvision mobilenet_v2 (fp32
    parameters) under torch.autocast runs, returns the autocast dtype like the original,
    and its output and parameter gradients (fp32) are as close to the float64 result as
    the original's under autocast are (eager: about 1e-3 and 1e-2 relative in eval, 1e-2
    and 0.1 for the first blocks in training)."""
    low = AUTOCAST_DTYPE[device]
    model = randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0, num_classes=10))
    if training:  # deeper, batch statistics in bf16 leave eager's gradients ~100% off too
        model = model.features[:4]
    model = model.to(device).train(training)
    fused = convert(model)
    exact = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 64, 64, device=device)
    want = exact(x.double())
    want.square().mean().backward()
    g64 = torch.cat([p.grad.flatten() for p in exact.parameters()])
    errs = {}
    for name, m in (("eager", model), ("ours", fused)):
        with torch.autocast(device, dtype=low):
            y = m(x)
        assert y.dtype == low, name
        y.float().square().mean().backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g.dtype == torch.float32 for g in grads), name
        g = torch.cat([g.double().flatten() for g in grads])
        errs[name] = (err(y, want), ((g - g64).norm() / g64.norm()).item())
    floor = 4 * torch.finfo(low).eps
    assert errs["ours"][0] <= 2 * errs["eager"][0] + floor * want.abs().max().item(), errs
    assert errs["ours"][1] <= 2 * errs["eager"][1] + floor, errs


def _frozen_bn_mobilenet_v3():
    """torchvision mobilenet_v3_large with FrozenBatchNorm2d (what the detection backbones
    use), fixed statistics and affine away from their defaults, in float64."""
    from torchvision.ops import FrozenBatchNorm2d
    norm = functools.partial(FrozenBatchNorm2d, eps=1e-3)
    model = torchvision.models.mobilenet_v3_large(dropout=0.0, norm_layer=norm)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                              (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.double()


def test_convert_frozen_batchnorm():
    """FrozenBatchNorm2d is fused as eval-mode BN whatever the module's mode: the same
    outputs and conv-weight gradients in training, no new parameters, the same
    state-dict keys (BatchNorm2d checkpoints load as into the original), and revert()
    gives FrozenBatchNorm2d back with the same buffers."""
    from torchvision.ops import FrozenBatchNorm2d
    model = _frozen_bn_mobilenet_v3().train()
    fused, report = convert(model, return_report=True)
    assert (len(report.fused), [n for n, _ in report.left]) == (45, ["features.0.0"]), report
    # the stand-ins are FrozenBatchNorm2d to isinstance, as the layers they replaced
    assert [n for n, m in fused.named_modules() if isinstance(m, FrozenBatchNorm2d)] == \
        [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert sum(type(m) is FrozenBatchNorm2d for m in fused.modules()) == 1  # the stem
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    ya, yb = model(x), fused(x)
    torch.testing.assert_close(yb, ya, atol=1e-10, rtol=1e-9)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9, rtol=1e-7, msg=n)
    # a BatchNorm2d checkpoint (with num_batches_tracked) loads into both alike
    plain = torchvision.models.mobilenet_v3_large().double().state_dict()
    model.load_state_dict(plain)
    fused.load_state_dict(plain)
    for k, v in model.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    reverted = revert(copy.deepcopy(fused))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
    for k, v in model.state_dict().items():
        assert torch.equal(reverted.state_dict()[k], v), k
    assert not any(hasattr(m, "momentum") or hasattr(m, "num_batches_tracked")
                   for m in reverted.modules() if isinstance(m, FrozenBatchNorm2d))


def test_convert_detection_backbone():
    """torchvision's detection MobileNetV3 + FPN backbone (FrozenBatchNorm2d by default):
    its depthwise and pointwise convs fuse and every feature map matches."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    torch.manual_seed(0)
    body = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True)
    body = body.double().eval()
    fused, report = convert(body, return_report=True)
    assert len(report.fused) == 45, report
    x = torch.randn(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        want, got = body(x), fused(x)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-9, msg=k)


def test_hooks_after_convert_see_the_layers_own_tensors(monkeypatch):
    """A hook registered after convert() on a fused layer's stand-in (the conv, BatchNorm
    or activation position) makes that layer run unfused, so the hook sees what it sees
    without convert(); so does a hook on a container that a block whose add was fused
    opened up. Once the hooks are removed the layer runs fused again. A block whose add
    was fused still answers for the replaced block's own attributes (read-only), and
    an unknown one still raises."""
    torch.manual_seed(0)
    eager = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.35, dropout=0.0),
                         bias_std=1.0).double().eval()
    fused = convert(eager)
    calls = []
    module = sys.modules["mobilenet_ext.convert"]
    op = module.fused_conv_bn_act
    monkeypatch.setattr(module, "fused_conv_bn_act", lambda *a, **k: calls.append(1) or op(*a, **k))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused(x)
    n_fused = len(calls)
    assert n_fused == 51
    seen = {}

    def hooks(model, tag):
        def hook(name):
            def record(m, args, out):
                seen[tag, name] = (args[0], out)
            return record
        dw = model.features[3].conv[1]  # depthwise conv, BatchNorm, ReLU6
        return [dw[i].register_forward_hook(hook(i)) for i in range(3)] + \
            [model.features[5].conv.register_forward_hook(hook("opened")),
             model.features[6].conv[3].register_forward_hook(hook("projection"))]

    handles = hooks(eager, "eager") + hooks(fused, "fused")
    calls.clear()
    torch.testing.assert_close(fused(x), eager(x), atol=1e-12, rtol=1e-10)
    # those two layers unfused; the blocks run their own forward, their layers still fused
    assert len(calls) == n_fused - 2
    assert {type(fused.features[i]).__name__ for i in (5, 6)} == {"_ResidualBlock"}
    for name in (0, 1, 2, "opened", "projection"):
        for a, b in zip(seen["fused", name], seen["eager", name]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=str(name))
    for h in handles:
        h.remove()
    calls.clear()
    fused(x)
    assert len(calls) == n_fused
    # a hook for every module: every layer unfused, each module's own tensors
    bn_inputs_plus_one = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: (args[0] + 1,) if isinstance(m, nn.BatchNorm2d) else None)
    try:
        calls.clear()
        torch.testing.assert_close(fused(x), eager(x), atol=1e-12, rtol=1e-10)
        assert not calls
    finally:
        bn_inputs_plus_one.remove()
    grads = {}  # a backward hook: the BatchNorm's own gradients, as without convert()
    for model, tag in ((eager, "eager"), (fused, "fused")):
        model.features[3].conv[3].register_full_backward_hook(  # (no in-place act after)
            lambda m, gin, gout, tag=tag: grads.setdefault(tag, (gin[0], gout[0])) and None)
        model(x.requires_grad_()).square().sum().backward()
    for a, b in zip(grads["fused"], grads["eager"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    block = fused.features[3]
    assert type(block).__name__ == "_ResidualBlock"
    assert (block.use_res_connect, block.out_channels, block.stride) == \
        (True, eager.features[3].out_channels, 1)
    with pytest.raises(AttributeError, match="_ResidualBlock"):
        block.no_such_attribute


def test_convert_leaves_hooked_pruned_and_parametrized():
    """A conv or BatchNorm whose forward hooks would not run inside the fused op (user
    hooks, pruning's mask, weight_norm), or whose weight is parametrized, is left as it
    is and reported; the rest of the model still fuses and trains like the original."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    seen = []

    def build():
        torch.manual_seed(0)
        model = randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0)).double()
        model.features[1].conv[0][0].register_forward_hook(lambda *_: seen.append("conv"))
        prune.l1_unstructured(model.features[2].conv[1][0], "weight", amount=0.5)
        parametrize.register_parametrization(model.features[3].conv[0][0], "weight", Double())
        model.features[4].conv[3].register_forward_pre_hook(lambda *_: seen.append("bn"))
        model.features[5].register_forward_hook(lambda *_: seen.append("block"))
        return model

    model = build()
    # inplace: a pruned model cannot be deep-copied (torch: non-leaf weight)
    fused, report = convert(build(), inplace=True, return_report=True)
    left = dict(report.left)
    assert "has hooks" in left["features.1.conv.0.0"]
    assert "has hooks" in left["features.2.conv.1.0"]  # pruning's forward pre-hook
    assert "parametrized" in left["features.3.conv.0.0"]
    assert "BatchNorm has hooks" in left["features.4.conv.2"]
    assert len(report.fused) == 51 - 4
    assert len(report.residual) == 10 - 1 and "features.5" not in report.residual
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.05)
    for _ in range(2):  # the pruned and parametrized weights are recomputed every step
        x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
        seen.clear()
        la = model(x).square().mean()
        hooks_a = sorted(seen)
        seen.clear()
        lb = fused(x).square().mean()
        assert sorted(seen) == hooks_a == ["block", "bn", "conv"]
        torch.testing.assert_close(lb, la, atol=1e-10, rtol=1e-9)
        for opt, loss in ((opt_a, la), (opt_b, lb)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-9, rtol=1e-7, msg=n)


def test_sync_batchnorm_is_never_fused(monkeypatch):
    """convert() leaves SyncBatchNorm layers and says why; our fused modules whose
    BatchNorm convert_sync_batchnorm swapped for a SyncBatchNorm run that SyncBatchNorm
    (here one process: the statistics equal the local ones) instead of the fused op."""
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.mobilenet_v2())
    _, report = convert(synced, return_report=True)
    assert not report.fused and "SyncBatchNorm" in str(report)
    ours = randomise_bn(models.mobilenet_v2(dropout=0.0)).train()
    ours_synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ours))
    calls = []
    forward = nn.SyncBatchNorm.forward
    monkeypatch.setattr(nn.SyncBatchNorm, "forward",
                        lambda self, x: calls.append(1) or forward(self, x))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours_synced(x), ours(x), atol=1e-4, rtol=1e-4)
    assert len(calls) == sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(ours_synced.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)


# More families convert() must handle: (fused conv+BN pairs, pairs left, residual adds
# fused). MobileNetV4's universal blocks (layer scale before the add) and GhostNet's
# (a conv shortcut) keep their adds in their own forward.
NO_DROP = dict(drop_rate=0.0, drop_path_rate=0.0)
MORE_MODELS = {
    "tv_mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(dropout=0.0), 51, 1, 10),
    "tv_shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(), 55, 1, 0),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(
        dropout=0.0, stochastic_depth_prob=0.0), 48, 1, 9),
    "tv_regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(), 44, 27, 0),
    "timm_mobilenetv1_100": (lambda: timm.create_model("mobilenetv1_100", **NO_DROP), 26, 1, 0),
    "timm_mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100",
                                                             **NO_DROP), 45, 1, 10),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", **NO_DROP), 48, 1, 9),
    "timm_efficientnet_es": (lambda: timm.create_model("efficientnet_es", **NO_DROP), 41, 8, 12),
    # its residual adds follow a layer scale, folded into the projection's BN
    "timm_mobilenetv4_hybrid_medium": (lambda: timm.create_model("mobilenetv4_hybrid_medium",
                                                                 **NO_DROP),
                                       86, 2, 19),
    "timm_lcnet_050": (lambda: timm.create_model("lcnet_050", **NO_DROP), 26, 1, 0),
    "timm_ghostnet_100": (lambda: timm.create_model("ghostnet_100", drop_rate=0.0), 75, 5, 0),
}


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_convert_more_families(name):
    """float64, BN randomised: eval output, and one training step's output and every
    parameter gradient, match the original (dropout and drop-path off)."""
    build, n_fused, n_left, n_residual = MORE_MODELS[name]
    torch.manual_seed(0)
    model = randomise_bn(build()).double()
    fused, report = convert(model, return_report=True)
    assert (len(report.fused), len(report.left), len(report.residual)) == \
        (n_fused, n_left, n_residual), str(report)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(fused.eval()(x), want, atol=1e-10 * want.abs().max().item(),
                                   rtol=1e-9)
    _assert_same_step(model, fused, model.train()(x), fused.train()(x))


def _assert_same_step(model, fused, ya, yb):
    """Training outputs ya (model) and yb (fused) agree in float64, and so does every
    parameter gradient of a loss on them."""
    torch.testing.assert_close(yb, ya, atol=1e-10 * ya.abs().max().item(), rtol=1e-9)
    ya.square().mean().backward()
    yb.square().mean().backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9 * scale, rtol=1e-7, msg=n)


def _count_fused_residuals(monkeypatch):
    """A list that gets one entry per pointwise fused op called with a residual."""
    calls = []
    pw = mobilenet_ext.ops.pw_conv_bn_act

    def counting(*args, residual=None, **kwargs):
        if residual is not None:
            calls.append(residual.shape)
        return pw(*args, residual=residual, **kwargs)

    monkeypatch.setattr(mobilenet_ext.ops, "pw_conv_bn_act", counting)
    return calls


@pytest.mark.parametrize("name", ["tv", "timm"])
def test_residual_add_fused_with_drop_path(name, monkeypatch):
    """EfficientNet-B0 with stochastic depth / drop path on: the residual add is fused
    in eval, and while training (where the drop comes between the projection and the
    add) it runs after the drop; with one seed, outputs and every gradient equal the
    original's in float64."""
    calls = _count_fused_residuals(monkeypatch)
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.2)
                         if name == "tv" else
                         timm.create_model("efficientnet_b0", drop_rate=0.0, drop_path_rate=0.2))
    model = model.double()
    fused, report = convert(model, return_report=True)
    assert len(report.residual) == 9, str(report)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    _assert_adds_fused_in_eval_only(model, fused, x, calls, 9)


def _assert_adds_fused_in_eval_only(model, fused, x, calls, n_adds):
    """With drop path on: in eval, n_adds residual adds run inside fused ops and the
    output matches the original's; while training none do (the drop comes before the
    add), and with one seed the output and every gradient match, in float64."""
    with torch.no_grad():
        want = model.eval()(x)
        torch.testing.assert_close(fused.eval()(x), want, atol=1e-10 * want.abs().max().item(),
                                   rtol=1e-9)
    assert len(calls) == n_adds
    calls.clear()
    torch.manual_seed(3)
    ya = model.train()(x)
    torch.manual_seed(3)
    yb = fused.train()(x)
    assert not calls
    _assert_same_step(model, fused, ya, yb)


def test_residual_add_fused_timm_uir_and_convbnact(monkeypatch):
    """timm's MobileNetV4 UniversalInvertedResidual (projection inside a ConvNormAct,
    drop path on), without and with a layer scale (folded into the projection's BN,
    gamma randomised), and a ConvBnAct block with a skip: the adds run in the
    projections' fused ops in eval, after the drop path while training; float64 outputs
    and every gradient (gamma's included) equal the original's; revert gives back the
    blocks."""
    from timm.models._efficientnet_blocks import ConvBnAct, UniversalInvertedResidual
    calls = _count_fused_residuals(monkeypatch)
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        UniversalInvertedResidual(16, 16, dw_kernel_size_mid=5, exp_ratio=3.0,
                                  layer_scale_init_value=None, drop_path_rate=0.3),
        UniversalInvertedResidual(16, 16, dw_kernel_size_start=3, exp_ratio=2.0,
                                  layer_scale_init_value=1.0, drop_path_rate=0.3),
        ConvBnAct(16, 16, 1, skip=True, act_layer=nn.ReLU6, drop_path_rate=0.3))).double()
    with torch.no_grad():
        model[1].layer_scale.gamma.uniform_(-2, 2)
    fused, report = convert(model, return_report=True)
    assert report.residual == ["0", "1", "2"] and not report.left, str(report)
    assert "layer scale" in repr(fused[1]) and "layer scale" not in repr(fused[0])
    _assert_adds_fused_in_eval_only(model, fused, torch.randn(2, 16, 9, 9, dtype=torch.float64),
                                    calls, 3)
    back = mobilenet_ext.revert(fused)
    assert [type(m) for m in back] == [UniversalInvertedResidual] * 2 + [ConvBnAct]


def test_residual_add_fused_and_reverted(monkeypatch):
    """torchvision MobileNetV3's blocks (projection inside a Conv2dNormActivation) and
    timm's: each residual block's add runs inside its projection's fused op; a block
    whose projection has hooks or whose children are not the ones its forward is known
    to call keeps its own add, and is reported; revert gives back the original blocks."""
    calls = _count_fused_residuals(monkeypatch)
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.mobilenet_v3_small(dropout=0.0)).double().eval()
    seen = []
    model.features[3].block[-1].register_forward_hook(lambda *_: seen.append("proj"))
    fused, report = convert(model, return_report=True)
    assert len(report.residual) == 5 and "features.3" not in report.residual, str(report)
    assert "hooks" in dict(report.left)["features.3"]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert seen == ["proj"]
        torch.testing.assert_close(fused(x), want, atol=1e-10 * want.abs().max().item(),
                                   rtol=1e-9)
    assert seen == ["proj", "proj"] and len(calls) == 5
    copied = copy.deepcopy(fused)  # runs its own modules, not the original's
    with torch.no_grad():
        copied.features[5].block[-1][1].weight.mul_(2)
        assert not torch.allclose(copied(x), want)
    reverted = revert(copy.deepcopy(fused))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), want, atol=0, rtol=0)

    tm = randomise_bn(timm.create_model("mobilenetv2_100", drop_rate=0.0)).double().eval()
    tm.blocks[2][1].add_module("extra", nn.Identity())  # not called by its forward
    fused, report = convert(tm, return_report=True)
    assert len(report.residual) == 9 and "children differ" in dict(report.left)["blocks.2.1"]
    calls.clear()
    with torch.no_grad():
        want = tm(x)
        torch.testing.assert_close(fused(x), want, atol=1e-10 * want.abs().max().item(),
                                   rtol=1e-9)
    assert len(calls) == 9


def test_fx_symbolic_trace():
    """FX traces converted and native fused modules, each fused step as one call of
    nn.fused_conv_bn_act, and the traced graph (traced in training mode) updates the
    running buffers and num_batches_tracked at run time, momentum=None included."""
    from mobilenet_ext.nn import fused_conv_bn_act
    converted = convert(randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0)))
    native = nn.Sequential(DWConvBNAct(8, momentum=None), PWConvBNAct(8, 16),
                           InvertedResidual(16, 16, 1, 2))
    for model, n_fused, shape in ((converted, 51, (2, 3, 64, 64)), (native, 5, (2, 8, 9, 9))):
        for training in (False, True):
            model.train(training)
            twin = copy.deepcopy(model)
            traced = torch.fx.symbolic_trace(twin)
            calls = [n for n in traced.graph.nodes if n.target is fused_conv_bn_act]
            assert len(calls) == n_fused
            for _ in range(2):
                x = torch.randn(*shape)
                torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
            for k, v in model.state_dict().items():
                torch.testing.assert_close(traced.state_dict()[k], v, atol=1e-6, rtol=1e-5,
                                           msg=k)
    assert int(native[0].bn.num_batches_tracked) == 2


def test_feature_extractor():
    """torchvision's create_feature_extractor (FX, traced in train and eval mode) on a
    converted mobilenet_v2 gives the original's intermediate features."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0)).double()
    nodes = {"features.3": "c2", "features.6": "c3", "features.13": "c4"}
    want = create_feature_extractor(model, return_nodes=nodes)
    got = create_feature_extractor(convert(model), return_nodes=nodes)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for training in (True, False):
        a, b = want.train(training)(x), got.train(training)(x)
        assert list(a) == list(b) == ["c2", "c3", "c4"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-10, rtol=1e-9, msg=k)


def _ddp_worker(rank, world, port, out):
    """One DDP rank: the original and the converted first blocks of mobilenet_v2 (float64),
    each wrapped in DistributedDataParallel, two SGD steps on this rank's own batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        base = randomise_bn(torchvision.models.mobilenet_v2().features[:8]).double()
        result = {}
        for name, model in (("eager", copy.deepcopy(base)), ("ours", convert(base))):
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(2):
                x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=g)
                opt.zero_grad()
                ddp(x).square().mean().backward()
                opt.step()
            result[name] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_eager(tmp_path):
    """DistributedDataParallel (gloo, two CPU processes, different batches per rank): a
    converted model's parameters and buffers after two steps equal the original's, and
    the ranks' parameters agree (gradients are all-reduced through the fused ops)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for k, v in r["eager"].items():
            torch.testing.assert_close(r["ours"][k], v, atol=1e-9, rtol=1e-7, msg=k)
    for k, v in ranks[0]["ours"].items():
        if "running" not in k and "num_batches" not in k:  # BN statistics stay per rank
            torch.testing.assert_close(ranks[1]["ours"][k], v, atol=0, rtol=0, msg=k)


def test_momentum_none_and_num_batches_tracked():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                          nn.BatchNorm2d(8, momentum=None), nn.ReLU6(),
                          nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
    fused = convert(model)
    for _ in range(3):
        x = torch.randn(2, 8, 7, 7)
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert int(fused.state_dict()["1.num_batches_tracked"]) == 3


def test_state_dict_round_trips():
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.mobilenet_v2())
    fused = convert(original)
    # original -> converted
    other = convert(torchvision.models.mobilenet_v2())
    other.load_state_dict(original.state_dict())
    # converted -> original
    plain = torchvision.models.mobilenet_v2()
    plain.load_state_dict(fused.state_dict())
    reverted = revert(copy.deepcopy(fused))
    for sd in (other.state_dict(), plain.state_dict(), reverted.state_dict()):
        assert list(sd) == list(original.state_dict())
        for k, v in original.state_dict().items():
            assert torch.equal(sd[k], v), k
    kinds = [type(m) for m in reverted.modules()]
    assert kinds == [type(m) for m in original.modules()]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reverted.eval()(x), original.eval()(x))


def test_convert_inplace_and_optimizer_params():
    model = torchvision.models.mobilenet_v2()
    params = {id(p) for p in model.parameters()}
    fused = convert(model, inplace=True)
    assert fused is model
    assert {id(p) for p in fused.parameters()} == params  # optimizers keep working


def test_convert_nothing_to_fuse():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    fused, report = convert(model, return_report=True)
    assert "nothing to fuse" in str(report)
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]


def test_convert_report_lists_what_is_left(capsys):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=True), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.GELU())
    fused, report = convert(model, verbose=True, return_report=True)
    out = capsys.readouterr().out
    assert "fused 1" in out and "conv has a bias" in out and "pointwise" in out
    assert [(n, k) for n, k, _ in report.fused] == [("5", "pointwise")]
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_converted_mobilenet_v2():
    torch._dynamo.reset()
    model = convert(randomise_bn(torchvision.models.mobilenet_v2())).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_as_the_first_call_in_a_process():
    """torch.compile(fullgraph=True) of a converted model before any eager op has run
    (the backend probe cannot be traced: it runs at import or outside the graph), in
    eval and in training with timm's drop path on."""
    import os
    import subprocess
    import sys
    code = """
import torch, timm, mobilenet_ext
model = mobilenet_ext.convert(timm.create_model("efficientnet_b0", drop_path_rate=0.2))
x = torch.randn(2, 3, 32, 32)
compiled = torch.compile(model.eval(), fullgraph=True, backend="aot_eager")
with torch.no_grad():
    got = compiled(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
compiled = torch.compile(model.train(), fullgraph=True, backend="aot_eager")
torch.manual_seed(0)
got = compiled(x)
torch.manual_seed(0)
torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_torch_compile_under_autocast():
    """The autocast casts trace into the graph: compiled (fullgraph) under CPU autocast
    gives the converted model's eager autocast result, in bf16, forward and backward."""
    torch._dynamo.reset()
    model = convert(randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0).features[:4]))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        outs = []
        for m in (compiled, model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(x)
            (g,) = torch.autograd.grad(y.float().square().sum(), model[1].conv[0][0].weight)
            outs.append((y, g))
        assert outs[0][0].dtype == torch.bfloat16
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-2, rtol=2e-2)


def test_torch_export_converted():
    """torch.export of a converted model (the ops' fake kernels give the shapes): the
    exported program calls the fused ops and matches the model, in eval and training."""
    model = convert(randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0).features[:5]))
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        twin = copy.deepcopy(model)
        program = torch.export.export(twin, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("mobilenet_ext" in t and "dw_fwd" in t for t in targets), targets
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_jit_trace_converted():
    """torch.jit.trace (with its check that a second trace gives the same graph) records
    the registered fused ops; the traced module matches in eval at another input size,
    and in training (outputs, input gradients, running statistics) at the traced size
    (as with any trace, the batch-statistics count is a constant of that size)."""
    model = convert(randomise_bn(torchvision.models.mobilenet_v2(dropout=0.0).features[:5]))
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        traced = torch.jit.trace(copy.deepcopy(model), x)
        assert "mobilenet_ext::dw_fwd" in str(traced.inlined_graph)
        traced.load_state_dict(model.state_dict())  # undo the buffer updates of tracing
        xg = torch.randn(2, 3, 32 if training else 40, 32 if training else 40,
                         requires_grad=True)
        ya, yb = model(xg), traced(xg)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        ga, = torch.autograd.grad(ya.square().sum(), xg)
        gb, = torch.autograd.grad(yb.square().sum(), xg)
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-5)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(traced.state_dict()[k], v, msg=k)


def test_models_load_torchvision_state_dict():
    torch.manual_seed(0)
    tv = randomise_bn(torchvision.models.mobilenet_v2()).eval()
    ours = models.mobilenet_v2().eval()
    ours.load_state_dict(tv.state_dict())  # strict: every key matches
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("size", [128, 224, 97])
def test_mobilenet_v1_any_resolution(width, size):
    model = models.mobilenet_v1(width_mult=width, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_fused_modules():
    dw = DWConvBNAct(8, 5, stride=2, act="hardswish")
    pw = PWConvBNAct(8, 16, act="identity")
    assert "hardswish" in repr(dw) and isinstance(dw.conv, nn.Conv2d) and \
        isinstance(dw.bn, nn.BatchNorm2d)
    x = torch.randn(2, 8, 9, 9)
    ref = nn.functional.hardswish(dw.bn(dw.conv(x)))
    dw.bn.num_batches_tracked.zero_()
    torch.testing.assert_close(dw(x), ref, atol=1e-5, rtol=1e-5)
    res = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(pw(x, residual=res), pw.bn(pw.conv(x)) + res, atol=1e-5,
                               rtol=1e-5)
    half = PWConvBNAct(8, 16).half().eval()
    assert half(x.half()).dtype == torch.float16
    block = InvertedResidual(16, 16, 1, 6)
    assert block.use_res_connect and "residual=True" in repr(block)
    assert DepthwiseSeparable(8, 16, 2)(x).shape == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="expected input"):
        dw(torch.randn(2, 7, 9, 9))
    with pytest.raises(ValueError, match="act: unknown activation"):
        PWConvBNAct(8, 16, act="gelu")


def _eager_twin(fused_module, act):
    """The eager conv -> bn -> act of a fused module (deep copies of its children)."""
    acts = {"relu6": nn.ReLU6(), "hardswish": nn.Hardswish(), "identity": nn.Identity()}
    return nn.Sequential(copy.deepcopy(fused_module.conv), copy.deepcopy(fused_module.bn),
                         acts[act])


def _same_steps(a, b, x, modes=(True, False)):
    """Module b computes what module a computes (float64): outputs, gradients and
    buffers, over a training step and an eval step (modes; None: as they are)."""
    for training in modes:
        if training is not None:
            a.train(training)
            b.train(training)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(yb, ya, atol=1e-12 * ya.abs().max().item(), rtol=1e-10)
        ya.square().mean().backward()
        yb.square().mean().backward()
        pbs = dict(b.named_parameters())  # by name: the order may differ (pruning)
        assert sorted(pbs) == sorted(n for n, _ in a.named_parameters())
        for n, pa in a.named_parameters():
            torch.testing.assert_close(pbs[n].grad, pa.grad, atol=1e-9, rtol=1e-7,
                                       msg=lambda m, n=n: f"{n}: {m}")
    bbs = dict(b.named_buffers())
    assert sorted(bbs) == sorted(n for n, _ in a.named_buffers())
    for n, ba in a.named_buffers():
        torch.testing.assert_close(bbs[n], ba, atol=1e-12, rtol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("case", ["bias", "reflect", "stride12", "pad10", "dil21", "pw_stride",
                                  "pw_pad", "pw_bias", "pruned", "hooked"])
def test_fused_modules_run_unfused_what_they_cannot_fuse(case):
    """A fused module around a conv the op cannot compute (a bias, another padding mode,
    different strides/paddings/dilations per dimension, a strided or padded 1x1) or
    whose conv has hooks (pruning, user hooks) runs conv, BN and activation as
    modules: what eager computes, not a silently different fused result."""
    torch.manual_seed(0)
    dw = dict(bias=dict(bias=True), reflect=dict(padding_mode="reflect"),
              stride12=dict(stride=(1, 2)), pad10=dict(padding=(1, 0)),
              dil21=dict(dilation=(2, 1), padding=(2, 1)))
    pw = dict(pw_stride=dict(stride=2), pw_pad=dict(padding=1), pw_bias=dict(bias=True))
    if case in pw:
        conv = nn.Conv2d(8, 6, 1, **{"bias": False, **pw[case]})
        module = PWConvBNAct.from_modules(conv, nn.BatchNorm2d(6), act="hardswish")
        act = "hardswish"
    else:
        kw = {"padding": 1, "bias": False, **dw.get(case, {})}
        module = DWConvBNAct.from_modules(nn.Conv2d(8, 8, 3, groups=8, **kw),
                                          nn.BatchNorm2d(8))
        act = "relu6"
    module = randomise_bn(module).double()
    eager = _eager_twin(module, act)
    calls = []
    if case == "pruned":
        for m in (module, eager):
            torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)
    if case == "hooked":
        for m in (module, eager):
            m[0].register_forward_hook(lambda *a: calls.append(1))
    _same_steps(eager, module, torch.randn(2, 8, 9, 10, dtype=torch.float64))
    assert len(calls) == (4 if case == "hooked" else 0)  # 2 steps x (eager, fused)


def test_fused_modules_follow_their_bn_mode():
    """Freezing BatchNorm for fine-tuning (bn.eval() in a model in training): the fused
    modules normalise with the running statistics and leave them as they are, as
    eager's BatchNorm does."""
    torch.manual_seed(0)
    model = randomise_bn(models.mobilenet_v2(width_mult=0.35, num_classes=10,
                                                  dropout=0.0)).double()
    eager = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10, dropout=0.0)
    eager.load_state_dict(model.state_dict())
    eager.double()
    for m in (model, eager):
        m.train()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    _same_steps(eager, model, torch.randn(2, 3, 32, 32, dtype=torch.float64), modes=(None,))


def _bn_names(model, cls=nn.BatchNorm2d):
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def test_convert_stand_ins_are_the_replaced_classes():
    """Code that finds BatchNorms, convs or activations by isinstance finds the fused
    ones' stand-ins: the same modules (timm's BatchNormAct2d as such); torchvision's
    reference recipe leaves the same parameters out of weight decay; freezing
    BatchNorm for fine-tuning (bn.eval() and a new momentum on every BatchNorm of a
    model in training), a Kaiming init of every conv, freezing the depthwise convs and
    swapping every ReLU6 for Hardswish train as in eager. A whole converted model
    pickles (torch.save) and loads as the same classes."""
    from timm.layers import BatchNormAct2d
    from torchvision.ops._utils import split_normalization_params
    torch.manual_seed(0)
    eager = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10,
                                                         dropout=0.0)).double()
    fused = convert(eager)
    assert _bn_names(fused) == _bn_names(eager) and len(_bn_names(eager)) == 52
    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return [sorted(names[id(p)] for p in g) for g in split_normalization_params(model)]

    assert groups(fused) == groups(eager) and len(groups(eager)[0]) == 2 * 52
    for cls in (nn.Conv2d, nn.ReLU6):
        assert _bn_names(fused, cls) == _bn_names(eager, cls)
    timm_eager = timm.create_model("mobilenetv2_050", **NO_DROP)
    assert _bn_names(convert(timm_eager), BatchNormAct2d) == _bn_names(timm_eager, BatchNormAct2d)
    for m in (eager, fused):
        m.train()
        torch.manual_seed(5)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.3
                if mod.num_features > 100:
                    mod.eval()
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out")
                mod.weight.requires_grad_(mod.groups == 1)
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.ReLU6) and "features.4" in f"{name}.{child_name}":
                    setattr(mod, child_name, nn.Hardswish())
    for _ in range(2):
        _same_steps(eager, fused, torch.randn(2, 3, 32, 32, dtype=torch.float64),
                    modes=(None,))
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in fused.modules()]
    for m in (eager, loaded):
        m.zero_grad(set_to_none=True)
    _same_steps(eager, loaded, torch.randn(2, 3, 32, 32, dtype=torch.float64), modes=(False,))


@pytest.mark.parametrize("bn", [dict(affine=False), dict(track_running_stats=False),
                                dict(momentum=None), dict(affine=False, track_running_stats=False)])
def test_convert_batchnorm_variants(bn):
    """BatchNorm without affine parameters, without running statistics (batch
    statistics in eval too) or with a cumulative average: fused, and the same steps."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                          nn.BatchNorm2d(8, **bn), nn.ReLU6(), nn.Conv2d(8, 12, 1, bias=False),
                          nn.BatchNorm2d(12, **bn)).double()
    fused, report = convert(eager, return_report=True)
    assert len(report.fused) == 2, report
    for _ in range(2):
        _same_steps(eager, fused, 3 * torch.randn(3, 8, 7, 9, dtype=torch.float64))


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _unswap(model, case):
    """Undo what _swap did where revert() cannot carry it over (ValueError)."""
    if case == "prune_bn":
        for m in model.modules():
            if hasattr(m, "weight_orig"):
                torch.nn.utils.prune.remove(m, "weight")
    if case == "param_bn":
        torch.nn.utils.parametrize.remove_parametrizations(model.features[2].conv[1][1],
                                                           "weight")


def _swap(model, case):
    """Swap a module of a (converted or eager) torchvision mobilenet_v2 the way `case`
    says, the same new modules for both (seeded)."""
    g = torch.Generator().manual_seed(3)
    if case == "sync_batchnorm":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if case == "timm_freeze":
        from timm.layers import freeze_batch_norm_2d
        return freeze_batch_norm_2d(model)
    if case == "conv":  # a fused depthwise conv's slot
        c = model.features[2].conv[1][0].weight.shape[0]  # (a slot has no in_channels)
        new = nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False).double()
        with torch.no_grad():
            new.weight.copy_(torch.randn(new.weight.shape, generator=g, dtype=torch.float64))
        model.features[2].conv[1][0] = new
    elif case == "act":  # an activation fused into the BatchNorm before it
        model.features[2].conv[0][2] = nn.ReLU()
    elif case == "timm_act":  # the activation inside a fused timm BatchNormAct2d
        model.blocks[1][0].bn1.act = nn.ReLU()
    elif case == "insert":  # a module inserted between a fused conv and its BatchNorm
        model.features[2].conv[0].insert(1, nn.Hardswish())
    elif case == "insert_act":  # ... and between the BatchNorm and its activation
        model.features[2].conv[0].insert(2, nn.Hardswish())
    elif case == "copy_bn":  # a BatchNorm replaced by a deep copy of itself
        model.features[2].conv[1][1] = copy.deepcopy(model.features[2].conv[1][1])
    elif case == "prune_bn":  # network slimming: every BatchNorm's weight pruned
        for m in list(model.modules()):
            if isinstance(m, nn.BatchNorm2d):
                torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5)
    elif case == "param_bn":  # a BatchNorm weight parametrized
        torch.nn.utils.parametrize.register_parametrization(model.features[2].conv[1][1],
                                                            "weight", _Double())
    elif case == "timm_drop_path":  # the drop path of a timm block whose add was fused
        model.blocks[2][1].drop_path = nn.Hardswish()
    elif case == "conv_geometry":  # a fused depthwise conv dilated (output stride)
        conv = model.features[2].conv[1][0]
        conv.dilation, conv.padding = (2, 2), (2, 2)
    elif case == "block_append":  # a module appended to the body of such a block
        model.features[3].conv.append(nn.Hardswish())
    elif case == "res_flag":  # the residual add of such a block switched off
        model.features[3].use_res_connect = False
    elif case == "block_bn":  # the projection BN of a block whose add was fused
        bn = nn.BatchNorm2d(model.features[3].conv[3].num_features).double()
        model.features[3].conv[3] = randomise_bn(bn, bias_std=1.0)
    elif case == "block_container":  # a whole Conv2dNormActivation inside such a block
        c = model.features[3].conv[1][0].weight.shape[0]
        torch.manual_seed(4)
        new = torchvision.ops.Conv2dNormActivation(c, c, 3, groups=c,
                                                   activation_layer=nn.Hardswish).double()
        model.features[3].conv[1] = randomise_bn(new)
    return model


SWAPS = ["sync_batchnorm", "timm_freeze", "timm_freeze_timm", "conv", "act", "timm_act",
         "insert", "insert_act", "copy_bn", "prune_bn", "param_bn", "timm_drop_path",
         "conv_geometry", "block_append", "res_flag", "block_bn",
         "block_container"]


@pytest.mark.parametrize("case", SWAPS)
def test_swapped_stand_ins_run_unfused(case):
    """A fused layer's stand-in swapped for another module after convert() (a BatchNorm
    by convert_sync_batchnorm or timm's freeze_batch_norm_2d, which find them by
    isinstance; a conv slot, an activation slot, a module inside a block whose add was
    fused or its drop path, by hand), a module inserted between stand-ins, a BatchNorm
    swapped for a copy of itself or pruned: that layer or block runs unfused, the new
    module in place, and trains as eager does with the same change; cost.profile
    counts each conv once; revert() then gives eager's modules."""
    torch.manual_seed(0)
    if case in ("timm_freeze_timm", "timm_act", "timm_drop_path"):
        eager = timm.create_model("mobilenetv2_050", num_classes=10, **NO_DROP)
        # the stand-ins a residual block's own children
        case = "timm_freeze" if case == "timm_freeze_timm" else case
    else:
        eager = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10, dropout=0.0)
    eager = randomise_bn(eager, bias_std=1.0).double()
    fused = _swap(convert(eager), case)
    eager = _swap(eager, case)
    if case in ("sync_batchnorm", "timm_freeze"):  # every BatchNorm, fused or not, swapped
        assert not any(isinstance(m, _FusedNorm) for m in fused.modules())
    # 2x2 pixels at the end (3x3 in timm's, its training gradients are noisier), so
    # that batch statistics of 8 or more values per channel keep roundoff from
    # growing past _same_steps' float64 tolerance
    size = 96 if isinstance(eager, timm.models.EfficientNet) else 64
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _same_steps(eager, fused, x)
    if not isinstance(eager, timm.models.EfficientNet) and "prune" not in case:
        with torch.no_grad():  # FX traces the unfused parts (prune: its hook is not run)
            torch.testing.assert_close(torch.fx.symbolic_trace(fused.eval())(x), fused(x))
    layers = lambda m: [(r.kind, r.params, r.macs) for r in cost.profile(m, (1, 3, 64, 64)).layers]
    assert sorted(layers(fused)) == sorted(layers(eager))  # each conv counted once
    if case in ("prune_bn", "param_bn"):  # what revert cannot carry over: removed first
        with pytest.raises(ValueError, match="revert: .* after convert"):
            revert(fused)
        for m in (eager, fused):
            _unswap(m, case)
        _same_steps(eager, fused, x)
    reverted = revert(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in eager.modules()]
    _same_steps(eager, reverted, x)


def test_hooks_on_modules_the_fused_op_skips():
    """Hooks on modules that a fused layer or block does not call itself (a timm
    BatchNormAct2d's act, a block's drop path in eval) run, as without convert()."""
    torch.manual_seed(0)
    eager = randomise_bn(timm.create_model("mobilenetv2_050", num_classes=10, **NO_DROP),
                         bias_std=1.0).double().eval()
    fused = convert(eager)
    seen = {}
    for model, tag in ((eager, "eager"), (fused, "fused")):
        for name in ("blocks.1.0.bn1.act", "blocks.2.1.drop_path"):
            def record(m, args, out, key=(tag, name)):
                seen[key] = out * 1
            model.get_submodule(name).register_forward_hook(record)
            # a hook that changes the output changes the model's
            model.get_submodule(name).register_forward_hook(lambda m, args, out: out * 0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), atol=1e-12, rtol=1e-10)
    for name in ("blocks.1.0.bn1.act", "blocks.2.1.drop_path"):
        torch.testing.assert_close(seen["fused", name], seen["eager", name], atol=1e-12,
                                   rtol=1e-10)


def test_data_parallel_replicas_run_unfused(monkeypatch):
    """nn.DataParallel's replicas (torch's own replicate(), its CUDA broadcast replaced
    by a differentiable copy so that it runs on the CPU): a converted model's and our
    fused modules' replicas compute the model's outputs from their own copies of the
    parameters (the model's are NaN meanwhile), and their gradients reach the model's
    parameters, as an unconverted model's replicas do."""
    replicate = sys.modules["torch.nn.parallel.replicate"]
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda ts, devs, detach=False:
                        [[t.detach().clone() if detach else t * 1 for t in ts] for _ in devs])
    monkeypatch.setattr(replicate, "_get_device_index", lambda d, optional=False: d)
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10,
                                                            dropout=0.0), bias_std=1.0).double()

    def ours(eager):
        m = models.mobilenet_v2(width_mult=0.35, num_classes=10, dropout=0.0).double()
        m.load_state_dict(eager.state_dict())
        return m

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for make in (convert, ours):
        for training in (False, True):
            eager = copy.deepcopy(original).train(training)
            model = make(eager).train(training)
            replica = replicate.replicate(model, [0, 1])[1]
            with torch.no_grad():  # on a GPU they would be on another device: never read
                for t in (*model.parameters(), *model.buffers()):
                    if t.is_floating_point():
                        t.fill_(float("nan"))
            ya, yb = eager(x), replica(x)
            torch.testing.assert_close(yb, ya, atol=1e-12, rtol=1e-10)
            eager.zero_grad()
            model.zero_grad()
            ya.square().mean().backward()
            yb.square().mean().backward()
            grads = dict(model.named_parameters())
            for n, p in eager.named_parameters():
                torch.testing.assert_close(grads[n].grad, p.grad, atol=1e-9, rtol=1e-7, msg=n)


def test_convert_pairs_only_adjacent_layers():
    """A module registered twice (one activation instance reused) must not make a conv
    and a BatchNorm that are not run back to back look adjacent; nor may a Sequential
    subclass with its own forward, a BatchNorm2d subclass with its own forward, or a
    depthwise conv of a dilation the op does not take, be fused. timm's
    SplitBatchNorm2d is such a subclass."""
    torch.manual_seed(0)
    act = nn.ReLU6()
    shared = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), act, nn.BatchNorm2d(8),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), act,
                           nn.BatchNorm2d(8))

    class SkipSequential(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) + self[0](x)

    class AffineBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2 + 1

    skip = SkipSequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
    sub_bn = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), AffineBN(8), nn.ReLU())
    dilated = nn.Sequential(nn.Conv2d(8, 8, 3, padding=12, dilation=12, groups=8, bias=False),
                            nn.BatchNorm2d(8))
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64)
    for model in (shared, skip, sub_bn, dilated):
        model = randomise_bn(model).double()
        fused, report = convert(model, return_report=True)
        assert not report.fused, str(report)
        _same_steps(model, fused, x)
    timm_split = timm.layers.convert_splitbn_model(
        nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)), 2)
    assert not convert(timm_split, return_report=True)[1].fused


def test_convert_leaves_batchnormact_with_hooked_activation():
    bn = timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU)
    calls = []
    bn.act.register_forward_hook(lambda *a: calls.append(1))
    model = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), bn).double()
    fused, report = convert(model, return_report=True)
    assert not report.fused and "activation has hooks" in str(report)
    _same_steps(model, fused, torch.randn(2, 8, 5, 5, dtype=torch.float64))
    assert len(calls) == 4


def test_converted_model_loads_checkpoint_without_batch_count():
    """A checkpoint from before BatchNorm's num_batches_tracked (or a plain dict without
    those keys) loads into a converted model as into eager BatchNorm."""
    model = randomise_bn(torchvision.models.mobilenet_v2(num_classes=10))
    fused = convert(model)
    old = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    for m in (model, fused):
        m.load_state_dict(old)  # a plain dict: no version metadata
    sa, sb = model.state_dict(), fused.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_parametrized_after_convert():
    """A parametrization registered on a fused layer's conv slot after convert(): the
    fused op reads the parametrized weight."""

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                       nn.BatchNorm2d(8), nn.ReLU6())).double()
    fused = convert(model)
    for m in (model, fused):
        torch.nn.utils.parametrize.register_parametrization(m[0], "weight", Double())
    _same_steps(model, fused, torch.randn(2, 8, 9, 9, dtype=torch.float64))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """checkpoint_sequential over a converted model's features: outputs, gradients and
    running statistics as eager's (which update their buffers again when a segment is
    recomputed, up to the last tensor the backward needs)."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.35)).double().train()
    fused = convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ys = []
    for m in (model, fused):
        y = torch.utils.checkpoint.checkpoint_sequential(m.features, 3, x.requires_grad_(),
                                                         use_reentrant=reentrant)
        y.square().mean().backward()
        ys.append(y.detach())
    torch.testing.assert_close(ys[1], ys[0], atol=1e-10, rtol=1e-9)
    for (n, pa), pb in zip(model.named_parameters(), fused.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-9, rtol=1e-7,
                                       msg=lambda m, n=n: f"{n}: {m}")
    sa, sb = model.state_dict(), fused.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-10, rtol=1e-9,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("frozen", [False, True])
def test_forward_mode_ad(frozen):
    """jvp (torch.func and torch.autograd.forward_ad) through fused layers: the tangent
    eager gives, also when no parameter requires a gradient (the tangent used to be
    dropped)."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))).double().eval()
    fused = convert(model)
    for m in (model, fused):
        m.requires_grad_(not frozen)
    x, t = torch.randn(2, 8, 7, 7, dtype=torch.float64), torch.randn(2, 8, 7, 7,
                                                                     dtype=torch.float64)
    want = torch.func.jvp(model, (x,), (t,))
    got = torch.func.jvp(fused, (x,), (t,))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, want[1], atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ cost

def test_cost_formulas():
    std = cost.standard_conv(3, 32, 64, 112)
    dw, pw = cost.depthwise_conv(3, 32, 112), cost.pointwise_conv(32, 64, 112)
    assert std == cost.Cost(3 * 3 * 32 * 64, 3 * 3 * 32 * 64 * 112 * 112)
    assert dw.macs == 3 * 3 * 32 * 112 * 112 and pw.macs == 32 * 64 * 112 * 112
    assert (dw.macs + pw.macs) / std.macs == pytest.approx(cost.separable_ratio(3, 64))
    assert cost.separable_ratio(3, 64) == pytest.approx(1 / 64 + 1 / 9)
    half = cost.pointwise_conv(32, 64, 112, alpha=0.5, rho=0.5)
    assert half.macs == 16 * 32 * 56 * 56 and half.params == 16 * 32


@pytest.mark.parametrize("build,params,macs", [
    # the papers' numbers (conv and linear layers, 224x224): MobileNetV1 1.0 4.2M / 569M,
    # MobileNetV2 1.0 3.4M / 300M (counting gives 3.47M parameters: the paper truncates)
    (models.mobilenet_v1, 4.2e6, 569e6),
    (models.mobilenet_v2, 3.4e6, 300e6),
    (torchvision.models.mobilenet_v2, 3.4e6, 300e6),
])
def test_profile_reproduces_papers(build, params, macs):
    p = cost.profile(build())
    assert round(p.macs / 1e6) in (round(macs / 1e6), round(macs / 1e6) + 1)
    assert int(p.params / 1e5) / 10 == params / 1e6 or round(p.params / 1e5) / 10 == params / 1e6
    assert {r.kind for r in p.layers} >= {"standard", "depthwise", "pointwise", "linear"}
    assert "total" in str(p)


def test_profile_counts_fused_and_plain_alike():
    tv = torchvision.models.mobilenet_v2()
    a, b = cost.profile(tv), cost.profile(convert(tv))
    assert (a.params, a.macs, len(a.layers)) == (b.params, b.macs, len(b.layers))


@pytest.mark.parametrize("script,args", [
    ("train_converted.py", ["--steps", "2", "--batch", "4", "--size", "32"]),
    ("train_converted.py", ["--steps", "2", "--batch", "4", "--size", "32", "--amp"]),
    ("convert_mobilenet_v2.py", ["--batch", "1", "--size", "32", "--iters", "1"]),
])
def test_examples_run(script, args):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(root, "python", script), *args,
                          "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout or "converted" in out.stdout
