"""The fused pointwise (1x1) conv + BN + activation (+ residual) against reference.py."""
import pytest
import torch
import torch.nn as nn

import mobilenet_ext
from mobilenet_ext import reference
from conftest import (AUTOCAST_DTYPE, HAS_CUDA, as64, call_with, check_autocast, check_close, pick_act,
                      poison_allocator, randomise_stats)

op = torch.ops.mobilenet_ext
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
# (N, Cin, Cout, H, W): odd channel counts, MobileNetV2's 96 -> 24 projection, 1x1 images
CASES = [
    (3, 3, 17, 7, 7),
    (1, 17, 40, 15, 15),
    (3, 96, 24, 1, 1),
    (1, 40, 17, 33, 15),
    (2, 24, 96, 7, 9),
]
ACTS = list(reference.ACTIVATIONS)


def make_inputs(case, dtype, device, layout, residual, bn_dtype=None):
    n, cin, cout, h, w = case
    bn_dtype = bn_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "strided":  # a non-contiguous view: every other channel of a wider tensor
        x = torch.randn(n, 2 * cin, h, w, device=device, dtype=dtype)[:, ::2]
    else:
        x = torch.randn(n, cin, h, w, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 1, 1, device=device, dtype=dtype) / cin ** 0.5
    gamma = torch.rand(cout, device=device, dtype=bn_dtype) + 0.5
    beta = torch.randn(cout, device=device, dtype=bn_dtype)
    rmean = torch.randn(cout, device=device, dtype=bn_dtype) * 0.1
    rvar = torch.rand(cout, device=device, dtype=bn_dtype) + 0.5
    res = None
    if residual:
        res = torch.randn(n, cout, h, w, device=device, dtype=dtype)
        if layout == "channels_last":
            res = res.contiguous(memory_format=torch.channels_last)
    return x, weight, gamma, beta, rmean, rvar, res


