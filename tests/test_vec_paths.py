"""The CUDA kernels' two paths: the vectorised channels_last one (16-byte loads,
strips of output columns; taken when C is a multiple of 16 bytes' worth of channels
and every tensor is 16-byte aligned) and the scalar one (everything else, or
MOBILENET_EXT_VEC=0). Both against reference.py on MobileNet-like shapes, forward
(eval and training) and backward, with poisoned outputs; plus a misaligned input
that must take the scalar path. GPU only: the CPU kernels have no such switch."""
import re

import pytest
import torch

from mobilenet_ext import reference
from conftest import HAS_CUDA, as64, check_close, poison_allocator

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")]

op = torch.ops.mobilenet_ext
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W, k, stride, pad): C a multiple of 8, W not a multiple of the strip (4);
# C = 264: 33 channel groups of 8 (fp16) -> two blocks across channels, one idle thread
DW_CASES = [(2, 32, 14, 13, 3, 1, 1), (2, 48, 9, 10, 3, 2, 1), (1, 24, 11, 9, 5, 1, 2),
            (2, 16, 8, 7, 5, 2, 2), (1, 16, 9, 8, 7, 1, 3), (1, 8, 13, 11, 7, 2, 3),
            (1, 264, 6, 5, 3, 1, 1), (2, 16, 9, 9, 3, 1, 0), (2, 24, 8, 8, 3, 2, 0)]
# Added for the shared-memory tile kernel (MOBILENET_EXT_DW_TILE=1, dw_tile.cu), whose
# blocks are 8 output rows at stride 1 (4, 3, 2 at stride 2 for k = 3, 5, 7) by 32 / CG
# strips of 4 columns by CG channel groups: several tiles per image in both directions
# with a partial last one, a partly used last channel block (fp16: 9 groups at CG = 4,
# 5 groups at CG = 8), batch > 1, and k = 7 at the largest padding (k - 1). The last
# one: k = 7, stride 2, 16 groups (fp16) and Wo = 8, where the other stages take CG 16
# and the one-kernel dc + weight gradient (64 threads, a part per kernel row and group)
# has to take CG 8 instead.
TILE_CASES = DW_CASES + [(3, 72, 19, 70, 3, 1, 1), (2, 40, 25, 141, 3, 2, 1),
                         (2, 24, 13, 45, 7, 2, 6), (2, 128, 9, 15, 7, 2, 3)]
# (N, Cin, Cout, H, W): N*H*W not a multiple of the strip (4)
PW_CASES = [(2, 16, 24, 7, 7), (1, 40, 16, 5, 3), (1, 24, 264, 3, 5)]


def channels_last(t, misaligned):
    """t in channels_last; misaligned: the same values at a 2-element offset into
    a larger buffer, so the data pointer is not 16-byte aligned."""
    if not misaligned:
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    buf = torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)
    v = buf[2:].view(n, h, w, c).permute(0, 3, 1, 2)
    v.copy_(t)
    assert v.is_contiguous(memory_format=torch.channels_last) and v.data_ptr() % 16 != 0
    return v


def bn_params(c, device):
    return (torch.rand(c, device=device) + 0.5, torch.randn(c, device=device),
            torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5)


