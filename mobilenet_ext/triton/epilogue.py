"""The fused BatchNorm + activation (+ residual) epilogue in Triton, shared by the
depthwise and pointwise ops (the same passes as csrc/cuda/epilogue.cuh).

A tile is BLOCK_P output pixels x BLOCK_C channels; the conv value comes from a
source: the depthwise conv computed from x (SRC_DW) or a buffer written by the
pointwise GEMM (SRC_BUF). Reductions write one partial per (pixel block,
channel), combined on the host in a fixed order.
"""
import os

import torch
import triton
import triton.language as tl

SRC_DW, SRC_BUF = 0, 1
MODE_APPLY, MODE_STATS, MODE_SUMS, MODE_DC = 0, 1, 2, 3
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    # order of mobilenet_ext.reference.ACTIVATIONS / csrc/common.h
    if ACT == 0:
        r = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 1:
        r = tl.maximum(z, 0.0)
    elif ACT == 3:
        r = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 4:
        r = z / (1.0 + tl.exp(-z))
    else:
        r = z
    return r


@triton.jit
def act_bwd(z, dy, ACT: tl.constexpr):
    """dL/dz given dL/dy, with PyTorch's derivatives at the kinks."""
    if ACT == 0:
        r = tl.where((z > 0.0) & (z < 6.0), dy, 0.0)
    elif ACT == 1:
        r = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 3:
        r = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, dy * (z / 3.0 + 0.5), dy))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        r = dy * s * (1.0 + z * (1.0 - s))
    else:
        r = dy
    return r


