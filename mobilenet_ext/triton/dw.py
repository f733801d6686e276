"""Depthwise conv + BatchNorm + activation in Triton: launchers of the shared
epilogue kernel with the depthwise source, and the dx kernel."""
import torch
import triton
import triton.language as tl

from . import epilogue as E
from ..reference import ACTIVATIONS


@triton.jit
def dx_kernel(dc_ptr, w_ptr, dx_ptr, P, C, H, W, Ho, Wo, sxn, sxc, sxh, sxw, syn, syc, syh,
              syw, stride, pad, dil, K: tl.constexpr, ACC: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[n,c,h,w] = sum over taps with h = ho*s - pad + i*dil (same for w) of
    dc[n,c,ho,wo] * weight[c,i,j]: a gather over the input pixels, no atomics."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, h, w, pmask = E.pixels(tl.program_id(0), P, H, W, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for i in tl.static_range(K):
        hn = h + pad - i * dil
        ho = hn // stride
        okh = (hn >= 0) & (hn % stride == 0) & (ho < Ho)
        for j in tl.static_range(K):
            wn = w + pad - j * dil
            wo = wn // stride
            ok = pmask & okh & (wn >= 0) & (wn % stride == 0) & (wo < Wo)
            off = n * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
            dcv = tl.load(dc_ptr + off[:, None] + c[None, :] * syc,
                          mask=ok[:, None] & cmask[None, :], other=0.0).to(ACC)
            wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cmask, other=0.0).to(ACC)
            acc += dcv * wv[None, :]
    xoff = (n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr + xoff, acc.to(dx_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


def _fmt(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _geometry(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return n, c, h, w, k, ho, wo


def _common(x, weight, y, stride, padding, dilation, act):
    n, c, h, w, k, ho, wo = _geometry(x, weight, stride, padding, dilation)
    sx, sy = E.strides(x), E.strides(y)
    return dict(x_ptr=x, w_ptr=weight, C=c, H=h, W=w, Ho=ho, Wo=wo,
                sxn=sx[0], sxc=sx[1], sxh=sx[2], sxw=sx[3], syn=sy[0], syc=sy[1], syh=sy[2],
                syw=sy[3], stride=stride, pad=padding, dil=dilation, K=k,
                ACT=ACTIVATIONS.index(act), SRC=E.SRC_DW, ACC=E.tl_acc(x.dtype)), n * ho * wo


def dw_fwd(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
           training, eps, act):
    """Triton implementation of mobilenet_ext::dw_fwd: (y, mean, invstd)."""
    x = x.contiguous(memory_format=_fmt(x))
    weight = weight.contiguous()
    cl = _fmt(x) == torch.channels_last
    n, c, h, w, k, ho, wo = _geometry(x, weight, stride, padding, dilation)
    y = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype, memory_format=_fmt(x))
    acc = E.acc_dtype(x.dtype)
    kw, P = _common(x, weight, y, stride, padding, dilation, act)
    nil = dict(conv_ptr=x, res_ptr=x, y_ptr=y, dy_ptr=x, dc_ptr=y, mean_ptr=x, coef_ptr=x,
               HAS_RES=False)
    if training:
        part = E.part_buffer(P, c, cl, 2, x)
        E.launch(P, cl, **kw, **nil, scale_ptr=x, shift_ptr=x, part_ptr=part,
                 MODE=E.MODE_STATS)
        mean, invstd = E.combine_stats(part, P, E.blocks(P, c, cl)[0], eps)
    else:
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = (bn_weight.to(acc) * invstd).contiguous()
    shift = (bn_bias.to(acc) - mean * scale).contiguous()
    if y.numel():
        E.launch(P, cl, **kw, **nil, scale_ptr=scale, shift_ptr=shift, part_ptr=scale,
                 MODE=E.MODE_APPLY)
    return y, mean, invstd


def dw_bwd(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
           training, act):
    """Triton implementation of mobilenet_ext::dw_bwd: (dx, dweight, dgamma, dbeta)."""
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    cl = fmt == torch.channels_last
    dy = grad_y.contiguous(memory_format=fmt)
    weight = weight.contiguous()
    n, c, h, w, k, ho, wo = _geometry(x, weight, stride, padding, dilation)
    acc = E.acc_dtype(x.dtype)
    gamma = bn_weight.to(acc)
    scale = (gamma * invstd).contiguous()
    shift = (bn_bias.to(acc) - mean * scale).contiguous()
    kw, P = _common(x, weight, dy, stride, padding, dilation, act)
    nil = dict(conv_ptr=x, res_ptr=x, y_ptr=dy, HAS_RES=False, scale_ptr=scale,
               shift_ptr=shift, mean_ptr=mean.contiguous())
    sums = E.part_buffer(P, c, cl, 2, x)
    E.launch(P, cl, **kw, **nil, dy_ptr=dy, dc_ptr=dy, coef_ptr=scale, part_ptr=sums,
             MODE=E.MODE_SUMS)
    dgamma, dbeta, coef = E.bn_bwd_coef(sums, gamma, mean, invstd, P, training)
    dc = torch.empty_like(dy)
    taps = E.part_buffer(P, c, cl, k * k, x)
    E.launch(P, cl, **kw, **nil, dy_ptr=dy, dc_ptr=dc, coef_ptr=coef, part_ptr=taps,
             MODE=E.MODE_DC)
    dweight = taps.sum(0).t().reshape(weight.shape).to(weight.dtype).contiguous()
    dx = torch.empty_like(x)
    Pin = n * h * w
    bp, bc = E.blocks(Pin, c, cl)
    sx, sy = E.strides(x), E.strides(dy)
    dx_kernel[(triton.cdiv(Pin, bp), triton.cdiv(c, bc))](
        dc, weight, dx, Pin, c, h, w, ho, wo, *sx, *sy, stride, padding, dilation, K=k,
        ACC=E.tl_acc(x.dtype), BLOCK_P=bp, BLOCK_C=bc)
    return dx, dweight, dgamma.to(bn_weight.dtype), dbeta.to(bn_bias.dtype)
