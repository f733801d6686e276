"""The fused depthwise conv + BN + activation against reference.py."""
import os

import pytest
import torch
import torch.nn as nn

import mobilenet_ext
from mobilenet_ext import reference
from conftest import (as64, call_with, check_autocast, check_close, pick_act, poison_allocator,
                      randomise_stats)

op = torch.ops.mobilenet_ext
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
# (N, C, H, W, k, stride, dilation): odd channels and spatial sizes, batch 1 and 3
CASES = [
    (3, 3, 7, 7, 3, 1, 1),
    (1, 17, 15, 15, 3, 2, 1),
    (3, 40, 33, 33, 3, 2, 1),
    (3, 17, 1, 1, 3, 1, 1),
    (1, 40, 15, 7, 5, 1, 1),
    (3, 3, 33, 15, 7, 2, 1),
    (1, 17, 15, 15, 3, 1, 2),
]
ACTS = list(reference.ACTIVATIONS)


def make_inputs(case, dtype, device, layout, bn_dtype=None):
    n, c, h, w, k, stride, dil = case
    bn_dtype = bn_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "strided":  # a non-contiguous view: every other channel of a wider tensor
        x = torch.randn(n, 2 * c, h, w, device=device, dtype=dtype)[:, ::2]
    else:
        x = torch.randn(n, c, h, w, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, device=device, dtype=dtype) / k
    if layout == "strided":  # a non-contiguous weight too: every other filter, transposed
        weight = (torch.randn(2 * c, 1, k, k, device=device, dtype=dtype) / k)[::2]
        weight = weight.transpose(2, 3)
    gamma = torch.rand(c, device=device, dtype=bn_dtype) + 0.5
    beta = torch.randn(c, device=device, dtype=bn_dtype)
    rmean = torch.randn(c, device=device, dtype=bn_dtype) * 0.1
    rvar = torch.rand(c, device=device, dtype=bn_dtype) + 0.5
    return x, weight, gamma, beta, rmean, rvar, dict(stride=stride, dilation=dil,
                                                     padding=(k - 1) // 2 * dil)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward(device, case, dtype, layout, training):
    if training and case[0] * case[2] * case[3] <= 1:
        pytest.skip("one value per channel: training is an error (tested below)")
    x, w, g, b, rm, rv, cfg = make_inputs(case, dtype, device, layout)
    act = pick_act(case, layout) if dtype != torch.float32 else "relu6"
    poison_allocator(device)
    y, mean, invstd = op.dw_fwd(x, w, g, b, rm, rv, cfg["stride"], cfg["padding"],
                                cfg["dilation"], training, 1e-5, act)
    y64, mean64, invstd64 = reference.dw_fwd(*as64(x, w, g, b, rm, rv), cfg["stride"],
                                             cfg["padding"], cfg["dilation"], training, 1e-5, act)
    eager, _, _ = reference.dw_fwd(x, w, g, b, rm, rv, cfg["stride"], cfg["padding"],
                                   cfg["dilation"], training, 1e-5, act)
    expect_cl = layout == "channels_last" and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else
                           torch.contiguous_format)
    assert y.dtype == dtype and mean.dtype == invstd.dtype == g.dtype
    check_close(y, eager, y64, factor=2)
    stat_tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mean.double(), mean64, atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(invstd.double(), invstd64, atol=stat_tol, rtol=stat_tol)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:])
