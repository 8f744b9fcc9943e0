"""Cross-sub-layer fusion: F_post,res of sub-layer l and the coefficient pass of sub-layer l+1.

Both touch the same n·C stream values of a token. The paper's decomposition writes
``x_{l+1} = h_res·x_l + h_post·f`` and then reads ``x_{l+1}`` back to compute its coefficients;
here each tile of ``x_{l+1}`` is rounded to the stream dtype, written, and fed to the projection
and the sum of squares while still on-chip. Per sub-layer the streams are read (2n + 1)·C
times less n·C: reads (n + 1)·C and writes n·C for both steps together, instead of (2n + 1)·C and n·C.

The coefficients come from the rounded, stored ``x_{l+1}``, and each output value is formed by the
same sequence of fused multiply-adds as in ``post_res_op``: the result is what the unfused pipeline
computes, bit for bit in ``x_{l+1}`` (up to the order of fp32 sums in the coefficients).

How one step over BC channels of BT tokens runs:
- one copy-engine (TMA) load brings all streams ``[BT, NS, BC]``, split into NS tiles ``[BT, BC]``
  in registers, and one more brings f;
- each destination stream i is mixed, rounded and stored as a ``[BT, BC]`` tile (16-byte stores);
- the NS tiles are joined stream-major into one ``[BT, NS·BC]`` operand and the projection runs
  transposed, ``acc[M, BT] += fnp[M, NS·BC] @ operandᵀ``: the operand goes from registers to shared
  memory once, as the product's B operand, and ``fnp`` (fn packed by :func:`pack_fn`) is the
  A operand, its bf16 hi and lo parts stacked along M so one product covers both.
The previous form, ``[BT, NP·BC]`` operand in the A position, spent its time moving the mixed tile
into the tensor-core operand layout (Nsight Compute: shared-memory stalls and bank conflicts).

Speed (H100, ``torchmhc bench``; ``benchmarks/results/h100.md``, session 6): 480 µs at
T = 16384, C = 4096, n = 4 (85% of a copy; the [BT, NP·BC]-operand form took 516) against 411 + 205
µs for the post-res and coefficient kernels it replaces; 91 µs at T = 8192, C = 1280 (70 + 52) and
132 µs at C = 2048 (109 + 73). What is left: each program's coefficient epilogue (Sinkhorn, ~4 µs)
moves no stream data, and one program of 4 warps holds a multiprocessor (its staged tiles fill the
shared memory).

With ``MIX`` (:func:`post_res_coefficients_pre_mix_fwd`, what ``dispatch.mhc_post_pre`` runs by
default) the kernel also forms sub-layer l+1's layer input ``y = Σ_j h_pre[j]·x_{l+1}[j]``: h_pre is
known only after the epilogue, so each program then reads its tokens' x_{l+1} back, last-written
channels first, from L2 where the copy is still there, and writes y ``[T, C]``. The transition then
moves (2n + 2)·C a token forward (reads x_l and f, writes x_{l+1} and y) instead of (3n + 2)·C with
the pre-mix kernel reading x_{l+1} from memory, in one launch instead of two; y is the pre-mix
kernel's bit for bit (``pre_mix_op.mix_stream``: the same fused multiply-adds in the same order).
Measured on an H100 (``torchmhc bench``, ``benchmarks/results/h100.md``, 2026-12-07): 181.4 µs
against 192.9 for the pass without ``MIX`` then the pre-mix kernel at T = 8192, C = 2048, and
118.3 against 131.2 at C = 1280. At C = 2048 the read-back adds 48.5 µs to the pass, near what
reading x_{l+1} from DRAM would take, so little of it hits L2 (see the launcher): the gain is
11.5 of the separate pre-mix kernel's 60 µs.

With ``NORM`` too (:func:`post_res_coefficients_pre_mix_norm_fwd`) each program then scales the y
it has just written by sub-layer l+1's branch RMSNorm (``docs/math.md`` §9).

Backward reuses the two-step coefficient backward (whose dx step adds the incoming gradient of
``x_{l+1}`` in the same pass) and then the F_post,res backward.

Legend: T tokens, n streams, NS = n padded to a power of two, NP = max(4, NS), C channels,
K = n·C; see ``coefficients_op.py`` for the packed pp / res column layouts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import cdiv, channel_block, define_op, eager_or_compiled, next_pow2, tile_descriptor, token_block
from torchmhc.kernels._precision import MODE_FMA, precision_mode, split2
from torchmhc.kernels.coefficients_op import (
    _np,
    coef_epilogue,
    coefficients_bwd_tokens,
    coefficients_bwd_x,
    empty_coefficient_outputs,
    merged_row_of,
)
from torchmhc.kernels.post_res_op import post_res_bwd
from torchmhc.kernels.pre_mix_op import mix_stream

__all__ = [
    "pack_fn",
    "empty_transition_grads",
    "post_res_coefficients_fwd",
    "post_res_coefficients_pre_mix_fwd",
    "post_res_coefficients_op",
    "post_res_coefficients_pre_mix_op",
    "post_res_coefficients_pre_mix_norm_fwd",
    "post_res_coefficients_pre_mix_norm_op",
    "post_res_coefficients_backward",
    "PostResCoefficients",
    "post_res_coefficients_backward_op",
]


def packed_rows(n: int) -> int:
    """Rows M of the packed fn: hi and lo halves of ``[pp (16) | res (NP²)]`` (n <= 4), or of
    ``[res (64) | pp (16) | zeros (48)]`` (n > 4); halves of 32 / 128 rows split in registers."""
    return 64 if n <= 4 else 256


@triton.jit
def _packed_fn_row(r, N: tl.constexpr, NP: tl.constexpr):
    """Row r of a packed half -> (fn row, valid), through the backward's merged column map."""
    if NP == 4:  # [pp | res]: the merged order itself
        return merged_row_of(r, N, NP)
    # [res | pp | zeros]
    return merged_row_of(tl.where(r < 64, r + 16, tl.where(r < 80, r - 64, 16 + NP * NP)), N, NP)


