"""The CPU path: hyper-connection ops on fp32 CPU tensors in a few large PyTorch ops.

The reference (``torchmhc.functional``) is written to be read. On a CPU at the sizes of the tiny
preset (T = 2048 tokens of n = 4 streams of C = 128) its time goes to the number of ops and of
passes over the stream tensors, not to arithmetic: Sinkhorn's ~40 tiny ops per direction on
``[T, n, n]`` (reductions over a last axis of 4 elements are slow), autograd's backward of the
einsums, RMS norms and broadcasts, and the sums of x's three gradients. Here the same functions are
computed with:

- one autograd Function per op whose hand-written backward reads each stream tensor once or twice;
- Sinkhorn in a token-last layout ``[n, n, T]``: every normalization reduces over a leading axis,
  vectorized along the tokens; the backward replay records each step's denominator and output;
- x handed through each op as a pass-through output (as in the kernels' chained sub-layer, see
  ``dispatch.py``): the gradient of x from the ops downstream arrives at the op upstream, which
  adds its own part into that buffer, so no separate sums of stream-sized gradients remain.

:func:`supported` says where this path applies (fp32 CPU tensors); ``dispatch.py`` chooses it in the
``"auto"`` mode. Values equal the reference's to fp32 rounding (tests/kernels/test_cpu.py, against
the fp64 reference at the coefficient tolerances rtol 1e-5, atol 2e-5).

Legend: T tokens, n streams, C channels; a projection maps rows ``[R, K]`` through ``fn [M, K]``
to ``[R, M]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchmhc.functional import Coefficients

__all__ = [
    "supported",
    "sinkhorn",
    "mhc_coefficients",
    "mhc_pre",
    "hc_coefficients",
    "hc_pre",
    "pre_mix",
    "post_res",
    "head_mix",
]


def supported(*tensors: Tensor) -> bool:
    """True when every tensor is a non-empty fp32 CPU tensor (the caller checks shapes)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in tensors)


# ----------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------


