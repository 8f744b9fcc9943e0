"""Cross-sub-layer fusion: F_post,res of sub-layer l and the coefficient pass of sub-layer l+1.

Both touch the same n·C stream values of a token. The paper's decomposition writes
``x_{l+1} = h_res·x_l + h_post·f`` and then reads ``x_{l+1}`` back to compute its coefficients;
here each tile of ``x_{l+1}`` is rounded to the stream dtype, written, and fed to the projection
and the sum of squares while still in registers. Per sub-layer the streams are read (2n + 1)·C
times less n·C: reads (n + 1)·C and writes n·C for both steps together, instead of (2n + 1)·C and n·C.

The coefficients come from the rounded, stored ``x_{l+1}``, so the result is what the unfused
pipeline computes (up to the order of fp32 sums).

Speed (H100, ``benchmarks/kernels.py``): 516 µs at T = 16384, C = 4096, n = 4 (79% of a copy)
against 412 + 206 µs for the post-res and coefficient kernels it replaces; 104 µs at T = 8192,
C = 1280 and 156 µs at C = 2048, against 70 + 52 and 106 + 73. The source tiles move by the copy
engine (TMA); with per-thread loads it took 637 µs at the main shape. What keeps it under the copy
rate (Nsight Compute, per-thread-load version): warps wait on shared memory (short-scoreboard
stalls, ~33 M bank conflicts) while the mixed tile is moved into the tensor-core operand layout.

Backward reuses the two-step coefficient backward (whose dx step adds the incoming gradient of
``x_{l+1}`` in the same pass) and then the F_post,res backward.

Legend: T tokens, n streams, C channels, K = n·C; see ``coefficients_op.py`` for the packed layouts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import channel_block, num_sms, tile_descriptor
from torchmhc.kernels._precision import MODE_FMA, precision_mode, split_bf16
from torchmhc.kernels.coefficients_op import (
    empty_coefficient_outputs,
    _dot_fn,
    _np,
    _pp_rows,
    _res_rows,
    _token_block,
    coef_epilogue,
    coefficients_bwd_tokens,
    coefficients_bwd_x,
)
from torchmhc.kernels.post_res_op import post_res_bwd

__all__ = ["post_res_coefficients_fwd", "post_res_coefficients_op"]


@triton.jit
def _post_res_coef_fwd_kernel(
    x_desc,  # [T, n·C] streams of sub-layer l, tiles [BT, BC] (one stream's channels)
    f_desc,  # [T, C] branch output of sub-layer l, tiles [BT, BC]
    hpost_ptr,  # [T, n] fp32, sub-layer l
    hres_ptr,  # [T, n, n] fp32, sub-layer l (paper orientation)
    out_ptr,  # [T, n, C] out: streams x_{l+1}
    fn_ptr,  # sub-layer l+1: [n²+2n, K] fp32 (MODE_FMA) or bf16 hi part
    fnlo_ptr,  # bf16 lo part (unused in MODE_FMA)
    scale_ptr,
    base_ptr,
    hpre2_ptr,  # [T, n] fp32 out: sub-layer l+1's coefficients
    hpost2_ptr,
    hres2_ptr,
    mpp_ptr,  # saved for the backward, as in coefficients_op
    mres_ptr,
    rinv_ptr,
    T,
    eps,
    rms_eps,
    post_scale,
    C: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    ITERS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    MODE: tl.constexpr,
):
    # grid (cdiv(T, BT),): BT tokens per program, C in BC chunks. A chunk is a [BT, NP, BC] tile of
    # x_{l+1} (destination streams on axis 1) built from the n source rows, each loaded once, then
    # stored and fed to the projection as one [BT, NP·BC] operand while still in registers. The
    # source tiles move by the copy engine (TMA): 637 -> 516 µs at T = 16384, C = 4096 (H100)
    K: tl.constexpr = N * C
    t0 = tl.program_id(0) * BT
    toks = t0 + tl.arange(0, BT)
    tmask = toks < T
    toks = toks.to(tl.int64)
    t3 = toks[:, None, None]
    m3 = tmask[:, None, None]
    ii = tl.arange(0, NP)[None, :, None]
    imask = m3 & (ii < N)
    # sub-layer l's coefficients, loaded once: h_post and the n columns h_res[:, :, j], [BT, NP, 1] each
    h_post = tl.load(hpost_ptr + t3 * N + ii, mask=imask, other=0.0)
    h_cols = ()
    for j in tl.static_range(N):
        h_cols = h_cols + (tl.load(hres_ptr + t3 * (N * N) + ii * N + j, mask=imask, other=0.0),)
    # the projection's K index of operand column (i, c) is i·C + c0 + c
    kk = tl.arange(0, NP * BC)
    k_stream = kk // BC
    k_valid = k_stream < N
    pp_row, pp_valid, _ = _pp_rows(N)
    res_row, res_valid = _res_rows(N, NP)
    pp_mask = k_valid[:, None] & pp_valid[None, :]
    res_mask = k_valid[:, None] & res_valid[None, :]
    acc_pp = tl.zeros([BT, 16], dtype=tl.float32)
    acc_res = tl.zeros([BT, NP * NP], dtype=tl.float32)
    sumsq = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)[None, None, :]
        y = h_post * tl.reshape(f_desc.load([t0, c0]), (BT, 1, BC)).to(tl.float32)
        for j in tl.static_range(N):  # source stream j scales into every destination row
            xj = tl.reshape(x_desc.load([t0, j * C + c0]), (BT, 1, BC))
            y += h_cols[j] * xj.to(tl.float32)
        yq = y.to(out_ptr.dtype.element_ty)  # what is stored is what the next pass sees
        tl.store(out_ptr + (t3 * N + ii) * C + cc, yq, mask=imask)
        yf = yq.to(tl.float32)
        sumsq += tl.sum(tl.sum(yf * yf, axis=2), axis=1)
        operand = tl.reshape(yq, (BT, NP * BC))
        ks = k_stream * C + c0 + kk % BC
        off_pp = pp_row[None, :] * K + ks[:, None]
        off_res = res_row[None, :] * K + ks[:, None]
        acc_pp = _dot_fn(operand, fn_ptr + off_pp, fnlo_ptr + off_pp, pp_mask, acc_pp, MODE)
        acc_res = _dot_fn(operand, fn_ptr + off_res, fnlo_ptr + off_res, res_mask, acc_res, MODE)
    coef_epilogue(
        acc_pp, acc_res, sumsq, toks, tmask, scale_ptr, base_ptr, hpre2_ptr, hpost2_ptr, hres2_ptr, mpp_ptr,
        mres_ptr, rinv_ptr, eps, rms_eps, post_scale, K, N, NP, ITERS, BT,
    )  # fmt: skip


def post_res_coefficients_fwd(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    iters: int,
    eps: float,
    rms_eps: float,
    post_scale: float,
    *,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher. Sub-layer l: ``x [T, n, C]`` (bf16/fp16/fp32), ``f_out [T, C]``, ``h_post [T, n]``,
    ``h_res [T, n, n]`` fp32; sub-layer l+1: ``fn [n²+2n, n·C]``, ``scale [3]``, ``base [n²+2n]``
    fp32; all contiguous -> ``(x_next [T, n, C] x.dtype, h_pre [T, n], h_post [T, n],
    h_res [T, n, n], m_pp [T, 16], m_res [T, NP²], rinv [T])`` (coefficients of l+1, fp32).
    Tiles: ``block_t`` tokens by ``block_c`` channels of every stream per step. Defaults from
    ``benchmarks/tune.py`` on an H100: 32 channels and 4 stages for 16-bit streams and n <= 4, with
    128 tokens and 8 warps where T is large enough to keep the multiprocessors busy, else 64 and 4;
    otherwise 64 x 16, 4 warps, 3 stages (2 for n > 4: 2188 -> 1924 µs at n = 8), whose staged
    tiles fit in shared memory."""
    t, n, c = x.shape
    x_next = torch.empty_like(x)
    outs = empty_coefficient_outputs(x)
    if t == 0:
        return (x_next, *outs)
    narrow = n <= 4 and x.dtype != torch.float32
    # one program per multiprocessor: 128-token tiles only where they still keep 7/8 of them busy
    # (H100: T = 16384, 128 tokens 525 µs against 593 at 64; T = 8192, 64 tokens 99 µs against 160)
    wide = narrow and 8 * triton.cdiv(t, 128) >= 7 * num_sms(x.device)
    bt = _token_block(block_t or (128 if wide else 64))
    block_c = channel_block(c, block_c or (32 if narrow else 16))
    mode = precision_mode(x)
    fn_hi, fn_lo = (fn, fn) if mode == MODE_FMA else split_bf16(fn)
    _post_res_coef_fwd_kernel[(triton.cdiv(t, bt),)](
        tile_descriptor(x.view(t, n * c), [bt, block_c]), tile_descriptor(f_out, [bt, block_c]),
        h_post, h_res, x_next, fn_hi, fn_lo, scale, base, *outs, t, eps, rms_eps, post_scale,
        C=c, N=n, NP=_np(n), ITERS=iters, BT=bt, BC=block_c, MODE=mode,
        num_warps=num_warps or (8 if wide else 4), num_stages=num_stages or (4 if narrow else 3 if n <= 4 else 2),
    )  # fmt: skip
    return (x_next, *outs)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("torchmhc::post_res_coefficients", mutates_args=())
