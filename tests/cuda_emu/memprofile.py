"""Memory-access counts of the CUDA kernels, on the CPU (profile.h): per kernel and
access size, the warp-level requests, the shared-memory wavefronts or global 32-byte
sectors they take, the ideal for the same bytes, and the bytes. Counted from the
emulated threads' addresses (tests/cuda_emu, the profile build), not timed: what
Nsight Compute would call wavefronts and sectors per request, without caches.

    python tests/cuda_emu/memprofile.py --op dw --shape 144,34,3,1 --pad 0 \
        --env MOBILENET_EXT_DW_TILE=1 [--mode train] [--dtype fp16] [--batch 1]
    python tests/cuda_emu/memprofile.py --op pw --shape 24,144,28 [--residual]

Requests are formed by the lanes of a warp that ran the same instruction the same
n-th time; where lanes skip iterations others run (the strip kernels' taps outside
the image at a padded edge, the tile staging's columns past the tile), later
iterations pair up differently than on a GPU, so layouts are best judged at padding
0 with the tile width dividing the output width."""
import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import build  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("global_load", "global_store", "shared_load", "shared_store")


def module():
    return build.load(profile=True)


def run_dw(m, c, h, k, s, *, pad, dtype=torch.float16, batch=1, training=False, backward=False):
    """One depthwise call (channels_last, h x h), forward and, if backward, its
    backward; the profile of what ran."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, h, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, 1, k, k, generator=g) / k).to(dtype)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    m.profile_take()
    y, mean, invstd = m.dw_fwd(x, w, gamma, beta, rm, rv, s, pad, 1, training, 1e-5, "relu6")
    if backward:
        dy = torch.randn(y.shape, generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
        m.dw_bwd(dy, x, w, gamma, beta, mean, invstd, s, pad, 1, training, "relu6")
    return m.profile_take()


def run_pw(m, cin, cout, h, *, dtype=torch.float16, batch=1, training=False, backward=False,
           residual=False):
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, cin, h, h, generator=g).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5).to(dtype)
    gamma, beta = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
    rm, rv = torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.5
    res = torch.randn(batch, cout, h, h, generator=g).to(dtype).contiguous(memory_format=cl) \
        if residual else None
    act = "identity" if residual else "relu6"
    m.profile_take()
    y, mean, invstd, _ = m.pw_fwd(x, w, gamma, beta, rm, rv, res, training, 1e-5, act, False)
    if backward:
        dy = torch.randn(y.shape, generator=g).to(dtype).contiguous(memory_format=cl)
        m.pw_bwd(dy, x, w, gamma, beta, mean, invstd, None, training, act)
    return m.profile_take()


def rows(profile):
    """(kernel, kind, access bytes, requests, units, ideal, bytes) per counted class."""
    out = []
    for kernel, kinds in profile.items():
        for kind in KINDS:
            for size, (req, units, ideal, nbytes) in sorted(kinds[kind].items()):
                out.append((kernel, kind, size, req, units, ideal, nbytes))
    return out


def table(profile) -> str:
    lines = ["| kernel | access | requests | wavefronts / sectors | ideal | x ideal | bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kernel, kind, size, req, units, ideal, nbytes in rows(profile):
        lines.append(f"| {kernel} | {kind} {size}B | {req} | {units} | {ideal} | "
                     f"{units / ideal:.2f} | {nbytes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=("dw", "pw"), required=True)
    p.add_argument("--shape", required=True, help="dw: C,H,K,S; pw: Cin,Cout,H")
    p.add_argument("--pad", type=int, default=None, help="dw padding (default (K-1)/2)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--residual", action="store_true")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE knobs, e.g. "
                   "MOBILENET_EXT_DW_TILE=1")
    a = p.parse_args(argv)
    for kv in a.env:
        key, value = kv.split("=", 1)
        os.environ[key] = value
    m = module()
    shape = [int(v) for v in a.shape.split(",")]
    train = a.mode == "train"
    if a.op == "dw":
        c, h, k, s = shape
        prof = run_dw(m, c, h, k, s, pad=(k - 1) // 2 if a.pad is None else a.pad,
                      dtype=DTYPES[a.dtype], batch=a.batch, training=train, backward=train)
    else:
        cin, cout, h = shape
        prof = run_pw(m, cin, cout, h, dtype=DTYPES[a.dtype], batch=a.batch, training=train,
                      backward=train, residual=a.residual)
    print(table(prof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
