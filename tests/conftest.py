import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter; it must
# be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mobilenet_ext  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and mobilenet_ext.compiled_with_cuda()

# Every test that takes `device` runs on the CPU always and on CUDA on a GPU runner.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA kernels")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts from the default backend choice and a fixed seed."""
    mobilenet_ext._backend._selected = None
    torch.manual_seed(0)
    yield
    mobilenet_ext._backend._selected = None


def poison_allocator(device, nbytes=1 << 24):
    """Fill and free a NaN block so that freshly allocated outputs start as NaN
    where the allocator reuses it (the CUDA caching allocator does): elements a
    kernel forgets to write then fail the comparison."""
    t = torch.full((nbytes // 4,), float("nan"), device=device)
    del t


def pytest_report_header(config):
    return (f"mobilenet_ext backends: "
            + ", ".join(f"{k}={'yes' if v.available else 'no'}"
                        for k, v in mobilenet_ext.backends().items())
            + f"; CUDA kernels compiled: {mobilenet_ext.compiled_with_cuda()}"
            + f"; MOBILENET_EXT_EXPECT_CUDA={os.environ.get('MOBILENET_EXT_EXPECT_CUDA', '0')}")


def err(a, ref):
    return (a.double() - ref).abs().max().item()


def check_close(ours, eager, ref, factor, dtype=None):
    """Inputs in fp64/fp32: tight tolerances against the float64 reference. Inputs in
    fp16/bf16 (`dtype`, default ours.dtype; BN parameter gradients are fp32 but come
    from low-precision data): our error against float64 is at most `factor` x the
    error of eager PyTorch at that dtype."""
    ref = ref.double()
    dtype = dtype or ours.dtype
    assert not ours.isnan().any(), "NaN in output (unwritten elements?)"
    if dtype in (torch.float64, torch.float32):
        tol = 1e-9 if dtype == torch.float64 else 2e-4
        torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)
        return
    floor = torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    e_ours, e_eager = err(ours, ref), err(eager, ref)
    assert e_ours <= factor * e_eager + floor, (e_ours, e_eager)


def as64(*ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def call_with(fn, inputs: dict, change: dict):
    """fn(*positional inputs, **options) with `change` overriding inputs or adding options."""
    kw, opts = dict(inputs), {}
    for k, v in change.items():
        (kw if k in kw else opts)[k] = v
    return fn(*kw.values(), **opts)


def pick_act(*key):
    """An activation chosen by the test case (deterministic across runs, unlike hash())."""
    from mobilenet_ext.reference import ACTIVATIONS
    return ACTIVATIONS[zlib.crc32(repr(key).encode()) % len(ACTIVATIONS)]


@torch.no_grad()
def randomise_stats(bn):
    """Running statistics and affine parameters away from their defaults."""
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()


# What the tests run torch.autocast with on each device (CPU autocast's default is bf16).
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def check_autocast(device, fn, cast: dict, keep: dict, buffers=()):
    """fn(**cast, **keep, buffers) under torch.autocast gives exactly what it gives
    outside autocast with the `cast` tensors (fp32 leaves: x, weight, residual) cast
    to the autocast dtype: the same output in that dtype, the same running buffers
    and the same fp32 gradients for every leaf, `keep`'s (BN parameters) included."""
    low = AUTOCAST_DTYPE[device]
    leaves = {k: v.detach().clone().requires_grad_() for k, v in {**cast, **keep}.items()}
    bufs_a, bufs_b = [b.clone() for b in buffers], [b.clone() for b in buffers]
    with torch.autocast(device, dtype=low):
        got = fn(*bufs_a, **leaves)
    want = fn(*bufs_b, **{k: v.to(low) if k in cast else v for k, v in leaves.items()})
    assert got.dtype == low and torch.equal(got, want)
    for a, b in zip(bufs_a, bufs_b):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    dy = torch.randn_like(got)
    grads_a = torch.autograd.grad(got, list(leaves.values()), dy)
    grads_b = torch.autograd.grad(want, list(leaves.values()), dy)
    for name, a, b in zip(leaves, grads_a, grads_b):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