def act_for(case, layout, dtype):
    return "relu6" if dtype == torch.float32 else pick_act(case, layout)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward(device, case, dtype, layout, training, residual):
    x, w, g, b, rm, rv, r = make_inputs(case, dtype, device, layout, residual)
    act = act_for(case, layout, dtype)
    # the CPU kernels keep the conv output whenever asked; on CUDA ask in training only,
    # so that eval keeps the fused kernel (it has nothing to keep)
    save = device == "cpu" or training
    poison_allocator(device)
    y, mean, invstd, conv = op.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, save)
    y64, mean64, invstd64, conv64 = reference.pw_fwd(*as64(x, w, g, b, rm, rv, r), training,
                                                     1e-5, act, save)
    eager, _, _, conv_eager = reference.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, save)
    expect_cl = layout == "channels_last" and not x.is_contiguous()
    assert y.shape == y64.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else
                           torch.contiguous_format)
    check_close(y, eager, y64, factor=2)
    stat_tol = 1e-9 if dtype == torch.float64 else 1e-4
    # low-precision GEMM outputs are rounded to the dtype before the statistics (as eager)
    if dtype in (torch.float16, torch.bfloat16) and device == "cuda":
        stat_tol = 2e-2
    torch.testing.assert_close(mean.double(), mean64, atol=stat_tol, rtol=stat_tol)
    torch.testing.assert_close(invstd.double(), invstd64, atol=stat_tol, rtol=stat_tol)
    if save:  # the conv output for the backward, laid out like y, in the accumulation
        # dtype on CPU, in x's on CUDA (the GEMM's output, as eager keeps it)
        assert conv.dtype == (mean.dtype if device == "cpu" else dtype)
        assert conv.shape == y.shape and conv.stride() == y.stride()
        check_close(conv.to(conv_eager.dtype), conv_eager, conv64, factor=2, dtype=dtype)
    else:
        assert conv.numel() == 0 and conv.dtype == mean.dtype


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[:2] + CASES[4:])
def test_backward(device, case, dtype, layout, training, residual):
    x, w, g, b, rm, rv, r = make_inputs(case, dtype, device, layout, residual)
    act = act_for(case, layout, dtype)
    dy = None

    def grads(run, *ts):
        nonlocal dy
        leaves = [t.detach().requires_grad_() if t is not None else None for t in ts]
        y = run(*leaves)
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy.to(y.dtype))
        return [t.grad if t is not None else None for t in leaves]

    def ours(x, w, g, b, r):  # on CPU the backward reads the saved conv output
        return op.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, device == "cpu")[0]

    def ref(x, w, g, b, r):
        stat = (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t)
        return reference.pw_fwd(x, w, g, b, stat(rm), stat(rv), r, training, 1e-5, act)[0]

    poison_allocator(device)
    got = grads(ours, x, w, g, b, r)
    want = grads(ref, *as64(x, w, g, b, r))
    eager = grads(ref, x, w, g, b, r)
    for name, a, e, ref64 in zip(("dx", "dweight", "dgamma", "dbeta", "dresidual"),
                                 got, eager, want):
        if name == "dresidual" and not residual:
            assert a is None
            continue
        assert a.shape == ref64.shape and a.dtype == e.dtype, name
        check_close(a, e, ref64, factor=3, dtype=x.dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_params_in_x_dtype(device, dtype, layout, training):
    """BN parameters and running statistics in x's dtype, as after model.half() (on
    CUDA, eval channels_last with Cout >= Cin takes the one-kernel GEMM path): the
    statistics come back in fp32, the BN parameters' gradients in their dtype, and y
    and every gradient are as close to float64 as eager PyTorch's at that dtype."""
    x, w, g, b, rm, rv, r = make_inputs(CASES[1], dtype, device, layout, True, bn_dtype=dtype)
    dy = None

    def run(fwd, x, w, g, b, r, rm, rv, *save):
        nonlocal dy
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b, r)]
        y, mean, invstd = fwd(*leaves[:4], rm, rv, leaves[4], training, 1e-5, "silu", *save)[:3]
        if dy is None:
            dy = torch.randn_like(y)
        y.backward(dy.to(y.dtype))
        return [y, mean, invstd] + [t.grad for t in leaves]

    poison_allocator(device)
    got = run(op.pw_fwd, x, w, g, b, r, rm, rv, device == "cpu")
    want = run(reference.pw_fwd, *as64(x, w, g, b, r, rm, rv))
    eager = run(reference.pw_fwd, x, w, g, b, r, rm, rv)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert got[5].dtype == got[6].dtype == dtype
    for i in (1, 2):
        torch.testing.assert_close(got[i].double(), want[i], atol=1e-3, rtol=1e-3)
    for i in (0, 3, 4, 5, 6, 7):
        check_close(got[i], eager[i], want[i], factor=3, dtype=dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(device, act, channels_last, training):
    x, w, g, b, rm, rv, r = make_inputs((2, 5, 7, 4, 3), torch.float64, device,
                                        "channels_last" if channels_last else "nchw", True)
    b = b + 0.37  # keep the pre-activations off the kinks
    save = device == "cpu" and act != "silu"  # on CPU: the saved and the recomputed conv

    def f(x, w, g, b, r):
        return op.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, save)[0]

    inputs = [t.detach().requires_grad_() for t in (x, w, g, b, r)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_stats_match_batchnorm(device, momentum, channels_last):
    cin, cout = 24, 17
    conv = nn.Conv2d(cin, cout, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(cout, momentum=momentum).to(device)
    randomise_stats(bn)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(3, cin, 9, 9, device=device)
        res = torch.randn(3, cout, 9, 9, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 conv
            want = bn(conv(x)) + res
        m = 1.0 / step if momentum is None else momentum  # as nn.BatchNorm2d does
        got = mobilenet_ext.pw_conv_bn_act(x, conv.weight, bn.weight, bn.bias, rm, rv,
                                           residual=res, training=True, momentum=m,
                                           act="identity")
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(rm, bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rv, bn.running_var, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("buffers", ["float32", "float64", "float64 stats", "strided",
                                     "mean only", "var only"])
def test_update_running_op(device, buffers):
    """The compiled running-buffer update (a loop on CPU for contiguous buffers in the
    statistics' dtype, ATen ops otherwise) against nn.BatchNorm2d's formula; it bumps
    the buffers' version counters as an in-place ATen op does."""
    if not hasattr(op, "_update_running"):
        pytest.skip("the compiled extension is not built")
    c, eps, count, m = 37, 1e-3, 50, 0.3
    stat_dtype = torch.float64 if buffers == "float64 stats" else torch.float32
    mean = torch.randn(c, device=device, dtype=stat_dtype)
    invstd = torch.rand(c, device=device, dtype=stat_dtype) + 0.5
    dtype = torch.float64 if buffers.startswith("float64") else torch.float32
    rm = torch.randn(2 * c, device=device, dtype=dtype)
    rv = torch.rand(2 * c, device=device, dtype=dtype) + 0.5
    rm, rv = (rm[::2], rv[::2]) if buffers == "strided" else (rm[:c], rv[:c])
    var = (invstd.double() ** -2 - eps) * count / (count - 1)
    want_m = (1 - m) * rm.double() + m * mean.double()
    want_v = (1 - m) * rv.double() + m * var
    keep_m, keep_v = rm.clone(), rv.clone()
    rm_arg = None if buffers == "var only" else rm
    rv_arg = None if buffers == "mean only" else rv
    versions = rm._version, rv._version
    op._update_running(rm_arg, rv_arg, mean, invstd, eps, count / (count - 1), m)
    assert (rm._version > versions[0]) == (rm_arg is not None)
    assert (rv._version > versions[1]) == (rv_arg is not None)
    torch.testing.assert_close(rm.double(), keep_m.double() if rm_arg is None else want_m,
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv.double(), keep_v.double() if rv_arg is None else want_v,
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="running buffers: expected shape"):
        op._update_running(rm[:3], None, mean, invstd, eps, 1.0, m)
    with pytest.raises(ValueError, match="mean/invstd: expected two 1-D tensors"):
        op._update_running(rm, None, mean, invstd[:3], eps, 1.0, m)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n,cout,training", [(0, 16, False), (0, 16, True), (2, 0, False),
                                              (2, 0, True)])
def test_empty_batch_or_channels(device, n, cout, training, channels_last):
    """An empty batch or no output channels: empty outputs of the right shape and
    layout, forward and backward, as eager's conv + BN give (an empty training batch
    leaves the running buffers as they are)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, 8, 5, 5, device=device).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(cout, 8, 1, 1, device=device, requires_grad=True)
    g = torch.ones(cout, device=device, requires_grad=True)
    b = torch.zeros(cout, device=device, requires_grad=True)
    rm, rv = torch.zeros(cout, device=device), torch.ones(cout, device=device)
    y = mobilenet_ext.pw_conv_bn_act(x, w, g, b, rm, rv, training=training)
    # layout rule of the ops: channels_last only where x is not also contiguous
    expect = torch.channels_last if channels_last and not x.is_contiguous() else \
        torch.contiguous_format
    assert y.shape == (n, cout, 5, 5) and y.is_contiguous(memory_format=expect)
    y.sum().backward()
    for name, t in (("x", x), ("weight", w), ("bn_weight", g), ("bn_bias", b)):
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert (t.grad == 0).all(), name
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("act", ["relu6", "relu", "hardswish"])
def test_gradients_at_the_kinks(device, act):
    """Pre-activations exactly at relu/relu6/hardswish's kinks (an identity 1x1 conv, BN
    scale 1, shift 0): the gradients eager's activations give there (hardswish: 0 at -3,
    1 at 3; relu6: 0 at 0 and 6)."""
    c = 8
    x = torch.tensor([-6.0, -3.0, -1.5, 0.0, 1.5, 3.0, 6.0, 7.0], device=device)
    x = x.repeat(c).reshape(1, c, 8, 1).requires_grad_()
    w = torch.eye(c, device=device).reshape(c, c, 1, 1)
    ones, zeros = torch.ones(c, device=device), torch.zeros(c, device=device)
    y = mobilenet_ext.pw_conv_bn_act(x, w, ones, zeros, zeros, ones, eps=0.0, act=act)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    want = {"relu6": torch.nn.functional.relu6, "relu": torch.relu,
            "hardswish": torch.nn.functional.hardswish}[act](x2)
    (gw,) = torch.autograd.grad(want.sum(), x2)
    assert torch.equal(y, want.detach())
    assert torch.equal(gx, gw), (gx[0, 0, :, 0], gw[0, 0, :, 0])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_zero_spatial_size_raises(device, training, channels_last):
    """H or W == 0 has no 1x1 conv in eager either (conv2d raises): a ValueError that
    names x, from every backend."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    w = torch.randn(4, 8, 1, 1, device=device)
    g, b = torch.ones(4, device=device), torch.zeros(4, device=device)
    for shape in ((2, 8, 0, 5), (2, 8, 5, 0)):
        x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
        with pytest.raises(ValueError, match="x: spatial size must be non-zero"):
            mobilenet_ext.pw_conv_bn_act(x, w, g, b, torch.zeros(4, device=device),
                                         torch.ones(4, device=device), training=training)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_can_be_modified_in_place(device, channels_last, training):
    """The output is a fresh tensor, not a view of a GEMM temporary: an in-place op after
    it (mobilenet_v3's Hardswish(inplace=True)) works and its gradient flows."""
    x = torch.randn(2, 8, 5, 5, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(12, 8, 1, 1, device=device, requires_grad=True)
    g, b = torch.ones(12, device=device), torch.zeros(12, device=device)
    rm, rv = torch.zeros(12, device=device), torch.ones(12, device=device)
    y = mobilenet_ext.pw_conv_bn_act(x, w, g, b, rm, rv, training=training, act="identity")
    assert y._base is None
    torch.nn.functional.hardswish(y, inplace=True).sum().backward()
    want = torch.nn.functional.hardswish(
        reference.pw_fwd(x.detach(), w.detach(), g, b, rm, rv, None, training, 1e-5,
                         "identity")[0])
    torch.testing.assert_close(y.detach(), want, atol=1e-4, rtol=1e-4)
    assert x.grad is not None and x.grad.isfinite().all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_autocast(device, layout, training, residual):
    """Under torch.autocast, fp32 x, weight and residual run in the autocast dtype (as
    eager conv2d does, and the add after it) with the fp32 BN parameters; their
    gradients come back fp32."""
    x, w, g, b, rm, rv, r = make_inputs((2, 17, 40, 5, 7), torch.float32, device, layout,
                                        residual)

    def fn(rm, rv, x, weight, g, b, residual=None):
        return mobilenet_ext.pw_conv_bn_act(x, weight, g, b, rm, rv, residual=residual,
                                            training=training, act="identity")
    cast = dict(x=x, weight=w, **(dict(residual=r) if residual else {}))
    check_autocast(device, fn, cast, dict(g=g, b=b), (rm, rv))


@pytest.mark.parametrize("training", [False, True])
def test_autocast_inner_aten_calls(device, training):
    """channels_last fp32 with 16384 pixels: the CPU op computes the 1x1 conv with
    oneDNN's conv2d (pw_conv.cpp), an ATen call that torch.autocast would recast to
    bf16 under the op (a bf16 conv output the fp32 epilogue rejected: RuntimeError). It
    must run as written, as must the backward's GEMMs when backward() is called inside
    autocast: the same output and gradients as the op on inputs cast by hand."""
    x, w, g, b, rm, rv, _ = make_inputs((16, 8, 24, 32, 32), torch.float32, device,
                                        "channels_last", False)
    low = AUTOCAST_DTYPE[device]

    def fn(rm, rv, x, weight, g, b):
        return mobilenet_ext.pw_conv_bn_act(x, weight, g, b, rm, rv, training=training,
                                            act="relu6")
    check_autocast(device, fn, dict(x=x, weight=w), dict(g=g, b=b), (rm, rv))
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, g, b)]
    with torch.autocast(device, dtype=low):
        y = fn(rm.clone(), rv.clone(), *leaves)
        got = torch.autograd.grad(y.float().square().sum(), leaves)
    cast = [leaves[0].to(low), leaves[1].to(low), *leaves[2:]]
    want = torch.autograd.grad(fn(rm.clone(), rv.clone(), *cast).float().square().sum(), leaves)
    for name, a, e in zip(("x", "weight", "bn_weight", "bn_bias"), got, want):
        assert a.dtype == torch.float32 and torch.equal(a, e), name


