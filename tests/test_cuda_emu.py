"""The ops' CUDA kernels run on the CPU: csrc/cuda compiled as host C++ with every
CUDA thread a fiber (tests/cuda_emu/emu.h, build.py), and the CUDA implementations
(dw_conv_cuda.cpp, pw_conv_cuda.cpp, unchanged) called on CPU tensors. It checks what
a CPU can see of GPU code never run on a GPU: index math, bounds, tile choices,
barriers, the cp.async pipelines, the shared-memory layouts and the fixed-order
reductions of every depthwise path (scalar, vector strips, shared-memory tiles) and
every pointwise kernel (the epilogues around cuBLAS's GEMM, done by at::mm here, and
the tensor-core eval kernel through shadow/mma.h), forward and backward, against the
float64 reference, with every output poisoned (NaN) before the kernels.
test_cuda_emu_sanitized.py runs a subset under ASan and UBSan.

It does not replace the GPU tests (tests/test_vec_paths.py): no timing, no memory
model beyond barriers and cp.async, no fp contraction, one block at a time (emu.h
says what it models)."""
import os
import pathlib
import sys

import pytest
import torch

from mobilenet_ext import reference

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emu"))
import build as emu_build  # noqa: E402



@pytest.fixture(scope="module")
def emu():
    if emu_build.missing():
        pytest.skip(emu_build.missing())
    assert os.path.isfile(os.path.join(emu_build._cuda_include(), "cuda_fp16.h"))
    return emu_build.load()


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every tensor the op allocates (outputs, workspaces) starts as NaN."""
    for k in emu_build.KNOBS:
        monkeypatch.delenv(k, raising=False)
    det, fill = torch.are_deterministic_algorithms_enabled(), \
        torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


# path -> environment; "tile1" runs the tile kernels on an emulated device of one SM, so
# that every block loops over several tiles (the sums kept across tiles, the merge)
PATHS = {
    "scalar": {"MOBILENET_EXT_VEC": "0"},
    "vec": {},
    "tile": {"MOBILENET_EXT_DW_TILE": "1"},
    "tile1": {"MOBILENET_EXT_DW_TILE": "1", "MBX_EMU_SMS": "1"},
    "tile_split": {"MOBILENET_EXT_DW_TILE": "1", "MOBILENET_EXT_DW_TILE_SPLIT": "1"},
}
# (n, c, h, w, k, stride)
CASES = [(2, 24, 13, 13, 3, 1), (2, 24, 12, 10, 3, 2), (1, 16, 11, 9, 5, 1),
         (2, 32, 13, 13, 5, 2), (1, 24, 12, 10, 7, 1), (1, 16, 15, 15, 7, 2)]
def _name(dtype):
    return str(dtype).removeprefix("torch.")


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(case, dtype, channels_last, seed=0):
    n, c, h, w, k, s = case
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g) / k).to(dtype)
    bn = [torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1,
          torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5]
    return x, weight, *(t.to(acc) for t in bn)


def _close(name, got, want, dtype, eager=None):
    """got within TOL[dtype] of the largest value of want (float64), or within 3x the
    error of eager PyTorch at got's dtype (DESIGN.md's rule, for gradients that cancel:
    a batch of two values per channel)."""
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overrun)"
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() or 1.0
    bound = TOL[dtype] * scale
    if eager is not None:
        bound = max(bound, 3 * (eager.double() - want).abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} for values up to {scale:.3g}"


def _misaligned(t):
    """t's values, in t's layout, in memory that starts one element past a 16-byte
    boundary (as a view into a larger buffer can)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    if t.dim() == 4 and not t.is_contiguous():  # channels_last
        n, c, h, w = t.shape
        out = base.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = base.view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0 and out.stride() == t.stride()
    return out


