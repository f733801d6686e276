"""`python -m bench`: command line, the loop over layers, modes and providers."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
from dataclasses import asdict, dataclass

import torch

import mobilenet_ext

from . import core, dw, model, problem, pw, report
from . import providers as prov
from .problem import Op

OPS = {"dw": dw.OP, "pw": pw.OP}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# per device: dtype, batch, repeats, warmup (--quick: repeats, warmup)
DEFAULTS = {"cuda": ("fp16", 128, 100, 10, 20, 3), "cpu": ("fp32", 8, 10, 3, 3, 2)}


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    fmt: torch.memory_format
    batch: int
    repeats: int
    warmup: int
    backend: str


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="mobilenet_ext's fused conv+BN+activation ops ('ours') against eager "
                    "PyTorch ('eager': Conv2d, BatchNorm2d, ReLU6, + residual as torchvision "
                    "runs them) on every MobileNetV2 depthwise and pointwise layer. Outputs "
                    "are checked before timing.")
    p.add_argument("--op", choices=[*OPS, "block", "model", "all"], default="all",
                   help="dw: depthwise 3x3 layers; pw: 1x1 layers (expansion, projection with "
                        "or without residual, last conv); block: each distinct MobileNetV2 "
                        "InvertedResidual block; model: torchvision mobilenet_v2 whole "
                        "(eager, converted, compiled); all: every one (default)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--batch", help="batch size, or a comma-separated list (e.g. 1,32,128); "
                                   "default 128 on GPU, 8 on CPU")
    p.add_argument("--layout", choices=list(LAYOUTS), default="channels_last")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both",
                   help="infer: eval forward without grad; train: training forward + "
                        "backward to x (and the residual), conv weight, BN weight and bias")
    p.add_argument("--quick", action="store_true",
                   help="one layer per op and few repeats: a smoke run")
    p.add_argument("--json", metavar="PATH", help="write environment, args and raw rows here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: speedup over eager and %% of "
                                                  "copy bandwidth per layer (needs matplotlib)")
    p.add_argument("--repeats", type=int, help="timed calls per row (default 100 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--backend", choices=list(mobilenet_ext.BACKENDS),
                   help="mobilenet_ext backend for 'ours' (default cuda on GPU, cpu on CPU)")
    p.add_argument("--providers", metavar="LIST",
                   help="comma-separated subset of " + ",".join(prov.ORDER) + " (layers) and "
                        + ",".join(model.ORDER) + " (model) (default: "
                        "the device's default set; the others are listed as skipped with "
                        "the reason); 'all' for every one")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.batches = None
    if args.batch is not None:
        try:
            args.batches = [int(b) for b in str(args.batch).split(",")]
        except ValueError:
            p.error(f"--batch: expected integers, got {args.batch!r}")
        if not args.batches or min(args.batches) < 1:
            p.error("--batch must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.providers is not None:
        names = list(dict.fromkeys(prov.ORDER + model.ORDER)) if args.providers == "all" else \
            [n.strip() for n in args.providers.split(",") if n.strip()]
        bad = [n for n in names if n not in prov.ORDER + model.ORDER]
        if bad or not names:
            p.error(f"--providers: unknown {', '.join(bad) or '(empty)'}; choose from "
                    + ", ".join(prov.ORDER))
        args.providers = list(names)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def resolve(args: argparse.Namespace) -> Config:
    kind = args.device if args.device != "auto" else \
        "cuda" if torch.cuda.is_available() else "cpu"
    dtype, batch, repeats, warmup, q_repeats, q_warmup = DEFAULTS[kind]
    if args.quick:
        repeats, warmup = q_repeats, q_warmup
    args.dtype = args.dtype or dtype
    args.batches = args.batches or [batch]
    args.batch = args.batches[0] if len(args.batches) == 1 else args.batches
    args.repeats = args.repeats or repeats
    args.warmup = warmup if args.warmup is None else args.warmup
    args.backend = args.backend or kind
    args.device = kind
    return Config(torch.device(kind), DTYPES[args.dtype], LAYOUTS[args.layout],
                  args.batches[0], args.repeats, args.warmup, args.backend)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def bench_case(op: Op, layer, mode: str, cfg: Config, skip: dict[str, str], providers=None,
               progress=None) -> list[dict]:
    """Check, then time, every provider (name -> builder; default the device's default set
    of op.providers) on one layer and mode, except those in skip (name -> reason); plus the
    copy baseline."""
    if providers is None:  # the device's default set
        providers = {name: op.providers[name] for name in prov.DEFAULT[cfg.device.type]
                     if name in op.providers}
    nbytes = problem.layer_bytes(layer, cfg.batch, cfg.dtype, mode)
    flops = problem.layer_flops(layer, cfg.batch, mode)
    base = {"op": op.name, "layer": layer.name, **asdict(layer), "mode": mode,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "layout": "channels_last" if cfg.fmt == torch.channels_last else "nchw",
            "batch": cfg.batch, "bytes": nbytes, "flops": flops, "intensity": flops / nbytes,
            "buffers": None, "status": "ok", "reason": None, "errors": None, "stats": None,
            "copy": None}
    rows = [dict(base, provider=name, backend=cfg.backend if name == "ours" else "torch")
            for name in providers]
    try:
        template = op.template(layer, cfg.dtype, cfg.fmt, cfg.device)
        buffers = problem.make_inputs(layer, cfg.batch, cfg.dtype, cfg.fmt, cfg.device, mode,
                                      core.n_buffers(nbytes, cfg.device))
        ref_dtype = core.REF_DTYPE[cfg.dtype]
        truth = copy.deepcopy(template).to(ref_dtype).train(mode == "train")
        with core.for_reference():
            ref = problem.outputs(truth, layer,
                                  *problem.cast_inputs(*buffers[0], ref_dtype, cfg.fmt, mode),
                                  mode)
        del truth
    except Exception as e:  # e.g. out of memory: every provider's row says so
        for row in rows:
            row.update(status="error", reason=f"setup: {_error(e)}")
            if progress:
                progress(row)
        return rows
    checked = {}
    ctx = prov.ProviderContext(cfg.device, mode, cfg.backend)
    for row, build in zip(rows, providers.values()):
        row["buffers"] = len(buffers)
        if skip.get(row["provider"]):
            row.update(status="skipped", reason=skip[row["provider"]])
        else:
            try:
                module = build(template, op.parts(template), ctx)
                _check_and_time(row, module, layer, buffers, ref, checked, mode, cfg)
            except prov.Unavailable as e:
                row.update(status="skipped", reason=str(e))
            except Exception as e:  # one broken provider must not stop the table
                row.update(status="error", reason=_error(e))
        if progress:
            progress(row)
    del ref, checked
    if cfg.device.type == "cuda" and any(r["stats"] for r in rows):
        copy_row = _copy_baseline(nbytes, len(buffers), cfg)
        for r in rows:
            r["copy"] = copy_row
    return rows


def _check_and_time(row, module, layer, buffers, ref, checked, mode, cfg) -> None:
    """Compare one provider's first step with the reference; time it only if it passes."""
    module.train(mode == "train")
    got = checked[row["provider"]] = problem.outputs(module, layer, *buffers[0], mode)
    base = got if row["provider"] == report.BASELINE else checked.get(report.BASELINE)
    row["errors"], why = core.compare(got, ref, cfg.dtype,
                                      {name: problem.slack(name) for name in ref}, base)
    if not got["y"].is_contiguous(memory_format=cfg.fmt):
        why = "; ".join(filter(None, [why, "y is not in the input's memory format"]))
    if why:
        row.update(status="FAILED", reason=why)
        return
    step = problem.make_step(module, mode)
    call = core.batch1_graphed(row, core.rotating(step, buffers), step, buffers, cfg.device,
                               cfg.batch, mode)
    row["stats"] = core.measure(call, cfg.device, warmup=cfg.warmup,
                                repeats=cfg.repeats).asdict()


