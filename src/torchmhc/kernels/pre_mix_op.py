"""F_pre (paper Sec. 4.3.1): the layer input ``y = Σ_j h_pre[j] · x[j]`` of every token, fused.

Forward reads the n·C stream values once and writes C; backward reads x (n·C) and dy (C) once,
writes dx (n·C) and reduces ``dh_pre[j] = Σ_c dy[c]·x[j, c]`` on-chip (no atomics: deterministic).
The backward can leave dx out (:func:`pre_mix_dh`: reads n·C + C, writes n values a token): the
chained sub-layer (``dispatch.mhc_pre``) computes only dh_pre here and sums ``h_pre ⊗ dy`` into the
coefficient backward's dx pass, which reads and writes the streams anyway.

Legend: T tokens, n streams (NP = n padded to a power of two), C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import channel_block, define_op, eager_or_compiled, next_pow2

__all__ = [
    "mix_stream",
    "pre_mix_fwd",
    "pre_mix_bwd",
    "pre_mix_dh",
    "pre_mix_op",
    "PreMix",
    "pre_mix_backward_op",
    "pre_mix_dh_op",
]


@triton.jit
def mix_stream(y, h, x):
    """One term of ``y = Σ_j h[j]·x[j]``: ``y + h·x`` in fp32 as one fused multiply-add (``h`` a
    scalar or a column broadcast over y's shape; ``x`` in the stream dtype). Every kernel that forms a
    layer input adds the streams with it in the order j = 0, 1, ... from y = 0, so their outputs are
    bit-identical (the fused transition's re-walk, ``post_res_coefficients_op``, is one)."""
    return tl.fma(tl.broadcast_to(h, y.shape), x.to(tl.float32), y)


@triton.jit
def _pre_mix_fwd_kernel(x_ptr, h_ptr, out_ptr, C: tl.constexpr, N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (T,): one token per program. Streams are read as separate rows and accumulated
    # elementwise: a cross-warp reduction over the stream axis ran 10x slower at C = 1280.
    t = tl.program_id(0).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        y = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(N):
            y = mix_stream(y, tl.load(h_ptr + t * N + j), tl.load(x_ptr + (t * N + j) * C + cols))
        tl.store(out_ptr + t * C + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _pre_mix_bwd_kernel(
    g_ptr,  # [T, C] dL/dy
    x_ptr,  # [T, n, C]
    h_ptr,  # [T, n] fp32 (unused without DX)
    dx_ptr,  # [T, n, C] out (unused without DX)
    dh_ptr,  # [T, n] fp32 out
    C: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DX: tl.constexpr,
):
    # grid (T,): one token per program, looping over C so that dh_pre is reduced in registers.
    # C is a compile-time constant: loop bounds from runtime scalars break the CPU interpreter
    # (triton 3.6 with numpy >= 2.4) and C is fixed for a model anyway. BLOCK_C need not divide
    # C: a block past C is masked (one masked step can replace a loop of small ones, e.g. 2048 for
    # C = 1280 instead of five steps of 256).
    t = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, NP)
    rmask = rows < N
    if DX:
        h = tl.load(h_ptr + t * N + rows, mask=rmask, other=0.0)
    # elementwise partial products; one reduction at the end instead of one per chunk
    acc = tl.zeros([NP, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = (t * N + rows[:, None]) * C + cols[None, :]
        g = tl.load(g_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += x * g[None, :]
        if DX:
            dx = h[:, None] * g[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + t * N + rows, tl.sum(acc, axis=1), mask=rmask)


def pre_mix_fwd(x: Tensor, h_pre: Tensor) -> Tensor:
    """Launcher. ``x [T, n, C]`` contiguous (bf16/fp16/fp32), ``h_pre [T, n]`` fp32 contiguous
    -> ``y [T, C]`` in x.dtype (fp32 accumulation). Needs C % 64 == 0."""
    t, n, c = x.shape
    out = torch.empty((t, c), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    block_c = channel_block(c)
    _pre_mix_fwd_kernel[(t,)](x, h_pre, out, C=c, N=n, BLOCK_C=block_c, num_warps=4)
    return out


def _launch_bwd(
    grad: Tensor, x: Tensor, h_pre: Tensor | None, block_c: int | None = None, num_warps: int = 4
) -> tuple[Tensor, Tensor]:
    """dx (only when ``h_pre`` is given; else x stands in) and dh_pre. ``block_c``: channels a step,
    a power of two; steps past C are masked. Default: C's next power of two, at most 4096 / n's
    next power of two (at least 64): at T = 8192, C = 1280, n = 4 two steps of 1024 take the dh-only
    pass from 49.9 to 48.1 µs against five of 256 (H100, ``benchmarks/tune.py``, ``pre_mix_dh``)."""
    with_dx = h_pre is not None
    t, n, c = x.shape
    dx = torch.empty_like(x) if with_dx else x
    dh = torch.empty((t, n), dtype=torch.float32, device=x.device)
    if t == 0:
        return dx, dh
    np_ = next_pow2(n)
    if block_c is None:
        block_c = min(max(64, 4096 // np_), next_pow2(c))
    elif block_c < 16 or block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}.")
    _pre_mix_bwd_kernel[(t,)](
        grad, x, x if h_pre is None else h_pre, dx, dh, C=c, N=n, NP=np_, BLOCK_C=block_c, DX=with_dx,
        num_warps=num_warps,
    )  # fmt: skip
    return dx, dh


def pre_mix_bwd(grad: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    """Launcher. ``grad [T, C]`` (dL/dy), ``x [T, n, C]``, ``h_pre [T, n]`` fp32, all contiguous
    -> ``(dx [T, n, C] in x.dtype, dh_pre [T, n] fp32)``."""
    return _launch_bwd(grad, x, h_pre)


def pre_mix_dh(grad: Tensor, x: Tensor, *, block_c: int | None = None, num_warps: int = 4) -> Tensor:
    """Launcher of the backward without dx: ``grad [T, C]``, ``x [T, n, C]`` contiguous
    -> ``dh_pre [T, n]`` fp32, ``dh_pre[j] = Σ_c grad[c]·x[j, c]`` (reads x once, writes nothing
    stream-sized). ``block_c`` (channels a step, a power of two that need not divide C) and
    ``num_warps`` are launch options (``benchmarks/tune.py``)."""
    return _launch_bwd(grad, x, None, block_c, num_warps)[1]


# ----------------------------------------------------------------------------------------------
# Registered ops: opaque to torch.compile (fake impls give shapes), autograd attached
# ----------------------------------------------------------------------------------------------


#: ``x [T, n, C]``, ``h_pre [T, n]`` fp32 -> ``[T, C]`` in x.dtype.
pre_mix_op = define_op(
    "pre_mix", "(Tensor x, Tensor h_pre) -> Tensor", pre_mix_fwd, lambda x, h_pre: x.new_empty((x.shape[0], x.shape[2]))
)
#: ``(dx, dh_pre)`` of :func:`pre_mix_bwd`.
pre_mix_backward_op = define_op(
    "pre_mix_backward",
    "(Tensor grad, Tensor x, Tensor h_pre) -> (Tensor, Tensor)",
    pre_mix_bwd,
    lambda grad, x, h_pre: (torch.empty_like(x), torch.empty_like(h_pre)),
)
#: :func:`pre_mix_dh`: ``dh_pre [T, n]`` fp32 alone.
pre_mix_dh_op = define_op(
    "pre_mix_dh",
    "(Tensor grad, Tensor x) -> Tensor",
    pre_mix_dh,
    lambda grad, x: x.new_empty(x.shape[:2], dtype=torch.float32),
)


def _setup_context(ctx, inputs, output) -> None:
    x, h_pre = inputs
    ctx.save_for_backward(x, h_pre)


def _backward(ctx, grad: Tensor):
    x, h_pre = ctx.saved_tensors
    dx, dh = eager_or_compiled(pre_mix_backward_op, pre_mix_bwd, x)(grad.contiguous(), x, h_pre)
    # one gradient per input: (x, h_pre)
    return dx, dh


torch.library.register_autograd("torchmhc::pre_mix", _backward, setup_context=_setup_context)


class PreMix(torch.autograd.Function):
    """:func:`pre_mix_op` in eager mode: the launcher, the same context and backward, no custom-op
    dispatch (``_common.eager_or_compiled``)."""

    @staticmethod
    def forward(ctx, x: Tensor, h_pre: Tensor) -> Tensor:
        # a forward taking ctx: Function.apply inspects the signature of one with setup_context
        out = pre_mix_fwd(x, h_pre)
        _setup_context(ctx, (x, h_pre), out)
        return out

    backward = staticmethod(_backward)
