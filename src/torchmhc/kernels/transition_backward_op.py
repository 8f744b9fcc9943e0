"""The transition's backward in one pass over the streams: the coefficient dx/dfn pass of sub-layer
l+1 and the F_post,res backward of sub-layer l, fused.

The transition's forward (``post_res_coefficients_op``) computes ``x_{l+1} = h_res·x_l + h_post·f``
and, from x_{l+1}, the coefficients and the pre-mix of sub-layer l+1. Its backward in two passes
writes the total gradient of x_{l+1},

    d[i] = dm @ fn[:, i] + c_x·x_{l+1}[i] + h_pre[i]·dy + d_next[i]     (coefficients, pre-mix, downstream)

and reads it back for the post-res backward of l:

    dx_l[j] = Σ_i h_res[i, j]·d[i],   df = Σ_i h_post[i]·d[i],
    dh_res[i, j] = Σ_c d[i, c]·x_l[j, c],   dh_post[i] = Σ_c d[i, c]·f[c].

That pass reads x_{l+1}, d_next and dy and writes d ((3n + 1)·C a token); the post-res backward
reads d, x_l and f and writes dx_l and df ((3n + 2)·C). Here one program keeps d in registers and
recomputes x_{l+1} from x_l and f, which it reads anyway (the forward's fused multiply-adds in the
forward's order: the same bits as the stored x_{l+1}), so a token moves (3n + 3)·C: reads x_l, f,
d_next, dy and writes dx_l, df. The pre-mix's ``dh_pre = Σ_c dy·x_{l+1}`` must be known before dm is
(it feeds the Sinkhorn/σ backward of every token), so it stays a pass of its own (``pre_mix_dh``,
(n + 1)·C): (4n + 4)·C a token for the whole transition backward instead of (7n + 4)·C.

Layout: a program owns BC channels of all n streams and a run of TILES token tiles of BT tokens.
fn's columns for those channels and the dfn sums stay on-chip for the whole run (dfn needs no
atomics), as in ``coefficients_op``'s dx pass; the per-token sums over C that the post-res backward
makes (dh_res, dh_post) are therefore partial, one ``[T, n + n²]`` block per channel block (one
coalesced store a tile), summed over channel blocks in a fixed order afterwards (deterministic).
At n = 4, C = 2048 and 32 channels a block those partials are (2·80·64 bytes) / (15·2·2048 bytes)
= 17% more traffic.

How a tile runs: the n stream tiles of x_l and d_next, f, dy, dm and the per-token coefficients
come in by per-thread loads, one tile ahead: the loads of tile k + 1 are issued during the work on
tile k (after its two products, ``late_prefetch``, by default), whose registers they then fill
while it runs. Two programs of 4 warps fill a multiprocessor's registers (255 a thread at n = 4,
bf16), so little else would hide their latency: Triton pipelines only loads that feed a
tensor-core product directly, and a copy-engine load it does not pipeline is issued and waited
for at once. The stream tiles are loaded one by one and joined into
one ``[BT, n·BC]`` operand only for the two products (d = dm @ fn + rest, dfn += x_{l+1}ᵀ @ dm), so
that the mixes around them need few layout changes (``benchmarks/registers.py --kernel
transition``: 7 a tile at 4 warps, 4 at 8).

Speed (H100, T = 8192, n = 4, bf16, 2026-12-07, ``torchmhc bench``, ``benchmarks/results/h100.md``):
326 µs at C = 2048 (61% of a copy by its own byte count, partial sums included) against 352 µs for
the dx pass and the post-res backward (87%), 216 against 244 µs at C = 1280: the pass moves
(3n + 3)·C instead of (6n + 3)·C a token, in less time. With the next tile's loads issued before the products and 8 warps a program (one
program a multiprocessor, 243 registers a thread), it took 365 and 241 µs. The first form of this kernel
(copy-engine loads of all n streams, split in registers) took 923 µs at C = 2048: as Triton
lowers copy-engine loads it does not pipeline, each tile's were waited for before any work (not
profiled itself), and the splits cost 26 layout changes a tile. What limits
this one (Nsight Compute): two warps a scheduler, each stalled on shared memory (the products'
operands) and on short dependencies; issue slots 35% busy (that 8-warp form). Instructions of the
token loop (``benchmarks/registers.py``): 812 a thread, 6496 for a tile's 8 warps (the 108 million
Nsight Compute counted); the default, 4 warps with the late prefetch, 5356 a tile with two
programs a multiprocessor; 16 warps (which 32 x 32 tiles fit with the late prefetch) 10096 a
tile, as the reductions' shuffles and the address arithmetic do not shrink with a thread's share
of the tile, and none was among the fastest. The models' default since 2026-12-07
(``dispatch.mhc_post_pre``; ``TORCHMHC_TRANSITION_BACKWARD=two_pass`` or
``one_pass_backward=False`` for the two passes): two sub-layers forward and backward 1203.8
against 1231.9 µs at T = 8192, C = 2048 (806.6 against 830.2 at C = 1280); a whole training step on
an H100 the same within the spread between runs (gpu-dense-1b +17.3% against +17.5% in one run,
+17.6% against +17.1% in the next; gpu-moe-3b +8.0% both; ``benchmarks/results/h100.md``).

With the branch's RMSNorm inside the transition (``NORM``, :func:`transition_backward_norm`) the
layer input went out as ``z = y·rnorm·gamma``: :func:`norm_dh` replaces the pre-mix's dh pass (it
reads dz instead of dy, recomputes y and sums what dh_pre and the norm's ``knorm`` need), and this
pass forms ``dy = rnorm·gamma·dz - knorm·y`` from the recomputed y before adding ``h_pre ⊗ dy``,
and sums the weight's gradient ``Σ_t dz·y·rnorm`` over its tokens: no bytes beyond the plain pass's.

Precision: as ``coefficients_op`` (dm @ fn and dfn on tensor cores with fp32 operands split into bf16
parts, see ``_precision.py``); d stays fp32 (the two passes round it to the stream dtype in
between), the stream mixes are fp32 fused multiply-adds.

Legend: T tokens, n streams, NS = n padded to a power of two, NP = max(4, NS), C channels,
K = n·C, W = the merged gradient width of ``coefficients_op``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import cdiv, channel_block, define_op, next_pow2, token_block, token_runs
from torchmhc.kernels._precision import dot_bf16_f32, precision_mode, split2
from torchmhc.kernels.coefficients_op import _dot_dm_fn, _gradient_rows, _np
from torchmhc.kernels.post_res_coefficients_op import _join_streams, _split_streams, empty_transition_grads
from torchmhc.kernels.pre_mix_op import mix_stream

__all__ = [
    "transition_bwd_streams",
    "norm_dh",
    "transition_backward",
    "transition_backward_op",
    "transition_backward_norm",
    "transition_backward_norm_op",
]


@triton.jit
def _load_tile(x_ptr, f_ptr, dnext_ptr, dy_ptr, hpost_ptr, hres_ptr, hpre_ptr, dm_ptr, cx_ptr, rnorm_ptr, knorm_ptr,
               t0, live, T, c0, dm_valid, C: tl.constexpr, N: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr, MIX: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    """Everything one token tile of :func:`_transition_bwd_kernel` reads, by per-thread loads (nothing
    when ``live`` is false): ``(x_l tiles, d_next tiles, f, dy, dm, c_x, h_post, h_pre, h_res, rnorm,
    knorm)``, the stream tiles ``[BT, BC]`` one a stream, the coefficients ``[BT]`` one a stream (pair)."""
    toks = t0 + tl.arange(0, BT)
    tmask = (toks < T) & live
    toks = toks.to(tl.int64)
    chans = c0 + tl.arange(0, BC)
    rows = toks[:, None] * (N * C) + chans[None, :]
    xs = ()
    dns = ()
    for j in tl.static_range(N):
        xs = xs + (tl.load(x_ptr + rows + j * C, mask=tmask[:, None], other=0.0),)
        dns = dns + (tl.load(dnext_ptr + rows + j * C, mask=tmask[:, None], other=0.0),)
    f = tl.load(f_ptr + toks[:, None] * C + chans[None, :], mask=tmask[:, None], other=0.0)
    dy = f  # unused without MIX
    if MIX:
        dy = tl.load(dy_ptr + toks[:, None] * C + chans[None, :], mask=tmask[:, None], other=0.0)
    # padding columns of dm are never written: read as zeros
    dm = tl.load(dm_ptr + toks[:, None] * W + tl.arange(0, W)[None, :], mask=tmask[:, None] & dm_valid[None, :], other=0.0)
    cx = tl.load(cx_ptr + toks, mask=tmask, other=0.0)
    h_post = ()
    h_pre = ()
    h_res = ()
    for i in tl.static_range(N):
        h_post = h_post + (tl.load(hpost_ptr + toks * N + i, mask=tmask, other=0.0),)
        if MIX:
            h_pre = h_pre + (tl.load(hpre_ptr + toks * N + i, mask=tmask, other=0.0),)
        for j in tl.static_range(N):
            h_res = h_res + (tl.load(hres_ptr + toks * (N * N) + i * N + j, mask=tmask, other=0.0),)
    rnorm = cx  # unused without NORM
    knorm = cx
    if NORM:
        rnorm = tl.load(rnorm_ptr + toks, mask=tmask, other=0.0)
        knorm = tl.load(knorm_ptr + toks, mask=tmask, other=0.0)
    return xs, dns, f, dy, dm, cx, h_post, h_pre, h_res, rnorm, knorm


@triton.jit
def _transition_bwd_kernel(
    x_ptr,  # [T, n, C] streams x_l
    f_ptr,  # [T, C] branch output f of sub-layer l
    hpost_ptr,  # [T, n] fp32, sub-layer l
    hres_ptr,  # [T, n, n] fp32, sub-layer l (paper orientation)
    fn_ptr,  # [n²+2n, K] fp32, sub-layer l+1
    dm_ptr,  # [T, W] fp32: sub-layer l+1's logit gradients (coefficients_bwd_tokens)
    cx_ptr,  # [T] fp32: their 1/r coefficient
    dnext_ptr,  # [T, n, C] stream dtype: the gradient x_{l+1} got downstream
    dy_ptr,  # [T, C] (MIX; else unused): sub-layer l+1's layer-input gradient
    hpre_ptr,  # [T, n] fp32 (MIX; else unused): sub-layer l+1's h_pre
    gamma_ptr,  # [C] (NORM; else unused): the branch RMSNorm's weight; dy_ptr then holds dz
    rnorm_ptr,  # [T] fp32 (NORM): the forward's 1/rms of y
    knorm_ptr,  # [T] fp32 (NORM): rnorm³·Σ_c y·gamma·dz / C (norm_dh)
    dgamma_ptr,  # [groups, C] fp32 out (NORM): the weight's gradient, partial sums per token group
    dx_ptr,  # [T, n, C] out: gradient of x_l
    df_ptr,  # [T, C] out: gradient of f
    dfn_ptr,  # [groups, ROWS, K] fp32 out: dfn partial sums per token group
    part_ptr,  # [C / BC, T, n + n²] fp32 out: dh_post | dh_res (i·n + j) partial sums per channel block
    T,
    C: tl.constexpr,
    N: tl.constexpr,
    NS: tl.constexpr,
    NP: tl.constexpr,
    NH: tl.constexpr,  # n + n² sums a token, padded to a power of two
    W: tl.constexpr,
    ROWS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    TILES: tl.constexpr,
    MODE: tl.constexpr,
    MIX: tl.constexpr,
    NORM: tl.constexpr,  # (with MIX) the layer input went out RMS-normalized: dy formed here from dz
    LATE_PREFETCH: tl.constexpr,  # issue the next tile's loads after the products (fewer registers)
):
    # grid (C // BC, groups): the program owns channels [cb·BC, +BC) of every stream for TILES·BT
    # consecutive tokens
    K: tl.constexpr = N * C
    cb = tl.program_id(0)
    c0 = cb * BC
    chans = c0 + tl.arange(0, BC)
    group = tl.program_id(1)
    rows, valid = _gradient_rows(N, NP, W, ROWS, True)
    # the channel block of every stream as one operand of NS·BC columns, stream-major (column
    # i·BC + c is stream i's channel c0 + c; zero for padding streams): one product a step for d and
    # one for dfn, as the one-stream tiles of coefficients_op's dx pass
    jk = tl.arange(0, NS * BC)
    jcols = (jk // BC) * C + c0 + jk % BC
    jvalid = jk // BC < N
    # fnᵀ tile [W, NS·BC], resident for the whole token run (bf16 parts split once)
    w = tl.load(fn_ptr + rows[:, None] * K + jcols[None, :], mask=valid[:, None] & jvalid[None, :], other=0.0)
    if MODE != 0:
        w, w_lo = split2(w)
    else:
        w_lo = w
    dfn_t = tl.zeros([NS * BC, W], dtype=tl.float32)  # dfnᵀ = x_{l+1}ᵀ·dm (M = NS·BC for the tensor cores)
    sum_cols = tl.arange(0, NH)  # the tile's per-token sums, column p of part
    if NORM:
        gamma = tl.load(gamma_ptr + chans).to(tl.float32)[None, :]
        dgamma = tl.zeros([BC], dtype=tl.float32)
    first = group * TILES * BT
    ahead = _load_tile(x_ptr, f_ptr, dnext_ptr, dy_ptr, hpost_ptr, hres_ptr, hpre_ptr, dm_ptr, cx_ptr, rnorm_ptr,
                       knorm_ptr, first, True, T, c0, valid, C, N, W, BT, BC, MIX, NORM)  # fmt: skip
    for it in range(TILES):
        xs, dns, f, dy, dm, cx, h_post, h_pre, h_res, rnorm, knorm = ahead
        t0 = first + it * BT
        if not LATE_PREFETCH:  # the next tile's loads go out now and land while this tile is worked on
            ahead = _load_tile(x_ptr, f_ptr, dnext_ptr, dy_ptr, hpost_ptr, hres_ptr, hpre_ptr, dm_ptr, cx_ptr,
                               rnorm_ptr, knorm_ptr, t0 + BT, it + 1 < TILES, T, c0, valid, C, N, W, BT, BC, MIX,
                               NORM)  # fmt: skip
        toks = t0 + tl.arange(0, BT)
        tmask = toks < T
        toks = toks.to(tl.int64)
        f = f.to(tl.float32)
        xns = ()
        for i in tl.static_range(NS):
            if i < N:
                # x_{l+1}[i] as the forward made it (post_res_op's fused multiply-adds, in its
                # order), rounded to the stream dtype as stored
                xn = h_post[i][:, None] * f
                for j in tl.static_range(N):
                    xn = tl.fma(h_res[i * N + j][:, None], xs[j].to(tl.float32), xn)
                xns = xns + (xn.to(xs[0].dtype),)
            else:  # padding stream: zero operand columns
                xns = xns + (tl.zeros([BT, BC], dtype=xs[0].dtype),)
        dy = dy.to(tl.float32)
        if NORM:
            # dy is the gradient dz of the normalized layer input z = y·rnorm·gamma: y as the forward
            # formed it (the pre-mix's fused multiply-adds, rounded as stored), then the RMSNorm's
            # backward, dy = rnorm·gamma·dz - knorm·y
            y = tl.zeros([BT, BC], dtype=tl.float32)
            for j in tl.static_range(N):
                y = mix_stream(y, h_pre[j][:, None], xns[j])
            y = y.to(xs[0].dtype).to(tl.float32)
            dgamma += tl.sum(dy * y * rnorm[:, None], axis=0)
            dy = rnorm[:, None] * gamma * dy - knorm[:, None] * y
        rests = ()  # d less its dm @ fn share: c_x·x_{l+1} + h_pre·dy + d_next
        for i in tl.static_range(NS):
            if i < N:
                rest = cx[:, None] * xns[i].to(tl.float32) + dns[i].to(tl.float32)
                if MIX:
                    rest += h_pre[i][:, None] * dy
                rests = rests + (rest,)
            else:
                rests = rests + (tl.zeros([BT, BC], dtype=tl.float32),)
        x_next = _join_streams(xns, BT, NS, BC)
        d = _dot_dm_fn(dm, w, w_lo, _join_streams(rests, BT, NS, BC), MODE)
        dfn_t = dot_bf16_f32(tl.trans(x_next), dm, dfn_t, MODE)
        ds = _split_streams(tl.reshape(d, (BT, NS, BC)), BT, NS, BC)
        # the post-res backward of sub-layer l from d in registers
        out_rows = toks[:, None] * K + chans[None, :]
        df = h_post[0][:, None] * ds[0]
        for i in tl.static_range(1, N):
            df = tl.fma(h_post[i][:, None], ds[i], df)
        tl.store(df_ptr + toks[:, None] * C + chans[None, :], df.to(df_ptr.dtype.element_ty), mask=tmask[:, None])
        if LATE_PREFETCH:  # or now, with the products' operands and results no longer live
            ahead = _load_tile(x_ptr, f_ptr, dnext_ptr, dy_ptr, hpost_ptr, hres_ptr, hpre_ptr, dm_ptr, cx_ptr,
                               rnorm_ptr, knorm_ptr, t0 + BT, it + 1 < TILES, T, c0, valid, C, N, W, BT, BC, MIX,
                               NORM)  # fmt: skip
        sums = tl.zeros([BT, NH], dtype=tl.float32)
        for i in tl.static_range(N):
            sums = tl.where(sum_cols[None, :] == i, tl.sum(ds[i] * f, axis=1)[:, None], sums)
        for j in tl.static_range(N):
            xj = xs[j].to(tl.float32)
            dxj = h_res[j][:, None] * ds[0]  # h_res[0, j]
            for i in tl.static_range(1, N):
                dxj = tl.fma(h_res[i * N + j][:, None], ds[i], dxj)
            tl.store(dx_ptr + out_rows + j * C, dxj.to(dx_ptr.dtype.element_ty), mask=tmask[:, None])
            for i in tl.static_range(N):
                sums = tl.where(sum_cols[None, :] == N + i * N + j, tl.sum(ds[i] * xj, axis=1)[:, None], sums)
        # one store of the tile's n + n² sums a token (contiguous rows of part) instead of one a sum
        part_rows = (cb * T + toks)[:, None] * (N + N * N)
        tl.store(part_ptr + part_rows + sum_cols[None, :], sums, mask=tmask[:, None] & (sum_cols[None, :] < N + N * N))
    ptrs = dfn_ptr + group * ROWS * K + rows[None, :] * K + jcols[:, None]
    tl.store(ptrs, dfn_t, mask=valid[None, :] & jvalid[:, None])
    if NORM:
        tl.store(dgamma_ptr + group * C + chans, dgamma)


def transition_bwd_streams(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    dm: Tensor,
    cx: Tensor,
    d_next: Tensor,
    mix: tuple[Tensor, Tensor] | None = None,
    *,
    norm: tuple[Tensor, Tensor, Tensor] | None = None,
    block_t: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    waves: int | None = None,
    late_prefetch: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher of the one-pass stream step. Sub-layer l: ``x [T, n, C]`` (bf16/fp16/fp32),
    ``f_out [T, C]`` (x.dtype), ``h_post [T, n]``, ``h_res [T, n, n]`` fp32; sub-layer l+1: ``fn
    [n²+2n, n·C]`` fp32 and ``coefficients_bwd_tokens``'s ``dm [T, W]``, ``cx [T]``; ``d_next
    [T, n, C]`` (x.dtype), the gradient of x_{l+1} from downstream; ``mix = (dy [T, C], h_pre [T, n])``
    when sub-layer l+1's pre-mix was fused in (its ``h_pre ⊗ dy`` joins d); ``norm = (gamma [C],
    rnorm [T], knorm [T])`` when its branch's RMSNorm was fused in too (``mix``'s first tensor is
    then dz, the normalized layer input's gradient, and dy is formed here: :func:`norm_dh`); all
    contiguous -> ``(dx [T, n, C], df [T, C], dh_post [T, n], dh_res [T, n, n], dfn [n²+2n, n·C])``,
    the last three fp32, and with ``norm`` also ``dgamma [C]`` fp32. Tiles: ``block_t`` tokens (default 32) by ``block_c`` channels of every stream
    (default 32, a power of two dividing C), ``num_warps`` (default 4 for 16-bit streams, 8 for
    fp32, whose tiles need twice the registers), ``num_stages`` (2), ``waves`` as in
    ``_common.token_runs``. ``late_prefetch`` (default) issues the next tile's loads after the two
    products and the df store instead of before them, so that the products' operands and the loads
    do not hold registers at once: at n = 4 and 4 warps, 255 registers a thread without spilling
    (bf16; the early form spills 1216 bytes), at 8 warps 222 for fp32 (``benchmarks/registers.py
    --kernel transition``). The fastest of the tiles timed on an H100 (``benchmarks/tune.py``,
    2026-12-07): 318.8 µs at T = 8192, C = 2048 against 343.7 for 32 x 64 at 8 warps and 365.6 for
    the early form at 8 warps; 214.2 against 228.4 at C = 1280 (the early form: 240.5 in an earlier
    run)."""
    t, n, c = x.shape
    ns = next_pow2(n)
    dx = torch.empty_like(x)
    df = torch.empty_like(f_out)
    bt = token_block(block_t or 32)
    bc = channel_block(c, block_c or 32)
    c_blocks = c // bc
    t_blocks = cdiv(t, bt)
    tiles, groups = token_runs(t_blocks, c_blocks, x.device, waves)
    dfn_part = torch.empty((groups, *fn.shape), dtype=torch.float32, device=x.device)
    part = torch.empty((c_blocks, t, n + n * n), dtype=torch.float32, device=x.device)
    w = dm.shape[1]
    if norm is not None and mix is None:
        raise ValueError("norm needs mix: the RMSNorm is of the pre-mix's output")
    dy, h_pre = (None, None) if mix is None else mix
    gamma, rnorm, knorm = (None, None, None) if norm is None else norm
    dgamma_part = torch.empty((groups, c), dtype=torch.float32, device=x.device) if norm is not None else None
    _transition_bwd_kernel[(c_blocks, groups)](
        x, f_out, h_post, h_res, fn, dm, cx, d_next, dy, h_pre, gamma, rnorm, knorm, dgamma_part, dx, df, dfn_part,
        part, t, C=c, N=n, NS=ns, NP=_np(n), NH=next_pow2(n + n * n), W=w, ROWS=fn.shape[0], BT=bt, BC=bc,
        TILES=tiles, MODE=precision_mode(x), MIX=mix is not None, NORM=norm is not None, LATE_PREFETCH=late_prefetch,
        num_warps=num_warps or (4 if x.element_size() <= 2 else 8), num_stages=num_stages,
    )  # fmt: skip
    sums = part[0] if c_blocks == 1 else part.sum(0)
    dh_post, dh_res = sums[:, :n], sums[:, n:].view(t, n, n)
    grads = (dx, df, dh_post.contiguous(), dh_res.contiguous(), dfn_part[0] if groups == 1 else dfn_part.sum(0))
    if norm is None:
        return grads
    return (*grads, dgamma_part[0] if groups == 1 else dgamma_part.sum(0))