def test_double_backward_raises():
    x, w, g, b, rm, rv, r = make_inputs((2, 3, 5, 4, 4), torch.float64, "cpu", "nchw", True)
    x.requires_grad_()
    y = mobilenet_ext.pw_conv_bn_act(x, w, g, b, rm, rv, residual=r, training=True, act="silu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_public_matches_reference_backend(device):
    x, w, g, b, rm, rv, r = make_inputs((2, 17, 40, 9, 9), torch.float32, device,
                                        "channels_last", True)
    rm2, rv2 = rm.clone(), rv.clone()
    got = mobilenet_ext.pw_conv_bn_act(x, w, g, b, rm, rv, residual=r, training=True,
                                       act="identity")
    mobilenet_ext.set_backend("reference")
    want = mobilenet_ext.pw_conv_bn_act(x, w, g, b, rm2, rv2, residual=r, training=True,
                                        act="identity")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(device, training, channels_last, residual):
    x, w, g, b, rm, rv, r = make_inputs((2, 5, 7, 4, 3), torch.float32, device,
                                        "channels_last" if channels_last else "nchw", residual)
    args = [t.requires_grad_() if t is not None else None for t in (x, w, g, b, r)]
    x, w, g, b, r = args
    save = True
    torch.library.opcheck(op.pw_fwd.default,
                          (x, w, g, b, rm, rv, r, training, 1e-5, "relu6", save))
    _, mean, invstd, conv = op.pw_fwd(x.detach(), w.detach(), g.detach(), b.detach(), rm, rv,
                                      None, training, 1e-5, "relu6", save)
    dy = torch.randn(2, 7, 4, 3, device=device)
    for saved in ((conv, None) if save else (None,)):
        torch.library.opcheck(op.pw_bwd.default, (dy, x.detach(), w.detach(), g.detach(),
                                                  b.detach(), mean, invstd, saved, training,
                                                  "relu6"))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_conv_backward_matches_recompute(device, dtype, layout, training):
    """The backward from the conv output pw_fwd saved gives the gradients of the one
    that recomputes it, and leaves the saved tensor as it was (a second backward,
    retain_graph, reads it again). Bit for bit where the saved conv has the recomputed
    one's precision (CPU: both in the accumulation dtype; CUDA fp32/fp64: the same
    GEMM); CUDA fp16/bf16 saves the GEMM's output rounded to x's dtype, as eager keeps
    it, and recomputes in fp32: close, with no activation (at relu6's kinks the two
    roundings may pick different sides: dz changes by dy there)."""
    x, w, g, b, rm, rv, r = make_inputs((2, 24, 40, 5, 7), dtype, device, layout, True)
    exact = device == "cpu" or dtype in (torch.float32, torch.float64)
    act = "relu6" if exact else "identity"
    _, mean, invstd, conv = op.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, True)
    kept = conv.clone()
    dy = torch.randn(2, 40, 5, 7, dtype=dtype, device=device).contiguous(
        memory_format=_format(x))
    poison_allocator(device)
    saved = op.pw_bwd(dy, x, w, g, b, mean, invstd, conv, training, act)
    recomputed = op.pw_bwd(dy, x, w, g, b, mean, invstd, None, training, act)
    for name, a, e in zip(("dx", "dweight", "dgamma", "dbeta"), saved, recomputed):
        assert not a.isnan().any(), name
        tol = 0 if exact else 1e-2
        torch.testing.assert_close(a, e, atol=tol * e.abs().max().item(), rtol=tol, msg=name)
    torch.testing.assert_close(conv, kept, atol=0, rtol=0)