@triton.jit
def store_tile_stats(v, pmask, cmask, c, base, C, ACC: tl.constexpr):
    """Batch-statistics partial of a tile: per channel (mean, M2) of its valid pixels,
    at base[0:C] and base[C:2C]; combine_stats merges them."""
    m2d = pmask[:, None] & cmask[None, :]
    cnt = tl.sum(pmask.to(ACC), axis=0)
    mean_t = tl.sum(tl.where(m2d, v, 0.0), axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(m2d, v - mean_t[None, :], 0.0)
    tl.store(base + c, mean_t, mask=cmask)
    tl.store(base + C + c, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def pixels(pid_p, P, Ho, Wo, BLOCK_P: tl.constexpr):
    """Output pixels of a tile: flat index -> (n, h, w) and the validity mask."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    wo = p % Wo
    t = p // Wo
    return (t // Ho).to(tl.int64), t % Ho, wo, p < P


@triton.jit
def dw_conv_tile(x_ptr, w_ptr, n, ho, wo, pmask, c, cmask, H, W, sxn, sxc, sxh, sxw, stride,
                 pad, dil, K: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Depthwise conv output of a tile, in the accumulation dtype."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    base = n * sxn
    for i in tl.static_range(K):
        hi = ho * stride - pad + i * dil
        for j in tl.static_range(K):
            wi = wo * stride - pad + j * dil
            ok = pmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            off = base + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
            xv = tl.load(x_ptr + off[:, None] + c[None, :] * sxc,
                         mask=ok[:, None] & cmask[None, :], other=0.0).to(ACC)
            wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cmask, other=0.0).to(ACC)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def epilogue_kernel(
        x_ptr, w_ptr, conv_ptr, res_ptr, y_ptr, dy_ptr, dc_ptr,
        scale_ptr, shift_ptr, mean_ptr, coef_ptr, part_ptr,
        P, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh, syw, stride, pad, dil,
        MODE: tl.constexpr, SRC: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr,
        HAS_RES: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, ho, wo, pmask = pixels(pid_p, P, Ho, Wo, BLOCK_P)
    m2d = pmask[:, None] & cmask[None, :]
    yoff = (n * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw)[:, None] + c[None, :] * syc
    if SRC == 0:
        v = dw_conv_tile(x_ptr, w_ptr, n, ho, wo, pmask, c, cmask, H, W, sxn, sxc, sxh, sxw,
                         stride, pad, dil, K, ACC, BLOCK_P, BLOCK_C)
    else:
        v = tl.load(conv_ptr + yoff, mask=m2d, other=0.0).to(ACC)
    if MODE == 1:
        store_tile_stats(v, pmask, cmask, c, part_ptr + pid_p * 2 * C, C, ACC)
    else:
        sc = tl.load(scale_ptr + c, mask=cmask, other=0.0)
        sh = tl.load(shift_ptr + c, mask=cmask, other=0.0)
        z = v * sc[None, :] + sh[None, :]
        if MODE == 0:
            out = act_fwd(z, ACT)
            if HAS_RES:
                out += tl.load(res_ptr + yoff, mask=m2d, other=0.0).to(ACC)
            tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=m2d)
        else:
            dy = tl.load(dy_ptr + yoff, mask=m2d, other=0.0).to(ACC)
            dz = tl.where(m2d, act_bwd(z, dy, ACT), 0.0)
            if MODE == 2:  # sum(dz), sum(dz * (conv - mean))
                mu = tl.load(mean_ptr + c, mask=cmask, other=0.0)
                base = part_ptr + pid_p * 2 * C
                tl.store(base + c, tl.sum(dz, axis=0), mask=cmask)
                tl.store(base + C + c, tl.sum(dz * (v - mu[None, :]), axis=0), mask=cmask)
            else:  # dc = a*dz + b*conv + d; depthwise: dweight partials per tap
                a = tl.load(coef_ptr + c, mask=cmask, other=0.0)
                b = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)
                dd = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)
                g = tl.where(m2d, a[None, :] * dz + b[None, :] * v + dd[None, :], 0.0)
                tl.store(dc_ptr + yoff, g.to(dc_ptr.dtype.element_ty), mask=m2d)
                if SRC == 0:
                    base = part_ptr + pid_p * (K * K) * C
                    for i in tl.static_range(K):
                        hi = ho * stride - pad + i * dil
                        for j in tl.static_range(K):
                            wi = wo * stride - pad + j * dil
                            ok = pmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                            off = n * sxn + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
                            xv = tl.load(x_ptr + off[:, None] + c[None, :] * sxc,
                                         mask=ok[:, None] & cmask[None, :], other=0.0).to(ACC)
                            tl.store(base + (i * K + j) * C + c, tl.sum(g * xv, axis=0),
                                     mask=cmask)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def blocks(P, C, channels_last):
    """Tile sizes from the problem: channels on the contiguous axis for channels_last;
    one config (small) under the interpreter."""
    if INTERPRET:
        return 16, min(16, triton.next_power_of_2(max(C, 1)))
    bc = min(64 if channels_last else 16, triton.next_power_of_2(max(C, 1)))
    return 64 if channels_last else 128, bc


def strides(t):
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def launch(P, channels_last, **kw):
    """Runs epilogue_kernel over (pixel blocks, channel blocks) of P pixels x kw["C"]."""
    bp, bc = blocks(P, kw["C"], channels_last)
    grid = (triton.cdiv(P, bp), triton.cdiv(kw["C"], bc))
    epilogue_kernel[grid](**kw, P=P, BLOCK_P=bp, BLOCK_C=bc)


def part_buffer(P, C, channels_last, width, like):
    bp, _ = blocks(P, C, channels_last)
    return torch.zeros(triton.cdiv(P, bp), width, C, device=like.device,
                       dtype=acc_dtype(like.dtype))


def combine_stats(part, P, block_p, eps):
    """Chan's merge of the per-block (mean, M2) partials of blocks of block_p pixels
    (the last one partial) -> (mean, invstd)."""
    nb = part.shape[0]
    cnt = torch.full((nb,), float(block_p), dtype=part.dtype, device=part.device)
    cnt[-1] = P - block_p * (nb - 1)
    means, m2s = part[:, 0], part[:, 1]
    mean = (cnt[:, None] * means).sum(0) / P
    m2 = m2s.sum(0) + (cnt[:, None] * (means - mean) ** 2).sum(0)
    return mean, torch.rsqrt(m2 / P + eps)


def bn_bwd_coef(part, gamma, mean, invstd, count, training):
    """dgamma, dbeta and the (a, b, d) of dc = a*dz + b*conv + d (csrc/common.h)."""
    s1, s2 = part[:, 0].sum(0), part[:, 1].sum(0)
    dgamma = s2 * invstd
    a = gamma * invstd
    if training:
        b = -a * invstd * (dgamma / count)
        d = -a * (s1 / count) + a * invstd * (dgamma / count) * mean
    else:
        b, d = torch.zeros_like(a), torch.zeros_like(a)
    return dgamma, s1, torch.stack([a, b, d]).contiguous()