def grads(run, dy, *ts):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in ts]
    y = run(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def aligned(t):
    """An aligned copy of a (possibly misaligned) channels_last tensor: the references
    run on these, so that only our kernels see the misaligned pointers."""
    return None if t is None else t.clone(memory_format=torch.channels_last)


def compare(run_ours, run_ref, dy, inputs, names, dtype):
    poison_allocator("cuda")
    y, got = grads(run_ours, dy, *inputs)
    inputs = [aligned(t) if t is not None and t.dim() == 4 else t for t in inputs]
    y64, want = grads(run_ref, dy, *as64(*inputs))
    ye, eager = grads(run_ref, dy, *inputs)
    check_close(y, ye, y64, factor=2)
    for name, a, e, r in zip(names, got, eager, want):
        if r is None:
            continue
        assert a.shape == r.shape, name
        check_close(a, e, r, factor=3, dtype=dtype)


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vec", ["1", "0"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DW_CASES)
def test_dw_paths(monkeypatch, case, dtype, training, vec, misaligned):
    monkeypatch.setenv("MOBILENET_EXT_VEC", vec)
    n, c, h, w, k, s, pad = case
    x = channels_last(torch.randn(n, c, h, w, device="cuda", dtype=dtype), misaligned)
    weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype) / k
    g, b, rm, rv = bn_params(c, "cuda")
    dy = torch.randn(n, c, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1,
                     device="cuda").contiguous(memory_format=torch.channels_last)
    act = "relu6" if dtype == torch.float32 else "hardswish"

    def ours(x, w, g, b):
        return op.dw_fwd(x, w, g, b, rm, rv, s, pad, 1, training, 1e-5, act)[0]

    def ref(x, w, g, b):
        cast = (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t)
        return reference.dw_fwd(x, w, g, b, cast(rm), cast(rv), s, pad, 1, training, 1e-5,
                                act)[0]

    compare(ours, ref, dy, (x, weight, g, b), ("dx", "dweight", "dgamma", "dbeta"), dtype)


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("vec", ["1", "0"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PW_CASES)
def test_pw_paths(monkeypatch, case, dtype, training, residual, vec, misaligned):
    monkeypatch.setenv("MOBILENET_EXT_VEC", vec)
    n, cin, cout, h, w = case
    x = channels_last(torch.randn(n, cin, h, w, device="cuda", dtype=dtype), misaligned)
    weight = torch.randn(cout, cin, 1, 1, device="cuda", dtype=dtype) / cin ** 0.5
    g, b, rm, rv = bn_params(cout, "cuda")
    r = None
    if residual:
        r = channels_last(torch.randn(n, cout, h, w, device="cuda", dtype=dtype), misaligned)
    dy = torch.randn(n, cout, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    act = "relu6" if dtype == torch.float32 else "silu"

    def ours(x, w, g, b, r):
        return op.pw_fwd(x, w, g, b, rm, rv, r, training, 1e-5, act, False)[0]

    def ref(x, w, g, b, r):
        cast = (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t)
        return reference.pw_fwd(x, w, g, b, cast(rm), cast(rv), r, training, 1e-5, act)[0]

    compare(ours, ref, dy, (x, weight, g, b, r),
            ("dx", "dweight", "dgamma", "dbeta", "dresidual"), dtype)


@pytest.mark.parametrize("tile", ["0", "1"], ids=["strip", "tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dw_unread_column_inf(monkeypatch, dtype, tile):
    """Stride 2, pad 0, even W: no output reads x's last column, yet the vector path's
    last strip loads it (the strip kernels from global memory, the tile kernels,
    MOBILENET_EXT_DW_TILE=1, from the staged tile). An inf there must not reach dweight
    or dgamma (0 * inf)."""
    monkeypatch.setenv("MOBILENET_EXT_DW_TILE", tile)
    n, c, h, w, k, s = 2, 24, 8, 8, 3, 2
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype) \
        .contiguous(memory_format=torch.channels_last)
    unread = torch.zeros(1, 1, 1, w, dtype=torch.bool, device="cuda")
    unread[..., -1] = True
    weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype) / k
    g, b, rm, rv = bn_params(c, "cuda")
    dy = torch.randn(n, c, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last)

    def ours(x, w, g, b):  # x with inf in the unread column (its gradient there is 0)
        x_inf = x.masked_fill(unread, float("inf")).contiguous(
            memory_format=torch.channels_last)  # masked_fill with a broadcast mask: NCHW
        return op.dw_fwd(x_inf, w, g, b, rm, rv, s, 0, 1, True, 1e-5, "relu6")[0]

    def ref(x, w, g, b):  # the reference never sees the inf (its conv may read every column)
        cast = (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t)
        return reference.dw_fwd(x, w, g, b, cast(rm), cast(rv), s, 0, 1, True, 1e-5,
                                "relu6")[0]

    y, got = grads(ours, dy, x, weight, g, b)
    assert torch.isfinite(y).all()
    for name, a in zip(("dx", "dweight", "dgamma", "dbeta"), got):
        assert torch.isfinite(a).all(), name
    compare(ours, ref, dy, (x, weight, g, b), ("dx", "dweight", "dgamma", "dbeta"), dtype)


@pytest.mark.parametrize("fused", ["0", "1", None])
@pytest.mark.parametrize("cin,cout", [(16, 48), (48, 16), (24, 24)])
def test_pw_eval_path_choice(monkeypatch, cin, cout, fused):
    """Eval fp16 channels_last: the fused tensor-core kernel (default where Cout >= Cin,
    MOBILENET_EXT_PW_FUSED=1 always) and cuBLAS + the vector epilogue (default for
    projections, =0 always) both match the reference, with and without a residual."""
    if fused is None:
        monkeypatch.delenv("MOBILENET_EXT_PW_FUSED", raising=False)
    else:
        monkeypatch.setenv("MOBILENET_EXT_PW_FUSED", fused)
    x = channels_last(torch.randn(3, cin, 7, 9, device="cuda", dtype=torch.float16), False)
    weight = torch.randn(cout, cin, 1, 1, device="cuda", dtype=torch.float16) / cin ** 0.5
    g, b, rm, rv = bn_params(cout, "cuda")
    for r in (None, channels_last(torch.randn(3, cout, 7, 9, device="cuda",
                                              dtype=torch.float16), False)):
        poison_allocator("cuda")
        y = op.pw_fwd(x, weight, g, b, rm, rv, r, False, 1e-5, "relu6", False)[0]
        y64 = reference.pw_fwd(*as64(x, weight, g, b, rm, rv, r), False, 1e-5, "relu6")[0]
        eager = reference.pw_fwd(x, weight, g, b, rm, rv, r, False, 1e-5, "relu6")[0]
        check_close(y, eager, y64, factor=2)


@pytest.mark.parametrize("knobs", [{"MOBILENET_EXT_DW_SPLIT": "1"},
                                   {"MOBILENET_EXT_DW_SPLIT": "0"},
                                   {"MOBILENET_EXT_VEC_ITEMS": "3"},
                                   {"MOBILENET_EXT_VEC_OCC": "1"},
                                   {"MOBILENET_EXT_VEC_R": "2"},
                                   {"MOBILENET_EXT_DW_TILE": "1"}],
                         ids=lambda k: "=".join(next(iter(k.items()))))
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [c for c in DW_CASES if c[4] == 3])
def test_dw_knobs(monkeypatch, case, dtype, training, knobs):
    """The variants behind the tuning knobs (backward with dc and dweight in two kernels
    or one, several strips per thread, the apply kernels without the register cap, with
    2-column strips and through a shared-memory tile) give the same results as the
    defaults."""
    for k, v in knobs.items():
        monkeypatch.setenv(k, v)
    test_dw_paths(monkeypatch, case, dtype, training, "1", False)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TILE_CASES)
