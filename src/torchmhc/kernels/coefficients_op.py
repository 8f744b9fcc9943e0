"""mHC coefficients (paper Eq. 7–9, Sec. 4.3.1 Eq. 14–19; DeepSeek-V4 numerics), fused.

Forward, one pass over x ``[T, n·C]``: the projection ``vec(x) @ fnᵀ`` on tensor cores together
with the sum of squares, then ``1/r``, α, b, σ, 2σ and the whole Sinkhorn-Knopp iteration in
registers. The kernel keeps ``m = m̂/r`` (n² + 2n values a token) and ``1/r`` for the backward.

Backward, two kernels:

1. per token (reads only the saved m and the output gradients): σ' and the Sinkhorn backward,
   which runs the iteration again on-chip keeping every step's output in registers, then walks it
   in reverse (nothing stored in memory), giving ``dm̂`` and the 1/r coefficient;
   α and b gradients are reduced per program and summed over programs by torch (deterministic).
2. per block of channels: ``dx = dm̂ @ fn + c_t·x`` and ``dfn = dm̂ᵀ @ x`` from one read of x, on
   the merged gradient block; dfn accumulates transposed (``xᵀ @ dm̂``, so M = the channel tile);
   each program owns its columns of dfn for a fixed run of tokens (no atomics: deterministic).

Precision (see ``_precision.py``): the products run on bf16 tensor cores with fp32 operands split
into bf16 parts: fn into hi + lo (~16 bits; a bf16 x is exact, an fp16/fp32 x is split too), the
backward's fp32 gradients into two or three parts. Nothing goes through one-pass TF32.

Packed column layouts used inside the kernels (``fn`` itself stays in DeepSeek-V4's layout):
    pp  [16]:   column p < 8 is pre stream p, column 8 + i is post stream i (padding masked)
    res [NP²]:  column i·NP + j is H_res[i, j] (paper orientation), i.e. fn row 2n + j·n + i
    merged [W]: the backward's ``[pp | res | padding]``, W = 16 + NP² rounded to a power of two
Legend: T tokens, n streams, NP = max(4, n padded to a power of two), K = n·C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import (
    cdiv,
    channel_block,
    define_op,
    eager_or_compiled,
    grad_or_zeros,
    next_pow2,
    num_sms,
    tile_descriptor,
    token_block,
    token_runs,
)
from torchmhc.kernels._precision import MODE_FMA, dot_bf16_f32, dot_stream_fn, precision_mode, split2, split_bf16

__all__ = [
    "coefficients_fwd",
    "coefficients_bwd",
    "coefficients_bwd_tokens",
    "coefficients_bwd_x",
    "coefficients_op",
    "coefficients_backward",
    "coefficients_backward_op",
    "Coefficients",
    "PP",
]

#: Width of the packed [pre | post] block (8 slots each: n <= 8).
PP = 16


# ----------------------------------------------------------------------------------------------
# Column maps and small helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pp_rows(N: tl.constexpr):
    """Packed pre/post column -> (fn row, valid, is_pre)."""
    p = tl.arange(0, 16)
    is_pre = p < 8
    row = tl.where(is_pre, p, N + p - 8)
    valid = tl.where(is_pre, p < N, p - 8 < N)
    return row, valid, is_pre


@triton.jit
def _res_rows(N: tl.constexpr, NP: tl.constexpr):
    """Packed H_res column i·NP + j -> (fn row of comb[j, i], valid)."""
    p = tl.arange(0, NP * NP)
    i = p // NP
    j = p % NP
    return 2 * N + j * N + i, (i < N) & (j < N)


@triton.jit
def _gradient_rows(N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, ROWS: tl.constexpr, MERGED: tl.constexpr):
    """Columns of the backward's gradient block (W wide) -> (fn row, valid). ``MERGED`` (mHC):
    ``[pre/post (16) | res (NP²) | padding]``, so that the gradient products run on this one block
    instead of two narrow ones; else column p is fn row p, valid for p < ROWS (HC)."""
    p = tl.arange(0, W)
    if MERGED:
        return merged_row_of(p, N, NP)
    return p, p < ROWS


@triton.jit
def merged_row_of(p, N: tl.constexpr, NP: tl.constexpr):
    """Merged column p (>= 16 + NP²: padding) -> (fn row, valid); also used to pack fn for the
    fused post-res kernel."""
    is_pp = p < 16
    q = tl.where(is_pp, 0, p - 16)  # res column i·NP + j
    i = q // NP
    j = q % NP
    pp_row = tl.where(p < 8, p, N + p - 8)
    pp_valid = tl.where(p < 8, p < N, p - 8 < N)
    res_valid = (q < NP * NP) & (i < N) & (j < N)
    return tl.where(is_pp, pp_row, 2 * N + j * N + i), tl.where(is_pp, pp_valid, res_valid)


@triton.jit
def _dot_dm_fn(dm, w_hi, w_lo, acc, MODE: tl.constexpr):
    """acc += dm @ fn-tile, both fp32 (w_hi holds fn itself in MODE_FMA): 3 bf16 products, ~16 bits."""
    if MODE == 0:
        acc = tl.dot(dm, w_hi, acc, input_precision="ieee")
    else:
        d_hi, d_lo = split2(dm)
        acc = tl.dot(d_hi, w_hi, acc)
        acc = tl.dot(d_hi, w_lo, acc)
        acc = tl.dot(d_lo, w_hi, acc)
    return acc


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp in registers on [BT, NP, NP] tiles (axis 1 = destination i, axis 2 = source j)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sk_softmax(logits, valid):
    """Max-shifted softmax over axis 1 (columns); padding gets exactly 0, never NaN."""
    lg = tl.where(valid, logits, -1e30)
    e = tl.exp(lg - tl.max(lg, axis=1)[:, None, :])
    return tl.where(valid, e / tl.sum(e, axis=1)[:, None, :], 0.0)


@triton.jit
def _sk_inv(v, q: tl.constexpr, eps):
    """1/(row sums + ε) for even steps q (sum over axis 2), 1/(column sums + ε) for odd (axis 1),
    shaped to broadcast against v."""
    # one reciprocal per row/column and multiplies: a division per entry costs several times more
    if q % 2 == 0:
        inv = (1.0 / (tl.sum(v, axis=2) + eps))[:, :, None]
    else:
        inv = (1.0 / (tl.sum(v, axis=1) + eps))[:, None, :]
    return inv


@triton.jit
def _sk_step_bwd(y, inv, g, q: tl.constexpr, valid):
    """Gradient through step q from its output y = v·inv: dv = (g − Σ(g·y))·inv (sums as in step q).

    Padding entries are constants (always 0): their gradient is dropped, else a padded column would
    be divided by ε again at every step and overflow."""
    if q % 2 == 0:
        g = (g - tl.sum(g * y, axis=2)[:, :, None]) * inv
    else:
        g = (g - tl.sum(g * y, axis=1)[:, None, :]) * inv
    return tl.where(valid, g, 0.0)


@triton.jit
def _sinkhorn_fwd(logits, valid, eps, ITERS: tl.constexpr):
    """V4 convention: softmax over columns, +ε, then 2·ITERS − 1 alternating row/column steps."""
    v = tl.where(valid, _sk_softmax(logits, valid) + eps, 0.0)
    for q in tl.static_range(2 * ITERS - 1):  # unrolled: each step's axis is known at compile time
        v = v * _sk_inv(v, q, eps)
    return v


@triton.jit
def _sinkhorn_bwd(logits, valid, g, eps, ITERS: tl.constexpr):
    """d logits from dH, nothing stored in memory: the forward runs again on-chip and keeps every
    step's output and reciprocal sums (compile-time tuples: registers), then the 2·ITERS − 1 steps
    are walked back, one reduction each. The chain of dependent steps is 2·(2·ITERS − 1) long."""
    Q: tl.constexpr = 2 * ITERS - 1
    p = _sk_softmax(logits, valid)
    v = tl.where(valid, p + eps, 0.0)
    outs = ()
    invs = ()
    for q in tl.static_range(Q):
        inv = _sk_inv(v, q, eps)
        v = v * inv
        outs = outs + (v,)
        invs = invs + (inv,)
    g = tl.where(valid, g, 0.0)
    for r in tl.static_range(Q):
        g = _sk_step_bwd(outs[Q - 1 - r], invs[Q - 1 - r], g, Q - 1 - r, valid)
    # +ε is additive; softmax over axis 1: dℓ = (g − Σ(g·p))·p
    return (g - tl.sum(g * p, axis=1)[:, None, :]) * p


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def coef_epilogue(
    acc_pp, acc_res, sumsq, toks, tmask, scale_ptr, base_ptr, hpre_ptr, hpost_ptr, hres_ptr, mpp_ptr, mres_ptr,
    rinv_ptr, eps, rms_eps, post_scale,
    K: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr,
    RELOAD: tl.constexpr,
):  # fmt: skip
    """From the projections ``acc_pp [BT, 16]``, ``acc_res [BT, NP²]`` and ``Σx² [BT]`` of BT tokens:
    stores the saved m and 1/r, then H_pre, H_post and H_res (shared with the fused post-res pass).
    ``RELOAD``: read the stored m back for the rest, see below."""
    pp = tl.arange(0, 16)
    rr = tl.arange(0, NP * NP)
    pp_row, pp_valid, is_pre = _pp_rows(N)
    res_row, res_valid = _res_rows(N, NP)
    # m = m̂ · rsqrt(mean(x²) + ε_rms)
    rinv = tl.rsqrt(sumsq / K + rms_eps)
    m_pp = acc_pp * rinv[:, None]
    m_res = acc_res * rinv[:, None]
    tl.store(rinv_ptr + toks, rinv, mask=tmask)
    tl.store(mpp_ptr + toks[:, None] * 16 + pp[None, :], m_pp, mask=tmask[:, None])
    tl.store(mres_ptr + toks[:, None] * (NP * NP) + rr[None, :], m_res, mask=tmask[:, None])
    # RELOAD: read back what was just stored (visible to the whole program after the barrier; from
    # L2, not L1). The loaded tiles get layouts of their own, where the transposed products of the
    # fused post-res kernel leave each token spread over many threads: its epilogue 4127 -> 1901
    # instructions, 6.4 -> 4.1 µs a program (H100). The coefficient kernel's 64-token tiles are
    # slower with it (191 -> 207 µs at T = 16384, C = 4096), so it passes RELOAD = 0
    if RELOAD:
        tl.debug_barrier()
        m_pp = tl.load(mpp_ptr + toks[:, None] * 16 + pp[None, :], mask=tmask[:, None], other=0.0, cache_modifier=".cg")
        m_res = tl.load(
            mres_ptr + toks[:, None] * (NP * NP) + rr[None, :], mask=tmask[:, None], other=0.0, cache_modifier=".cg"
        )

    # H_pre = σ(α_pre·m + b) + ε, H_post = post_scale·σ(α_post·m + b)
    alpha = tl.where(is_pre, tl.load(scale_ptr), tl.load(scale_ptr + 1))
    b_pp = tl.load(base_ptr + pp_row, mask=pp_valid, other=0.0)
    sig = tl.sigmoid(alpha[None, :] * m_pp + b_pp[None, :])
    h = tl.where(is_pre[None, :], sig + eps, post_scale * sig)
    tl.store(hpre_ptr + toks[:, None] * N + pp[None, :], h, mask=tmask[:, None] & (is_pre & pp_valid)[None, :])
    tl.store(
        hpost_ptr + toks[:, None] * N + (pp - 8)[None, :], h, mask=tmask[:, None] & (~is_pre & pp_valid)[None, :]
    )

    # H_res = Sinkhorn(α_res·m + b) in paper orientation
    b_res = tl.load(base_ptr + res_row, mask=res_valid, other=0.0)
    logits = tl.reshape(tl.load(scale_ptr + 2) * m_res + b_res[None, :], (BT, NP, NP))
    ii = tl.arange(0, NP)[None, :, None]
    jj = tl.arange(0, NP)[None, None, :]
    valid = (ii < N) & (jj < N)
    hres = _sinkhorn_fwd(logits, valid, eps, ITERS)
    t3 = toks[:, None, None]
    tl.store(hres_ptr + t3 * (N * N) + ii * N + jj, hres, mask=valid & tmask[:, None, None])


@triton.jit
def _coef_fwd_kernel(
    x_ptr,  # [T, K] stream dtype
    fn_ptr,  # [n²+2n, K] fp32 (MODE_FMA), else its bf16 hi part
    fnlo_ptr,  # [n²+2n, K] bf16 lo part (unused in MODE_FMA)
    scale_ptr,  # [3] fp32
    base_ptr,  # [n²+2n] fp32
    hpre_ptr,  # [T, n] fp32 out
    hpost_ptr,  # [T, n] fp32 out
    hres_ptr,  # [T, n, n] fp32 out
    mpp_ptr,  # [T, 16] fp32 out (saved m, packed)
    mres_ptr,  # [T, NP²] fp32 out (saved m, packed)
    rinv_ptr,  # [T] fp32 out (saved 1/r)
    T,
    eps,
    rms_eps,
    post_scale,
    K: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    ITERS: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    MODE: tl.constexpr,
):
    # grid (cdiv(T, BT),): BT tokens per program, K (= n·C, a compile-time constant) in BK chunks
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = toks < T
    toks = toks.to(tl.int64)
    pp_row, pp_valid, _ = _pp_rows(N)
    res_row, res_valid = _res_rows(N, NP)

    acc_pp = tl.zeros([BT, 16], dtype=tl.float32)
    acc_res = tl.zeros([BT, NP * NP], dtype=tl.float32)
    sumsq = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + toks[:, None] * K + ks[None, :], mask=tmask[:, None], other=0.0)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        off_pp = pp_row[None, :] * K + ks[:, None]  # fnᵀ tiles [BK, 16] and [BK, NP²]
        off_res = res_row[None, :] * K + ks[:, None]
        acc_pp = dot_stream_fn(x, fn_ptr + off_pp, fnlo_ptr + off_pp, pp_valid[None, :], acc_pp, MODE)
        acc_res = dot_stream_fn(x, fn_ptr + off_res, fnlo_ptr + off_res, res_valid[None, :], acc_res, MODE)

    coef_epilogue(
        acc_pp, acc_res, sumsq, toks, tmask, scale_ptr, base_ptr, hpre_ptr, hpost_ptr, hres_ptr, mpp_ptr, mres_ptr,
        rinv_ptr, eps, rms_eps, post_scale, K, N, NP, ITERS, BT, 0,  # RELOAD: 0
    )  # fmt: skip


@triton.jit
def _coef_bwd_token_kernel(
    mpp_ptr,  # [T, 16] fp32 saved m
    mres_ptr,  # [T, NP²] fp32 saved m
    rinv_ptr,  # [T] fp32 saved 1/r
    scale_ptr,
    base_ptr,
    dhpre_ptr,  # [T, n] fp32
    dhpost_ptr,  # [T, n] fp32
    dhres_ptr,  # [T, n, n] fp32
    dm_ptr,  # [T, W] fp32 out: dL/dm̂, merged columns [pre/post | res | padding never read]
    cx_ptr,  # [T] fp32 out: coefficient of x in dx (from 1/r)
    part_ptr,  # [programs, n²+2n+3] fp32 out: per-program partial sums of [dbase | dscale]
    T,
    eps,
    post_scale,
    K: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    ITERS: tl.constexpr,
    BT: tl.constexpr,
    W: tl.constexpr,
):
    # grid (cdiv(T, BT),): BT tokens per program; touches only O(n²) values per token
    pid = tl.program_id(0)
    toks = pid * BT + tl.arange(0, BT)
    tmask = toks < T
    toks = toks.to(tl.int64)
    pp = tl.arange(0, 16)
    rr = tl.arange(0, NP * NP)
    pp_row, pp_valid, is_pre = _pp_rows(N)
    res_row, res_valid = _res_rows(N, NP)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)

    rinv = tl.load(rinv_ptr + toks, mask=tmask, other=0.0)
    m_pp = tl.load(mpp_ptr + toks[:, None] * 16 + pp[None, :], mask=tmask[:, None], other=0.0)
    m_res = tl.load(mres_ptr + toks[:, None] * (NP * NP) + rr[None, :], mask=tmask[:, None], other=0.0)

    # pre / post: σ' (the ε of H_pre is additive)
    alpha = tl.where(is_pre, s0, s1)
    b_pp = tl.load(base_ptr + pp_row, mask=pp_valid, other=0.0)
    sig = tl.sigmoid(alpha[None, :] * m_pp + b_pp[None, :])
    gmask = tmask[:, None] & pp_valid[None, :]
    g_pre = tl.load(dhpre_ptr + toks[:, None] * N + pp[None, :], mask=gmask & is_pre[None, :], other=0.0)
    g_post = tl.load(dhpost_ptr + toks[:, None] * N + (pp - 8)[None, :], mask=gmask & ~is_pre[None, :], other=0.0)
    dz = (g_pre + post_scale * g_post) * sig * (1.0 - sig)  # d(pre/post logit), 0 on padding
    dm_pp = dz * alpha[None, :]

    # res: Sinkhorn backward on [BT, NP, NP]
    b_res = tl.load(base_ptr + res_row, mask=res_valid, other=0.0)
    logits = tl.reshape(s2 * m_res + b_res[None, :], (BT, NP, NP))
    ii = tl.arange(0, NP)[None, :, None]
    jj = tl.arange(0, NP)[None, None, :]
    valid = (ii < N) & (jj < N)
    # loaded as [BT, NP²] and reshaped like the logits: both then share one register layout (a 3-D
    # load got another, and every Sinkhorn step paid a layout conversion through shared memory)
    res_i = rr // NP
    res_j = rr % NP
    g_res = tl.load(
        dhres_ptr + toks[:, None] * (N * N) + (res_i * N + res_j)[None, :],
        mask=tmask[:, None] & ((res_i < N) & (res_j < N))[None, :],
        other=0.0,
    )
    g_res = tl.reshape(g_res, (BT, NP, NP))
    dl = tl.reshape(_sinkhorn_bwd(logits, valid, g_res, eps, ITERS), (BT, NP * NP))
    dm_res = dl * s2

    # m = m̂·(1/r): dm̂ = dm/r; d(1/r) = Σ dm·m̂ = r·Σ dm·m; d(1/r)/dx = −(1/r)³·x/K
    dot_mm = tl.sum(dm_pp * m_pp, axis=1) + tl.sum(dm_res * m_res, axis=1)
    tl.store(cx_ptr + toks, -dot_mm * rinv * rinv / K, mask=tmask)
    tl.store(dm_ptr + toks[:, None] * W + pp[None, :], dm_pp * rinv[:, None], mask=tmask[:, None])
    tl.store(dm_ptr + toks[:, None] * W + 16 + rr[None, :], dm_res * rinv[:, None], mask=tmask[:, None])

    # α and b: partial sums over this program's tokens (padding tokens contribute exact zeros)
    dsc_pre = tl.sum(tl.sum(tl.where(is_pre[None, :], dz * m_pp, 0.0), axis=1), axis=0)
    dsc_post = tl.sum(tl.sum(tl.where(is_pre[None, :], 0.0, dz * m_pp), axis=1), axis=0)
    dsc_res = tl.sum(tl.sum(dl * m_res, axis=1), axis=0)
    R: tl.constexpr = N * N + 2 * N
    row = part_ptr + pid * (R + 3)
    tl.store(row + R, dsc_pre)
    tl.store(row + R + 1, dsc_post)
    tl.store(row + R + 2, dsc_res)
    tl.store(row + pp_row, tl.sum(dz, axis=0), mask=pp_valid)
    tl.store(row + res_row, tl.sum(dl, axis=0), mask=res_valid)


@triton.jit
def _coef_bwd_x_kernel(
    x_desc,  # [T, K] stream dtype, tiles [BT, BK]
    fn_ptr,  # [n²+2n, K] fp32
    dm_desc,  # [T, W] fp32 (columns: see _gradient_rows), tiles [BT, W]
    cx_ptr,  # [T] fp32
    add_ptr,  # [T, K] stream dtype: a gradient to add into dx when ADD (else None)
    dy_ptr,  # [T / DY_ROWS, C]: the pre-mix's output gradient when MIX (else None)
    hpre_ptr,  # [T, n] fp32: the pre-mix's coefficients when MIX (else None)
    dx_desc,  # [T, K] stream dtype out
    dfn_ptr,  # [groups, ROWS, K] fp32 out: partial sums per token group
    T,
    C: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    W: tl.constexpr,
    ROWS: tl.constexpr,
    MERGED: tl.constexpr,
    DY_ROWS: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
    MODE: tl.constexpr,
    ADD: tl.constexpr,
    MIX: tl.constexpr,
):
    # grid (K // BK, groups): the program owns columns [kb·BK, +BK) for TILES·BT consecutive tokens,
    # so x is read once for both products and dfn needs no atomics. With MIX, BK divides C: the
    # columns lie in one stream, whose pre-mix gradient h_pre[stream]·dy is summed into dx here.
    # HC runs this kernel on rows (token, stream) of its streams: N = 1, and DY_ROWS = n rows
    # share one token's dy.
    # The tiles that feed tensor-core products (x, dm) and the dx tile move by the copy engine (TMA
    # descriptors; rows past T read as zeros and are not written): against per-thread loads,
    # 434 -> 387 µs at T = 16384, C = 4096 (H100, torchmhc bench), with 167 registers instead of
    # 255 (243 with MIX + ADD; offline sm_90a compile with Triton 3.6, benchmarks/registers.py), so
    # 3 pipeline stages fit without spilling. The others stay
    # per-thread loads: Triton pipelines only the former, and a TMA load it does not pipeline is
    # issued and then waited for at once (Nsight Compute: half the stalls of the MIX + ADD loop;
    # per-thread loads there took the chained step from 682 to 659 µs)
    K: tl.constexpr = N * C
    k0 = tl.program_id(0) * BK
    ks = k0 + tl.arange(0, BK)
    stream = k0 // C
    group = tl.program_id(1)
    rows, valid = _gradient_rows(N, NP, W, ROWS, MERGED)
    # fnᵀ tile [W, BK], resident for the whole token loop (bf16 parts split once)
    w = tl.load(fn_ptr + rows[:, None] * K + ks[None, :], mask=valid[:, None], other=0.0)
    if MODE != 0:
        w, w_lo = split2(w)
    else:
        w_lo = w
    # dfnᵀ = xᵀ·dm accumulated as [BK, W]: the stream tile is the left operand, so M = BK is
    # large enough for warp-group tensor-core products
    dfn_t = tl.zeros([BK, W], dtype=tl.float32)
    for it in range(TILES):
        t0 = (group * TILES + it) * BT
        toks = t0 + tl.arange(0, BT)
        tmask = toks < T
        toks = toks.to(tl.int64)
        x = x_desc.load([t0, k0])
        dm = tl.where(valid[None, :], dm_desc.load([t0, 0]), 0.0)  # padding columns are never written
        cx = tl.load(cx_ptr + toks, mask=tmask, other=0.0)
        dx = _dot_dm_fn(dm, w, w_lo, cx[:, None] * x.to(tl.float32), MODE)
        if MIX or ADD:  # the stream's other gradients, summed here instead of in separate passes
            other = tl.zeros([BT, BK], dtype=tl.float32)
            if MIX:
                h = tl.load(hpre_ptr + toks * N + stream, mask=tmask, other=0.0)
                dy_offs = (toks // DY_ROWS)[:, None] * C + (ks - stream * C)[None, :]
                dy = tl.load(dy_ptr + dy_offs, mask=tmask[:, None], other=0.0)
                other = h[:, None] * dy.to(tl.float32)
            if ADD:
                other += tl.load(add_ptr + toks[:, None] * K + ks[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            dx += other
        dx_desc.store([t0, k0], dx.to(dx_desc.dtype))
        dfn_t = dot_bf16_f32(tl.trans(x), dm, dfn_t, MODE)
    tl.store(dfn_ptr + group * ROWS * K + rows[None, :] * K + ks[:, None], dfn_t, mask=valid[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _np(n: int) -> int:
    # tl.dot needs every dimension >= 16, so the NP x NP res block is at least 4 x 4
    return max(4, next_pow2(n))


def empty_coefficient_outputs(x: Tensor) -> tuple[Tensor, ...]:
    """Uninitialized ``(h_pre, h_post, h_res, m_pp, m_res, rinv)`` fp32 for ``x [T, n, C]``: what the
    forward launchers write and the fake impls return."""
    t, n, _ = x.shape
    np_ = _np(n)
    f32 = dict(dtype=torch.float32, device=x.device)
    shapes = ((t, n), (t, n), (t, n, n), (t, PP), (t, np_ * np_), (t,))
    return tuple(torch.empty(shape, **f32) for shape in shapes)


def coefficients_fwd(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    iters: int,
    eps: float,
    rms_eps: float,
    post_scale: float,
    *,
    block_t: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher. ``x [T, n, C]`` contiguous (bf16/fp16/fp32, C % 64 == 0, n <= 8),
    ``fn [n²+2n, n·C]``, ``scale [3]``, ``base [n²+2n]`` fp32 contiguous
    -> ``(h_pre [T, n], h_post [T, n], h_res [T, n, n], m_pp [T, 16], m_res [T, NP²], rinv [T])``,
    all fp32; the last three are what the backward needs. The keyword arguments are tile sizes
    (tokens and channels per step; ``block_k`` defaults to 128 for 16-bit streams and 64 for fp32,
    whose staged tiles would not fit in shared memory) and launch options. Defaults: the fastest of
    ``benchmarks/tune.py`` on an H100 (128 tokens, 8 warps, 4 stages for 16-bit streams and n <= 4
    when that still gives every multiprocessor a program, else 64 tokens, 4 warps, 4 stages: 56 → 52
    µs at T = 8192, C = 1280; 64, 4, 3 for fp32 streams or n > 4)."""
    t, n, c = x.shape
    k = n * c
    outs = empty_coefficient_outputs(x)
    if t == 0:
        return outs
    narrow = n <= 4 and x.dtype != torch.float32  # 16-bit streams, at most 4: the staged tiles fit 4 stages
    wide = narrow and cdiv(t, 128) >= num_sms(x.device)
    bt = token_block(block_t or (128 if wide else 64))
    mode = precision_mode(x)
    fn_hi, fn_lo = (fn, fn) if mode == MODE_FMA else split_bf16(fn)
    _coef_fwd_kernel[(cdiv(t, bt),)](
        x, fn_hi, fn_lo, scale, base, *outs, t, eps, rms_eps, post_scale,
        K=k, N=n, NP=_np(n), ITERS=iters, BT=bt, BK=channel_block(k, block_k or (64 if x.dtype == torch.float32 else 128)),
        MODE=mode, num_warps=num_warps or (8 if wide else 4), num_stages=num_stages or (4 if narrow else 3),
    )  # fmt: skip
    return outs