def _format(t):
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def test_public_op_saves_conv_only_when_a_backward_follows(monkeypatch):
    """The public op on CPU asks the kernel for the conv output exactly when the
    backward op will run (a gradient of x, weight or the BN parameters), keeps that one
    tensor (the conv, not y) for it, and a second backward (retain_graph) reads it
    unchanged."""
    x, w, g, b, rm, rv, r = make_inputs((2, 8, 12, 5, 5), torch.float32, "cpu",
                                        "channels_last", True)
    flags, packed, bwd_calls = [], [], []
    call, call_bwd = mobilenet_ext.ops._call, mobilenet_ext.ops._call_bwd
    monkeypatch.setattr(mobilenet_ext.ops, "_call",
                        lambda name, *a: flags.append(a[-1]) or call(name, *a))
    monkeypatch.setattr(mobilenet_ext.ops, "_call_bwd",
                        lambda *a: bwd_calls.append(1) or call_bwd(*a))

    def run(*ts, res=None):
        flags.clear()
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                      lambda t: t):
            return mobilenet_ext.pw_conv_bn_act(*ts, rm, rv, residual=res, training=True)

    wg = w.clone().requires_grad_()
    y = run(x, wg, g, b)
    assert flags == [True]
    convs = [t for t in packed if t.shape == y.shape]
    assert len(convs) == 1 and convs[0].dtype == torch.float32
    assert convs[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(convs[0], torch.nn.functional.conv2d(x, w), atol=1e-5,
                               rtol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first, wg.grad = wg.grad.clone(), None
    y.backward(dy)
    torch.testing.assert_close(wg.grad, first, atol=0, rtol=0)
    for ts in ((x, w, g, b), (x, w.detach(), g, b)):
        with torch.no_grad():
            run(*ts)
        assert flags == [False]
        run(*ts)
        assert flags == [False]
    # only the residual needs a gradient: it is grad_y, and the backward op never runs
    bwd_calls.clear()
    rg = r.clone().requires_grad_()
    y = run(x, w, g, b, res=rg)
    assert flags == [False]
    y.backward(dy)
    assert bwd_calls == [] and torch.equal(rg.grad, dy)


@pytest.mark.parametrize("save", [False, True])
def test_only_y_is_differentiable(save):
    """The statistics and the saved conv output are not differentiable outputs of the
    registered op (their gradients would be dropped): autograd says so."""
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 6, 5, 5), torch.float32, "cpu", "nchw", False)
    out = op.pw_fwd(x.requires_grad_(), w, g, b, rm, rv, None, True, 1e-5, "relu6", save)
    assert [t.requires_grad for t in out] == [True, False, False, False]