def test_dw_tile(monkeypatch, case, dtype, training):
    """The forward stages through the shared-memory tile kernels (MOBILENET_EXT_DW_TILE=1)
    for every k and stride: against the reference as test_dw_paths (y and the gradients,
    so the backward tile kernels too), plus the batch mean and invstd against the
    reference in training; in eval, y bit for bit against the strip kernel (same tap
    order, plus w * 0 for the taps outside the image that the strip kernel skips; same
    epilogue). In training the statistics merge the same values in another
    order, so y is only close to the strip kernels' (test_dw_paths checks it)."""
    monkeypatch.setenv("MOBILENET_EXT_DW_TILE", "1")
    test_dw_paths(monkeypatch, case, dtype, training, "1", False)
    n, c, h, w, k, s, pad = case
    x = channels_last(torch.randn(n, c, h, w, device="cuda", dtype=dtype), False)
    weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype) / k
    g, b, rm, rv = bn_params(c, "cuda")
    act = "relu6" if dtype == torch.float32 else "hardswish"
    outs, kernels = [], []
    for tile in ("1", "0"):
        monkeypatch.setenv("MOBILENET_EXT_DW_TILE", tile)
        poison_allocator("cuda")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            outs.append(op.dw_fwd(x, weight, g, b, rm, rv, s, pad, 1, training, 1e-5, act))
            torch.cuda.synchronize()
        kernels.append(" ".join(e.name for e in prof.events()))
    # the knob reached the extension: the tile kernels ran with it and not without it
    assert "dw_tile_apply_kernel" in kernels[0] and "dw_tile_apply_kernel" not in kernels[1]
    assert ("dw_tile_stats_kernel" in kernels[0]) == training
    assert "dw_tile_stats_kernel" not in kernels[1]
    if not training:
        assert torch.equal(outs[0][0], outs[1][0])
        return
    want = reference.dw_fwd(*as64(x, weight, g, b, rm, rv), s, pad, 1, True, 1e-5, act)
    eager = reference.dw_fwd(x, weight, g, b, rm, rv, s, pad, 1, True, 1e-5, act)
    for i in (1, 2):  # mean, invstd of the tile and the strip statistics kernels
        check_close(outs[0][i], eager[i], want[i], factor=2, dtype=dtype)
        check_close(outs[1][i], eager[i], want[i], factor=2, dtype=dtype)


