"""Where the time goes: the CUDA kernels of one layer's step, eager against ours, from
torch.profiler (device time per kernel, summed over the profiled steps).

    python -m bench.profile --op pw --layer "24->144@56x56" --mode train
    python -m bench.profile --op dw --mode infer            # every V2 layer of the op

A profiling aid for kernel work (the numbers to quote come from `python -m bench`)."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from . import dw, problem, pw
from .shapes import mobilenet_v3_dw_layers

OPS = {"dw": (dw.OP, dw.Fused), "pw": (pw.OP, pw.Fused)}


def find_layers(op_name: str, name: str | None) -> list:
    """The MobileNetV2 layers of op `op_name` when name is None; else the layer called
    `name` among every one the aids know: the op's tables (V2, V1) and, for dw,
    MobileNetV3's 5x5 layers (mobilenet_v3_dw_layers). Empty when none is."""
    op = OPS[op_name][0]
    if name is None:
        return [lay for lay in op.layers() if lay.net == "v2"]
    known = op.layers() + (mobilenet_v3_dw_layers() if op_name == "dw" else [])
    return [lay for lay in known if lay.name == name][:1]


def cuda_fp16_cl(parser: argparse.ArgumentParser) -> tuple:
    """The GPU setting of these aids (bench.profile, bench.sweep): (device, dtype, memory
    format), cuDNN autotuning on as in bench; a parser error without a GPU."""
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda"), torch.float16, torch.channels_last


def kernel_table(step, args, steps: int, top: int) -> str:
    for _ in range(3):
        step(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(*args)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows) / steps
    out = [f"  {total:9.1f} us per step, total device time of its kernels"]
    for e in rows[:top]:
        out.append(f"  {e.device_time_total / steps:9.1f} us  {e.count // steps:3d}x  "
                   f"{e.key[:110]}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--op", choices=list(OPS), default="pw")
    p.add_argument("--layer", help="a layer name as the bench prints it, or a MobileNetV3 "
                   "5x5 one (\"v3 120@28x28 s1 k5\"; default: every MobileNetV2 layer of "
                   "the op)")
    p.add_argument("--mode", choices=["infer", "train"], default="train")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    dev, dtype, fmt = cuda_fp16_cl(p)
    op, fused = OPS[args.op]
    layers = find_layers(args.op, args.layer)
    if not layers:
        p.error(f"no {args.op} layer named {args.layer!r}")
    seen = set()
    for layer in layers:
        if layer.name in seen:
            continue
        seen.add(layer.name)
        template = op.template(layer, dtype, fmt, dev)
        inputs = problem.make_inputs(layer, args.batch, dtype, fmt, dev, args.mode, 1)[0]
        print(f"{args.op} {layer.name} {args.mode} fp16 channels_last batch {args.batch}")
        for name, module in (("eager", template), ("ours", fused(template))):
            module.train(args.mode == "train")
            print(f" {name}:")
            print(kernel_table(problem.make_step(module, args.mode), inputs, args.steps,
                               args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
