"""The CPU kernels are built twice (baseline ISA and AVX2+FMA, csrc/cpu/isa.h) and chosen
at run time; MOBILENET_EXT_CPU_ISA forces one. Every other CPU test runs the build this
CPU picks; here each build runs on its own against the float64 reference, in every
activation, both layouts, eval and training, forward and backward, on shapes whose
channel and column counts hit each vector block size (4 vectors, 1 vector, a tail)."""
import pytest
import torch

import mobilenet_ext  # noqa: F401  (loads the ops)
from mobilenet_ext import reference

op = torch.ops.mobilenet_ext
ACTS = list(reference.ACTIVATIONS)
ISAS = ["base", "avx2"]


def _has_avx2_build():
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MOBILENET_EXT_CPU_ISA", "avx2")
            x = torch.randn(1, 3, 4, 4)
            op.dw_fwd(x, torch.randn(3, 1, 3, 3), torch.ones(3), torch.zeros(3), torch.zeros(3),
                      torch.ones(3), 1, 1, 1, False, 1e-5, "relu6")
        return True
    except RuntimeError:
        return False


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if not hasattr(op, "dw_fwd"):
        pytest.skip("the compiled extension is not built")
    if request.param == "avx2" and not _has_avx2_build():
        pytest.skip("no AVX2 kernels here (not x86-64 with GCC, or the CPU lacks AVX2/FMA)")
    monkeypatch.setenv("MOBILENET_EXT_CPU_ISA", request.param)
    return request.param


def _grads(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _check(got, want, dtype):
    tol = 1e-9 if dtype == torch.float64 else 3e-4
    for a, r in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), r.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [(2, 5, 1, 1, 3, 1), (3, 17, 7, 7, 3, 2), (1, 9, 15, 15, 5, 1),
                                  (2, 11, 6, 33, 3, 2), (1, 6, 5, 70, 7, 1),
                                  (2, 300, 7, 7, 3, 1)])  # tiles: two blocks, 52-channel tail
@pytest.mark.parametrize("path", ["native", "channels_last", "tiles"])
def test_dw_nchw_paths(monkeypatch, path, case, dtype, training):
    """NCHW depthwise input runs on the NCHW kernels, through channels_last copies, or (eval
    forward) on channels_last tiles of channel planes (narrow rows; MOBILENET_EXT_CPU_NCHW
    forces one): each against the float64 reference, y and dx handed back NCHW-contiguous."""
    if not hasattr(op, "dw_fwd"):
        pytest.skip("the compiled extension is not built")
    monkeypatch.setenv("MOBILENET_EXT_CPU_NCHW", path)
    n, c, h, w, k, s = case
    torch.manual_seed(3)
    x = torch.randn(n, c, h, w, dtype=dtype)
    wt = torch.randn(c, 1, k, k, dtype=dtype) / k
    g, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype) * 0.1, torch.rand(c, dtype=dtype) + 0.5
    pad = (k - 1) // 2
    dy = torch.randn(n, c, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
    ours = _grads(lambda *a: op.dw_fwd(*a, rm, rv, s, pad, 1, training, 1e-5, "relu6")[0],
                  (x, wt, g, b), dy)
    ref = _grads(lambda *a: reference.dw_fwd(*a, rm.double(), rv.double(), s, pad, 1, training,
                                             1e-5, "relu6")[0],
                 [t.double() for t in (x, wt, g, b)], dy)
    _check(ours, ref, dtype)
    y, mean, invstd = op.dw_fwd(x, wt, g, b, rm, rv, s, pad, 1, training, 1e-5, "relu6")
    dx = op.dw_bwd(dy.to(dtype), x, wt, g, b, mean, invstd, s, pad, 1, training, "relu6")[0]
    assert y.is_contiguous() and dx.is_contiguous()


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)])
def test_dw_nchw_planes(isa, monkeypatch, k, s, training):
    """The NCHW plane kernels (a zero-padded copy of each plane, unrolled taps; dx the
    conv of dc, zero-upsampled at stride 2) at every padding the op allows at dilation 1,
    and the extremes at dilation 2, on odd planes whose rows end in a partial vector and, at stride 2, leave the last
    input row or column unread (dx zero there): every output and gradient against the
    float64 reference, in float64 and float16."""
    monkeypatch.setenv("MOBILENET_EXT_CPU_NCHW", "native")
    torch.manual_seed(k * 10 + s)
    span = k - 1
    for d, pad in [(1, p) for p in range(k)] + [(2, 0), (2, span), (2, 2 * span)]:
        for (n, c, h, w), dtype in [((2, 3, 9, 19), torch.float64), ((1, 2, 12, 10), torch.float64),
                                    ((1, 2, 15, 17), torch.float64), ((1, 2, 8, 37), torch.float16)]:
            ho, wo = (h + 2 * pad - d * span - 1) // s + 1, (w + 2 * pad - d * span - 1) // s + 1
            if ho < 1 or wo < 1:
                continue
            x = torch.randn(n, c, h, w, dtype=dtype)
            wt = torch.randn(c, 1, k, k, dtype=dtype) / k
            g, b = torch.rand(c) + 0.5, torch.randn(c)
            if dtype == torch.float64:
                g, b = g.double(), b.double()
            rm, rv = torch.randn(c, dtype=g.dtype) * 0.1, torch.rand(c, dtype=g.dtype) + 0.5
            dy = torch.randn(n, c, ho, wo)
            ours = _grads(lambda *a: op.dw_fwd(*a, rm, rv, s, pad, d, training, 1e-5,
                                               "hardswish")[0], (x, wt, g, b), dy)
            ref = _grads(lambda *a: reference.dw_fwd(*a, rm.double(), rv.double(), s, pad, d,
                                                     training, 1e-5, "hardswish")[0],
                         [t.double() for t in (x, wt, g, b)], dy)
            if dtype == torch.float64:
                _check(ours, ref, dtype)
            else:  # float16 x and y: compare at float16's resolution
                for a, r in zip(ours, ref):
                    torch.testing.assert_close(a.double(), r, atol=2e-2, rtol=2e-2)