def kernel_names(fn):
    """fn() run under the CUDA profiler: its result and the names of the kernels it ran."""
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, " ".join(e.name for e in prof.events())


@pytest.mark.parametrize("split", ["0", "1"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TILE_CASES)
def test_dw_tile_backward(monkeypatch, case, dtype, training, split):
    """The backward stages through the shared-memory tile kernels: the sums for every k;
    dc and the weight gradient in one kernel for every k, or in two at k = 3 with
    MOBILENET_EXT_DW_TILE_SPLIT=1; dx at stride 1. The profiler shows that each ran with
    MOBILENET_EXT_DW_TILE=1 and none without it. In eval, dc does not depend on the sums,
    so at k = 3 dx is bit for bit the strip kernels' (same conv of dc, same dc
    epilogue); at k = 5, 7 the run without tiles takes dc from the scalar kernel, so dx
    is only compared within rounding there; the reductions
    (dweight, dgamma, dbeta) add the same values grouped otherwise, so they are only
    close, both against the reference (test_dw_tile runs test_dw_paths with the knob)
    and here against the strip kernels'."""
    monkeypatch.setenv("MOBILENET_EXT_DW_TILE_SPLIT", split)
    n, c, h, w, k, s, pad = case
    x = channels_last(torch.randn(n, c, h, w, device="cuda", dtype=dtype), False)
    weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype) / k
    g, b, rm, rv = bn_params(c, "cuda")
    act = "relu6" if dtype == torch.float32 else "hardswish"
    monkeypatch.delenv("MOBILENET_EXT_DW_TILE", raising=False)
    _, mean, invstd = op.dw_fwd(x, weight, g, b, rm, rv, s, pad, 1, training, 1e-5, act)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    dy = channels_last(torch.randn(n, c, ho, wo, device="cuda", dtype=dtype), False)
    outs, kernels = [], []
    for tile in ("1", "0"):
        monkeypatch.setenv("MOBILENET_EXT_DW_TILE", tile)
        out, names = kernel_names(lambda: op.dw_bwd(dy, x, weight, g, b, mean, invstd, s, pad,
                                                    1, training, act))
        outs.append(out)
        kernels.append(names)
    two = split == "1" and k == 3
    assert "dw_tile_sums_kernel" in kernels[0]
    assert ("dw_tile_dweight_kernel" in kernels[0]) == two
    assert bool(re.search(r"dw_tile_apply_kernel<[^>]*true>", kernels[0])) == two  # dc
    assert ("dw_tile_dc_dweight_kernel" in kernels[0]) != two
    assert bool(re.search(r"dw_tile_apply_kernel<[^>]*false>", kernels[0])) == (s == 1)  # dx
    assert "dw_tile_" not in kernels[1]
    for name, a, e in zip(("dx", "dweight", "dgamma", "dbeta"), *outs):
        assert torch.isfinite(a).all(), name
        if name == "dx" and not training and k == 3:
            assert torch.equal(a, e), name
        else:
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item(),
                                       msg=name)
