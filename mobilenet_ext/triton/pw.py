"""Pointwise (1x1) conv + BatchNorm + activation (+ residual) in Triton.

The forward is one GEMM kernel (tl.dot) over [N*H*W pixels, Cin] x [Cin, Cout] read
with x's strides (channels_last and NCHW alike, no layout conversion), with the
BatchNorm, activation, residual and cast in its epilogue: the conv output never
goes to memory in eval. Training writes the conv output and per-block statistics
from the same kernel, then the shared epilogue normalises it in place. Backward
recomputes the conv output (one GEMM), runs the shared epilogue backward for
dgamma/dbeta/dc, and leaves the two plain GEMMs of dx and dweight to torch.matmul.
"""
import torch
import triton
import triton.language as tl

from . import epilogue as E
from ..reference import ACTIVATIONS

GEMM_FUSED, GEMM_STATS, GEMM_CONV = 0, 1, 2


@triton.jit
def gemm_kernel(x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, part_ptr,
                P, Cin, Cout, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                MODE: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    n, h, w, pmask = E.pixels(pid_m, P, H, W, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < Cout
    xrow = n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, Cin, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < Cin
        a = tl.load(x_ptr + xrow[:, None] + k[None, :] * sxc,
                    mask=pmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + co[None, :] * Cin + k[:, None],
                    mask=kmask[:, None] & comask[None, :], other=0.0)
        if DOT == 0:  # fp16 / bf16 on tensor cores, fp32 accumulation
            acc += tl.dot(a, b, out_dtype=ACC)
        elif DOT == 1:  # fp32 without TF32 rounding (and bf16 under the interpreter)
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:  # fp64
            acc += tl.dot(a, b)
    m2d = pmask[:, None] & comask[None, :]
    yoff = (n * syn + h.to(tl.int64) * syh + w.to(tl.int64) * syw)[:, None] + co[None, :] * syc
    if MODE == 0:
        sc = tl.load(scale_ptr + co, mask=comask, other=0.0)
        sh = tl.load(shift_ptr + co, mask=comask, other=0.0)
        out = E.act_fwd(acc * sc[None, :] + sh[None, :], ACT)
        if HAS_RES:
            out += tl.load(res_ptr + yoff, mask=m2d, other=0.0).to(ACC)
        tl.store(y_ptr + yoff, out.to(y_ptr.dtype.element_ty), mask=m2d)
    else:
        tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=m2d)
        if MODE == 1:  # statistics from the unrounded conv
            E.store_tile_stats(acc, pmask, comask, co, part_ptr + pid_m * 2 * Cout, Cout, ACC)


def _fmt(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dot_kind(dtype):
    if dtype == torch.float64:
        return 2
    if dtype == torch.float32 or (E.INTERPRET and dtype == torch.bfloat16):
        return 1  # the interpreter has no bf16 dot
    return 0


# On a GPU the GEMM is autotuned over warps and pipeline stages (the tile sizes come from
# the problem: the statistics buffers are sized by BLOCK_M); every mode writes its outputs
# without accumulating, so the tuner's repeated launches leave the same result. Under the
# interpreter: the plain kernel, one config.
gemm_kernel_tuned = gemm_kernel if E.INTERPRET else triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3, 4)],
    key=["P", "Cin", "Cout", "MODE", "HAS_RES"])(gemm_kernel)


