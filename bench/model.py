"""Whole-model and block rows: torchvision mobilenet_v2 (width 1.0, 224x224), or each of its
distinct InvertedResidual blocks (--op block), as eager PyTorch runs it,
converted to mobilenet_ext (cuda / cpu backend as "ours", and "triton"), compiled with
torch.compile, and converted + compiled. Inference: images/s; training: one step
(forward, a loss, backward to every parameter; no optimizer update) in ms; peak memory of
that step on a GPU. Every provider's logits are checked against the eager model run one
precision up before it is timed. Batch-1 inference on a GPU is timed from CUDA graphs, as the
layer rows are ("cuda_graph"), with the eager loop's own time in "ungraphed_stats" beside it.
"""
from __future__ import annotations

import contextlib
import copy

import torch

import mobilenet_ext

from . import core
from .providers import NOT_DEFAULT, using_backend

ORDER = ("eager", "ours", "triton", "compile", "ours+compile")
DEFAULT = {"cuda": ORDER, "cpu": ("eager", "ours")}
IMAGE = 224


def build_eager(seed: int = 0) -> torch.nn.Module:
    """torchvision mobilenet_v2 with random weights, BN statistics away from 0/1, and the
    classifier's dropout off (p=0: same work, deterministic output)."""
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # deterministic training outputs, so they can be checked
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _provider(name: str, eager: torch.nn.Module, device: torch.device, backend: str):
    """(module, context) for one provider, or a str saying why it cannot run."""
    if name in ("triton",) and device.type != "cuda":
        return NOT_DEFAULT["triton"]
    if name in ("compile", "ours+compile") and device.type == "cuda" and \
            not mobilenet_ext.backends()["triton"].available:
        return "torch.compile needs triton on a GPU"
    ctx = contextlib.nullcontext
    if name in ("ours", "triton", "ours+compile"):
        be = "triton" if name == "triton" else backend
        if not mobilenet_ext.backends()[be].available:
            return f"backend {be!r}: {mobilenet_ext.backends()[be].detail}"
        module = mobilenet_ext.convert(eager)
        ctx = lambda: using_backend(be)  # noqa: E731
    else:
        module = copy.deepcopy(eager)
    if name in ("compile", "ours+compile"):
        module = torch.compile(module)
    return module, ctx


def _step(module, mode: str, ctx):
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "infer":
        def step(x):
            with ctx(), torch.no_grad():
                return module(x)
    else:
        def step(x):
            with ctx():
                y = module(x)
                grads = torch.autograd.grad(y.float().square().mean(), params)
                return y, grads
    return step


