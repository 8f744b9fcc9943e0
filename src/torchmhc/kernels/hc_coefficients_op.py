"""Coefficients of the original Hyper-Connections (Zhu et al.: static + tanh dynamic), fused.

Every stream j of a token t is one row r = t·n + j of the streams viewed as ``[T·n, C]``, with its
own RMS normalization and its own projection by the shared ``fn [n + 2, C]``::

    m_r   = (x_r @ fnᵀ) · rinv_r,  rinv_r = rsqrt(mean(x_r²) + ε_rms)      [n + 2]
    h_pre[t, j] = base[j] + s_pre·tanh(m_r[0]),  h_post[t, j] = base[n + j] + s_post·tanh(m_r[1])
    h_res[t, k, j] = comb[j, k] = base[2n + j·n + k] + s_res·tanh(m_r[2 + k])

Forward, one pass over x: per block of rows, the projection on tensor cores (fn's n + 2 rows padded
to W = 16 columns) together with the sum of squares, then rinv, tanh and the static part. It keeps
``m [T, n, W]`` and ``rinv [T, n]`` for the backward.

Backward, two kernels:

1. per token (reads only m, rinv and the output gradients): with dd the gradient reaching
   ``s·tanh(m)``, ``g = dd·s·(1 − tanh²m)`` (the gradient of m) gives ``dm̂ = g·rinv`` (of the
   projection before the RMS scaling) and the RMS term ``cx = −rinv²·Σ_k g_k·m_k / C``: the
   normalization's backward needs Σ_c dnormed_c·normed_c, which is Σ_k g_k·m_k. s and base
   gradients are reduced per program and summed over programs by torch (deterministic).
2. the mHC coefficient backward's dx + dfn step (``coefficients_op.coefficients_bwd_x``) on the
   rows: ``dx_r = dm̂_r @ fn + cx_r·x_r``, ``dfn = Σ_r dm̂_rᵀ x_r``, one read of x, no atomics; it
   can sum x's other gradients into dx in the same pass (the chained sub-layer, ``dispatch.hc_pre``).

Precision as in ``coefficients_op.py``: fp32 math, the products on bf16 tensor cores with fp32
operands split into bf16 parts (``_precision.py``), fp32 products under Triton's interpreter.

Legend: T tokens, n streams (NS = n padded to a power of two), C channels, W = 16 dynamic columns
per row (p = 0 pre, 1 post, 2 + k res to destination k; p >= n + 2 padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import cdiv, channel_block, define_op, eager_or_compiled, grad_or_zeros, next_pow2, token_block
from torchmhc.kernels._precision import MODE_FMA, dot_stream_fn, precision_mode, split_bf16
from torchmhc.kernels.coefficients_op import coefficients_bwd_x

__all__ = [
    "hc_coefficients_fwd",
    "hc_coefficients_bwd",
    "hc_coefficients_bwd_tokens",
    "hc_coefficients_op",
    "hc_coefficients_backward",
    "HcCoefficients",
    "WIDTH",
    "hc_coefficients_backward_op",
]

#: Dynamic columns per row, n + 2 <= 10 padded to what tl.dot takes (n <= 8).
WIDTH = 16


# ----------------------------------------------------------------------------------------------
# Column maps and small helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _base_index(j, p, N: tl.constexpr):
    """Index in ``base`` of column p of source stream j: pre j, post n + j, comb[j, k] = 2n + j·n + k."""
    return tl.where(p == 0, j, tl.where(p == 1, N + j, 2 * N + j * N + p - 2))


@triton.jit
def _gates(scale_ptr, p):
    """The gate s of each column p: s_pre, s_post, then s_res."""
    return tl.where(p == 0, tl.load(scale_ptr), tl.where(p == 1, tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)))


@triton.jit
def _tanh(m):
    """fp32 tanh of any finite m (Triton has no tanh that its interpreter runs): the sign of m times
    (1 − e)/(1 + e) with e = exp(−2|m|), and the series m − m³/3 + 2m⁵/15 for |m| < 1/16, where
    1 − e would cancel (the next term is below 4e-9 relative there)."""
    a = tl.abs(m)
    e = tl.exp(-2.0 * a)
    m2 = m * m
    r = tl.where(a < 0.0625, a * (1.0 + m2 * (-1.0 / 3.0 + m2 * (2.0 / 15.0))), (1.0 - e) / (1.0 + e))
    return tl.where(m < 0, -r, r)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _hc_fwd_kernel(
    x_ptr,  # [T·n, C] stream dtype
    fn_ptr,  # [n + 2, C] fp32 (MODE_FMA), else its bf16 hi part
    fnlo_ptr,  # [n + 2, C] bf16 lo part (unused in MODE_FMA)
    scale_ptr,  # [3] fp32
    base_ptr,  # [n² + 2n] fp32
    hpre_ptr,  # [T, n] fp32 out
    hpost_ptr,  # [T, n] fp32 out
    hres_ptr,  # [T, n, n] fp32 out, paper orientation
    m_ptr,  # [T·n, W] fp32 out (saved m, padding columns 0)
    rinv_ptr,  # [T·n] fp32 out (saved rinv)
    R,
    rms_eps,
    C: tl.constexpr,
    N: tl.constexpr,
    W: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    MODE: tl.constexpr,
):
    # grid (cdiv(T·n, BR),): BR rows (token, stream) per program, C in BK chunks
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows = rows.to(tl.int64)
    p = tl.arange(0, W)
    pvalid = p < N + 2

    acc = tl.zeros([BR, W], dtype=tl.float32)
    sumsq = tl.zeros([BR], dtype=tl.float32)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * C + ks[None, :], mask=rmask[:, None], other=0.0)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        off = p[None, :] * C + ks[:, None]  # fnᵀ tile [BK, W]
        acc = dot_stream_fn(x, fn_ptr + off, fnlo_ptr + off, pvalid[None, :], acc, MODE)

    rinv = tl.rsqrt(sumsq / C + rms_eps)
    m = acc * rinv[:, None]
    tl.store(rinv_ptr + rows, rinv, mask=rmask)
    tl.store(m_ptr + rows[:, None] * W + p[None, :], m, mask=rmask[:, None])

    # static part + s·tanh(m), each column to its output (h_res in paper orientation: [t, k, j])
    t = rows // N
    j = rows % N
    valid = rmask[:, None] & pvalid[None, :]
    b = tl.load(base_ptr + _base_index(j[:, None], p[None, :], N), mask=valid, other=0.0)
    h = b + _gates(scale_ptr, p)[None, :] * _tanh(m)
    col = p[None, :] + 0 * rows[:, None]
    tl.store(hpre_ptr + rows[:, None] + 0 * col, h, mask=valid & (col == 0))
    tl.store(hpost_ptr + rows[:, None] + 0 * col, h, mask=valid & (col == 1))
    tl.store(hres_ptr + t[:, None] * (N * N) + (col - 2) * N + j[:, None], h, mask=valid & (col >= 2))


@triton.jit
def _hc_bwd_token_kernel(
    m_ptr,  # [T·n, W] fp32 saved m
    rinv_ptr,  # [T·n] fp32 saved rinv
    scale_ptr,  # [3] fp32
    dhpre_ptr,  # [T, n] fp32
    dhpost_ptr,  # [T, n] fp32
    dhres_ptr,  # [T, n, n] fp32
    dm_ptr,  # [T·n, W] fp32 out: gradient of the projection before the RMS scaling (padding 0)
    cx_ptr,  # [T·n] fp32 out: coefficient of x_r in dx_r (the RMS term)
    part_ptr,  # [programs, n² + 2n + 3] fp32 out: per-program partial sums of [dbase | dscale]
    T,
    C: tl.constexpr,
    N: tl.constexpr,
    NS: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
):
    # grid (cdiv(T, BT),): BT whole tokens per program as BT·NS rows (stream axis padded to NS), so
    # that the base gradients reduce over the token axis of a [BT, NS, W] tile
    pid = tl.program_id(0)
    q = tl.arange(0, BT * NS)
    t = (pid * BT + q // NS).to(tl.int64)
    j = q % NS
    rmask = (t < T) & (j < N)
    rows = t * N + j
    p = tl.arange(0, W)
    valid = rmask[:, None] & (p < N + 2)[None, :]
    col = p[None, :] + 0 * q[:, None]

    m = tl.load(m_ptr + rows[:, None] * W + p[None, :], mask=valid, other=0.0)
    rinv = tl.load(rinv_ptr + rows, mask=rmask, other=0.0)
    # the gradient reaching column p of row (t, j): dh_pre[t, j], dh_post[t, j], dh_res[t, k, j]
    dd = tl.load(dhpre_ptr + rows[:, None] + 0 * col, mask=valid & (col == 0), other=0.0)
    dd += tl.load(dhpost_ptr + rows[:, None] + 0 * col, mask=valid & (col == 1), other=0.0)
    dd += tl.load(dhres_ptr + t[:, None] * (N * N) + (col - 2) * N + j[:, None], mask=valid & (col >= 2), other=0.0)

    th = _tanh(m)
    g = dd * _gates(scale_ptr, p)[None, :] * (1.0 - th * th)  # dL/dm, 0 on padding
    # m = m̂·rinv: dm̂ = g·rinv; through rinv: dx gets −rinv³·x/C · Σ_c dnormed_c·x_c = cx·x
    tl.store(dm_ptr + rows[:, None] * W + p[None, :], g * rinv[:, None], mask=rmask[:, None])
    tl.store(cx_ptr + rows, -tl.sum(g * m, axis=1) * rinv * rinv / C, mask=rmask)

    # s and base: partial sums over this program's tokens (padding rows contribute exact zeros)
    R: tl.constexpr = N * N + 2 * N
    part = part_ptr + pid * (R + 3)
    dyn = dd * th
    tl.store(part + R, tl.sum(tl.sum(tl.where(col == 0, dyn, 0.0), axis=1), axis=0))
    tl.store(part + R + 1, tl.sum(tl.sum(tl.where(col == 1, dyn, 0.0), axis=1), axis=0))
    tl.store(part + R + 2, tl.sum(tl.sum(tl.where(col >= 2, dyn, 0.0), axis=1), axis=0))
    db = tl.sum(tl.reshape(dd, (BT, NS, W)), axis=0)  # [NS, W]
    jj = tl.arange(0, NS)[:, None]
    pp = p[None, :]
    tl.store(part + _base_index(jj, pp, N), db, mask=(jj < N) & (pp < N + 2))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def empty_hc_outputs(x: Tensor) -> tuple[Tensor, ...]:
    """Uninitialized ``(h_pre [T, n], h_post [T, n], h_res [T, n, n], m [T, n, W], rinv [T, n])``
    fp32 for ``x [T, n, C]``: what the forward launcher writes and the fake impl returns."""
    t, n, _ = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    return tuple(torch.empty(shape, **f32) for shape in ((t, n), (t, n), (t, n, n), (t, n, WIDTH), (t, n)))


def hc_coefficients_fwd(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    rms_eps: float,
    *,
    block_r: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher. ``x [T, n, C]`` contiguous (bf16/fp16/fp32, C % 64 == 0, n <= 8),
    ``fn [n + 2, C]``, ``scale [3]``, ``base [n² + 2n]`` fp32 contiguous
    -> ``(h_pre [T, n], h_post [T, n], h_res [T, n, n], m [T, n, W], rinv [T, n])``, all fp32; the
    last two are what the backward needs. Keywords: rows (token, stream) and channels per step
    (defaults 128 and 128 for 16-bit streams, 64 and 64 for fp32, whose staged tiles are twice as
    large), warps and pipeline stages (8 and 4 for 16-bit streams, 4 and 3 for fp32): the mHC
    coefficient kernel's tuned values, whose loop is the same, not tuned for this kernel."""
    t, n, c = x.shape
    outs = empty_hc_outputs(x)
    if t == 0:
        return outs
    wide = x.dtype != torch.float32
    mode = precision_mode(x)
    fn_hi, fn_lo = (fn, fn) if mode == MODE_FMA else split_bf16(fn)
    br = token_block(block_r or (128 if wide else 64))
    _hc_fwd_kernel[(cdiv(t * n, br),)](
        x, fn_hi, fn_lo, scale, base, *outs, t * n, rms_eps,
        C=c, N=n, W=WIDTH, BR=br, BK=channel_block(c, block_k or (128 if wide else 64)), MODE=mode,
        num_warps=num_warps or (8 if wide else 4), num_stages=num_stages or (4 if wide else 3),
    )  # fmt: skip
    return outs