def test_backward(device, case, dtype, layout, training):
    x, w, g, b, rm, rv, cfg = make_inputs(case, dtype, device, layout)
    act = "relu6" if dtype == torch.float32 else pick_act(case, layout)
    dy = None

    def grads(x, w, g, b, run):
        nonlocal dy
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
        y = run(*leaves)
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy.to(y.dtype))
        return [t.grad for t in leaves]

    def ours(x, w, g, b):
        return op.dw_fwd(x, w, g, b, rm, rv, cfg["stride"], cfg["padding"], cfg["dilation"],
                         training, 1e-5, act)[0]

    def ref(x, w, g, b):
        return reference.dw_fwd(x, w, g, b, rm.to(x.dtype if x.dtype == torch.float64 else rm.dtype),
                                rv.to(x.dtype if x.dtype == torch.float64 else rv.dtype),
                                cfg["stride"], cfg["padding"], cfg["dilation"], training, 1e-5,
                                act)[0]

    poison_allocator(device)
    got = grads(x, w, g, b, ours)
    want = grads(*as64(x, w, g, b), ref)
    eager = grads(x, w, g, b, ref)
    for name, a, e, r in zip(("dx", "dweight", "dgamma", "dbeta"), got, eager, want):
        assert a.shape == r.shape and a.dtype == e.dtype, name
        if name == "dx":
            assert a.is_contiguous(memory_format=torch.channels_last) == \
                (layout == "channels_last" and not x.is_contiguous())
        check_close(a, e, r, factor=3, dtype=x.dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_params_in_x_dtype(device, dtype, layout, training):
    """BN parameters and running statistics in x's dtype, as after model.half(): the
    statistics come back in fp32, the BN parameters' gradients in their dtype, and y and
    every gradient are as close to float64 as eager PyTorch's at that dtype."""
    x, w, g, b, rm, rv, cfg = make_inputs(CASES[1], dtype, device, layout, bn_dtype=dtype)
    cfg_args = (cfg["stride"], cfg["padding"], cfg["dilation"], training, 1e-5, "hardswish")
    dy = None

    def run(fwd, x, w, g, b, rm, rv):
        nonlocal dy
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
        y, mean, invstd = fwd(*leaves, rm, rv, *cfg_args)
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy.to(y.dtype))
        return [y, mean, invstd] + [t.grad for t in leaves]

    poison_allocator(device)
    got = run(op.dw_fwd, x, w, g, b, rm, rv)
    want = run(reference.dw_fwd, *as64(x, w, g, b, rm, rv))
    eager = run(reference.dw_fwd, x, w, g, b, rm, rv)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert got[5].dtype == got[6].dtype == dtype
    for i in (1, 2):
        torch.testing.assert_close(got[i].double(), want[i], atol=1e-3, rtol=1e-3)
    for i in (0, 3, 4, 5, 6):
        check_close(got[i], eager[i], want[i], factor=3, dtype=dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(device, act, channels_last, training):
    x, w, g, b, rm, rv, cfg = make_inputs((2, 3, 6, 5, 3, 2, 1), torch.float64, device,
                                          "channels_last" if channels_last else "nchw")
    # keep the pre-activations off the kinks of relu/relu6/hardswish
    b = b + 0.37

    def f(x, w, g, b):
        return op.dw_fwd(x, w, g, b, rm, rv, cfg["stride"], cfg["padding"], cfg["dilation"],
                         training, 1e-5, act)[0]

    inputs = [t.detach().requires_grad_() for t in (x, w, g, b)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_kernel5_dilated():
    x, w, g, b, rm, rv, cfg = make_inputs((2, 3, 9, 8, 5, 1, 2), torch.float64, "cpu", "nchw")
    f = lambda *t: op.dw_fwd(*t, rm, rv, 1, 4, 2, True, 1e-5, "silu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (x, w, g, b)])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_stats_match_batchnorm(device, momentum, channels_last):
    """Several training steps of the public op update the buffers as nn.BatchNorm2d."""
    c = 17
    conv = nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False).to(device)
    bn = nn.BatchNorm2d(c, momentum=momentum).to(device)
    randomise_stats(bn)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(3, c, 15, 15, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 conv
            want = nn.functional.relu6(bn(conv(x)))
        m = 1.0 / step if momentum is None else momentum  # as nn.BatchNorm2d does
        got = mobilenet_ext.dw_conv_bn_act(x, conv.weight, bn.weight, bn.bias, rm, rv,
                                           stride=2, training=True, momentum=m)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(rm, bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rv, bn.running_var, atol=1e-6, rtol=1e-5)
    bn.eval()
    x = torch.randn(2, c, 9, 9, device=device)
    torch.testing.assert_close(
        mobilenet_ext.dw_conv_bn_act(x, conv.weight, bn.weight, bn.bias, rm, rv, stride=2),
        nn.functional.relu6(bn(conv(x))), atol=2e-5, rtol=2e-5)


def test_affine_false_and_no_running_stats(device):
    x, w, _, _, _, _, _ = make_inputs((2, 5, 8, 8, 3, 1, 1), torch.float32, device, "nchw")
    got = mobilenet_ext.dw_conv_bn_act(x, w, None, None, None, None, training=True,
                                       act="identity")
    bn = nn.BatchNorm2d(5, affine=False, track_running_stats=False).to(device)
    want = bn(nn.functional.conv2d(x, w, padding=1, groups=5))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_public_matches_reference_backend(device):
    x, w, g, b, rm, rv, cfg = make_inputs((2, 17, 15, 15, 3, 2, 1), torch.float32, device,
                                          "channels_last")
    rm2, rv2 = rm.clone(), rv.clone()
    got = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm, rv, stride=2, training=True)
    mobilenet_ext.set_backend("reference")
    want = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm2, rv2, stride=2, training=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_autocast(device, layout, training):
    """Under torch.autocast, fp32 x and weight run in the autocast dtype (as eager conv2d
    does under autocast) with the fp32 BN parameters, and their gradients come back fp32."""
    x, w, g, b, rm, rv, cfg = make_inputs((2, 17, 9, 11, 3, 2, 1), torch.float32, device, layout)

    def fn(rm, rv, x, weight, g, b):
        return mobilenet_ext.dw_conv_bn_act(x, weight, g, b, rm, rv, stride=2,
                                            training=training, act="hardswish")
    check_autocast(device, fn, dict(x=x, weight=w), dict(g=g, b=b), (rm, rv))


def test_autocast_leaves_float64(device):
    x, w, g, b, rm, rv, cfg = make_inputs(CASES[1], torch.float64, device, "nchw")
    want = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm, rv, **cfg)
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        got = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm, rv, **cfg)
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_zero_batch(device, training, layout):
    """As eager: an empty output; gradients zero; in training the running buffers as
    they were (no values to update them with)."""
    x, w, g, b, rm, rv, _ = make_inputs((1, 4, 5, 5, 3, 1, 1), torch.float32, device, layout)
    rm0, rv0 = rm.clone(), rv.clone()
    x = x[:0].detach().requires_grad_()
    for t in (w, g, b):
        t.requires_grad_()
    y = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm, rv, training=training)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    for name, t in (("x", x), ("weight", w), ("bn_weight", g), ("bn_bias", b)):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all(), name
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_double_backward_raises():
    x, w, g, b, rm, rv, _ = make_inputs((2, 3, 6, 6, 3, 1, 1), torch.float64, "cpu", "nchw")
    x.requires_grad_()
    y = mobilenet_ext.dw_conv_bn_act(x, w, g, b, rm, rv, act="silu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ------------------------------------------------------------------ registration

@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, training, channels_last, requires_grad):
    x, w, g, b, rm, rv, _ = make_inputs((2, 5, 7, 6, 3, 2, 1), torch.float32, device,
                                        "channels_last" if channels_last else "nchw")
    args = [x, w, g, b]
    if requires_grad:
        args = [t.requires_grad_() for t in args]
    torch.library.opcheck(op.dw_fwd.default, (*args, rm, rv, 2, 1, 1, training, 1e-5, "relu6"))
    mean, invstd = op.dw_fwd(x.detach(), w.detach(), g.detach(), b.detach(), rm, rv, 2, 1, 1,
                             training, 1e-5, "relu6")[1:]
    dy = torch.randn(2, 5, 4, 3, device=device)
    torch.library.opcheck(op.dw_bwd.default, (dy, x.detach(), w.detach(), g.detach(),
                                              b.detach(), mean, invstd, 2, 1, 1, training,
                                              "relu6"))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = mobilenet_ext.dw_conv_bn_act(x, self.conv.weight, self.bn.weight, self.bn.bias,
                                         self.bn.running_mean, self.bn.running_var,
                                         training=self.training, momentum=0.1)
        return y * 2 + 1


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = _Block(6).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.eval()
    torch.testing.assert_close(compiled(x), m(x))
    m.train()
    x.requires_grad_()
    y = compiled(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    m(x).sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    m = _Block(4).eval()
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


# ------------------------------------------------------------------ bad input

def _bad(**change):
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 8, 8, 3, 1, 1), torch.float32, "cpu", "nchw")
    return call_with(mobilenet_ext.dw_conv_bn_act, dict(x=x, weight=w, bn_weight=g, bn_bias=b,
                     running_mean=rm, running_var=rv), change)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 8, 8)), "x: expected a 4-D"),
    (dict(weight=torch.randn(5, 1, 3, 3)), "weight: expected shape"),
    (dict(weight=torch.randn(4, 1, 4, 4)), "weight: kernel size must be 3, 5 or 7"),
    (dict(stride=3), "stride: must be 1 or 2"),
    (dict(x=torch.randint(0, 5, (2, 4, 8, 8))), "x: expected a floating dtype"),
    (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), "weight: expected dtype"),
    (dict(bn_weight=torch.ones(4, dtype=torch.float16)), "bn_weight: expected dtype"),
    (dict(bn_bias=torch.zeros(3)), "bn_bias: expected shape"),
    (dict(x=torch.randn(1, 4, 1, 1), training=True, padding=1), "more than 1 value per channel"),
    (dict(act="gelu"), "act: unknown activation"),
    (dict(running_mean=None), "running_mean/running_var: required"),
    (dict(padding=5), "padding: must be in"),
    (dict(training=True, momentum=None), "momentum"),
    (dict(dilation=2.5), "dilation: expected an int"),
    (dict(stride="1"), "stride: expected an int"),
    (dict(training=True, eps=0.0), "eps: must be positive"),
    (dict(training=True, eps=-1e-3), "eps: must be positive"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input(change, match, backend):
    """The Python checks (reference, triton, torch.compile's tracing) and, run eagerly
    on the compiled backend, the C++ checks, one message each."""
    mobilenet_ext.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        _bad(**change)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 8, 8)), "x: expected a 4-D"),
    (dict(weight=torch.randn(4, 1, 4, 4)), "weight: kernel size"),
    (dict(stride=3), "stride: must be 1 or 2"),
    (dict(act="gelu"), "act: unknown activation"),
    (dict(x=torch.randn(1, 4, 1, 1), training=True), "more than 1 value per channel"),
])
def test_bad_input_registered_op(change, match):
    """The registered op checks its arguments itself (it may be called directly)."""
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 8, 8, 3, 1, 1), torch.float32, "cpu", "nchw")
    a = dict(x=x, weight=w, stride=1, act="relu6", training=False)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        op.dw_fwd(a["x"], a["weight"], g, b, rm, rv, a["stride"], 1, 1, a["training"], 1e-5,
                  a["act"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.gpu
def test_bad_input_mixed_devices():
    with pytest.raises(ValueError, match="weight: expected device"):
        _bad(weight=torch.randn(4, 1, 3, 3, device="cuda"))


def test_bad_input_mixed_devices_meta():
    """x and weight on different devices (meta stands in for a GPU on CPU-only machines)."""
    with pytest.raises(ValueError, match="weight: expected device"):
        _bad(weight=torch.randn(4, 1, 3, 3, device="meta"))


# ------------------------------------------------------------------ build / backends

@pytest.mark.skipif(os.environ.get("MOBILENET_EXT_EXPECT_CUDA") != "1",
                    reason="set MOBILENET_EXT_EXPECT_CUDA=1 where the build must contain CUDA")
def test_extension_has_cuda_kernels():
    assert mobilenet_ext.compiled_with_cuda(), \
        "the extension was expected to contain CUDA kernels but was built CPU-only"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mobilenet_ext::dw_bwd", "CUDA")


def test_cpu_kernels_registered():
    for name in ("dw_fwd", "dw_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mobilenet_ext::{name}", "CPU")


def test_backends_report():
    info = mobilenet_ext.backends()
    assert set(info) == {"cuda", "triton", "cpu", "reference"}
    assert info["cpu"].available and info["reference"].available
    assert info["cuda"].available == HAS_CUDA_RUNTIME
    for v in info.values():
        assert v.detail


HAS_CUDA_RUNTIME = torch.cuda.is_available() and mobilenet_ext.compiled_with_cuda()


def test_set_backend_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        mobilenet_ext.set_backend("opencl")
    if not mobilenet_ext.backends()["triton"].available:
        with pytest.raises(RuntimeError, match="triton"):
            mobilenet_ext.set_backend("triton")
    mobilenet_ext.set_backend("cpu")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run tensors on device"):
            _bad(x=torch.randn(2, 4, 8, 8, device="cuda"))


def test_env_backend(monkeypatch):
    monkeypatch.setenv("MOBILENET_EXT_BACKEND", "reference")
    assert mobilenet_ext.get_backend() == "reference"
    monkeypatch.setenv("MOBILENET_EXT_BACKEND", "nope")
    with pytest.raises(ValueError, match="MOBILENET_EXT_BACKEND"):
        mobilenet_ext.get_backend()