class _RmsProjection(torch.autograd.Function):
    """``m = (x @ fnᵀ) · rsqrt(mean(x²) + rms_eps)`` per row: ``x [R, K]``, ``fn [M, K]`` fp32 ->
    ``(m [R, M], x)``, with x passed through (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Tensor, rms_eps: float) -> tuple[Tensor, Tensor]:
        m_hat = x @ fn.T
        # ‖x‖² / K: one pass over x, where square().mean() makes two
        rinv = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + rms_eps)
        ctx.save_for_backward(x, fn, m_hat, rinv)
        ctx.set_materialize_grads(False)
        return m_hat * rinv, x

    @staticmethod
    def backward(ctx, dm: Tensor | None, d_pass: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:
        if dm is None:
            return d_pass, None, None
        x, fn, m_hat, rinv = ctx.saved_tensors
        dm_hat = dm * rinv
        dx = None
        if ctx.needs_input_grad[0]:
            # through rinv: d rinv / dx = −rinv³·x / K, weighted by Σ dm·m̂ over the outputs
            rms_weight = (dm * m_hat).sum(-1, keepdim=True) * rinv.pow(3) / -x.shape[-1]
            dx = dm_hat @ fn if d_pass is None else torch.addmm(d_pass, dm_hat, fn)
            dx.addcmul_(x, rms_weight)
        dfn = dm_hat.T @ x if ctx.needs_input_grad[1] else None
        return dx, dfn, None


class _PreMix(torch.autograd.Function):
    """``y = Σ_j h[j]·x[j]`` per token: ``x [T, n, C]``, ``h [T, n]`` fp32 -> ``(y [T, C], x)``, with x
    passed through (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, h)
        ctx.set_materialize_grads(False)
        return torch.bmm(h.unsqueeze(1), x).squeeze(1), x

    @staticmethod
    def backward(ctx, dy: Tensor | None, d_pass: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if dy is None:
            return d_pass, None
        x, h = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            h_col, dy_row = h.unsqueeze(-1), dy.unsqueeze(1)  # [T, n, 1], [T, 1, C]
            dx = h_col * dy_row if d_pass is None else torch.addcmul(d_pass, h_col, dy_row)
        dh = torch.bmm(x, dy.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None
        return dx, dh


class _PostRes(torch.autograd.Function):
    """``h_res @ x + h_post ⊗ f`` per token: ``x [T, n, C]``, ``f [T, C]``, ``h_post [T, n]``,
    ``h_res [T, n, n]`` (contiguous: bmm takes a slow per-matrix path otherwise), fp32 -> ``[T, n, C]``."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
        ctx.save_for_backward(x, f, h_post, h_res)
        return torch.bmm(h_res, x).addcmul_(h_post.unsqueeze(-1), f.unsqueeze(1))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, f, h_post, h_res = ctx.saved_tensors
        need_x, need_f, need_post, need_res = ctx.needs_input_grad
        dx = torch.bmm(h_res.mT, g) if need_x else None
        df = torch.bmm(h_post.unsqueeze(1), g).squeeze(1) if need_f else None
        dh_post = torch.bmm(g, f.unsqueeze(-1)).squeeze(-1) if need_post else None
        dh_res = torch.bmm(g, x.mT) if need_res else None
        return dx, df, dh_post, dh_res


def _sinkhorn_tokens_last(logits: Tensor, iters: int, eps: float, record: bool) -> tuple[Tensor, list[Tensor]]:
    """V4 Sinkhorn of ``logits [n, n, T]`` (paper orientation, tokens last) -> ``(H [n, n, T], steps)``.

    The reference's linear form (softmax over columns, + eps, then 2·iters − 1 normalizations by
    (sum + eps), rows first). With ``record``, ``steps`` holds the softmax, then each step's
    denominator and output."""
    soft = torch.softmax(logits, dim=0)
    m = soft + eps
    steps = [soft] if record else []
    for i in range(2 * iters - 1):
        dim = 1 if i % 2 == 0 else 0  # rows (sum over j) after the softmax's columns, then alternate
        denom = m.sum(dim, keepdim=True).add_(eps)
        if record:
            m = m / denom
            steps += [denom, m]
        else:
            m = m.div_(denom)  # m is this function's own: softmax + eps made it
    return m, steps


class _Sinkhorn(torch.autograd.Function):
    """V4 Sinkhorn (eps > 0) of ``logits [T, n, n]`` fp32 -> ``H_res [T, n, n]`` (contiguous).

    Like the reference, forward keeps only the logits (here token-last) and backward replays."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int, eps: float) -> Tensor:
        tokens_last = logits.permute(1, 2, 0).contiguous()
        ctx.save_for_backward(tokens_last)
        ctx.config = (iters, eps)
        out, _ = _sinkhorn_tokens_last(tokens_last, iters, eps, record=False)
        return out.permute(2, 0, 1).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (tokens_last,) = ctx.saved_tensors
        iters, eps = ctx.config
        _, steps = _sinkhorn_tokens_last(tokens_last, iters, eps, record=True)
        g = grad_out.permute(1, 2, 0).contiguous()
        for i in reversed(range(2 * iters - 1)):
            dim = 1 if i % 2 == 0 else 0
            denom, y = steps[1 + 2 * i], steps[2 + 2 * i]
            # y = v / (Σv + ε)  =>  dv = (g − Σ(g·y)) / (Σv + ε)  along the normalized axis
            g = (g - (g * y).sum(dim, keepdim=True)).div_(denom)
        soft = steps[0]
        # softmax over columns: dℓ = (g − Σ(g·s))·s
        g = (g - (g * soft).sum(0, keepdim=True)).mul_(soft)
        return g.permute(2, 0, 1).contiguous(), None, None


# ----------------------------------------------------------------------------------------------
# The ops, on flattened tokens: x [T, n, C] fp32, parameters fp32 (checked by the dispatch)
# ----------------------------------------------------------------------------------------------


# ATen runs an op on fewer values than this (at::internal::GRAIN_SIZE) on the calling thread only.
_ATEN_GRAIN_SIZE = 32768


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """``functional.sinkhorn_knopp(logits, iters, eps)`` for V4 with eps > 0: ``[T, n, n]`` -> ``[T, n, n]``.

    Runs on chunks of tokens small enough for ATen to keep each op on one thread: with more threads
    every one of the ~400 tiny ops per call would wake the others (at T = 2048, n = 4: 240 context
    switches a call, and 2x the CPU time at T = 8192)."""
    tokens_per_chunk = max(1, (_ATEN_GRAIN_SIZE - 1) // logits[0].numel())
    num_chunks = -(-logits.shape[0] // tokens_per_chunk)
    if num_chunks == 1:
        return _Sinkhorn.apply(logits, iters, eps)
    return torch.cat([_Sinkhorn.apply(chunk, iters, eps) for chunk in logits.tensor_split(num_chunks)])


def _mhc_coefficients(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, rms_eps: float, post_scale: float
) -> tuple[Coefficients, Tensor]:
    """The reference's formulas (paper Eq. 7–9, V4 numerics) on this path's projection and
    Sinkhorn -> (coefficients, x passed through ``[T, n, C]``)."""
    t, n, c = x.shape
    mixes, x_pass = _RmsProjection.apply(x.view(t, n * c), fn, rms_eps)
    h_pre = torch.sigmoid(scale[0] * mixes[:, :n] + base[:n]) + eps
    h_post = post_scale * torch.sigmoid(scale[1] * mixes[:, n : 2 * n] + base[n : 2 * n])
    comb = scale[2] * mixes[:, 2 * n :] + base[2 * n :]  # [T, n*n], [source j, destination k]
    h_res = sinkhorn(comb.view(t, n, n).mT, iters, eps)
    return Coefficients(h_pre, h_post, h_res), x_pass.view(t, n, c)


def _hc_coefficients(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, rms_eps: float) -> tuple[Coefficients, Tensor]:
    """``functional.hc_coefficients``'s formulas with each stream's RMS applied after the
    projection -> (coefficients, x passed through ``[T, n, C]``)."""
    t, n, c = x.shape
    mixes, x_pass = _RmsProjection.apply(x.view(t * n, c), fn, rms_eps)
    dynamic = torch.tanh(mixes).view(t, n, n + 2)  # [T, source j, n + 2]
    h_pre = base[:n] + scale[0] * dynamic[..., 0]
    h_post = base[n : 2 * n] + scale[1] * dynamic[..., 1]
    comb = base[2 * n :].view(n, n) + scale[2] * dynamic[..., 2:]  # [T, source j, destination k]
    return Coefficients(h_pre, h_post, comb.mT.contiguous()), x_pass.view(t, n, c)


def mhc_coefficients(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, rms_eps: float, post_scale: float
) -> Coefficients:
    """``functional.mhc_coefficients`` (Sinkhorn, V4 with eps > 0): ``x [T, n, C]`` -> fp32
    ``(h_pre [T, n], h_post [T, n], h_res [T, n, n])``."""
    return _mhc_coefficients(x, fn, scale, base, iters, eps, rms_eps, post_scale)[0]


def mhc_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, rms_eps: float, post_scale: float
) -> tuple[Tensor, Tensor, Coefficients]:
    """mHC coefficients and layer input of ``x [T, n, C]`` -> ``(y [T, C], x_for_post [T, n, C],
    Coefficients)``; pass ``x_for_post`` to :func:`post_res`, so that x's gradients meet in one buffer."""
    coefficients, x_pass = _mhc_coefficients(x, fn, scale, base, iters, eps, rms_eps, post_scale)
    y, x_for_post = _PreMix.apply(x_pass, coefficients.h_pre)
    return y, x_for_post, coefficients


def hc_coefficients(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, rms_eps: float) -> Coefficients:
    """``functional.hc_coefficients``: ``x [T, n, C]``, ``fn [n + 2, C]`` -> fp32 Coefficients."""
    return _hc_coefficients(x, fn, scale, base, rms_eps)[0]


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, rms_eps: float) -> tuple[Tensor, Tensor, Coefficients]:
    """HC coefficients and layer input, chained like :func:`mhc_pre`."""
    coefficients, x_pass = _hc_coefficients(x, fn, scale, base, rms_eps)
    y, x_for_post = _PreMix.apply(x_pass, coefficients.h_pre)
    return y, x_for_post, coefficients


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """``functional.pre_mix``: ``x [T, n, C]``, ``h_pre [T, n]`` -> ``[T, C]``."""
    return _PreMix.apply(x, h_pre)[0]


def post_res(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``functional.post_res``: ``x [T, n, C]``, ``f_out [T, C]``, ``h_post [T, n]``, ``h_res [T, n, n]``
    -> ``[T, n, C]``."""
    return _PostRes.apply(x, f_out, h_post, h_res.contiguous())


def head_mix(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, rms_eps: float) -> Tensor:
    """``functional.head_mix``: ``x [T, n, C]``, ``fn [n, n*C]``, ``scale [1]``, ``base [n]`` -> ``[T, C]``."""
    t, n, c = x.shape
    mixes, x_pass = _RmsProjection.apply(x.view(t, n * c), fn, rms_eps)
    weights = torch.sigmoid(scale * mixes + base) + eps
    return _PreMix.apply(x_pass.view(t, n, c), weights)[0]