def test_dw_nchw_planes_inf_past_the_row(isa, monkeypatch):
    """Columns of x that only lanes past the last output read (stride 2, even width:
    the last column) may hold inf: the weight gradient stays finite."""
    monkeypatch.setenv("MOBILENET_EXT_CPU_NCHW", "native")
    x = torch.randn(1, 2, 6, 12)
    x[..., -1] = float("inf")  # pad 0, k 3, stride 2: outputs read columns 0..10
    wt, g, b = torch.randn(2, 1, 3, 3), torch.ones(2), torch.zeros(2)
    rm, rv = torch.zeros(2), torch.ones(2)
    y, mean, invstd = op.dw_fwd(x, wt, g, b, rm, rv, 2, 0, 1, False, 1e-5, "identity")
    dy = torch.randn_like(y)
    dx, dwt, _, _ = op.dw_bwd(dy, x, wt, g, b, mean, invstd, 2, 0, 1, False, "identity")
    want = torch.nn.grad.conv2d_weight(x[..., :-1].double(), wt.shape, dy.double(), stride=2,
                                       groups=2)
    assert torch.isfinite(y).all() and torch.isfinite(dwt).all()
    torch.testing.assert_close(dwt.double(), want, atol=1e-4, rtol=1e-4)
    assert (dx[..., -1] == 0).all()


def test_dw_nchw_path_bad_knob(monkeypatch):
    if not hasattr(op, "dw_fwd"):
        pytest.skip("the compiled extension is not built")
    monkeypatch.setenv("MOBILENET_EXT_CPU_NCHW", "nhwc")
    with pytest.raises(ValueError, match="MOBILENET_EXT_CPU_NCHW"):
        op.dw_fwd(torch.randn(1, 3, 4, 4), torch.randn(3, 1, 3, 3), torch.ones(3),
                  torch.zeros(3), torch.zeros(3), torch.ones(3), 1, 1, 1, False, 1e-5, "relu6")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [(2, 45, 9, 70, 3, 1), (1, 37, 11, 40, 5, 2)])