def _run(emu, capfd, case, dtype, channels_last, training, act="hardswish", dil=1, pad=None,
         misaligned=False):
    """Forward and backward through the emulated CUDA kernels against the float64
    reference (autograd); returns the kernels that ran. misaligned: x and dy start
    off a 16-byte boundary."""
    x, weight, g, b, rm, rv = _inputs(case, dtype, channels_last)
    x = _misaligned(x) if misaligned else x
    k, s = case[4], case[5]
    pad = (k - 1) // 2 * dil if pad is None else pad
    os.environ["MBX_EMU_TRACE"] = "1"
    capfd.readouterr()
    y, mean, invstd = emu.dw_fwd(x, weight, g, b, rm, rv, s, pad, dil, training, 1e-5, act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last else
                       torch.contiguous_format)
    dy = _misaligned(dy) if misaligned else dy
    dx, dw, dg, db = emu.dw_bwd(dy, x, weight, g, b, mean, invstd, s, pad, dil, training, act)
    trace = capfd.readouterr().err
    x64, w64, g64, b64 = (t.double().requires_grad_() for t in (x, weight, g, b))
    y64, mean64, invstd64 = reference.dw_fwd(x64, w64, g64, b64, rm.double(), rv.double(), s,
                                             pad, dil, training, 1e-5, act)
    y64.backward(dy.double())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    _close("y", y, y64.detach(), dtype)
    if training:
        _close("mean", mean, mean64, torch.float64 if dtype == torch.float64 else
               torch.float32)
        _close("invstd", invstd, invstd64, dtype)
    eager = [None] * 4
    if training and dtype == torch.float32:  # eager's own error at this dtype
        xe, we, ge, be = (t.detach().clone().requires_grad_() for t in (x, weight, g, b))
        ye = reference.dw_fwd(xe, we, ge, be, rm, rv, s, pad, dil, training, 1e-5, act)[0]
        eager = torch.autograd.grad(ye, (xe, we, ge, be), dy)
    for name, got, want, e in zip(("dx", "dweight", "dgamma", "dbeta"), (dx, dw, dg, db),
                                  (x64.grad, w64.grad, g64.grad, b64.grad), eager):
        _close(name, got, want, dtype, e)
    return trace


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_depthwise_kernels(emu, capfd, monkeypatch, case, path, dtype, training, order):
    """Every path, k, stride, dtype and mode. The threads of a block run one after
    another between barriers, in both orders: a missing barrier shows as a poisoned or
    stale shared-memory read in at least one of them (a removed barrier of the tile
    loop fails every stride-1 case in both)."""
    monkeypatch.setenv("MBX_EMU_ORDER", order)
    for key, value in PATHS[path].items():
        monkeypatch.setenv(key, value)
    trace = _run(emu, capfd, case, dtype, path != "scalar", training)
    # the knobs reached the kernels: the tile kernels ran where asked for, and only there
    tiles = path.startswith("tile")
    assert ("dw_tile_apply_kernel" in trace) == tiles, trace
    assert ("dw_tile_stats_kernel" in trace) == (tiles and training), trace
    assert ("dw_tile_sums_kernel" in trace) == tiles, trace
    split = path == "tile_split" and case[4] == 3
    assert ("dw_tile_dweight_kernel" in trace) == split, trace
    assert ("dw_tile_dc_dweight_kernel" in trace) == (tiles and not split), trace
    assert ("vec_" in trace) == (path == "vec" or (tiles and case[5] == 2)), trace


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_float64_odd_shapes_dilation_padding(emu, capfd, training, channels_last):
    """float64 (the scalar kernels only), channel counts no vector width divides, 1x1 and
    wide images, dilation and non-default padding."""
    _run(emu, capfd, (2, 5, 9, 7, 3, 2), torch.float64, channels_last, training)
    _run(emu, capfd, (1, 17, 8, 9, 5, 1), torch.float32, channels_last, training, "relu6")
    _run(emu, capfd, (2, 3, 1, 1, 3, 1), torch.float32, channels_last, training, "silu")
    _run(emu, capfd, (1, 40, 33, 7, 3, 2), torch.float16, channels_last, training)
    _run(emu, capfd, (2, 16, 11, 10, 3, 1), torch.float32, channels_last, training, dil=2)
    _run(emu, capfd, (2, 16, 11, 10, 5, 2), torch.bfloat16, channels_last, training, pad=0)


# (n, cin, cout, h, w, residual)
PW_CASES = [(2, 16, 24, 7, 9, False), (1, 17, 40, 5, 5, True), (2, 96, 24, 6, 6, True),
            (1, 8, 3, 4, 5, False)]


def _run_pw(emu, capfd, case, channels_last, dtype, training, save_conv, misaligned=False,
            act=None):
    """The pointwise op's forward and backward through the emulated CUDA implementation
    against the float64 reference; returns the kernels that ran. misaligned: x, the
    residual and dy start off a 16-byte boundary."""
    n, cin, cout, h, w, with_res = case
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    moved = _misaligned if misaligned else (lambda t: t)
    x = moved(torch.randn(n, cin, h, w, generator=g).to(dtype).contiguous(memory_format=fmt))
    weight = (torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5).to(dtype)
    gamma, beta = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g) * 0.1
    rm, rv = torch.randn(cout, generator=g) * 0.1, torch.rand(cout, generator=g) + 0.5
    res = moved(torch.randn(n, cout, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)) \
        if with_res else None
    act = act or ("identity" if with_res else "relu6")
    os.environ["MBX_EMU_TRACE"] = "1"
    capfd.readouterr()
    y, mean, invstd, conv = emu.pw_fwd(x, weight, gamma, beta, rm, rv, res, training, 1e-5, act,
                                       save_conv)
    dy = moved(torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=fmt))
    dx, dw, dg, db = emu.pw_bwd(dy, x, weight, gamma, beta, mean, invstd,
                                conv if save_conv else None, training, act)
    trace = capfd.readouterr().err
    assert "kernel" in trace, "no emulated kernel ran"
    x64, w64, g64, b64 = (t.double().requires_grad_() for t in (x, weight, gamma, beta))
    y64, mean64, invstd64, _ = reference.pw_fwd(
        x64, w64, g64, b64, rm.double(), rv.double(), None if res is None else res.double(),
        training, 1e-5, act)
    y64.backward(dy.double())
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    _close("y", y, y64.detach(), dtype)
    if save_conv:
        _close("conv", conv, torch.nn.functional.conv2d(x64, w64).detach(), dtype)
    if training:  # statistics of the GEMM's output, rounded to x's dtype as cuBLAS's is
        _close("mean", mean, mean64, dtype)
        _close("invstd", invstd, invstd64, dtype)
    for name, got, want in (("dx", dx, x64.grad), ("dweight", dw, w64.grad),
                            ("dgamma", dg, g64.grad), ("dbeta", db, b64.grad)):
        _close(name, got, want, dtype)
    return trace


