"""Which implementation runs an op: cuda, triton, cpu (compiled C++) or reference."""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_ENV = "MOBILENET_EXT_BACKEND"
_HOW_TO_BUILD = ("build it with `pip install --no-build-isolation -e .` from the source tree "
                 "(see README.md, 'Building for your GPU')")

if os.environ.get("MOBILENET_EXT_NO_EXTENSION") == "1":
    _C_ERROR = "not loaded: MOBILENET_EXT_NO_EXTENSION=1"
else:
    try:
        from . import _C  # noqa: F401  (loads the library; registers the ops)
        _C_ERROR = None
    except ImportError as e:  # a pure-Python install: triton / reference only
        _C_ERROR = str(e)


class BackendInfo(NamedTuple):
    available: bool
    detail: str


def _has_kernel(op: str, key: str) -> bool:
    return _C_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"mobilenet_ext::{op}", key)


# asked once, at import: torch.compile cannot trace the dispatcher query
_COMPILED_CUDA = _has_kernel("dw_fwd", "CUDA")


def compiled_with_cuda() -> bool:
    """True when the compiled extension contains CUDA kernels."""
    return _COMPILED_CUDA


_INFO: dict | None = None


def backends() -> dict[str, BackendInfo]:
    """Every backend, whether it can run here, and why not (probed once)."""
    global _INFO
    if _INFO is None:
        _INFO = _probe()
    return dict(_INFO)


def _probe() -> dict[str, BackendInfo]:
    out = {}
    if _C_ERROR is not None:
        out["cuda"] = BackendInfo(False, f"compiled extension not importable ({_C_ERROR}); "
                                  + _HOW_TO_BUILD)
    elif not compiled_with_cuda():
        out["cuda"] = BackendInfo(False, "the extension was built without CUDA kernels (no CUDA "
                                  "toolkit or a CPU-only torch at build time)")
    elif not torch.cuda.is_available():
        out["cuda"] = BackendInfo(False, "CUDA kernels built, but no CUDA device is visible")
    else:
        out["cuda"] = BackendInfo(True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    out["triton"] = _triton_info()
    if _C_ERROR is None:
        out["cpu"] = BackendInfo(True, "compiled C++ kernels")
    else:
        out["cpu"] = BackendInfo(False, f"compiled extension not importable ({_C_ERROR}); "
                                 + _HOW_TO_BUILD)
    out["reference"] = BackendInfo(True, "pure PyTorch composition (always available)")
    return out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_info() -> BackendInfo:
    try:
        import triton
    except ImportError as e:
        return BackendInfo(False, f"triton is not installed ({e}): pip install triton")
    if torch.cuda.is_available():
        return BackendInfo(True, f"Triton {triton.__version__} kernels on CUDA tensors")
    if interpreting():
        return BackendInfo(True, f"Triton {triton.__version__} interpreter on CPU tensors "
                           "(TRITON_INTERPRET=1)")
    return BackendInfo(False, "no CUDA device; to run the Triton kernels on CPU tensors set "
                       "TRITON_INTERPRET=1 before triton is imported")


_selected = None
_warned: set = set()


def set_backend(name: str) -> None:
    """Select the backend for all ops: one of "auto", "cuda", "triton", "cpu", "reference"."""
    global _selected
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected auto, "
                         + ", ".join(BACKENDS))
    if name != "auto" and not backends()[name].available:
        raise RuntimeError(f"backend {name!r} is not available: {backends()[name].detail}")
    _selected = name


def get_backend() -> str:
    if _selected is not None:
        return _selected
    name = os.environ.get(_ENV, "auto")
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"{_ENV}: unknown backend {name!r}; expected auto, " + ", ".join(BACKENDS))
    return name


def _can_run(name: str) -> bool:
    """backends()[name].available, without the full probe for the compiled and
    reference backends (the triton check imports triton)."""
    if name == "cpu":
        return _C_ERROR is None
    if name == "cuda":
        return _COMPILED_CUDA and torch.cuda.is_available()
    return name == "reference" or backends()[name].available


_CUDA_ORDER = ("cuda", "triton", "reference")
_CPU_ORDER = ("cpu", "reference")


def pick(x: torch.Tensor) -> str:
    """The backend that runs an op on tensor x."""
    name = get_backend()
    if name != "auto":
        dev = x.device.type
        if not _can_run(name):
            raise RuntimeError(f"backend {name!r} is not available: {backends()[name].detail}")
        if (name == "cuda" and dev != "cuda") or (name == "cpu" and dev != "cpu") or \
                (name == "triton" and dev == "cpu" and not interpreting()):
            raise RuntimeError(f"backend {name!r} cannot run tensors on device {x.device}"
                               + (" (set TRITON_INTERPRET=1 before triton is imported)"
                                  if name == "triton" else ""))
        return name
    # x.is_cuda, not x.device.type: no torch.device built per call (~0.6 us)
    order = _CUDA_ORDER if x.is_cuda else _CPU_ORDER
    for cand in order:
        if _can_run(cand):
            if cand != order[0] and (x.device.type, cand) not in _warned:
                _warned.add((x.device.type, cand))
                warnings.warn(f"mobilenet_ext: backend {order[0]!r} unavailable "
                              f"({backends()[order[0]].detail}); falling back to {cand!r}",
                              stacklevel=3)
            return cand
    return "reference"
