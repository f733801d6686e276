"""A few small calls of every CUDA dw kernel, for compute-sanitizer (bench/gpu_check.sh).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with torch's caching allocator an
out-of-bounds access usually lands inside a pooled block and memcheck cannot see it.
Correctness is the tests' business; this only exercises eval, training forward and
backward in fp16/fp32, both memory formats, odd sizes, both strides and k = 3, 5.
"""
import itertools
import sys

import torch

import mobilenet_ext

SHAPES = ((2, 8, 9, 9, 3, 1), (3, 17, 15, 13, 3, 2), (2, 40, 7, 7, 5, 1), (1, 24, 33, 33, 5, 2))


def main() -> int:
    info = mobilenet_ext.backends()["cuda"]
    if not info.available:
        print(f"sanitizer smoke: cuda backend unavailable: {info.detail}")
        return 1
    mobilenet_ext.set_backend("cuda")
    cases = 0
    for (n, c, h, w, k, stride), dtype, fmt in itertools.product(
            SHAPES, (torch.float16, torch.float32), (torch.contiguous_format, torch.channels_last)):
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).to(memory_format=fmt)
        weight = torch.randn(c, 1, k, k, device="cuda", dtype=dtype, requires_grad=True)
        gamma = torch.rand(c, device="cuda", requires_grad=True)
        beta = torch.randn(c, device="cuda", requires_grad=True)
        mean, var = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        mobilenet_ext.dw_conv_bn_act(x, weight, gamma, beta, mean, var, stride=stride)
        x.requires_grad_()
        y = mobilenet_ext.dw_conv_bn_act(x, weight, gamma, beta, mean, var, stride=stride,
                                         training=True)
        y.backward(torch.randn_like(y))
        cases += 1
    torch.cuda.synchronize()
    print(f"sanitizer smoke: {cases} cases (eval, train fwd+bwd) ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