def test_dw_isa(isa, case, act, dtype, layout, training):
    n, c, h, w, k, s = case
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, k, k, dtype=dtype) / k
    g, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype) * 0.1, torch.rand(c, dtype=dtype) + 0.5
    pad = (k - 1) // 2
    dy = torch.randn(n, c, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
    ours = _grads(lambda *a: op.dw_fwd(*a, rm, rv, s, pad, 1, training, 1e-5, act)[0],
                  (x, wt, g, b), dy)
    ref = _grads(lambda *a: reference.dw_fwd(*a, rm.double(), rv.double(), s, pad, 1, training,
                                             1e-5, act)[0],
                 [t.double() for t in (x, wt, g, b)], dy)
    _check(ours, ref, dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_pw_isa(isa, act, dtype, layout, training, residual):
    n, ci, co, h, w = 2, 13, 45, 5, 37
    torch.manual_seed(1)
    x = torch.randn(n, ci, h, w, dtype=dtype)
    r = torch.randn(n, co, h, w, dtype=dtype) if residual else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if residual else None
    wt = torch.randn(co, ci, 1, 1, dtype=dtype) / ci ** 0.5
    g, b = torch.rand(co, dtype=dtype) + 0.5, torch.randn(co, dtype=dtype)
    rm, rv = torch.randn(co, dtype=dtype) * 0.1, torch.rand(co, dtype=dtype) + 0.5
    dy = torch.randn(n, co, h, w)
    # here training passes save_conv and eval does not: the saved and the recomputed
    # conv output both run in every ISA build
    ours = _grads(lambda *a: op.pw_fwd(*a, rm, rv, r, training, 1e-5, act, training)[0],
                  (x, wt, g, b), dy)
    ref = _grads(lambda *a: reference.pw_fwd(*a, rm.double(), rv.double(),
                                             r.double() if residual else None, training, 1e-5,
                                             act)[0],
                 [t.double() for t in (x, wt, g, b)], dy)
    _check(ours, ref, dtype)


def test_bad_isa_value(monkeypatch):
    if not hasattr(op, "dw_fwd"):
        pytest.skip("the compiled extension is not built")
    monkeypatch.setenv("MOBILENET_EXT_CPU_ISA", "avx512")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="MOBILENET_EXT_CPU_ISA"):
        op.dw_fwd(x, torch.randn(3, 1, 3, 3), torch.ones(3), torch.zeros(3), torch.zeros(3),
                  torch.ones(3), 1, 1, 1, False, 1e-5, "relu6")


@pytest.fixture
def threads():
    """torch.set_num_threads for the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_kernels_run_on_many_threads(threads):
    """at::parallel_for's OpenMP region is compiled into the extension (setup.py's
    -fopenmp): without the flag every CPU kernel silently ran on one thread."""
    if not hasattr(op, "_parallel_threads"):
        pytest.skip("the compiled extension is not built")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP")
    for n in (1, 3):
        threads(n)
        assert op._parallel_threads() == n


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["dw", "pw"])
def test_thread_count(isa, threads, kind, layout):
    """Training forward and backward on 1 and 5 threads against the float64
    reference: the per-thread partial sums (statistics, dgamma/dbeta, dweight) and
    the row split must not race or drop rows at any thread count."""
    torch.manual_seed(2)
    n, c, h, w = 3, 21, 13, 11
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    co = c if kind == "dw" else 19
    wt = torch.randn(co, 1, 3, 3, dtype=torch.float64) if kind == "dw" else torch.randn(
        co, c, 1, 1, dtype=torch.float64)
    g, b = torch.rand(co, dtype=torch.float64) + 0.5, torch.randn(co, dtype=torch.float64)
    dy = torch.randn(n, co, h, w, dtype=torch.float64)
    # (running stats, geometry, training, eps, act[, save_conv]) after (x, weight, bn_weight,
    # bn_bias)
    rest = (None, None, 1, 1, 1) if kind == "dw" else (None, None, None)
    rest += (True, 1e-5, "relu6") + (() if kind == "dw" else (True,))
    fwd = f"{kind}_fwd"
    ref = _grads(lambda *a: getattr(reference, fwd)(*a, *rest)[0], (x, wt, g, b), dy)
    for nt in (1, 5):
        threads(nt)
        _check(_grads(lambda *a: getattr(op, fwd)(*a, *rest)[0], (x, wt, g, b), dy), ref,
               torch.float64)