@triton.jit
def _transition_norm_dh_kernel(
    dz_ptr,  # [T, C] gradient of the normalized layer input z = y·rnorm·gamma
    x_ptr,  # [T, n, C] streams x_{l+1}
    hpre_ptr,  # [T, n] fp32
    gamma_ptr,  # [C]
    rnorm_ptr,  # [T] fp32: the forward's 1/rms of y
    dh_ptr,  # [T, n] fp32 out: dh_pre
    knorm_ptr,  # [T] fp32 out: rnorm³·Σ_c y·gamma·dz / C
    C: tl.constexpr,
    N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid (T,): one token a program, looping over C (steps past C masked) so that its sums over
    # the channels stay in registers, elementwise until one reduction at the end
    t = tl.program_id(0).to(tl.int64)
    rnorm = tl.load(rnorm_ptr + t)
    h = ()
    sx = ()  # Σ_c x_j·g, g = gamma·dz
    sy = ()  # Σ_c x_j·y
    for j in tl.static_range(N):
        h = h + (tl.load(hpre_ptr + t * N + j),)
        sx = sx + (tl.zeros([BLOCK_C], dtype=tl.float32),)
        sy = sy + (tl.zeros([BLOCK_C], dtype=tl.float32),)
    syg = tl.zeros([BLOCK_C], dtype=tl.float32)  # Σ_c y·g
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        g *= tl.load(dz_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
        xs = ()
        y = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(N):
            xj = tl.load(x_ptr + (t * N + j) * C + cols, mask=cmask, other=0.0)
            y = mix_stream(y, h[j], xj)  # the forward's y, bit for bit (pre_mix_op's order)
            xs = xs + (xj.to(tl.float32),)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        syg += y * g
        sx_next = ()
        sy_next = ()
        for j in tl.static_range(N):
            sx_next = sx_next + (sx[j] + xs[j] * g,)
            sy_next = sy_next + (sy[j] + xs[j] * y,)
        sx = sx_next
        sy = sy_next
    knorm = rnorm * rnorm * rnorm * tl.sum(syg, axis=0) / C
    tl.store(knorm_ptr + t, knorm)
    for j in tl.static_range(N):
        # dh_pre[j] = Σ_c x_j·dy with dy = rnorm·g - knorm·y
        tl.store(dh_ptr + t * N + j, rnorm * tl.sum(sx[j], axis=0) - knorm * tl.sum(sy[j], axis=0))


def norm_dh(
    dz: Tensor, x: Tensor, h_pre: Tensor, gamma: Tensor, rnorm: Tensor, *, block_c: int | None = None, num_warps: int = 4
) -> tuple[Tensor, Tensor]:
    """The pre-mix dh pass through the branch's RMSNorm. The layer input ``y = Σ_j h_pre[j]·x[j]``
    went out as ``z = y·rnorm·gamma`` (``rnorm = 1/rms(y)``); from its gradient ``dz`` the
    norm's backward is ``dy = rnorm·g - knorm·y`` with ``g = gamma·dz`` and ``knorm =
    rnorm³·Σ_c y·g / C``, so ``dh_pre[j] = Σ_c x[j]·dy = rnorm·Σ_c x[j]·g - knorm·Σ_c x[j]·y``:
    per-token sums of what the plain dh pass reads (dz and x; y recomputed as the forward formed
    it), and dy itself is never written (the stream pass forms it again from knorm).

    ``dz [T, C]``, ``x [T, n, C]`` (x_{l+1}), ``h_pre [T, n]`` fp32, ``gamma [C]``, ``rnorm [T]``
    fp32, contiguous -> ``(dh_pre [T, n], knorm [T])`` fp32. ``block_c``: channels a step (a power
    of two; default as ``pre_mix_op.pre_mix_dh``'s)."""
    t, n, c = x.shape
    dh = torch.empty((t, n), dtype=torch.float32, device=x.device)
    knorm = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t:
        block_c = block_c or min(max(64, 4096 // next_pow2(n)), next_pow2(c))
        _transition_norm_dh_kernel[(t,)](dz, x, h_pre, gamma, rnorm, dh, knorm, C=c, N=n, BLOCK_C=block_c, num_warps=num_warps)
    return dh, knorm


def _transition_backward(
    dy: Tensor, d_next: Tensor, d_pre: Tensor, d_post: Tensor, d_res: Tensor, x: Tensor, f_out: Tensor,
    h_post: Tensor, h_res: Tensor, x_next: Tensor, fn: Tensor, scale: Tensor, base: Tensor, h_pre2: Tensor,
    m_pp: Tensor, m_res: Tensor, rinv: Tensor, iters: int, eps: float, post_scale: float,
    norm: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Both transition backwards; ``norm = (gamma, rnorm)`` when the layer input went out normalized
    (``dy`` is then dz, and ``dgamma`` in gamma's dtype follows the other gradients)."""
    from torchmhc.kernels.coefficients_op import coefficients_bwd_tokens
    from torchmhc.kernels.pre_mix_op import pre_mix_dh

    t, n, c = x.shape
    if t == 0:
        grads = empty_transition_grads(x, f_out, h_post, h_res, fn, scale, base)
        return grads if norm is None else (*grads, torch.zeros_like(norm[0]))
    if norm is None:
        dh_pre, norm_args = pre_mix_dh(dy, x_next), None
    else:
        dh_pre, knorm = norm_dh(dy, x_next, h_pre2, *norm)
        norm_args = (*norm, knorm)
    dm, cx, dscale, dbase = coefficients_bwd_tokens(
        m_pp, m_res, rinv, scale, base, d_pre + dh_pre, d_post, d_res, n * c, iters, eps, post_scale
    )
    dx, df, dh_post, dh_res, dfn, *dgamma = transition_bwd_streams(
        x, f_out, h_post, h_res, fn, dm, cx, d_next, (dy, h_pre2), norm=norm_args
    )
    return (dx, df, dh_post, dh_res, dfn, dscale, dbase, *(g.to(norm[0].dtype) for g in dgamma))


def transition_backward(
    dy: Tensor,
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
    h_pre2: Tensor,
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    iters: int,
    eps: float,
    post_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the transition with sub-layer l+1's pre-mix (``dispatch._ChainedPostPre``) from
    the gradients of its outputs (``dy [T, C]`` of the layer input, ``d_next [T, n, C]`` of x_{l+1},
    fp32 ``d_pre``, ``d_post [T, n]``, ``d_res [T, n, n]`` of l+1's coefficients; all contiguous) and
    its saved tensors (sub-layer l's ``x, f_out, h_post, h_res``; ``x_next``; sub-layer l+1's
    parameters, ``h_pre2`` and ``m_pp, m_res, rinv``) -> ``(dx, df, dh_post, dh_res, dfn, dscale,
    dbase)``. Three launches and two small sums: the pre-mix's dh_pre (reads x_{l+1} and dy), the
    per-token σ/Sinkhorn backward, then :func:`transition_bwd_streams`."""
    return _transition_backward(
        dy, d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, h_pre2, m_pp, m_res,
        rinv, iters, eps, post_scale, None,
    )  # fmt: skip


def transition_backward_norm(
    dz: Tensor,
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
    h_pre2: Tensor,
    m_pp: Tensor,
    m_res: Tensor,
    rinv: Tensor,
    norm_weight: Tensor,
    rnorm: Tensor,
    iters: int,
    eps: float,
    post_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`transition_backward` of the transition whose layer input went out through the branch's
    RMSNorm (``post_res_coefficients_op.post_res_coefficients_pre_mix_norm_fwd``): ``dz [T, C]`` is
    the normalized input's gradient, ``norm_weight [C]`` and ``rnorm [T]`` (fp32) the norm's weight
    and the forward's 1/rms -> the same gradients and ``dnorm_weight`` (norm_weight's dtype). The
    launches are those of :func:`transition_backward`, the dh pass being :func:`norm_dh`: the
    norm's backward adds no pass over memory (a separate one reads dz and y, writes dy: 3·C a
    token)."""
    return _transition_backward(
        dz, d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, h_pre2, m_pp, m_res,
        rinv, iters, eps, post_scale, (norm_weight, rnorm),
    )  # fmt: skip


#: :func:`transition_backward`; no autograd of its own (it is one).
transition_backward_op = define_op(
    "transition_backward",
    "(Tensor dy, Tensor d_next, Tensor d_pre, Tensor d_post, Tensor d_res, Tensor x, Tensor f_out, Tensor h_post,"
    " Tensor h_res, Tensor x_next, Tensor fn, Tensor scale, Tensor base, Tensor h_pre2, Tensor m_pp, Tensor m_res,"
    " Tensor rinv, int iters, float eps, float post_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    transition_backward,
    lambda dy, d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, *_: tuple(
        torch.empty_like(t) for t in (x, f_out, h_post, h_res, fn, scale, base)
    ),
)
#: :func:`transition_backward_norm`; no autograd of its own (it is one).
transition_backward_norm_op = define_op(
    "transition_backward_norm",
    "(Tensor dz, Tensor d_next, Tensor d_pre, Tensor d_post, Tensor d_res, Tensor x, Tensor f_out, Tensor h_post,"
    " Tensor h_res, Tensor x_next, Tensor fn, Tensor scale, Tensor base, Tensor h_pre2, Tensor m_pp, Tensor m_res,"
    " Tensor rinv, Tensor norm_weight, Tensor rnorm, int iters, float eps, float post_scale)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    transition_backward_norm,
    lambda dz, d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, h_pre2, m_pp, m_res,
    rinv, norm_weight, *_: tuple(torch.empty_like(t) for t in (x, f_out, h_post, h_res, fn, scale, base, norm_weight)),
)
