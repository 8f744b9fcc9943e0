"""F_post,res (paper Sec. 4.3.1): ``out[i] = Σ_j h_res[i, j]·x[j] + h_post[i]·f`` per token, fused.

Forward reads x (n·C) and f (C) once and writes n·C. Backward reads dout (n·C), x (n·C) and f (C)
once, writes dx (n·C) and df (C), and reduces the coefficient gradients on-chip:
``dh_res[i, j] = Σ_c dout[i, c]·x[j, c]``, ``dh_post[i] = Σ_c dout[i, c]·f[c]`` (no atomics).
The backward packs 16 // n tokens into 16-row tiles and runs the mixes as tensor-core products.

Legend: T tokens, n streams (NP = n padded to a power of two), C channels; h_res in paper
orientation (row i = destination).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import cdiv, channel_block, define_op, eager_or_compiled, next_pow2
from torchmhc.kernels._precision import MODE_BF16, MODE_FMA, dot_f32_bf16, precision_mode

__all__ = [
    "post_res_fwd",
    "post_res_bwd",
    "post_res_op",
    "PostRes",
    "post_res_backward_op",
]


def _token_slab(c: int, limit: int) -> int:
    """Channels per step of a kernel that walks one token's C channels: the largest power of two
    <= ``limit`` dividing C, unless that is under ``limit / 2`` (C = 64 · odd, e.g. 1280 = 256 · 5);
    then one power of two up to ``limit`` with a masked tail, which keeps more of the token's loads
    in flight (H100, T = 8192, C = 1280: 88 µs in 256-channel steps, 70 in one masked 2048-wide
    step; the same for the pre-mix kernels gained nothing, so they keep dividing steps)."""
    block = channel_block(c, limit)
    return block if block >= limit // 2 else min(limit, next_pow2(c))


@triton.jit
def _post_res_fwd_kernel(
    x_ptr, f_ptr, hpost_ptr, hres_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr
):
    # grid (T,): one token per program, its [n, BLOCK_C] slabs in turn; BLOCK_C need not divide C
    # (the last slab is masked): at C = 1280 one 2048-wide slab keeps a whole token's loads in flight
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    rmask = rows < N
    hpost = tl.load(hpost_ptr + t * N + rows, mask=rmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        f = tl.load(f_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = hpost[:, None] * f[None, :]
        # source streams one at a time: each x row is read once, h_res column j scales it into all rows
        for j in tl.static_range(N):
            hcol = tl.load(hres_ptr + t * N * N + rows * N + j, mask=rmask, other=0.0)
            xj = tl.load(x_ptr + (t * N + j) * C + cols, mask=cmask, other=0.0).to(tl.float32)
            acc = tl.fma(hcol[:, None], xj[None, :], acc)  # explicit: the fused transition kernel repeats it
        offs = (t * N + rows[:, None]) * C + cols[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _post_res_bwd_kernel(
    g_ptr,
    x_ptr,
    f_ptr,
    hpost_ptr,
    hres_ptr,
    dx_ptr,
    df_ptr,
    dhpost_ptr,
    dhres_ptr,
    T,
    C: tl.constexpr,
    N: tl.constexpr,
    TPB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MODE: tl.constexpr,
):
    # grid (cdiv(T, TPB),): TPB = 16 // n tokens per program; their TPB·n stream rows (contiguous in
    # [T·n, C]) form one 16-row tile, so that the per-token n x n products become 16 x 16 tensor-core
    # products with block-diagonal coefficient matrices (rows a and b interact only within a token)
    t0 = tl.program_id(0) * TPB
    r = tl.arange(0, 16)
    tok = t0 + r // N
    rvalid = (r < TPB * N) & (tok < T)
    tok64 = tok.to(tl.int64)
    stream = r % N
    same = (r[:, None] // N == r[None, :] // N) & rvalid[:, None] & rvalid[None, :]
    # ht[a, b] = h_res[token, i_b, j_a]: dx rows are source streams j, columns destinations i
    ht = tl.load(hres_ptr + tok64[:, None] * N * N + stream[None, :] * N + stream[:, None], mask=same, other=0.0)
    # pm[a, b] = h_post[token_b, i_b] where a is b's local token: df rows are tokens
    pmask = (r[:, None] == r[None, :] // N) & rvalid[None, :]
    pm = tl.load(hpost_ptr + tok64[None, :] * N + stream[None, :] + 0 * r[:, None], mask=pmask, other=0.0)
    acc_res = tl.zeros([16, 16], dtype=tl.float32)  # Σ_c dout[a, c]·x[b, c]
    acc_post = tl.zeros([16, BLOCK_C], dtype=tl.float32)  # elementwise dout·f, reduced at the end
    df_rows = t0 + r
    df_mask = (r < TPB) & (df_rows < T)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        offs = tok64[:, None] * (N * C) + stream[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + offs, mask=rvalid[:, None], other=0.0)
        x = tl.load(x_ptr + offs, mask=rvalid[:, None], other=0.0)
        gf = g.to(tl.float32)
        f = tl.load(f_ptr + tok64[:, None] * C + cols[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32)
        acc_post += gf * f
        if MODE == 1:  # bf16 x bf16: exact products
            acc_res = tl.dot(g, tl.trans(x), acc_res)
        else:
            acc_res = tl.dot(gf, tl.trans(x.to(tl.float32)), acc_res, input_precision="ieee")
        # fp32 coefficients against the stream: split into exact bf16 parts (MODE_BF16)
        dx = dot_f32_bf16(ht, g, tl.zeros([16, BLOCK_C], dtype=tl.float32), MODE)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=rvalid[:, None])
        df = dot_f32_bf16(pm, g, tl.zeros([16, BLOCK_C], dtype=tl.float32), MODE)
        df_offs = df_rows[:, None].to(tl.int64) * C + cols[None, :]
        tl.store(df_ptr + df_offs, df.to(df_ptr.dtype.element_ty), mask=df_mask[:, None])
    tl.store(dhres_ptr + tok64[:, None] * N * N + stream[:, None] * N + stream[None, :], acc_res, mask=same)
    tl.store(dhpost_ptr + tok64 * N + stream, tl.sum(acc_post, axis=1), mask=rvalid)


def post_res_fwd(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    *,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Launcher. ``x [T, n, C]`` (bf16/fp16/fp32), ``f_out [T, C]`` (any float dtype),
    ``h_post [T, n]`` fp32, ``h_res [T, n, n]`` fp32, all contiguous -> ``[T, n, C]`` in x.dtype.
    ``block_c``: channels per step, a power of two (the last step is masked where it does not
    divide C); default :func:`_token_slab` of 8192 // n for n <= 4, else 4096 // n. ``num_warps``
    defaults to one per 1024 tile values, at least 4, and 4 for a masked step (H100,
    ``benchmarks/tune.py``: 2048 channels x 8 warps at C = 4096, n = 4; 8 warps on the 1024-channel
    tiles of C = 7168 lost 20%; 2048 masked channels x 4 warps at C = 1280)."""
    t, n, c = x.shape
    out = torch.empty_like(x)
    if t == 0:
        return out
    np_ = next_pow2(n)
    block_c = block_c or _token_slab(c, max(64, (8192 if n <= 4 else 4096) // np_))
    num_warps = num_warps or (4 if c % block_c else max(4, min(8, np_ * block_c // 1024)))
    _post_res_fwd_kernel[(t,)](x, f_out, h_post, h_res, out, C=c, N=n, NP=np_, BLOCK_C=block_c, num_warps=num_warps)
    return out


def post_res_bwd(
    grad: Tensor,
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    *,
    block_c: int = 128,
    num_warps: int = 1,
    num_stages: int = 3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launcher. ``grad [T, n, C]`` (dL/dout) and the forward's inputs, all contiguous
    -> ``(dx [T, n, C] x.dtype, df [T, C] f_out.dtype, dh_post [T, n] fp32, dh_res [T, n, n] fp32)``.
    ``block_c``: channels per step (at most; a power of two dividing C is used)."""
    t, n, c = x.shape
    dx = torch.empty_like(x)
    df = torch.empty_like(f_out)
    dh_post = torch.empty((t, n), dtype=torch.float32, device=x.device)
    dh_res = torch.empty((t, n, n), dtype=torch.float32, device=x.device)
    if t == 0:
        return dx, df, dh_post, dh_res
    tpb = 16 // n
    # bf16 streams on tensor cores (fp32-exact, see _precision.py); fp16/fp32 streams and the CPU
    # interpreter multiply in fp32 on CUDA cores
    mode = MODE_BF16 if precision_mode(x) == MODE_BF16 else MODE_FMA
    _post_res_bwd_kernel[(cdiv(t, tpb),)](
        grad, x, f_out, h_post, h_res, dx, df, dh_post, dh_res, t,
        C=c, N=n, TPB=tpb, BLOCK_C=channel_block(c, block_c), MODE=mode, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dx, df, dh_post, dh_res


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


#: ``x [T, n, C]``, ``f_out [T, C]``, ``h_post [T, n]``, ``h_res [T, n, n]`` -> ``[T, n, C]``.
post_res_op = define_op(
    "post_res",
    "(Tensor x, Tensor f_out, Tensor h_post, Tensor h_res) -> Tensor",
    post_res_fwd,
    lambda x, f_out, h_post, h_res: torch.empty_like(x),
)
post_res_backward_op = define_op(
    "post_res_backward",
    "(Tensor grad, Tensor x, Tensor f_out, Tensor h_post, Tensor h_res) -> (Tensor, Tensor, Tensor, Tensor)",
    post_res_bwd,
    lambda grad, x, f_out, h_post, h_res: tuple(torch.empty_like(t) for t in (x, f_out, h_post, h_res)),
)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor):
    x, f_out, h_post, h_res = ctx.saved_tensors
    backward = eager_or_compiled(post_res_backward_op, post_res_bwd, x)
    dx, df, dh_post, dh_res = backward(grad.contiguous(), x, f_out, h_post, h_res)
    # one gradient per input: (x, f_out, h_post, h_res)
    return dx, df, dh_post, dh_res


torch.library.register_autograd("torchmhc::post_res", _backward, setup_context=_setup_context)


class PostRes(torch.autograd.Function):
    """:func:`post_res_op` in eager mode: the launcher, the same context and backward, no custom-op
    dispatch (``_common.eager_or_compiled``)."""

    @staticmethod
    def forward(ctx, x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
        # a forward taking ctx: Function.apply inspects the signature of one with setup_context
        out = post_res_fwd(x, f_out, h_post, h_res)
        _setup_context(ctx, (x, f_out, h_post, h_res), out)
        return out

    backward = staticmethod(_backward)