def post_res_coefficients_op(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    iters: int,
    eps: float,
    rms_eps: float,
    post_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`post_res_coefficients_fwd`."""
    return post_res_coefficients_fwd(x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale)


@post_res_coefficients_op.register_fake
def _(x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale):
    return (torch.empty_like(x), *empty_coefficient_outputs(x))


@torch.library.custom_op("torchmhc::post_res_coefficients_backward", mutates_args=())
def _post_res_coefficients_backward_op(
    d_next: Tensor,
    d_pre: Tensor,
    d_post: Tensor,
    d_res: Tensor,
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    x_next: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    iters: int,
    eps: float,
    post_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    t, n, c = x.shape
    if t == 0:
        zeros = [torch.zeros_like(p) for p in (fn, scale, base)]
        return torch.empty_like(x), torch.empty_like(f_out), torch.empty_like(h_post), torch.empty_like(h_res), *zeros
    dm, cx, dscale, dbase = coefficients_bwd_tokens(
        m_pp, m_res, rinv, scale, base, d_pre, d_post, d_res, n * c, iters, eps, post_scale
    )
    # total gradient of x_{l+1}: the coefficient pass's share plus what came from downstream
    d_total, dfn = coefficients_bwd_x(x_next, fn, dm, cx, add=d_next)
    dx, df, dh_post, dh_res = post_res_bwd(d_total, x, f_out, h_post, h_res)
    return dx, df, dh_post, dh_res, dfn, dscale, dbase


@_post_res_coefficients_backward_op.register_fake
def _(d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, *_saved_and_config):
    return (
        torch.empty_like(x),
        torch.empty_like(f_out),
        torch.empty_like(h_post),
        torch.empty_like(h_res),
        torch.empty_like(fn),
        torch.empty_like(scale),
        torch.empty_like(base),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, f_out, h_post, h_res, fn, scale, base, iters, eps, _rms_eps, post_scale = inputs
    x_next, _, _, _, m_pp, m_res, rinv = output
    ctx.save_for_backward(x, f_out, h_post, h_res, x_next, fn, scale, base, m_pp, m_res, rinv)
    ctx.config = (iters, eps, post_scale)


def _backward(ctx, d_next, d_pre, d_post, d_res, _d_mpp, _d_mres, _d_rinv):
    x, f_out, h_post, h_res, x_next, fn, scale, base, m_pp, m_res, rinv = ctx.saved_tensors
    iters, eps, post_scale = ctx.config
    t, n, _ = x.shape

    def grad(g: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return like.new_zeros(shape) if g is None else g.contiguous()

    grads = _post_res_coefficients_backward_op(
        grad(d_next, tuple(x.shape), x), grad(d_pre, (t, n), rinv), grad(d_post, (t, n), rinv),
        grad(d_res, (t, n, n), rinv), x, f_out, h_post, h_res, x_next, fn, scale, base, m_pp, m_res, rinv,
        iters, eps, post_scale,
    )  # fmt: skip
    # one gradient per input: (x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale)
    return (*grads, None, None, None, None)


post_res_coefficients_op.register_autograd(_backward, setup_context=_setup_context)