def blocks(input_size: int = IMAGE) -> list[tuple[str, torch.nn.Module, tuple, int]]:
    """The distinct InvertedResidual blocks of build_eager()'s features, in network order:
    (label, block, input shape without batch, count)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    model = build_eager()
    h = (input_size + 1) // 2  # the stem's stride 2
    seen: dict[tuple, list] = {}
    for m in model.features:
        if not isinstance(m, InvertedResidual):
            continue
        convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
        cin, cout = convs[0].in_channels, convs[-1].out_channels
        hidden = convs[-1].in_channels
        key = (cin, cout, m.stride, hidden // cin, h)
        if key in seen:
            seen[key][3] += 1
        else:
            label = f"block {cin}->{cout} t{hidden // cin} s{m.stride}@{h}x{h}" + \
                (" +res" if m.use_res_connect else "")
            seen[key] = [label, m, (cin, h, h), 1]
        h = (h + 2 - 3) // m.stride + 1
    return [tuple(v) for v in seen.values()]


def subjects(what: str) -> list[tuple[str, torch.nn.Module, tuple, int]]:
    if what == "model":
        return [(f"mobilenet_v2 {IMAGE}px", build_eager(), (3, IMAGE, IMAGE), 1)]
    return blocks()


def run(device: torch.device, dtype: torch.dtype, fmt: torch.memory_format, batch: int,
        modes, requested, backend: str, warmup: int, repeats: int, progress=None,
        quick: bool = False, what: str = "model") -> list[dict]:
    """Check, then time, each provider (requested, or the device's default set; with quick
    the compiled ones only when requested) in each mode, on the whole model (what="model")
    or on each distinct MobileNetV2 block (what="block"; --quick: the first block with a
    residual). Rows as in the module docstring."""
    rows = []
    todo = subjects(what)
    if quick and what == "block":
        todo = [next(sub for sub in todo if sub[0].endswith("+res"))]
    for label, eager32, shape, count in todo:
        gen = torch.Generator().manual_seed(1)
        x0 = torch.randn(batch, *shape, generator=gen)
        for mode in modes:
            rows += _run_one(what, label, count, eager32, x0, device, dtype, fmt, batch, mode,
                             requested, backend, warmup, repeats, progress, quick)
    base = {(r["layer"], r["mode"], r["batch"]): r["stats"]["median"] for r in rows
            if r["provider"] == "eager" and r["stats"]}
    for r in rows:
        b = base.get((r["layer"], r["mode"], r["batch"]))
        r["speedup"] = b / r["stats"]["median"] if b and r["stats"] else None
    return rows


def _run_one(what, label, count, eager32, x0, device, dtype, fmt, batch, mode, requested,
             backend, warmup, repeats, progress, quick) -> list[dict]:
    names = [n for n in ORDER if requested is None or n in requested]
    default = DEFAULT[device.type]
    rows = []
    ref_dtype = core.REF_DTYPE[dtype]
    truth = copy.deepcopy(eager32).to(device, ref_dtype, memory_format=fmt)
    truth.train(mode == "train")
    with core.for_reference(), torch.no_grad():
        ref = truth(x0.to(device, ref_dtype).contiguous(memory_format=fmt))
    del truth
    eager = copy.deepcopy(eager32).to(device, dtype, memory_format=fmt).train(mode == "train")
    xs = [x0.to(device, dtype).contiguous(memory_format=fmt) for _ in range(2)]
    base_y = None
    for name in names:
        row = {"op": what, "model": "mobilenet_v2", "layer": label, "count": count,
               "mode": mode, "provider": name, "batch": batch,
               "dtype": str(dtype).removeprefix("torch."),
               "layout": "channels_last" if fmt == torch.channels_last else "nchw",
               "status": "ok", "reason": None, "stats": None, "error": None,
               "images_per_s": None, "peak_mb": None}
        rows.append(row)
        if requested is None and quick and "compile" in name:
            row.update(status="skipped", reason=f"--quick: compiling every {what} takes "
                       "minutes: --providers " + name)
        elif requested is None and name not in default:
            row.update(status="skipped", reason="not in the CPU default set: --providers "
                       + name if name != "triton" else NOT_DEFAULT["triton"])
        else:
            try:
                _check_and_time(row, name, eager, xs, ref, mode, device, backend, warmup,
                                repeats, base_y)
                if name == "eager" and row["status"] == "ok":
                    base_y = row.pop("_y")
                row.pop("_y", None)
            except Exception as e:  # one broken provider must not stop the rest
                row.update(status="error", reason=f"{type(e).__name__}: "
                           + (str(e).strip().splitlines() or [""])[0])
        if progress:
            progress(row)
    return rows


def totals(rows: list[dict]) -> list[dict]:
    """Per batch, mode and provider: the blocks' time in the network (count x median) over
    the blocks where every provider that ran is ok."""
    out = []
    for key in dict.fromkeys((r["batch"], r["mode"]) for r in rows if r["op"] == "block"):
        sel = [r for r in rows if r["op"] == "block" and (r["batch"], r["mode"]) == key]
        labels = list(dict.fromkeys(r["layer"] for r in sel))
        ok = [lab for lab in labels if all(r["status"] in ("ok", "skipped") for r in sel
                                           if r["layer"] == lab)]
        for prov in dict.fromkeys(r["provider"] for r in sel):
            mine = [r for r in sel if r["provider"] == prov and r["layer"] in ok]
            if not mine or any(r["status"] != "ok" for r in mine):
                continue
            ms = sum(r["count"] * r["stats"]["median"] for r in mine)
            out.append({"op": "block", "layer": "TOTAL" if len(ok) == len(labels)
                        else f"TOTAL {len(ok)}/{len(labels)}", "count": sum(r["count"] for r in mine),
                        "mode": key[1], "provider": prov, "batch": key[0], "status": "ok",
                        "reason": None, "stats": {"median": ms}, "peak_mb": None,
                        "images_per_s": key[0] / ms * 1e3, "error": None})
    base = {(t["batch"], t["mode"]): t["stats"]["median"] for t in out if t["provider"] == "eager"}
    for t in out:
        b = base.get((t["batch"], t["mode"]))
        t["speedup"] = b / t["stats"]["median"] if b else None
    return out


def _check_and_time(row, name, eager, xs, ref, mode, device, backend, warmup, repeats,
                    base_y):
    got = _provider(name, eager, device, backend)
    if isinstance(got, str):
        row.update(status="skipped", reason=got)
        return
    module, ctx = got
    module.train(mode == "train")
    step = _step(module, mode, ctx)
    out = step(xs[0])
    y = out if mode == "infer" else out[0]
    row["_y"] = y.detach()
    # eager defines what the dtype allows (through 50+ BN layers with fp16 batch statistics
    # its training logits are ~1.5e-2 off the fp32 truth, above TOL): it is its own base,
    # so it fails only on a non-finite error; the others must stay within 2x of its error
    base = {"y": y} if name == "eager" else None if base_y is None else {"y": base_y}
    errs, why = core.compare({"y": y}, {"y": ref}, xs[0].dtype, {"y": 2.0}, base)
    row["error"] = errs.get("y")
    if why:
        row.update(status="FAILED", reason=why)
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(xs[1])
        torch.cuda.synchronize(device)
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20

    def ungraphed(i: int):
        return step(xs[i % len(xs)])

    call = core.batch1_graphed(row, ungraphed, step, [(x,) for x in xs], device, row["batch"],
                               mode)
    if row["cuda_graph"]:  # the eager loop's time too: launch overhead and Python included
        row["ungraphed_stats"] = core.measure(ungraphed, device, warmup=warmup,
                                              repeats=repeats).asdict()
    stats = core.measure(call, device, warmup=warmup, repeats=repeats)
    row["stats"] = stats.asdict()
    row["images_per_s"] = row["batch"] / stats.median * 1e3


def render(rows: list[dict]) -> str:
    head = ["model / block", "n", "batch", "mode", "provider", "ms", "img/s", "peak MB",
            "speedup", "status"]
    body = []
    from .report import num
    for r in rows:
        ms = r["stats"]["median"] if r["stats"] else None
        body.append([r["layer"], str(r.get("count", 1)), str(r["batch"]), r["mode"],
                     r["provider"], num(ms, 4),
                     num(r["images_per_s"], 4), num(r["peak_mb"], 4),
                     "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                     "" if r["status"] == "ok" else r["status"]])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    left = {0, 3, 4, len(head) - 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), "-" * len(line(head))] + [line(c) for c in body])
