import os

import pytest
import torch

import mobilenet_ext

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
