"""Convert a torchvision MobileNetV2 to fused kernels, check it, and time it.

    python python/convert_mobilenet_v2.py [--batch 32] [--device cuda|cpu]

Uses only the public API: mobilenet_ext.convert / backends.
"""
import argparse
import time

import torch
import torchvision

import mobilenet_ext


def bench(fn, x, iters):
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    print("backends:", {k: v.available for k, v in mobilenet_ext.backends().items()})
    model = torchvision.models.mobilenet_v2().eval()
    fused, report = mobilenet_ext.convert(model, return_report=True)
    print(report)

    model = model.to(args.device, dtype, memory_format=torch.channels_last)
    fused = fused.to(args.device, dtype, memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        err = (fused(x).float() - model(x).float()).abs().max().item()
    print(f"max |converted - original| on the logits: {err:.3g}")

    t_eager, t_fused = bench(model, x, args.iters), bench(fused, x, args.iters)
    print(f"{args.device} {dtype} batch {args.batch}: eager {args.batch / t_eager:,.0f} img/s, "
          f"converted {args.batch / t_fused:,.0f} img/s ({t_eager / t_fused:.2f}x); "
          "wall-clock timing: use `python -m bench` for kernel numbers")


if __name__ == "__main__":
    main()
