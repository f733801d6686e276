"""The Triton kernels behind the public ops (under TRITON_INTERPRET=1 on CPU in CI)."""
import os
import subprocess
import sys

import pytest
import torch

import mobilenet_ext
from mobilenet_ext import reference
from conftest import HAS_CUDA, as64, check_close, pick_act, poison_allocator
from test_dw_conv import make_inputs as dw_inputs
from test_pw_conv import make_inputs as pw_inputs

pytestmark = pytest.mark.skipif(not mobilenet_ext.backends()["triton"].available,
                                reason=mobilenet_ext.backends()["triton"].detail)
op = torch.ops.mobilenet_ext
# small odd shapes: the interpreter runs every program instance in Python
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DW_CASES = [(3, 3, 7, 7, 3, 1, 1), (1, 17, 9, 7, 5, 2, 2)]
PW_CASES = [(3, 3, 17, 5, 7), (1, 40, 24, 3, 5)]


def _dw(case, dtype, device, layout, training):
    x, w, g, b, rm, rv, cfg = dw_inputs(case, dtype, device, layout)
    act = pick_act(case, layout, training)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], training, 1e-5, act)
    bwd_cfg = (cfg["stride"], cfg["padding"], cfg["dilation"], training, act)
    return (x, w, g, b), (rm, rv), args, bwd_cfg, reference.dw_fwd


def _pw(case, dtype, device, layout, training):
    x, w, g, b, rm, rv, r = pw_inputs(case, dtype, device, layout, residual=True)
    act = pick_act(case, layout, training)
    return ((x, w, g, b), (rm, rv, r), (training, 1e-5, act, False), (None, training, act),
            reference.pw_fwd)


FAMILIES = {"dw": (_dw, DW_CASES), "pw": (_pw, PW_CASES)}


def _cases():
    for fam, (_, cases) in FAMILIES.items():
        for case in cases:
            yield pytest.param(fam, case, id=f"{fam}-{'x'.join(map(str, case))}")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fam,case", list(_cases()))
def test_forward_and_backward(device, fam, case, dtype, layout, training):
    """Every Triton kernel (forward, statistics, backward) against reference.py, with
    the same tolerance rule as the compiled kernels."""
    make, _ = FAMILIES[fam]
    (x, w, g, b), extra, args, bwd_cfg, ref = make(case, dtype, device, layout, training)
    fwd, bwd = getattr(op, f"{fam}_fwd_triton"), getattr(op, f"{fam}_bwd_triton")
    poison_allocator(device)
    y, mean, invstd = fwd(x, w, g, b, *extra, *args)[:3]
    y64, mean64, invstd64 = ref(*as64(x, w, g, b, *extra), *args)[:3]
    check_close(y, ref(x, w, g, b, *extra, *args)[0], y64, factor=2)
    tol = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(mean.double(), mean64, atol=tol, rtol=tol)
    torch.testing.assert_close(invstd.double(), invstd64, atol=tol, rtol=tol)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")

    dy = torch.randn_like(y)
    got = bwd(dy, x, w, g, b, mean, invstd, *bwd_cfg)

    def ref_grads(*ts):
        leaves = [t.detach().requires_grad_() for t in ts]
        stats = [t.to(leaves[2].dtype) if t is not None and t.dim() == 1 else t for t in extra]
        ref(*leaves, *stats, *args)[0].backward(dy.to(leaves[0].dtype))
        return [t.grad for t in leaves]

    want, eager = ref_grads(*as64(x, w, g, b)), ref_grads(x, w, g, b)
    for name, a, e, r in zip(("dx", "dweight", "dgamma", "dbeta"), got, eager, want):
        assert a.shape == r.shape and a.dtype == e.dtype, name
        check_close(a, e, r, factor=3, dtype=x.dtype)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fam", ["dw", "pw"])