def hc_coefficients_bwd_tokens(
    m: Tensor,
    rinv: Tensor,
    scale: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    c: int,
    *,
    block_t: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher of backward step 1 (tanh' and the RMS term; reads O(n²) values a token). Saved
    ``m [T, n, W]``, ``rinv [T, n]``; ``dh_pre``/``dh_post [T, n]``, ``dh_res [T, n, n]`` fp32,
    contiguous; ``c`` = C; ``block_t`` tokens per program (default 32)
    -> ``(dm [T·n, W], cx [T·n], dscale [3], dbase [n² + 2n])`` fp32, dm and cx per row (token,
    stream) as ``coefficients_bwd_x(..., per_stream=True)`` takes them."""
    t, n = dh_pre.shape
    bt = token_block(block_t or 32)
    progs = cdiv(t, bt)
    dm = torch.empty((t * n, WIDTH), dtype=torch.float32, device=m.device)
    cx = torch.empty((t * n,), dtype=torch.float32, device=m.device)
    rows = n * n + 2 * n
    part = torch.empty((progs, rows + 3), dtype=torch.float32, device=m.device)
    _hc_bwd_token_kernel[(progs,)](
        m, rinv, scale, dh_pre, dh_post, dh_res, dm, cx, part, t,
        C=c, N=n, NS=next_pow2(n), W=WIDTH, BT=bt, num_warps=num_warps,
    )  # fmt: skip
    # fixed-order sums over programs: deterministic (two reductions, not views of one: the
    # registered op's outputs may not alias)
    return dm, cx, part[:, rows:].sum(0), part[:, :rows].sum(0)


def hc_coefficients_bwd(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    m: Tensor,
    rinv: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    *,
    add: Tensor | None = None,
    mix: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher. The forward's ``x``, ``fn``, ``scale`` and saved ``(m, rinv)``, and the fp32
    gradients ``dh_pre [T, n]``, ``dh_post [T, n]``, ``dh_res [T, n, n]`` (contiguous)
    -> ``(dx [T, n, C] x.dtype, dfn [n + 2, C], dscale [3], dbase [n² + 2n])`` fp32 parameters'
    gradients. x's other gradients, summed into dx in the dx pass: ``add [T, n, C]`` and a
    pre-mix's ``mix = (dy [T, C], h_pre [T, n])`` (see ``coefficients_bwd_x``)."""
    t, n, c = x.shape
    if t == 0:
        dbase = torch.zeros((n * n + 2 * n,), dtype=torch.float32, device=x.device)
        return torch.empty_like(x), torch.zeros_like(fn), torch.zeros_like(scale), dbase
    dm, cx, dscale, dbase = hc_coefficients_bwd_tokens(m, rinv, scale, dh_pre, dh_post, dh_res, c)
    dx, dfn = coefficients_bwd_x(x, fn, dm, cx, add=add, mix=mix, per_stream=True)
    return dx, dfn, dscale, dbase


def hc_coefficients_backward(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    m: Tensor,
    rinv: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    add: Tensor | None = None,
    mix_dy: Tensor | None = None,
    mix_h: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`hc_coefficients_bwd` with x's other gradients as plain arguments (the registered op's
    signature): ``add`` (or None) is summed into dx, and so is ``mix_h ⊗ mix_dy`` when both are
    given (a pre-mix of x: its ``h_pre [T, n]`` and ``dy [T, C]``)."""
    mix = None if mix_dy is None or mix_h is None else (mix_dy, mix_h)
    return hc_coefficients_bwd(x, fn, scale, m, rinv, dh_pre, dh_post, dh_res, add=add, mix=mix)


# ----------------------------------------------------------------------------------------------
# Registered ops: opaque to torch.compile (fake impls give shapes), autograd attached
# ----------------------------------------------------------------------------------------------


def _backward_fake(x, fn, scale, *_, **__):
    n = x.shape[1]
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(scale), scale.new_empty((n * n + 2 * n,))


#: ``x [T, n, C]`` -> ``(h_pre, h_post, h_res, m, rinv)``; see :func:`hc_coefficients_fwd`.
hc_coefficients_op = define_op(
    "hc_coefficients",
    "(Tensor x, Tensor fn, Tensor scale, Tensor base, float rms_eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    hc_coefficients_fwd,
    lambda x, *_: empty_hc_outputs(x),
)
#: :func:`hc_coefficients_backward`.
hc_coefficients_backward_op = define_op(
    "hc_coefficients_backward",
    "(Tensor x, Tensor fn, Tensor scale, Tensor m, Tensor rinv, Tensor dh_pre, Tensor dh_post, Tensor dh_res,"
    " Tensor? add=None, Tensor? mix_dy=None, Tensor? mix_h=None) -> (Tensor, Tensor, Tensor, Tensor)",
    hc_coefficients_backward,
    _backward_fake,
)


def _setup_context(ctx, inputs, output) -> None:
    x, fn, scale, _base, _rms_eps = inputs
    *_, m, rinv = output
    ctx.save_for_backward(x, fn, scale, m, rinv)


def _backward(ctx, d_pre, d_post, d_res, _d_m, _d_rinv):
    x, fn, scale, m, rinv = ctx.saved_tensors
    like_pre = rinv.new_empty(rinv.shape)
    t, n = rinv.shape
    dx, dfn, dscale, dbase = eager_or_compiled(hc_coefficients_backward_op, hc_coefficients_backward, x)(
        x, fn, scale, m, rinv, grad_or_zeros(d_pre, like_pre), grad_or_zeros(d_post, like_pre),
        grad_or_zeros(d_res, rinv.new_empty((t, n, n))),
    )  # fmt: skip
    # one gradient per input: (x, fn, scale, base, rms_eps)
    return dx, dfn, dscale, dbase, None


torch.library.register_autograd("torchmhc::hc_coefficients", _backward, setup_context=_setup_context)


class HcCoefficients(torch.autograd.Function):
    """:func:`hc_coefficients_op` in eager mode: the launcher, the same context and backward, no op
    dispatch (``_common.eager_or_compiled``)."""

    @staticmethod
    def forward(ctx, *inputs):
        # a forward taking ctx: Function.apply inspects the signature of one with setup_context
        out = hc_coefficients_fwd(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(_backward)