def _gemm(x, w2, out, mode, scale=None, shift=None, res=None, part=None, act="identity"):
    n, cin, h, wd = x.shape
    cout = w2.shape[0]
    P = n * h * wd
    bm, _ = E.blocks(P, cout, True)
    bm = max(bm, 16)
    bn = 16 if E.INTERPRET else min(64, max(16, triton.next_power_of_2(cout)))
    bk = 16 if E.INTERPRET else min(32, max(16, triton.next_power_of_2(cin)))
    grid = (triton.cdiv(P, bm), triton.cdiv(cout, bn))
    dummy = out
    gemm_kernel_tuned[grid](x, w2, scale if scale is not None else dummy,
                      shift if shift is not None else dummy, res if res is not None else dummy,
                      out, part if part is not None else dummy, P, cin, cout, h, wd,
                      *E.strides(x), *E.strides(out), MODE=mode, ACT=ACTIVATIONS.index(act),
                      HAS_RES=res is not None, ACC=E.tl_acc(x.dtype), DOT=_dot_kind(x.dtype),
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return bm


def _epilogue(conv, out, mode, act, **kw):
    n, c, h, w = conv.shape
    sy = E.strides(conv)
    args = dict(x_ptr=conv, w_ptr=conv, conv_ptr=conv, C=c, H=h, W=w, Ho=h, Wo=w, sxn=sy[0],
                sxc=sy[1], sxh=sy[2], sxw=sy[3], syn=sy[0], syc=sy[1], syh=sy[2], syw=sy[3],
                stride=1, pad=0, dil=1, K=1, ACT=ACTIVATIONS.index(act), SRC=E.SRC_BUF,
                ACC=E.tl_acc(conv.dtype), MODE=mode, y_ptr=out)
    args.update(kw)
    E.launch(n * h * w, _fmt(conv) == torch.channels_last, **args)


def _not_saved(x):
    """pw_fwd's empty fourth output: the Triton backward recomputes the conv output."""
    return x.new_empty((0,), dtype=E.acc_dtype(x.dtype))


def pw_fwd(x, weight, bn_weight, bn_bias, running_mean, running_var, residual, training, eps,
           act, save_conv):
    """Triton implementation of mobilenet_ext::pw_fwd: (y, mean, invstd, empty)."""
    if save_conv:
        raise ValueError("save_conv: the Triton kernels do not keep the conv output; the "
                         "Triton backward recomputes it (pass save_conv=False)")
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    w2 = weight.reshape(cout, cin).contiguous()
    y = torch.empty((n, cout, h, w), device=x.device, dtype=x.dtype, memory_format=fmt)
    res = residual.contiguous(memory_format=fmt) if residual is not None else None
    acc = E.acc_dtype(x.dtype)
    P = n * h * w
    if training:
        bm = max(E.blocks(P, cout, True)[0], 16)
        part = torch.zeros(triton.cdiv(P, bm), 2, cout, device=x.device, dtype=acc)
        _gemm(x, w2, y, GEMM_STATS, part=part)
        mean, invstd = E.combine_stats(part, P, bm, eps)
    else:
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = (bn_weight.to(acc) * invstd).contiguous()
    shift = (bn_bias.to(acc) - mean * scale).contiguous()
    if y.numel() == 0:
        return y, mean, invstd, _not_saved(x)
    if training:  # normalise the conv output in place
        _epilogue(y, y, E.MODE_APPLY, act, res_ptr=res if res is not None else y,
                  HAS_RES=res is not None, dy_ptr=y, dc_ptr=y, scale_ptr=scale,
                  shift_ptr=shift, mean_ptr=scale, coef_ptr=scale, part_ptr=scale)
    else:
        _gemm(x, w2, y, GEMM_FUSED, scale=scale, shift=shift, res=res, act=act)
    return y, mean, invstd, _not_saved(x)


def _rows(t):
    """[N*H*W, C] view of a channels_last tensor, or the (N, C, H*W) view of NCHW."""
    n, c, h, w = t.shape
    if _fmt(t) == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n, c, h * w)


def pw_bwd(grad_y, x, weight, bn_weight, bn_bias, mean, invstd, conv, training, act):
    """Triton implementation of mobilenet_ext::pw_bwd: (dx, dweight, dgamma, dbeta)."""
    if conv is not None:
        raise ValueError("conv: the Triton backward recomputes the conv output; pass None")
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    dy = grad_y.contiguous(memory_format=fmt)
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    w2 = weight.reshape(cout, cin).contiguous()
    acc = E.acc_dtype(x.dtype)
    # the recomputed conv output stays in the accumulation dtype: dgamma sums
    # dz*(conv - mean) over every pixel, and a rounded conv costs it 2-6x eager's error
    conv = torch.empty(dy.shape, device=dy.device, dtype=acc, memory_format=fmt)
    _gemm(x, w2, conv, GEMM_CONV)
    gamma = bn_weight.to(acc)
    scale = (gamma * invstd).contiguous()
    shift = (bn_bias.to(acc) - mean * scale).contiguous()
    P = n * h * w
    cl = fmt == torch.channels_last
    common = dict(res_ptr=conv, HAS_RES=False, dy_ptr=dy, scale_ptr=scale, shift_ptr=shift,
                  mean_ptr=mean.contiguous())
    sums = E.part_buffer(P, cout, cl, 2, x)
    _epilogue(conv, conv, E.MODE_SUMS, act, dc_ptr=conv, coef_ptr=scale, part_ptr=sums,
              **common)
    dgamma, dbeta, coef = E.bn_bwd_coef(sums, gamma, mean, invstd, P, training)
    dc = torch.empty_like(dy)  # in x's dtype, as eager autograd keeps it, for the GEMMs
    _epilogue(conv, conv, E.MODE_DC, act, dc_ptr=dc, coef_ptr=coef, part_ptr=scale, **common)
    if cl:
        dx = (_rows(dc) @ w2).view(n, h, w, cin).permute(0, 3, 1, 2)
        dw2 = _rows(dc).t() @ _rows(x)
    else:
        dx = (w2.t() @ _rows(dc)).view(n, cin, h, w)
        dw2 = dc.transpose(0, 1).reshape(cout, -1) @ x.transpose(0, 1).reshape(cin, -1).t()
    return (dx.contiguous(memory_format=fmt), dw2.reshape(weight.shape).contiguous(),
            dgamma.to(bn_weight.dtype), dbeta.to(bn_bias.dtype))