@triton.jit
def _pack_fn_kernel(fn_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr, NS: tl.constexpr, NP: tl.constexpr,
                    M: tl.constexpr, BC: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # grid (M, cdiv(NS·C, BLOCK)): row m of the packed fn, columns in steps of BC channels, stream-major
    # within a step (column k·NS·BC + i·BC + c holds fn[row, i·C + k·BC + c]; zero for i >= n)
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row, valid = _packed_fn_row(m % (M // 2), N, NP)
    step = cols // (NS * BC)
    i = cols % (NS * BC) // BC
    src = i * C + step * BC + cols % BC
    w = tl.load(fn_ptr + row * (N * C) + src, mask=valid & (i < N) & (cols < NS * C), other=0.0)
    if SPLIT:  # bf16 hi part in the first half, lo part in the second
        hi, lo = split2(w)
        w = tl.where(m < M // 2, hi, lo)
    else:  # fp32 (interpreter): the second half is zero
        w = tl.where(m < M // 2, w, 0.0)
    tl.store(out_ptr + m * (NS * C) + cols, w.to(out_ptr.dtype.element_ty), mask=cols < NS * C)


def pack_fn(fn: Tensor, n: int, c: int, block_c: int, split: bool) -> Tensor:
    """fn ``[n²+2n, n·C]`` fp32 -> the fused kernel's A operand ``[M, NS·C]`` (:func:`packed_rows`):
    bf16 hi and lo parts (``split``) or fp32 and zeros, columns in steps of ``block_c`` channels."""
    ns, m = next_pow2(n), packed_rows(n)
    out = torch.empty((m, ns * c), dtype=torch.bfloat16 if split else torch.float32, device=fn.device)
    block = 1024
    _pack_fn_kernel[(m, cdiv(ns * c, block))](
        fn, out, C=c, N=n, NS=ns, NP=_np(n), M=m, BC=block_c, SPLIT=split, BLOCK=block
    )
    return out


@triton.jit
def _split_streams(x3, BT: tl.constexpr, NS: tl.constexpr, BC: tl.constexpr):
    """``[BT, NS, BC]`` -> NS tiles ``[BT, BC]`` in stream order (tl.split halves a trailing axis of 2)."""
    if NS == 1:
        return (tl.reshape(x3, (BT, BC)),)
    elif NS == 2:
        s0, s1 = tl.split(tl.permute(x3, (0, 2, 1)))
        return (s0, s1)
    elif NS == 4:  # stream 2u + v: [BT, u, v, BC] -> [BT, BC, v, u]
        lo, hi = tl.split(tl.permute(tl.reshape(x3, (BT, 2, 2, BC)), (0, 3, 2, 1)))
        s0, s1 = tl.split(lo)
        s2, s3 = tl.split(hi)
        return (s0, s1, s2, s3)
    else:  # stream 4u + 2v + w
        lo, hi = tl.split(tl.permute(tl.reshape(x3, (BT, 2, 2, 2, BC)), (0, 4, 3, 2, 1)))
        lo0, lo1 = tl.split(lo)
        hi0, hi1 = tl.split(hi)
        s0, s1 = tl.split(lo0)
        s2, s3 = tl.split(lo1)
        s4, s5 = tl.split(hi0)
        s6, s7 = tl.split(hi1)
        return (s0, s1, s2, s3, s4, s5, s6, s7)


@triton.jit
def _join_streams(ys, BT: tl.constexpr, NS: tl.constexpr, BC: tl.constexpr):
    """NS tiles ``[BT, BC]`` -> ``[BT, NS·BC]``, column i·BC + c holding stream i (the inverse of
    :func:`_split_streams`: each thread keeps its contiguous channels of every stream)."""
    if NS == 1:
        return ys[0]
    elif NS == 2:
        return tl.reshape(tl.permute(tl.join(ys[0], ys[1]), (0, 2, 1)), (BT, 2 * BC))
    elif NS == 4:
        y = tl.join(tl.join(ys[0], ys[1]), tl.join(ys[2], ys[3]))
        return tl.reshape(tl.permute(y, (0, 3, 2, 1)), (BT, 4 * BC))
    else:
        lo = tl.join(tl.join(ys[0], ys[1]), tl.join(ys[2], ys[3]))
        hi = tl.join(tl.join(ys[4], ys[5]), tl.join(ys[6], ys[7]))
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 4, 3, 2, 1)), (BT, 8 * BC))


@triton.jit
def _unpack_projection(acc, BT: tl.constexpr, NP: tl.constexpr, M: tl.constexpr):
    """``acc [M, BT]`` (hi- and lo-part rows) -> ``(acc_pp [BT, 16], acc_res [BT, NP²])``."""
    acc = tl.sum(tl.reshape(tl.trans(acc), (BT, 2, M // 2)), axis=1)  # hi + lo
    if NP == 4:  # [pp | res]
        acc_pp, acc_res = tl.split(tl.permute(tl.reshape(acc, (BT, 2, 16)), (0, 2, 1)))
    else:  # [res | pp | zeros]
        acc_res, rest = tl.split(tl.permute(tl.reshape(acc, (BT, 2, 64)), (0, 2, 1)))
        pp_pad, _ = tl.split(tl.permute(tl.reshape(rest, (BT, 2, 2, 16)), (0, 3, 2, 1)))
        acc_pp, _ = tl.split(pp_pad)
    return acc_pp, acc_res


@triton.jit
def _project(fn_tile, operand, acc, MODE: tl.constexpr):
    """acc += fn_tile @ operandᵀ. MODE_FMA: fp32 (interpreter, which also mishandles a transposed
    bf16 operand). Else fn_tile holds bf16 hi/lo rows; a bf16 operand is exact, an fp16/fp32 one
    is split in two."""
    if MODE == 0:
        acc = tl.dot(fn_tile, tl.trans(operand.to(tl.float32)), acc, input_precision="ieee")
    elif MODE == 1:
        acc = tl.dot(fn_tile, tl.trans(operand), acc)
    else:
        hi, lo = split2(operand.to(tl.float32))
        acc = tl.dot(fn_tile, tl.trans(hi), acc)
        acc = tl.dot(fn_tile, tl.trans(lo), acc)
    return acc


@triton.jit
def _pre_mix_norm_rows(x_ptr, hpre_ptr, gamma_ptr, z_ptr, rnorm_ptr, t0, T, norm_eps, C: tl.constexpr, N: tl.constexpr,
                       CP: tl.constexpr, BT: tl.constexpr, BTN: tl.constexpr):  # fmt: skip
    """The normalized pre-mix of tokens ``[t0, t0 + BT)`` over whole rows, BTN tokens a step with all C
    channels (padded to CP, masked) in registers, so that y's sum of squares is complete before
    ``z = y·rnorm·gamma`` is written and y itself is never stored (the in-place form writes y and
    reads it back)."""
    K: tl.constexpr = N * C
    cols = tl.arange(0, CP)
    cmask = cols < C
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for s0 in range(0, BT, BTN):
        rows = t0 + s0 + tl.arange(0, BTN)
        rmask = rows < T
        rows = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        y = tl.zeros([BTN, CP], dtype=tl.float32)
        for j in tl.static_range(N):
            hj = tl.load(hpre_ptr + rows * N + j, mask=rmask, other=0.0, cache_modifier=".cg")
            xj = tl.load(x_ptr + rows[:, None] * K + (j * C) + cols[None, :], mask=mask, other=0.0,
                         eviction_policy="evict_first")  # fmt: skip
            y = mix_stream(y, hj[:, None], xj)  # pre_mix_op's order: y bit-identical
        y = y.to(z_ptr.dtype.element_ty).to(tl.float32)
        rnorm = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / C + norm_eps)
        tl.store(rnorm_ptr + rows, rnorm, mask=rmask)
        z = y * rnorm[:, None] * gamma
        tl.store(z_ptr + rows[:, None] * C + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _post_res_coef_fwd_kernel(
    x_desc,  # [T, n, C] streams of sub-layer l, tiles [BT, NS, BC]
    f_desc,  # [T, C] branch output of sub-layer l, tiles [BT, BC]
    hpost_ptr,  # [T, n] fp32, sub-layer l
    hres_ptr,  # [T, n, n] fp32, sub-layer l (paper orientation)
    out_ptr,  # [T, n, C] out: streams x_{l+1}
    fnp_desc,  # [M, NS·C] sub-layer l+1's fn packed by pack_fn, tiles [M, NS·BC]
    scale_ptr,
    base_ptr,
    hpre2_ptr,  # [T, n] fp32 out: sub-layer l+1's coefficients
    hpost2_ptr,
    hres2_ptr,
    mpp_ptr,  # saved for the backward, as in coefficients_op
    mres_ptr,
    rinv_ptr,
    y_ptr,  # [T, C] out (MIX; else unused): sub-layer l+1's layer input Σ_j h_pre[j]·x_{l+1}[j]
    gamma_ptr,  # [C] (NORM; else unused): the branch RMSNorm's weight
    rnorm_ptr,  # [T] fp32 out (NORM; else unused): the RMSNorm's 1/rms of y
    T,
    eps,
    rms_eps,
    post_scale,
    norm_eps,
    C: tl.constexpr,
    N: tl.constexpr,
    NS: tl.constexpr,
    NP: tl.constexpr,
    M: tl.constexpr,
    ITERS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BCM: tl.constexpr,
    MODE: tl.constexpr,
    MIX: tl.constexpr,
    NORM: tl.constexpr,  # (with MIX) y goes out RMS-normalized: y·rnorm·gamma
    ROWS: tl.constexpr,  # (NORM) the normalized pre-mix over whole rows (_pre_mix_norm_rows)
    CP: tl.constexpr,  # (ROWS) C's next power of two
    BTN: tl.constexpr,  # (ROWS) tokens a step
):
    # grid (cdiv(T, BT),): BT tokens per program, C in BC-channel steps; with MIX, the tokens'
    # x_{l+1} once more, in BCM-channel steps, for the pre-mix of sub-layer l+1; with NORM, the
    # tokens' y once more (just written: from L2), to scale it by 1/rms(y) and gamma
    K: tl.constexpr = N * C
    t0 = tl.program_id(0) * BT
    toks = t0 + tl.arange(0, BT)
    tmask = toks < T
    toks = toks.to(tl.int64)
    # sub-layer l's coefficients, loaded once: [BT, 1] columns h_post[:, i] and h_res[:, i, j]
    h_post = ()
    h_res = ()
    for i in tl.static_range(N):
        h_post = h_post + (tl.load(hpost_ptr + toks * N + i, mask=tmask, other=0.0)[:, None],)
        for j in tl.static_range(N):
            h_res = h_res + (tl.load(hres_ptr + toks * (N * N) + i * N + j, mask=tmask, other=0.0)[:, None],)
    out_rows = out_ptr + toks[:, None] * K + tl.arange(0, BC)[None, :]
    acc = tl.zeros([M, BT], dtype=tl.float32)
    sumsq = tl.zeros([BT, BC], dtype=tl.float32)  # reduced over channels once, after the loop
    for c0 in range(0, C, BC):
        f = f_desc.load([t0, c0]).to(tl.float32)
        xs = _split_streams(x_desc.load([t0, 0, c0]), BT, NS, BC)
        ys = ()
        for i in tl.static_range(NS):
            if i < N:
                # the order of post_res_op's fused multiply-adds: bit-identical x_{l+1}
                y = h_post[i] * f
                for j in tl.static_range(N):
                    y = tl.fma(h_res[i * N + j], xs[j].to(tl.float32), y)
                y = y.to(out_ptr.dtype.element_ty)  # what is stored is what the next pass sees
                # with MIX read back below: kept in L2 ahead of the streamed-through x_l and f
                tl.store(out_rows + (i * C + c0), y, mask=tmask[:, None], eviction_policy="evict_last" if MIX else "")
                yf = y.to(tl.float32)
                sumsq += yf * yf
                ys = ys + (y,)
            else:  # padding stream: zero operand columns
                ys = ys + (tl.zeros([BT, BC], dtype=out_ptr.dtype.element_ty),)
        acc = _project(fnp_desc.load([0, c0 * NS]), _join_streams(ys, BT, NS, BC), acc, MODE)
    acc_pp, acc_res = _unpack_projection(acc, BT, NP, M)
    coef_epilogue(
        acc_pp, acc_res, tl.sum(sumsq, axis=1), toks, tmask, scale_ptr, base_ptr, hpre2_ptr, hpost2_ptr,
        hres2_ptr, mpp_ptr, mres_ptr, rinv_ptr, eps, rms_eps, post_scale, K, N, NP, ITERS, BT, 1,  # RELOAD: 1
    )  # fmt: skip
    if MIX:
        # the pre-mix from the x_{l+1} this program has just stored (from L2 where it is still
        # there, see the launcher) and the h_pre its epilogue has just stored: the barrier makes
        # every thread's stores visible to all of the program's threads, which read other elements
        tl.debug_barrier()
        if NORM and ROWS:
            _pre_mix_norm_rows(out_ptr, hpre2_ptr, gamma_ptr, y_ptr, rnorm_ptr, t0, T, norm_eps, C, N, CP, BT, BTN)
        else:
            h_pre = ()
            for j in tl.static_range(N):
                hj = tl.load(hpre2_ptr + toks * N + j, mask=tmask, other=0.0, cache_modifier=".cg")
                h_pre = h_pre + (hj[:, None],)
            mix_rows = out_ptr + toks[:, None] * K + tl.arange(0, BCM)[None, :]
            y_rows = y_ptr + toks[:, None] * C + tl.arange(0, BCM)[None, :]
            # last-written channels first: the shortest time from each store to its load back. This is
            # the tile's last read in the kernel: marked first to leave L2, it does not push out the
            # tiles still to come (no ".cg" beside it: PTX's ld takes a cache operator or eviction
            # priorities, not both)
            ysq = tl.zeros([BT, BCM], dtype=tl.float32)  # NORM: y's sum of squares, reduced after the loop
            for k in range(C // BCM):
                c0 = C - BCM - k * BCM
                y = tl.zeros([BT, BCM], dtype=tl.float32)
                for j in tl.static_range(N):
                    xj = tl.load(mix_rows + (j * C + c0), mask=tmask[:, None], other=0.0, eviction_policy="evict_first")
                    y = mix_stream(y, h_pre[j], xj)  # pre_mix_op's order: bit-identical y
                y = y.to(y_ptr.dtype.element_ty)
                # with NORM read back below, first the channels written last: kept in L2 till then
                tl.store(y_rows + c0, y, mask=tmask[:, None], eviction_policy="evict_last" if NORM else "")
                if NORM:
                    yf = y.to(tl.float32)  # the norm of the rounded y, as a norm after the pre-mix sees it
                    ysq += yf * yf
            if NORM:
                # the RMSNorm of y (torch.nn.functional.rms_norm's math: y·rsqrt(mean(y²) + eps)·gamma,
                # in fp32): its 1/rms is known only now, so y is scaled where it was written, from L2
                rnorm = 1.0 / tl.sqrt(tl.sum(ysq, axis=1) / C + norm_eps)
                tl.store(rnorm_ptr + toks, rnorm, mask=tmask)
                tl.debug_barrier()  # every thread's y stores visible to the threads that rescale them
                for k in range(C // BCM):
                    c0 = k * BCM
                    g = tl.load(gamma_ptr + c0 + tl.arange(0, BCM)).to(tl.float32)
                    y = tl.load(y_rows + c0, mask=tmask[:, None], other=0.0, eviction_policy="evict_first")
                    z = y.to(tl.float32) * rnorm[:, None] * g[None, :]
                    tl.store(y_rows + c0, z.to(y_ptr.dtype.element_ty), mask=tmask[:, None])


def _launch(
    x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int,
    eps: float, rms_eps: float, post_scale: float, mix: bool, block_t: int | None, block_c: int | None,
    block_c_mix: int | None, num_warps: int | None, num_stages: int | None,
    norm: tuple[Tensor, float] | None = None, whole_rows: bool = False,
) -> tuple[Tensor, ...]:  # fmt: skip
    """The launchers: ``(x_next, y or None (without ``mix``), *coefficient outputs, rnorm or None
    (without ``norm = (gamma, norm_eps)``, which needs ``mix``))``."""
    t, n, c = x.shape
    x_next = torch.empty_like(x)
    y = torch.empty((t, c), dtype=x.dtype, device=x.device) if mix else None
    rnorm = torch.empty((t,), dtype=torch.float32, device=x.device) if norm is not None else None
    outs = empty_coefficient_outputs(x)
    if t == 0:
        return (x_next, y, *outs, rnorm)
    ns, m = next_pow2(n), packed_rows(n)
    narrow = x.dtype != torch.float32
    bt = token_block(block_t or 32)
    block_c = channel_block(c, block_c or (64 if n <= 4 else 16))
    if n <= 4:
        num_warps, num_stages = num_warps or (4 if narrow else 8), num_stages or (4 if narrow else 3)
    else:
        num_warps, num_stages = num_warps or 8, num_stages or (3 if narrow else 2)
    mode = precision_mode(x)
    fnp = pack_fn(fn, n, c, block_c, split=mode != MODE_FMA)
    _post_res_coef_fwd_kernel[(cdiv(t, bt),)](
        tile_descriptor(x, [bt, ns, block_c]), tile_descriptor(f_out, [bt, block_c]), h_post, h_res, x_next,
        tile_descriptor(fnp, [m, ns * block_c]), scale, base, *outs, x_next if y is None else y,
        base if norm is None else norm[0], outs[-1] if rnorm is None else rnorm, t, eps, rms_eps, post_scale,
        0.0 if norm is None else norm[1], C=c, N=n, NS=ns, NP=_np(n), M=m, ITERS=iters, BT=bt, BC=block_c,
        BCM=channel_block(c, block_c_mix or 128) if mix else 64, MODE=mode, MIX=mix,  # BCM: unused without MIX
        NORM=norm is not None, ROWS=whole_rows, CP=next_pow2(c), BTN=min(bt, max(1, 4096 // next_pow2(c))),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return (x_next, y, *outs, rnorm)


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
    """Launcher. Sub-layer l: ``x [T, n, C]`` (bf16/fp16/fp32), ``f_out [T, C]`` (x.dtype), ``h_post [T, n]``,
    ``h_res [T, n, n]`` fp32; sub-layer l+1: ``fn [n²+2n, n·C]``, ``scale [3]``, ``base [n²+2n]``
    fp32; all contiguous -> ``(x_next [T, n, C] x.dtype, h_pre [T, n], h_post [T, n],
    h_res [T, n, n], m_pp [T, 16], m_res [T, NP²], rinv [T])`` (coefficients of l+1, fp32).
    Tiles: ``block_t`` tokens by ``block_c`` channels of every stream per step. Defaults: the
    fastest of ``benchmarks/tune.py`` on an H100 at T = 16384, C = 4096: 32 tokens, and for n <= 4
    64 channels (128-byte rows of 16-bit streams), 4 warps, 4 stages (481 µs; fp32 streams 8 warps,
    3 stages: 900 µs); for n > 4, 16 channels, 8 warps, 3 stages (2 for fp32 streams, whose staged
    tiles would not fit): 1399 µs against 2138 with 4 warps and 2 stages."""
    x_next, _, *outs, _ = _launch(
        x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale, False, block_t, block_c, None,
        num_warps, num_stages,
    )  # fmt: skip
    return (x_next, *outs)


def post_res_coefficients_pre_mix_fwd(
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
    block_c_mix: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher of the same kernel with sub-layer l+1's pre-mix: inputs as in
    :func:`post_res_coefficients_fwd` -> ``(x_next [T, n, C], y [T, C], both x.dtype, h_pre, h_post,
    h_res, m_pp, m_res, rinv)``, ``y = Σ_j h_pre[j]·x_next[j]`` bit-identical to
    ``pre_mix_op.pre_mix_fwd(x_next, h_pre)``.

    Each program, after its epilogue, reads its tokens' x_next back in ``block_c_mix``-channel steps
    (default 128), the channels it wrote last first. Those reads come from L2 as long as what all
    resident programs (one a multiprocessor) have written since is still there: about
    ``block_t``·n·C·(bytes of x) a program, 132 programs on an H100 (50 MB of L2): at n = 4, bf16,
    ``block_t`` = 32, 43 MB at C = 1280 and 69 MB at C = 2048 (each program's own reads of x_l and
    f pass through L2 too), so at C = 2048 only the last-written part is expected to hit; ``block_t``
    = 16 halves the footprint but was slower in the H100 sweep (``benchmarks/tune.py``,
    ``post_res_coef_mix_fwd``). x_next is stored with L2's evict-last hint, so that it stays there
    ahead of the x_l and f streaming through: 181.6 -> 179.9 µs at C = 2048, 118.5 -> 116.8 at
    C = 1280 (H100, ``torchmhc bench``, 2026-12-07). The other tile options and defaults are those
    of :func:`post_res_coefficients_fwd`, so that both give the same coefficients bit for bit; 8
    warps would be 1-2% faster here (116.5 against 118.6 µs at C = 1280, ``benchmarks/tune.py``)
    but lays out the projection's sums differently."""
    return _launch(
        x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale, True, block_t, block_c,
        block_c_mix, num_warps, num_stages,
    )[:-1]  # fmt: skip


def post_res_coefficients_pre_mix_norm_fwd(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    norm_weight: Tensor,
    iters: int,
    eps: float,
    rms_eps: float,
    post_scale: float,
    norm_eps: float,
    *,
    block_t: int | None = None,
    block_c: int | None = None,
    block_c_mix: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    whole_rows: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launcher of the same kernel with sub-layer l+1's pre-mix and its branch's RMSNorm (weight
    ``norm_weight [C]``, any float dtype, contiguous; ``norm_eps``): inputs otherwise as in
    :func:`post_res_coefficients_fwd` -> ``(x_next [T, n, C], z [T, C], both x.dtype, h_pre, h_post,
    h_res, m_pp, m_res, rinv, rnorm [T] fp32)`` where ``z = y·rnorm·norm_weight``, ``rnorm =
    1/sqrt(mean_c(y²) + norm_eps)``, ``y`` the rounded pre-mix of
    :func:`post_res_coefficients_pre_mix_fwd` (the same bits); x_next and the coefficients are
    those of :func:`post_res_coefficients_fwd`, bit for bit.

    y's sum of squares is complete only after the pre-mix's last channel, so each program writes
    its y as before and then scales it in place, the channels it wrote last first: a read and a
    write of C meant to stay in L2 (y is stored with the evict-last hint), where a norm after the
    kernel reads y and writes z from and to memory (2·C a token). On an H100 the rescale costs
    more than that would suggest: this form took 8.66 against 7.74 ms a step of the transition
    kernels without the norm in gpu-dense-1b (47 calls, 20 µs a call; ``e2e.py --profile``,
    ``benchmarks/results/h100.md``), near what a read and a write of y from memory take.
    ``whole_rows`` forms y over whole rows instead, a few tokens at a time with all C channels in
    registers, and writes z alone (:func:`_pre_mix_norm_rows`; at n = 4, C = 2048 it compiles for
    sm_90a to 186 registers a thread without spilling, the in-place form to 188:
    ``benchmarks/registers.py --kernel forward``): not timed on a GPU yet, so not the default
    (``benchmarks/tune.py`` sweeps it)."""
    x_next, z, *outs, rnorm = _launch(
        x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale, True, block_t, block_c,
        block_c_mix, num_warps, num_stages, (norm_weight, norm_eps), whole_rows,
    )  # fmt: skip
    return (x_next, z, *outs, rnorm)


# ----------------------------------------------------------------------------------------------
# Registered ops: opaque to torch.compile (fake impls give shapes), autograd attached
# ----------------------------------------------------------------------------------------------


def empty_transition_grads(
    x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor, fn: Tensor, scale: Tensor, base: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A transition backward's ``(dx, df, dh_post, dh_res, dfn, dscale, dbase)`` for zero tokens: no
    launch; the parameters' gradients are zeros (sums over no tokens)."""
    zeros = [torch.zeros_like(p) for p in (fn, scale, base)]
    return torch.empty_like(x), torch.empty_like(f_out), torch.empty_like(h_post), torch.empty_like(h_res), *zeros


def post_res_coefficients_backward(
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
    """Backward of :func:`post_res_coefficients_fwd` from the gradients of its outputs (``d_next``
    of x_next, fp32 ``d_pre``, ``d_post``, ``d_res``; all given, contiguous) and its saved tensors
    -> ``(dx, df, dh_post, dh_res, dfn, dscale, dbase)``: the coefficient backward of l+1 (adding
    ``d_next`` in its dx pass), then the post-res backward of l."""
    t, n, c = x.shape
    if t == 0:
        return empty_transition_grads(x, f_out, h_post, h_res, fn, scale, base)
    dm, cx, dscale, dbase = coefficients_bwd_tokens(
        m_pp, m_res, rinv, scale, base, d_pre, d_post, d_res, n * c, iters, eps, post_scale
    )
    # total gradient of x_{l+1}: the coefficient pass's share plus what came from downstream
    d_total, dfn = coefficients_bwd_x(x_next, fn, dm, cx, add=d_next)
    dx, df, dh_post, dh_res = post_res_bwd(d_total, x, f_out, h_post, h_res)
    return dx, df, dh_post, dh_res, dfn, dscale, dbase


#: See :func:`post_res_coefficients_fwd`.
post_res_coefficients_op = define_op(
    "post_res_coefficients",
    "(Tensor x, Tensor f_out, Tensor h_post, Tensor h_res, Tensor fn, Tensor scale, Tensor base, int iters,"
    " float eps, float rms_eps, float post_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    post_res_coefficients_fwd,
    lambda x, *_: (torch.empty_like(x), *empty_coefficient_outputs(x)),
)
#: See :func:`post_res_coefficients_pre_mix_fwd`; no autograd of its own: ``dispatch._ChainedPostPre``
#: runs it in its forward and has the backward.
post_res_coefficients_pre_mix_op = define_op(
    "post_res_coefficients_pre_mix",
    "(Tensor x, Tensor f_out, Tensor h_post, Tensor h_res, Tensor fn, Tensor scale, Tensor base, int iters,"
    " float eps, float rms_eps, float post_scale)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    post_res_coefficients_pre_mix_fwd,
    lambda x, *_: (torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2])), *empty_coefficient_outputs(x)),
)
#: See :func:`post_res_coefficients_pre_mix_norm_fwd`; its autograd is ``dispatch._ChainedPostPre``'s.
post_res_coefficients_pre_mix_norm_op = define_op(
    "post_res_coefficients_pre_mix_norm",
    "(Tensor x, Tensor f_out, Tensor h_post, Tensor h_res, Tensor fn, Tensor scale, Tensor base,"
    " Tensor norm_weight, int iters, float eps, float rms_eps, float post_scale, float norm_eps)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    post_res_coefficients_pre_mix_norm_fwd,
    lambda x, *_: (
        torch.empty_like(x), x.new_empty((x.shape[0], x.shape[2])), *empty_coefficient_outputs(x),
        x.new_empty((x.shape[0],), dtype=torch.float32),
    ),
)
#: :func:`post_res_coefficients_backward`.
post_res_coefficients_backward_op = define_op(
    "post_res_coefficients_backward",
    "(Tensor d_next, Tensor d_pre, Tensor d_post, Tensor d_res, Tensor x, Tensor f_out, Tensor h_post,"
    " Tensor h_res, Tensor x_next, Tensor fn, Tensor scale, Tensor base, Tensor m_pp, Tensor m_res, Tensor rinv,"
    " int iters, float eps, float post_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    post_res_coefficients_backward,
    lambda d_next, d_pre, d_post, d_res, x, f_out, h_post, h_res, x_next, fn, scale, base, *_: tuple(
        torch.empty_like(t) for t in (x, f_out, h_post, h_res, fn, scale, base)
    ),
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

    grads = eager_or_compiled(post_res_coefficients_backward_op, post_res_coefficients_backward, x)(
        grad(d_next, tuple(x.shape), x), grad(d_pre, (t, n), rinv), grad(d_post, (t, n), rinv),
        grad(d_res, (t, n, n), rinv), x, f_out, h_post, h_res, x_next, fn, scale, base, m_pp, m_res, rinv,
        iters, eps, post_scale,
    )  # fmt: skip
    # one gradient per input: (x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale)
    return (*grads, None, None, None, None)


torch.library.register_autograd("torchmhc::post_res_coefficients", _backward, setup_context=_setup_context)


class PostResCoefficients(torch.autograd.Function):
    """:func:`post_res_coefficients_op` in eager mode: the launcher, the same context and backward,
    no custom-op dispatch (``_common.eager_or_compiled``)."""

    @staticmethod
    def forward(ctx, *inputs):
        # a forward taking ctx: Function.apply inspects the signature of one with setup_context
        out = post_res_coefficients_fwd(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(_backward)
