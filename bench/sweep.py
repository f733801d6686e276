"""Environment-knob sweep of our kernels on a few layers: the same op timed under
each setting in one process (the CUDA path reads its knobs at every launch), so
kernel variants are compared on one card in one run.

    python -m bench.sweep --op dw --mode infer \
        --setting MOBILENET_EXT_VEC=0 --setting MOBILENET_EXT_VEC_ITEMS=2 ...

Each --setting is a comma-separated list of VAR=VALUE applied on top of the default
(the first row, "default", is always timed). A measuring aid for kernel work; the
numbers to quote come from `python -m bench`."""
from __future__ import annotations

import argparse
import os

import torch

from . import core, problem
from .profile import OPS, cuda_fp16_cl, find_layers
DEFAULT_LAYERS = {"dw": ("32@112x112 s1", "96@112x112 s2", "144@56x56 s1", "576@14x14 s1"),
                  "pw": ("expand 24->144@56x56", "project 144->24@56x56 +res")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__)
    p.add_argument("--op", choices=list(OPS), default="dw")
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--layer", action="append", help="layer name (repeatable): a MobileNetV2 "
                   "or V1 one as the bench prints it, or a MobileNetV3 5x5 depthwise one "
                   "(\"v3 120@28x28 s1 k5\")")
    p.add_argument("--setting", action="append", default=[], help="VAR=VALUE[,VAR=VALUE]")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    dev, dtype, fmt = cuda_fp16_cl(p)
    op, fused = OPS[args.op]
    names = args.layer or DEFAULT_LAYERS[args.op]
    settings = [("default", {})] + [
        (s, dict(kv.split("=", 1) for kv in s.split(","))) for s in args.setting]
    print(f"{args.op} {args.mode} fp16 channels_last batch {args.batch}, median ms of "
          f"{args.repeats} (CUDA events, inputs rotated)")
    print(f"{'layer':32s} " + " ".join(f"{s[:22]:>22s}" for s, _ in [("eager", 0)] + settings))
    layers = [find_layers(args.op, name) for name in names]
    if not all(layers):
        p.error(f"unknown {args.op} layer: {[n for n, f in zip(names, layers) if not f]}")
    for name, (layer,) in zip(names, layers):
        template = op.template(layer, dtype, fmt, dev)
        template.train(args.mode == "train")
        mods = [("eager", template), *((s, fused(template).train(args.mode == "train"))
                                       for s, _ in settings)]
        nbytes = problem.layer_bytes(layer, args.batch, dtype, args.mode)
        bufs = problem.make_inputs(layer, args.batch, dtype, fmt, dev, args.mode,
                                   core.n_buffers(nbytes, dev))
        cells = []
        for (label, module), env in zip(mods, [{}] + [e for _, e in settings]):
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                call = core.rotating(problem.make_step(module, args.mode), bufs)
                cells.append(core.measure(call, dev, warmup=5, repeats=args.repeats).median)
            except Exception as e:  # a broken variant must not stop the sweep
                cells.append(float("nan"))
                print(f"  {label}: {type(e).__name__}: {e}")
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        print(f"{name:32s} " + " ".join(f"{c:22.4f}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