def test_saved_conv_bad_input():
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 6, 5, 5), torch.float32, "cpu", "nchw", False)
    _, mean, invstd, conv = op.pw_fwd(x, w, g, b, rm, rv, None, True, 1e-5, "relu6", True)
    dy = torch.randn(2, 6, 5, 5)
    for bad in (conv[:1], conv.double(), conv.transpose(0, 1)):
        with pytest.raises(ValueError, match="conv: expected the conv output pw_fwd saved"):
            op.pw_bwd(dy, x, w, g, b, mean, invstd, bad, True, "relu6")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("knob", ["0", "1"])
def test_cuda_saves_conv_with_knob(monkeypatch, knob):
    """On CUDA the public op asks the kernel for the conv output only with
    MOBILENET_EXT_PW_SAVE=1 (and a backward to follow); it is then kept in x's dtype,
    laid out like y, and the gradients are those of the recomputing backward (equal
    without the knob; close with it: fp16 conv against the fp32 recompute, no
    activation, whose kinks the two roundings may straddle). pw_bwd rejects a saved conv
    of another dtype or shape."""
    monkeypatch.setenv("MOBILENET_EXT_PW_SAVE", knob)
    x, w, g, b, rm, rv, r = make_inputs((2, 16, 24, 5, 7), torch.float16, "cuda",
                                        "channels_last", True)
    flags, packed = [], []
    call = mobilenet_ext.ops._call
    monkeypatch.setattr(mobilenet_ext.ops, "_call",
                        lambda name, *a: flags.append(a[-1]) or call(name, *a))
    wg = w.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = mobilenet_ext.pw_conv_bn_act(x, wg, g, b, rm, rv, residual=r, training=True,
                                         act="identity")
    assert flags == [knob == "1"]
    convs = [t for t in packed if t.shape == y.shape]
    assert len(convs) == (knob == "1")
    if convs:
        assert convs[0].dtype == torch.float16
        assert convs[0].is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, mean, invstd, _ = op.pw_fwd(x, w, g, b, rm.clone(), rv.clone(), r, True, 1e-5,
                                   "identity", False)
    want = op.pw_bwd(dy, x, w, g, b, mean, invstd, None, True, "identity")[1]
    tol = 0 if knob == "0" else 1e-2
    torch.testing.assert_close(wg.grad, want, atol=tol * want.abs().max().item(), rtol=tol)
    conv = op.pw_fwd(x, w, g, b, rm, rv, None, True, 1e-5, "relu6", True)[3]
    for bad in (conv.float(), conv[:1]):
        with pytest.raises(ValueError, match="conv: expected the conv output pw_fwd saved"):
            op.pw_bwd(dy, x, w, g, b, mean, invstd, bad, True, "relu6")