def coefficients_bwd_tokens(
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    scale: Tensor,
    base: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    k: int,
    iters: int,
    eps: float,
    post_scale: float,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher of backward step 1 (σ' and Sinkhorn backward; reads O(n²) values a token).
    Saved ``m_pp [T, 16]``, ``m_res [T, NP²]``, ``rinv [T]``; ``dh_pre``/``dh_post [T, n]``,
    ``dh_res [T, n, n]`` fp32; ``k`` = n·C; ``block_t`` tokens per program and ``num_warps``
    (defaults from ``benchmarks/tune.py``, H100: 32 and 4 for n <= 4; 16 and 8 for n > 4, whose
    kept Sinkhorn steps need the registers) -> ``(dm [T, W], cx [T], dscale [3], dbase [n²+2n])`` fp32, with dm
    in the merged column layout of :func:`merged_width`."""
    t, n = dh_pre.shape
    block_t = block_t or (32 if n <= 4 else 16)
    if block_t < 16:  # with 2 warps, 8-token tiles gave wrong gradients on an H100 (Triton 3.6)
        raise ValueError(f"block_t must be >= 16, got {block_t}")
    np_ = _np(n)
    dev = m_pp.device
    bt = token_block(block_t)
    progs = cdiv(t, bt)
    width = merged_width(n)
    dm = torch.empty((t, width), dtype=torch.float32, device=dev)
    cx = torch.empty((t,), dtype=torch.float32, device=dev)
    rows = n * n + 2 * n
    part = torch.empty((progs, rows + 3), dtype=torch.float32, device=dev)
    _coef_bwd_token_kernel[(progs,)](
        m_pp, m_res, rinv, scale, base, dh_pre, dh_post, dh_res, dm, cx, part,
        t, eps, post_scale, K=k, N=n, NP=np_, ITERS=iters, BT=bt, W=width,
        num_warps=num_warps or (4 if n <= 4 else 8),
    )  # fmt: skip
    # fixed-order sums over programs: deterministic (two reductions: views of one sum would alias
    # the registered op's outputs, which its schema does not allow)
    return dm, cx, part[:, rows:].sum(0), part[:, :rows].sum(0)


def merged_width(n: int) -> int:
    """Columns of the backward's merged gradient block: [pre/post (16) | res (NP²)], padded to a
    power of two (32 for n <= 4, 128 for n = 8)."""
    return next_pow2(PP + _np(n) ** 2)


def coefficients_bwd_x(
    x: Tensor,
    fn: Tensor,
    dm: Tensor,
    cx: Tensor,
    *,
    block_t: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    waves: int | None = None,
    add: Tensor | None = None,
    mix: tuple[Tensor, Tensor] | None = None,
    per_stream: bool = False,
) -> tuple[Tensor, Tensor]:
    """Launcher of backward step 2: ``x [T, n, C]``, ``fn [n²+2n, n·C]`` fp32 and step 1's
    ``dm [T, W]``, ``cx [T]`` -> ``(dx [T, n, C] x.dtype, dfn [n²+2n, n·C] fp32)``, one read of x.
    Tile sizes and launch options as keywords: ``block_t`` defaults to 64 tokens, 32 for n > 4,
    whose gradient tiles are 128 wide; ``block_k`` to 128, 64 for fp32 streams and for n > 4, whose
    128-wide gradient block would spill registers (rounded to a power of two dividing C);
    ``waves``, programs per multiprocessor to aim for, to 2, or 4 when there are fewer column
    blocks than multiprocessors. Other gradients of x summed into dx in the same
    pass: ``add [T, n, C]`` (x.dtype, contiguous) and, for a pre-mix ``y = Σ_j h_pre[j]·x[j]`` of
    the same streams, ``mix = (dy [T, C], h_pre [T, n] fp32)``, contiguous: ``h_pre ⊗ dy``.
    ``num_stages`` defaults to 3 (with the tiles moved by TMA, also with ``mix``: no spills).

    ``per_stream`` (the original HC, ``hc_coefficients_op.py``): each stream has its own RMS and
    its own projection by a shared ``fn [n + 2, C]``; ``dm [T·n, 16]`` (column p is fn row p) and
    ``cx [T·n]`` are per (token, stream), and dfn is ``[n + 2, C]``. The kernel then runs on the
    rows ``[T·n, 1, C]`` of the streams, n rows sharing one token's dy."""
    dx = torch.empty_like(x)
    shape = x.shape
    dy_rows = 1
    if per_stream:
        t, n, c = x.shape
        x, dx = x.view(t * n, 1, c), dx.view(t * n, 1, c)
        add = None if add is None else add.view(t * n, 1, c)
        mix = None if mix is None else (mix[0], mix[1].view(t * n, 1))
        dy_rows = n
    t, n, c = x.shape
    k = n * c
    bt = token_block(block_t or (64 if n <= 4 else 32))  # n = 8, chained: 4069 -> 3561 µs (H100)
    # a power of two dividing C (a multiple of 64): a column block lies in one stream
    block_k = channel_block(c, block_k or (128 if x.dtype != torch.float32 and n <= 4 else 64))
    k_blocks = k // block_k
    t_blocks = cdiv(t, bt)
    tiles, groups = token_runs(t_blocks, k_blocks, x.device, waves)
    dfn_part = torch.empty((groups, *fn.shape), dtype=torch.float32, device=x.device)
    w = dm.shape[1]
    dy, h_pre = (None, None) if mix is None else mix  # unused inputs: None (compile-time constants)
    _coef_bwd_x_kernel[(k_blocks, groups)](
        tile_descriptor(x.view(t, k), [bt, block_k]), fn, tile_descriptor(dm, [bt, w]), cx, add, dy, h_pre,
        tile_descriptor(dx.view(t, k), [bt, block_k]), dfn_part, t,
        C=c, N=n, NP=_np(n), W=w, ROWS=fn.shape[0], MERGED=not per_stream, DY_ROWS=dy_rows, BT=bt, BK=block_k,
        TILES=tiles, MODE=precision_mode(x), ADD=add is not None, MIX=mix is not None, num_warps=num_warps,
        num_stages=num_stages or 3,
    )  # fmt: skip
    return dx.view(shape), (dfn_part[0] if groups == 1 else dfn_part.sum(0))


def coefficients_bwd(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    iters: int,
    eps: float,
    post_scale: float,
    *,
    add: Tensor | None = None,
    mix: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher. The forward's inputs and saved ``(m_pp, m_res, rinv)``, and the fp32 gradients
    ``dh_pre [T, n]``, ``dh_post [T, n]``, ``dh_res [T, n, n]`` (contiguous)
    -> ``(dx [T, n, C] x.dtype, dfn [n²+2n, n·C], dscale [3], dbase [n²+2n])`` fp32 parameters' grads.
    x's other gradients, summed into dx in the dx pass: ``add [T, n, C]`` and a pre-mix's
    ``mix = (dy [T, C], h_pre [T, n])`` (see :func:`coefficients_bwd_x`)."""
    t, n, c = x.shape
    if t == 0:
        return torch.empty_like(x), torch.zeros_like(fn), torch.zeros_like(scale), torch.zeros_like(base)
    dm, cx, dscale, dbase = coefficients_bwd_tokens(
        m_pp, m_res, rinv, scale, base, dh_pre, dh_post, dh_res, n * c, iters, eps, post_scale
    )
    dx, dfn = coefficients_bwd_x(x, fn, dm, cx, add=add, mix=mix)
    return dx, dfn, dscale, dbase


# ----------------------------------------------------------------------------------------------
# Registered ops: opaque to torch.compile (fake impls give shapes), autograd attached
# ----------------------------------------------------------------------------------------------


def coefficients_backward(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    dh_pre: Tensor,
    dh_post: Tensor,
    dh_res: Tensor,
    iters: int,
    eps: float,
    post_scale: float,
    add: Tensor | None = None,
    mix_dy: Tensor | None = None,
    mix_h: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`coefficients_bwd` with x's other gradients as plain arguments (the registered op's
    signature): ``add`` (or None) is summed into dx, and so is ``mix_h ⊗ mix_dy`` when both are
    given (a pre-mix of x: its ``h_pre [T, n]`` and ``dy [T, C]``)."""
    mix = None if mix_dy is None or mix_h is None else (mix_dy, mix_h)
    return coefficients_bwd(
        x, fn, scale, base, m_pp, m_res, rinv, dh_pre, dh_post, dh_res, iters, eps, post_scale, add=add, mix=mix
    )


#: ``x [T, n, C]`` -> ``(h_pre, h_post, h_res, m_pp, m_res, rinv)``; see :func:`coefficients_fwd`.
coefficients_op = define_op(
    "mhc_coefficients",
    "(Tensor x, Tensor fn, Tensor scale, Tensor base, int iters, float eps, float rms_eps, float post_scale)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    coefficients_fwd,
    lambda x, *_: empty_coefficient_outputs(x),
)
#: :func:`coefficients_backward`.
coefficients_backward_op = define_op(
    "mhc_coefficients_backward",
    "(Tensor x, Tensor fn, Tensor scale, Tensor base, Tensor m_pp, Tensor m_res, Tensor rinv, Tensor dh_pre,"
    " Tensor dh_post, Tensor dh_res, int iters, float eps, float post_scale, Tensor? add=None,"
    " Tensor? mix_dy=None, Tensor? mix_h=None) -> (Tensor, Tensor, Tensor, Tensor)",
    coefficients_backward,
    lambda x, fn, scale, base, *_, **__: tuple(torch.empty_like(t) for t in (x, fn, scale, base)),
)


def _setup_context(ctx, inputs, output) -> None:
    x, fn, scale, base, iters, eps, _rms_eps, post_scale = inputs
    _, _, _, m_pp, m_res, rinv = output
    ctx.save_for_backward(x, fn, scale, base, m_pp, m_res, rinv)
    ctx.config = (iters, eps, post_scale)


def _backward(ctx, d_pre, d_post, d_res, _d_mpp, _d_mres, _d_rinv):
    x, fn, scale, base, m_pp, m_res, rinv = ctx.saved_tensors
    iters, eps, post_scale = ctx.config
    t, n, _ = x.shape
    like_pre = rinv.new_empty((t, n))
    dx, dfn, dscale, dbase = eager_or_compiled(coefficients_backward_op, coefficients_backward, x)(
        x, fn, scale, base, m_pp, m_res, rinv,
        grad_or_zeros(d_pre, like_pre), grad_or_zeros(d_post, like_pre),
        grad_or_zeros(d_res, rinv.new_empty((t, n, n))), iters, eps, post_scale,
    )  # fmt: skip
    # one gradient per input: (x, fn, scale, base, iters, eps, rms_eps, post_scale)
    return dx, dfn, dscale, dbase, None, None, None, None


torch.library.register_autograd("torchmhc::mhc_coefficients", _backward, setup_context=_setup_context)


class Coefficients(torch.autograd.Function):
    """:func:`coefficients_op` in eager mode: the launcher, the same context and backward, no
    custom-op dispatch (``_common.eager_or_compiled``)."""

    @staticmethod
    def forward(ctx, *inputs):
        # a forward taking ctx: Function.apply inspects the signature of one with setup_context
        out = coefficients_fwd(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(_backward)