def test_gradients_float64(device, fam, training, channels_last):
    """Gradcheck-style: every gradient, through the public autograd path, against the
    reference's autograd in float64 (numerical gradcheck would run the interpreter
    hundreds of times)."""
    make, cases = FAMILIES[fam]
    layout = "channels_last" if channels_last else "nchw"
    (x, w, g, b), extra, args, _, ref = make(cases[0], torch.float64, device, layout, training)
    fwd = getattr(op, f"{fam}_fwd_triton")
    leaves = [t.detach().requires_grad_() for t in (x, w, g, b) + tuple(
        t for t in extra if t is not None and t.dim() == 4)]
    res = leaves[4:]

    def run(f):
        for t in leaves:
            t.grad = None
        e = list(extra[:2]) + res
        y = f(*leaves[:4], *e, *args)[0]
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        return [t.grad.clone() for t in leaves]

    for got, want in zip(run(fwd), run(ref)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_pw_does_not_save_conv(device):
    """The Triton kernels do not keep the conv output: the Triton ops say so when asked."""
    (x, w, g, b), extra, args, bwd_cfg, _ = _pw(PW_CASES[0], torch.float32, device,
                                                "channels_last", True)
    with pytest.raises(ValueError, match="save_conv: the Triton kernels do not keep"):
        op.pw_fwd_triton(x, w, g, b, *extra, *args[:-1], True)
    y, mean, invstd, conv = op.pw_fwd_triton(x, w, g, b, *extra, *args)
    assert conv.numel() == 0
    with pytest.raises(ValueError, match="conv: the Triton backward recomputes"):
        op.pw_bwd_triton(torch.randn_like(y), x, w, g, b, mean, invstd, y, *bwd_cfg[1:])


@pytest.mark.parametrize("fam", ["dw", "pw"])
def test_opcheck(device, fam):
    make, cases = FAMILIES[fam]
    (x, w, g, b), extra, args, bwd_cfg, _ = make(cases[0], torch.float32, device,
                                                 "channels_last", True)
    fwd = getattr(op, f"{fam}_fwd_triton")
    torch.library.opcheck(fwd.default, (x, w.requires_grad_(), g, b, *extra, *args),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_public_ops_and_compile_with_triton_backend():
    mobilenet_ext.set_backend("triton")
    m = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False),
                            torch.nn.BatchNorm2d(6), torch.nn.ReLU6(),
                            torch.nn.Conv2d(6, 8, 1, bias=False), torch.nn.BatchNorm2d(8))
    fused = mobilenet_ext.convert(m).eval()
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m.eval()(x), atol=1e-5, rtol=1e-5)


def test_works_without_compiled_extension():
    """A pure-Python install (no _C): the package imports, falls back to the reference
    on CPU with a warning, and runs the Triton kernels when asked."""
    code = """
import warnings, torch, mobilenet_ext as m
assert not m.backends()["cpu"].available and not m.backends()["cuda"].available
x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
g, b, rm, rv = torch.rand(4) + .5, torch.randn(4), torch.zeros(4), torch.ones(4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ref = m.dw_conv_bn_act(x, w, g, b, rm, rv)
assert any("falling back to 'reference'" in str(c.message) for c in caught)
m.set_backend("triton")
torch.testing.assert_close(m.dw_conv_bn_act(x, w, g, b, rm, rv), ref, atol=1e-5, rtol=1e-5)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOBILENET_EXT_NO_EXTENSION="1", TRITON_INTERPRET="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("fam,case", list(_cases()))
def test_triton_agrees_with_cuda(fam, case):
    make, _ = FAMILIES[fam]
    (x, w, g, b), extra, args, _, _ = make(case, torch.float16, "cuda", "channels_last", True)
    yt = getattr(op, f"{fam}_fwd_triton")(x, w, g, b, *extra, *args)[0]
    yc = getattr(op, f"{fam}_fwd")(x, w, g, b, *extra, *args)[0]
    torch.testing.assert_close(yt, yc, atol=1e-2, rtol=1e-2)


def test_gemm_autotuned_only_on_a_gpu():
    """One config under the interpreter; on a GPU an autotuner over warps and stages keyed on
    the problem (tile sizes stay derived from it)."""
    code = ("import mobilenet_ext.triton.pw as pw, triton; k = pw.gemm_kernel_tuned; "
            "print(type(k).__name__, len(getattr(k, 'configs', [])), getattr(k, 'keys', None))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["Autotuner", "6"], out.stdout
    assert "'Cin'" in out.stdout and "'MODE'" in out.stdout
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[1] == "0", out.stdout  # no autotuner