class _Bottleneck(nn.Module):
    """MobileNetV2's linear bottleneck projection with its residual."""

    def __init__(self, c, hidden):
        super().__init__()
        self.conv = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, h, x):
        return mobilenet_ext.pw_conv_bn_act(h, self.conv.weight, self.bn.weight, self.bn.bias,
                                            self.bn.running_mean, self.bn.running_var,
                                            residual=x, training=self.training,
                                            act="identity")


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = _Bottleneck(6, 12)
    h = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    m.eval()
    torch.testing.assert_close(compiled(h, x), m(h, x))
    m.train()
    h.requires_grad_()
    x.requires_grad_()
    compiled(h, x).square().sum().backward()
    gh, gx = h.grad.clone(), x.grad.clone()
    h.grad = x.grad = None
    m(h, x).square().sum().backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)


def _bad(**change):
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 6, 5, 5), torch.float32, "cpu", "nchw", False)
    return call_with(mobilenet_ext.pw_conv_bn_act, dict(x=x, weight=w, bn_weight=g, bn_bias=b,
                     running_mean=rm, running_var=rv), change)


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.randn(6, 4, 3, 3)), "weight: expected shape"),
    (dict(weight=torch.randn(6, 5, 1, 1)), "weight: expected shape"),
    (dict(x=torch.randn(4, 5, 5)), "x: expected a 4-D"),
    (dict(bn_weight=torch.ones(4)), "bn_weight: expected shape"),
    (dict(residual=torch.randn(2, 4, 5, 5)), "residual: expected shape"),
    (dict(residual=torch.randn(2, 6, 5, 5, dtype=torch.float64)), "residual: expected dtype"),
    (dict(residual=torch.randn(2, 6, 5, 5, device="meta")), "residual: expected device"),
    (dict(x=torch.randn(1, 4, 1, 1), training=True), "more than 1 value per channel"),
    (dict(act="gelu"), "act: unknown activation"),
    (dict(weight=torch.randn(6, 4, 1, 1, dtype=torch.float16)), "weight: expected dtype"),
    (dict(training=True, eps=0.0), "eps: must be positive"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input(change, match, backend):
    """The Python checks (reference, triton, torch.compile's tracing) and, run eagerly
    on the compiled backend, the C++ checks, one message each."""
    mobilenet_ext.set_backend(backend)
    with pytest.raises(ValueError, match=match):
        _bad(**change)


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.randn(6, 4, 3, 3)), "weight: expected shape"),
    (dict(residual=torch.randn(2, 4, 5, 5)), "residual: expected shape"),
    (dict(act="gelu"), "act: unknown activation"),
])
def test_bad_input_registered_op(change, match):
    x, w, g, b, rm, rv, _ = make_inputs((2, 4, 6, 5, 5), torch.float32, "cpu", "nchw", False)
    a = dict(weight=w, residual=None, act="relu6")
    a.update(change)
    with pytest.raises(ValueError, match=match):
        op.pw_fwd(x, a["weight"], g, b, rm, rv, a["residual"], False, 1e-5, a["act"], False)


def test_pw_kernels_registered():
    for name in ("pw_fwd", "pw_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mobilenet_ext::{name}", "CPU")
        if mobilenet_ext.compiled_with_cuda():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mobilenet_ext::{name}",
                                                                  "CUDA")