@pytest.mark.parametrize("save_conv", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("path", ["scalar", "vec"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", PW_CASES, ids=lambda c: "x".join(map(str, c)))
def test_pointwise_epilogues(emu, capfd, monkeypatch, case, channels_last, path, dtype,
                             training, save_conv):
    """The pointwise op's CUDA implementation with the GEMM on the CPU (at::mm in
    cuBLAS's place; the tensor-core eval kernel is off: its own test below) and its epilogue
    kernels emulated: statistics, apply (+ residual), the backward sums and dc, with the
    conv output recomputed or kept (MOBILENET_EXT_PW_SAVE's path, save_conv), against
    the float64 reference."""
    if path == "scalar":
        monkeypatch.setenv("MOBILENET_EXT_VEC", "0")
    monkeypatch.setenv("MOBILENET_EXT_PW_FUSED", "0")  # test_pointwise_fused_eval's
    monkeypatch.setenv("MBX_EMU_ORDER", "reverse" if save_conv else "forward")
    trace = _run_pw(emu, capfd, case, channels_last, dtype, training, save_conv)
    cout = case[2]
    assert ("vec_" in trace) == (path == "vec" and channels_last and cout % 8 == 0), trace


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_name)
def test_misaligned_tensors(emu, capfd, monkeypatch, dtype, training):
    """x, dy (and the pointwise residual) starting off a 16-byte boundary, channels_last,
    at shapes that otherwise take the vector (and tile) kernels: the results are right
    and no vector kernel ran (on a GPU their 16-byte accesses would fault; under the
    sanitizers, test_cuda_emu_sanitized.py, any misaligned access is an error)."""
    for tiles in ("0", "1"):
        monkeypatch.setenv("MOBILENET_EXT_DW_TILE", tiles)
        for case in ((2, 24, 13, 13, 3, 1), (2, 32, 13, 13, 5, 2)):
            trace = _run(emu, capfd, case, dtype, True, training, misaligned=True)
            assert "emu launch" in trace and "vec_" not in trace and "dw_tile" not in trace, \
                trace
    monkeypatch.setenv("MOBILENET_EXT_PW_FUSED", "0")  # test_pointwise_fused_acts_misaligned's
    for save_conv in (False, True):
        trace = _run_pw(emu, capfd, (2, 16, 24, 7, 9, True), True, dtype, training, save_conv,
                        misaligned=True)
        assert "vec_" not in trace, trace


# (n, cin, cout, h, w, residual): one K chunk and one channel tile; Cin 17 and Cout 40
# off the 16-byte paths; Cin 40 a partial K chunk (its last k-step skipped), Cout 96 a
# half-idle second channel tile; 2x13x11 = 286 pixels, a partial third pixel tile
FUSED_CASES = [(2, 16, 24, 7, 9, False), (1, 17, 40, 5, 5, True), (2, 40, 96, 13, 11, True),
               (2, 96, 24, 6, 6, True), (1, 8, 3, 4, 5, False)]


@pytest.mark.parametrize("sms", ["4", "1"])
@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c)))
def test_pointwise_fused_eval(emu, capfd, monkeypatch, case, dtype, order, sms):
    """The tensor-core eval kernel (pw_fused.cu: WMMA through shadow/mma.h, the cp.async
    pipeline of emu.h) against the float64 reference: 16-byte and scalar loads and
    stores, partial K chunks, pixel and channel tiles, with the residual; on one SM
    (two resident blocks) every block streams several tiles through the pipeline."""
    monkeypatch.setenv("MOBILENET_EXT_PW_FUSED", "1")  # also where Cout < Cin
    monkeypatch.setenv("MBX_EMU_ORDER", order)
    monkeypatch.setenv("MBX_EMU_SMS", sms)
    trace = _run_pw(emu, capfd, case, True, dtype, False, False)
    assert "pw_fused_kernel" in trace, trace


@pytest.mark.parametrize("act", ["relu6", "relu", "hardswish", "silu", "identity"])
def test_pointwise_fused_acts_misaligned(emu, capfd, monkeypatch, act):
    """Every activation of the fused kernel's epilogue, and x, residual off a 16-byte
    boundary (the scalar loads and stores)."""
    monkeypatch.setenv("MOBILENET_EXT_PW_FUSED", "1")
    for misaligned in (False, True):
        trace = _run_pw(emu, capfd, (1, 24, 32, 5, 7, True), True, torch.float16, False, False,
                        misaligned=misaligned, act=act)
        assert "pw_fused_kernel" in trace, trace