def _copy_baseline(nbytes: int, copies: int, cfg: Config) -> dict:
    """dst.copy_(src) moving the layer's byte count (read + write), rotated like the layer."""
    half = (nbytes + 1) // 2
    srcs = [torch.empty(half, dtype=torch.uint8, device=cfg.device) for _ in range(copies)]
    dsts = [torch.empty_like(s) for s in srcs]
    stats = core.measure(lambda i: dsts[i % copies].copy_(srcs[i % copies]), cfg.device,
                         warmup=cfg.warmup, repeats=cfg.repeats)
    return {"bytes": 2 * half, "stats": stats.asdict(), "gbps": 2 * half / stats.median / 1e6}


def _progress(total: int):
    done = [0]

    def show(row: dict) -> None:
        done[0] += 1
        ms = row["stats"]["median"] if row["stats"] else None
        if ms and "images_per_s" in row:
            what = f"{report.num(ms, 4)} ms, {report.num(row['images_per_s'], 4)} img/s"
        elif ms:
            what = f"{report.num(ms, 4)} ms, {report.num(row['bytes'] / ms / 1e6, 3)} GB/s"
        else:
            what = f"{row['status']}: {row['reason']}"
        print(f"[{done[0]}/{total}] {row['op']} {row['layer']} {row['mode']} b{row['batch']} "
              f"{row['provider']}: {what}", file=sys.stderr, flush=True)
    return show


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve(args)
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # eager at its best, as in training scripts
    names = list(OPS) + ["block", "model"] if args.op == "all" else [args.op]
    ops = [OPS[n] for n in names if n in OPS]
    layers = {op.name: [lay for lay in op.layers() if not args.quick or op.quick(lay)]
              for op in ops}
    modes = problem.MODES if args.mode == "both" else (args.mode,)
    chosen = {op.name: prov.select(op.providers, args.providers, cfg.device) for op in ops}
    if cfg.device.type == "cpu":
        print("no CUDA device: CPU comparison only (ours = mobilenet_ext cpu backend); "
              "GPU numbers need a GPU", file=sys.stderr)
    what = [f"{len(lays)} {name} layers" for name, lays in layers.items()] + \
        [f"the {w}s" if w == "block" else "the whole model" for w in ("block", "model")
         if w in names]
    print(f"bench {' + '.join(what)} x {len(modes)} modes, "
          f"{args.dtype}, {args.layout}, batch {','.join(map(str, args.batches))}, "
          f"{cfg.repeats} repeats on {cfg.device.type}", file=sys.stderr)

    n_model = len(model.ORDER) if args.providers is None else \
        len([n for n in model.ORDER if n in args.providers])
    n_blocks = (1 if args.quick else len(model.blocks())) if "block" in names else 0
    show = _progress((sum(len(layers[op.name]) * len(chosen[op.name]) for op in ops)
                      + n_model * (("model" in names) + n_blocks)) * len(modes)
                     * len(args.batches))
    rows, total_rows, model_rows = [], [], []
    for batch in args.batches:
        cfg = dataclasses.replace(cfg, batch=batch)
        batch_rows = []
        for op in ops:
            skip = {name: why for name, why in chosen[op.name].items() if why}
            table = {name: op.providers[name] for name in chosen[op.name]}
            for mode in modes:
                for layer in layers[op.name]:
                    batch_rows += bench_case(op, layer, mode, cfg, skip, table, progress=show)
                    gc.collect()
                    if cfg.device.type == "cuda":
                        torch.cuda.empty_cache()
        report.finish(batch_rows)
        batch_totals = report.totals(batch_rows)
        for t in batch_totals:
            t["batch"] = batch
        rows += batch_rows
        total_rows += batch_totals
        for what in ("block", "model"):
            if what not in names:
                continue
            got = model.run(cfg.device, cfg.dtype, cfg.fmt, batch, modes, args.providers,
                            cfg.backend, cfg.warmup,
                            max(2, cfg.repeats // 4) if args.quick else cfg.repeats,
                            progress=show, quick=args.quick, what=what)
            model_rows += got + (model.totals(got) if what == "block" else [])

    env = report.environment(cfg.device)
    timing = "device time (CUDA events), L2 rotated" if cfg.device.type == "cuda" else "wall time"
    for batch in args.batches:
        br = [r for r in rows if r["batch"] == batch]
        if br:
            print(f"\n{env['device']} | torch {env['torch']} | {args.dtype} {args.layout} batch "
                  f"{batch} | median of {cfg.repeats}, {timing}")
            print(report.render(br, [t for t in total_rows if t["batch"] == batch],
                                show_copy=cfg.device.type == "cuda"))
    if model_rows:
        print(f"\n{env['device']} | blocks and whole model, {args.dtype} {args.layout} | "
              f"{timing}")
        print(model.render(model_rows))
    everything = rows + model_rows
    for name, why in dict.fromkeys((r["provider"], r["reason"]) for r in everything
                                   if r["status"] == "skipped"):
        print(f"skipped {name}: {why}")
    bad = [r for r in everything if r["status"] in ("FAILED", "error")]
    for r in bad:
        print(f"{r['status']}: {r['op']} {r['layer']} {r['mode']} {r['provider']}: "
              f"{r['reason']}")
    if cfg.device.type == "cpu":
        print("CPU numbers only: GPU numbers need a GPU (run bench/gpu_check.sh there).")
    if args.json:
        report.write_json(args.json, env, vars(args), rows, total_rows, model_rows)
        print(f"wrote {args.json}")
    if args.plot:
        print(report.plot(args.plot, rows, model_rows))
    return 1 if bad else 0
