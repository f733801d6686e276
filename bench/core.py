"""Op-agnostic machinery: check outputs against a high-precision reference, and time.

Timing on a GPU is device time from CUDA events, one event pair per call. Before each
timed call the stream is held busy with `torch.cuda._sleep` for longer than the host
needs to enqueue the call, so the events enclose the call's kernels back to back and
Python/launch overhead stays out of the number, for every provider alike. Inputs and
outputs rotate over enough buffers to exceed twice the L2 cache, so a small layer is read
from and written to HBM as it is in a network. On a CPU it is time.perf_counter per call.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch

# the reference runs the eager composition one precision up
REF_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
             torch.float32: torch.float64, torch.float64: torch.float64}
# an error (normwise, see rel_err) up to this always passes
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}


@contextlib.contextmanager
def for_reference():
    """How the reference runs: fp32 convolutions and matmuls in full fp32 (cuDNN convs
    default to TF32, which keeps fp16's 10 mantissa bits and would leave the fp32 truth for
    an fp16 1x1 conv, a GEMM on tensor cores, as rough as the result checked), and without
    cuDNN's benchmark mode (it would time every algorithm for a call made once)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision, torch.backends.cudnn.benchmark = saved


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||got - ref|| / ||ref||, max |got - ref| / max |ref|)."""
    ref = ref.detach()
    diff = got.detach().to(ref.dtype) - ref
    tiny = torch.finfo(ref.dtype).tiny
    return (float(diff.norm() / ref.norm().clamp_min(tiny)),
            float(diff.abs().max() / ref.abs().max().clamp_min(tiny)))


def compare(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
            dtype: torch.dtype, slack: Mapping[str, float],
            base: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, str | None]:
    """Normwise errors of `got` against `ref`, and why it fails (None when it passes).

    A tensor passes when its error is at most TOL[dtype], or at most slack[name] times the
    error of `base` (eager at the same dtype), as in the kernel tests. The error is
    normwise, not elementwise: where the pre-activation sits within a rounding of a ReLU6
    kink, eager (which rounds the conv output to the compute dtype) and the truth disagree
    on whether the gradient passes, and a handful of such elements in millions puts the
    elementwise error of dx near 1 for a correct kernel. The elementwise error is reported
    with a failure. Wrong borders, channels or strides move the normwise error by far more
    than TOL; a single wrong element is the tests' business (they poison outputs).
    """
    errs, why = {}, []
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            why.append(f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}")
            continue
        e, e_max = rel_err(g, r)
        errs[name] = e if math.isfinite(e) else None  # JSON has no NaN
        e_base = rel_err(base[name], r)[0] if base is not None else 0.0
        limit = max(TOL[dtype], slack[name] * e_base)
        if not math.isfinite(e) or e > limit:
            why.append(f"{name}: err {e:.2e} > {limit:.2e}"
                       + (f" (eager {e_base:.2e})" if base is not None else "")
                       + f", max elementwise {e_max:.2e}")
    return errs, "; ".join(why) or None


@dataclass
class Stats:
    """Milliseconds per call over n samples."""
    median: float
    p20: float
    p80: float
    min: float
    n: int

    @classmethod
    def of(cls, times: Sequence[float]) -> "Stats":
        s = sorted(times)

        def q(p):  # linear interpolation between order statistics
            i = p * (len(s) - 1)
            lo = math.floor(i)
            return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)

        return cls(q(0.5), q(0.2), q(0.8), s[0], len(s))

    def asdict(self) -> dict:
        return asdict(self)


def n_buffers(nbytes: int, device: torch.device) -> int:
    """Copies of a call's tensors that together exceed twice the L2 cache (at least 4)."""
    if device.type != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(4, math.ceil(2 * l2 / max(nbytes, 1)))


def rotating(step: Callable, buffers: Sequence[tuple]) -> Callable[[int], None]:
    """call(i) runs step on buffer set i mod n and keeps its results alive for n calls, so
    outputs rotate over n allocations too instead of reusing one block that L2 holds."""
    ring = [None] * len(buffers)

    def call(i: int) -> None:
        j = i % len(buffers)
        ring[j] = None
        ring[j] = step(*buffers[j])

    return call


@functools.cache
def _sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def measure(call: Callable[[int], None], device: torch.device, *, warmup: int,
            repeats: int) -> Stats:
    """Time call(i) for i = 0..repeats-1 after `warmup` untimed calls."""
    for i in range(warmup):
        call(i)
    if device.type != "cuda":
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return Stats.of(times)
    torch.cuda.synchronize(device)
    host = []
    for i in range(3):  # enqueue time, measured with an idle GPU
        t0 = time.perf_counter()
        call(i)
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize(device)
    cycles = int((2 * max(host) * 1e3 + 0.05) * _sleep_cycles_per_ms())
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        torch.cuda._sleep(cycles)
        start.record()
        call(i)
        end.record()
    torch.cuda.synchronize(device)
    return Stats.of([start.elapsed_time(end) for start, end in events])


MAX_GRAPHS = 64


def batch1_graphed(row: dict, call: Callable[[int], None], step: Callable,
                   buffers: Sequence[tuple], device: torch.device, batch: int,
                   mode: str) -> Callable[[int], None]:
    """What to time for a row: batch-1 inference on a GPU replays CUDA graphs of step over
    buffers (launch overhead would dominate every provider), anything else, or a failed
    capture, runs call. Sets row["cuda_graph"] (and row["graph_error"] when it tried)."""
    row["cuda_graph"] = False
    if device.type != "cuda" or batch != 1 or mode != "infer":
        return call
    graph_call, row["graph_error"] = graphed(step, buffers)
    if graph_call is None:
        return call
    row["cuda_graph"] = True
    return graph_call


def graphed(step: Callable, buffers: Sequence[tuple]) -> tuple[Callable[[int], None] | None,
                                                             str | None]:
    """call(i) replaying one CUDA graph per buffer set (captured from step after a warm-up
    on a side stream), so that a batch-1 call is timed without its launch overheads, as a
    deployed batch-1 model runs it; or (None, why) when capture fails (a host sync, say).
    At most MAX_GRAPHS buffer sets: a batch-1 layer's tensors then fit in L2 together, as
    a batch-1 network's activations do."""
    buffers = buffers[:MAX_GRAPHS]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for args in buffers:
                step(*args)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for args in buffers:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = step(*args)
            graphs.append((g, out))  # out keeps the graph's output memory alive
    except Exception as e:  # noqa: BLE001 - any capture failure means: time it ungraphed
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"

    def call(i: int) -> None:
        graphs[i % len(graphs)][0].replay()
    return call, None
