"""Reference mathematics of hyper-connections in plain PyTorch.

Everything here is the ground truth that the fused kernels and the models are tested against
(``docs/math.md`` writes out the equations and conventions).

Legend::

    n     number of residual streams (expansion rate)
    C     hidden size of one stream
    ...   any leading dims (batch, sequence, ...)
    x     residual streams            [..., n, C]   activation dtype (bf16 / fp16 / fp32 / fp64)
    h_pre pre-mix weights H_pre       [..., n]      fp32 (fp64 when the parameters are fp64)
    h_post post weights H_post        [..., n]      fp32
    h_res residual mixing H_res       [..., n, n]   fp32, paper orientation: row i = destination

DeepSeek-V4 stores the residual mixing transposed (``comb[j, k]``, j = source, k = destination);
this module converts once, in :func:`comb_to_paper`, and speaks the paper's orientation elsewhere.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from .checks import (
    check_branch_output,
    check_coefficient_options,
    check_eps,
    check_floating,
    check_rms_eps,
    check_same_device,
    check_shape,
    check_square,
    check_streams,
)

# sinkhorn_knopp's name for check_floating (that function is edited elsewhere; rename it there)
_check_floating = check_floating

__all__ = [
    "Coefficients",
    "sinkhorn_knopp",
    "mhc_coefficients",
    "hc_coefficients",
    "pre_mix",
    "post_res",
    "head_mix",
    "amax_gain",
    "comb_to_paper",
    "paper_to_comb",
    "coefficient_dtype",
]

SinkhornConvention = Literal["v4", "paper"]


class Coefficients(NamedTuple):
    """The three mixing coefficients of one hyper-connection for every token (fp32)."""

    h_pre: Tensor  # [..., n]
    h_post: Tensor  # [..., n]
    h_res: Tensor  # [..., n, n], paper orientation


class ResidualProjection(Protocol):
    """What :func:`mhc_coefficients` needs from a manifold (see ``torchmhc.manifolds``)."""

    def num_logits(self, n: int) -> int: ...

    def project(self, logits: Tensor, n: int) -> Tensor: ...


def coefficient_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any tensor is fp64 (gradient checks), else fp32: coefficient math is never bf16."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------


def comb_to_paper(comb: Tensor, n: int) -> Tensor:
    """DeepSeek's flattened ``comb`` ``[..., n*n]`` ([source j, destination k] row-major)
    -> paper-orientation matrix ``[..., n, n]`` (row = destination)."""
    return comb.unflatten(-1, (n, n)).transpose(-1, -2)


def paper_to_comb(h: Tensor) -> Tensor:
    """Inverse of :func:`comb_to_paper`: ``[..., n, n]`` -> ``[..., n*n]``."""
    return h.transpose(-1, -2).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (docs/math.md §5)
# ----------------------------------------------------------------------------------------------


def _in_log_domain(dtype: torch.dtype, eps: float, convention: SinkhornConvention) -> bool:
    """Whether the projection runs on log-matrices (see :func:`_sinkhorn_iterate`).

    V4 with eps = 0, or with an eps below the smallest normal number of ``dtype`` (adding it would
    change nothing), is the paper's function."""
    return convention == "paper" or eps < torch.finfo(dtype).tiny


def _log_normalize(log_m: Tensor, dim: int, floor: float | None = None) -> Tensor:
    """``log_m − logsumexp(log_m)`` along ``dim``, shifted by the max first and only then reduced, so
    that the entries that carry the mass (near the max) come out accurate whatever the magnitude of
    ``log_m`` (``torch.logsumexp`` adds the max back before the subtraction, which rounds at
    |log_m|'s precision: 1e-3 at 1e4 in fp32). ``floor`` clamps the shifted values from below."""
    shifted = log_m - log_m.amax(dim, keepdim=True)
    if floor is not None:
        shifted = shifted.clamp_min(floor)
    return shifted - shifted.exp().sum(dim, keepdim=True).log()


def _sinkhorn_iterate(logits: Tensor, iters: int, eps: float, convention: SinkhornConvention, record: bool):
    """Runs the projection in paper orientation; returns (H, steps).

    Both forms normalize columns first, then rows, ``2·iters`` normalizations in all, so the last
    one normalizes rows. ``steps`` holds what the backward walk needs of every normalization and its
    axis when ``record`` is set (see :func:`_sinkhorn_backward`).

    - Log domain (the paper's convention; V4 without eps): the paper's exp(logits) underflows to an
      all-zero row when a row's logits lie far below the rest of their columns (two rows 200 apart
      in fp32, 800 in fp64), and no normalization restores it. Here every normalization, the first
      column one (which absorbs the exp) included, subtracts a logsumexp from log-matrices, which
      stay finite for any finite logits. Only the final exp may underflow, for single entries: the
      row just normalized holds an entry >= 1/n, and every row sums to 1 to rounding. ``steps``
      holds each normalization's output, exponentiated.
    - Linear (V4 with eps > 0, DeepSeek's numerics, which the fused kernels reproduce): softmax over
      columns, + eps, then each normalization divides by (sum + eps), so no denominator is below
      eps and every entry stays >= 0 and finite. ``steps`` holds each normalization's input ``v``.
    """
    if _in_log_domain(logits.dtype, eps, convention):
        # logits spread over more than the dtype's range would leave -inf rows (NaN next step)
        log_m = _log_normalize(logits, -2, floor=torch.finfo(logits.dtype).min)
        steps: list[tuple[Tensor, int]] = [(log_m.exp(), -2)] if record else []
        for i in range(2 * iters - 1):
            dim = -1 if i % 2 == 0 else -2  # rows after the first columns, then alternate
            log_m = _log_normalize(log_m, dim)
            if record:
                steps.append((log_m.exp(), dim))
        return log_m.exp(), steps
    m = torch.softmax(logits, dim=-2) + eps
    steps = []
    for i in range(2 * iters - 1):
        dim = -1 if i % 2 == 0 else -2
        if record:
            steps.append((m, dim))
        m = m / (m.sum(dim, keepdim=True) + eps)
    return m, steps


def _sinkhorn_backward(
    logits: Tensor, out: Tensor, steps: list[tuple[Tensor, int]], grad_out: Tensor, eps: float, log_domain: bool
) -> Tensor:
    """Walks the recorded normalizations of :func:`_sinkhorn_iterate` in reverse -> dL/dlogits."""
    if log_domain:
        # out = exp(L): dL = g·out. A normalization L' = L − logsumexp(L) (log_softmax included) has
        # softmax(L) = exp(L') = y, so dL = g − y·Σg along its axis.
        g = grad_out * out
        for y, dim in reversed(steps):
            g = g - y * g.sum(dim, keepdim=True)
        return g
    g = grad_out
    for v, dim in reversed(steps):
        denom = v.sum(dim, keepdim=True) + eps
        y = v / denom
        # y = v / (Σv + ε)  =>  dv = (g − Σ(g·y)) / (Σv + ε)  along the normalized axis
        g = (g - (g * y).sum(dim, keepdim=True)) / denom
    soft = torch.softmax(logits, dim=-2)
    # softmax over columns: dℓ = (g − Σ(g·s))·s
    return (g - (g * soft).sum(-2, keepdim=True)) * soft


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn with a recomputing backward: forward keeps only the logits alive; backward replays
    the iteration and walks it in reverse, so the 2·t_max intermediates per token exist only
    transiently inside backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int, eps: float, convention: SinkhornConvention) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.config = (iters, eps, convention)
        out, _ = _sinkhorn_iterate(logits, iters, eps, convention, record=False)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (logits,) = ctx.saved_tensors
        iters, eps, convention = ctx.config
        out, steps = _sinkhorn_iterate(logits, iters, eps, convention, record=True)
        log_domain = _in_log_domain(logits.dtype, eps, convention)
        return _sinkhorn_backward(logits, out, steps, grad_out, eps, log_domain), None, None, None


def _check_sinkhorn_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def sinkhorn_knopp(
    logits: Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    *,
    convention: SinkhornConvention = "v4",
) -> Tensor:
    """Projects logits onto the doubly-stochastic matrices (Birkhoff polytope): exp(logits), then
    ``iters`` times normalize columns, then rows (paper Eq. 9).

    Args:
        logits: ``[..., n, n]`` in paper orientation (row i = destination stream i), any float dtype;
            bf16/fp16 are computed in fp32. Any finite values.
        iters: t_max, the number of (column, row) normalization pairs, >= 1.
        eps: DeepSeek-V4's epsilon (added after the softmax and to every denominator), a finite
            number >= 0. Ignored by ``convention="paper"``, which uses none.
        convention: ``"v4"`` (default; softmax start, eps everywhere) or ``"paper"`` (exp start, no eps).
            With eps = 0 both compute the same function, in the log domain (exact for any finite
            logits; see :func:`_sinkhorn_iterate`).

    Returns:
        ``[..., n, n]`` fp32 (fp64 for fp64 input), entries in [0, 1], finite for finite logits.
        The last step normalizes rows: with the paper's convention (or eps = 0) rows sum to 1 to
        rounding; with V4's eps > 0 a row sums to S/(S + eps), S its sum before that step, which
        is within about (n + 1)·eps of 1 for iters >= 2 (with iters = 1, a row whose
        exponentials all underflow sums to n/(n + 1)). Columns sum to 1 within what ``iters``
        allows. Gradients come from a recomputing backward.
    """
    _check_floating(logits, "logits")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape [..., n, n], got {list(logits.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    eps = _check_sinkhorn_eps(eps)
    if convention not in ("v4", "paper"):
        raise ValueError(f"convention must be 'v4' or 'paper', got {convention!r}")
    return _SinkhornKnopp.apply(logits.to(coefficient_dtype(logits)), iters, eps, convention)


# ----------------------------------------------------------------------------------------------
# mHC coefficients (docs/math.md §4), DeepSeek-V4 parameter layout
# ----------------------------------------------------------------------------------------------


def _rms_scaled_projection(x: Tensor, fn: Tensor, rms_eps: float) -> Tensor:
    """``vec(x) @ fn.T * rsqrt(mean(vec(x)²) + rms_eps)`` in fp32: ``[..., n, C]`` -> ``[..., rows]``.

    The RMSNorm of paper Eq. 7 with its weight absorbed into ``fn`` and the division after the matmul.
    """
    dtype = coefficient_dtype(x, fn)
    flat = x.flatten(-2).to(dtype)
    return (flat @ fn.to(dtype).T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)


def mhc_coefficients(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    rms_eps: float = 1e-6,
    post_scale: float = 2.0,
    manifold: ResidualProjection | None = None,
) -> Coefficients:
    """Dynamic mHC coefficients of every token (paper Eq. 7–9, DeepSeek-V4 numerics).

    Args:
        x: streams ``[..., n, C]``, any float dtype (read once, computed in fp32).
        fn: ``[n*n + 2n, n*C]`` fp32 projection φᵀ, rows ordered [pre | post | res]; the res rows
            are DeepSeek's ``comb`` flattened as [source j, destination k]. With ``manifold`` given,
            ``[2n + manifold.num_logits(n), n*C]``.
        scale: ``[3]`` fp32 gates (α_pre, α_post, α_res).
        base: ``[rows]`` fp32 biases, same order as ``fn``'s rows.
        iters, eps: Sinkhorn t_max and DeepSeek's epsilon (also added to ``h_pre``).
        rms_eps: epsilon of the RMS normalization over all n·C values.
        post_scale: multiplier of σ in H_post (2.0 in the paper and DeepSeek-V4).
        manifold: another H_res constraint from ``torchmhc.manifolds`` (default: Sinkhorn-Knopp).

    Returns:
        :class:`Coefficients` ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32,
        paper orientation.
    """
    check_coefficient_options(iters, eps, rms_eps, post_scale)
    n, c = check_streams(x)
    num_res = n * n if manifold is None else manifold.num_logits(n)
    rows = 2 * n + num_res
    what = f" for x with n={n} streams of C={c} ([2n + {num_res}, n*C])"
    check_shape(fn, "fn", (rows, n * c), what)
    check_shape(scale, "scale", (3,), " (α_pre, α_post, α_res)")
    check_shape(base, "base", (rows,), f" (one bias per row of fn, n={n})")
    check_same_device(x, fn=fn, scale=scale, base=base)

    mixes = _rms_scaled_projection(x, fn, rms_eps)
    scale, base = scale.to(mixes.dtype), base.to(mixes.dtype)
    h_pre = torch.sigmoid(scale[0] * mixes[..., :n] + base[:n]) + eps
    h_post = post_scale * torch.sigmoid(scale[1] * mixes[..., n : 2 * n] + base[n : 2 * n])
    res_logits = scale[2] * mixes[..., 2 * n :] + base[2 * n :]
    if manifold is None:
        h_res = sinkhorn_knopp(comb_to_paper(res_logits, n), iters, eps)
    else:
        h_res = manifold.project(res_logits, n)
    return Coefficients(h_pre, h_post, h_res)


# ----------------------------------------------------------------------------------------------
# Original Hyper-Connections (Zhu et al., docs/math.md §3): static + tanh-dynamic, unconstrained
# ----------------------------------------------------------------------------------------------


def hc_coefficients(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, rms_eps: float = 1e-6) -> Coefficients:
    """Coefficients of the original (unconstrained) Hyper-Connections.

    Each stream is RMS-normalized on its own (x̃_j = RMSNorm(x_j) over C); stream j's dynamic part
    is ``tanh(x̃_j · θ)``, giving its pre weight, its post weight and its outgoing row of
    ``comb`` (how much of source j each destination receives)::

        d_j        = tanh(x̃_j @ fn.T)                      [..., n, n + 2]
        h_pre[j]   = base_pre[j]  + scale[0] · d_j[0]
        h_post[j]  = base_post[j] + scale[1] · d_j[1]
        comb[j, k] = base_res[j, k] + scale[2] · d_j[2 + k]  ->  h_res = combᵀ

    Args:
        x: streams ``[..., n, C]``, any float dtype.
        fn: ``[n + 2, C]`` θᵀ shared by the streams, rows [pre | post | res to destination 0..n-1].
        scale: ``[3]`` gates s (pre, post, res), initialized small (0.01) in the HC paper.
        base: ``[n*n + 2n]`` static part [pre (n) | post (n) | comb (n*n, [source, destination])],
            the same layout as mHC's ``base``.

    Returns:
        :class:`Coefficients` in paper orientation, fp32; entries may be negative.
    """
    check_rms_eps(rms_eps)
    n, c = check_streams(x)
    check_shape(fn, "fn", (n + 2, c), f" for x with n={n} streams of C={c} ([n + 2, C])")
    check_shape(scale, "scale", (3,), " (s_pre, s_post, s_res)")
    check_shape(base, "base", (n * n + 2 * n,), f" ([n*n + 2n] static coefficients, n={n})")
    check_same_device(x, fn=fn, scale=scale, base=base)

    dtype = coefficient_dtype(x, fn)
    xf = x.to(dtype)
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + rms_eps)
    dynamic = torch.tanh(normed @ fn.to(dtype).T)  # [..., n (source j), n + 2]
    scale, base = scale.to(dtype), base.to(dtype)
    h_pre = base[:n] + scale[0] * dynamic[..., 0]
    h_post = base[n : 2 * n] + scale[1] * dynamic[..., 1]
    comb = base[2 * n :].view(n, n) + scale[2] * dynamic[..., 2:]  # [..., source j, destination k]
    return Coefficients(h_pre, h_post, comb.transpose(-1, -2))


# ----------------------------------------------------------------------------------------------
# Stream mixes (paper Eq. 3; F_pre and F_post,res of Sec. 4.3.1)
# ----------------------------------------------------------------------------------------------


def _check_mix_weights(x: Tensor, weights: object, name: str, trailing: tuple[int, ...]) -> Tensor:
    expected = tuple(x.shape[:-2]) + trailing
    weights = check_shape(weights, name, expected, " (x's leading dims, then the stream dims)")
    check_same_device(x, **{name: weights})
    return weights


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """Layer input ``Σ_j h_pre[j]·x[j]``: ``x [..., n, C]``, ``h_pre [..., n]`` -> ``[..., C]`` in x.dtype.

    Accumulates in the coefficients' precision (fp32, or fp64 for fp64 inputs).
    """
    n, _ = check_streams(x)
    _check_mix_weights(x, h_pre, "h_pre", (n,))
    dtype = coefficient_dtype(x, h_pre)
    return torch.einsum("...j,...jc->...c", h_pre.to(dtype), x.to(dtype)).to(x.dtype)


def post_res(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Next streams ``h_res @ x + h_post[..., None] * f_out[..., None, :]`` (per token).

    Args:
        x: streams ``[..., n, C]``.
        f_out: branch output ``[..., C]`` (may have another float dtype than x).
        h_post: ``[..., n]`` fp32.
        h_res: ``[..., n, n]`` fp32, paper orientation (row = destination).

    Returns:
        ``[..., n, C]`` in x.dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    n, _ = check_streams(x)
    check_branch_output(x, f_out)
    _check_mix_weights(x, h_post, "h_post", (n,))
    _check_mix_weights(x, h_res, "h_res", (n, n))
    dtype = coefficient_dtype(x, f_out, h_post, h_res)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dtype), x.to(dtype))
    return (mixed + h_post.to(dtype).unsqueeze(-1) * f_out.to(dtype).unsqueeze(-2)).to(x.dtype)


def head_mix(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, eps: float = 1e-6, rms_eps: float = 1e-6
) -> Tensor:
    """DeepSeek-V4's ``hc_head`` (docs/math.md §7): ``Σ_i (σ(α·m_i + b_i) + ε)·x_i`` -> ``[..., C]`` in x.dtype.

    Args:
        x: streams ``[..., n, C]``.
        fn: ``[n, n*C]`` fp32; ``m = vec(x) @ fn.T * rsqrt(mean(vec(x)²) + rms_eps)``.
        scale: ``[1]`` fp32 gate α.
        base: ``[n]`` fp32 biases.
    """
    check_eps(eps)
    check_rms_eps(rms_eps)
    n, c = check_streams(x)
    check_shape(fn, "fn", (n, n * c), f" for x with n={n} streams of C={c} ([n, n*C])")
    check_shape(scale, "scale", (1,))
    check_shape(base, "base", (n,))
    check_same_device(x, fn=fn, scale=scale, base=base)
    mixes = _rms_scaled_projection(x, fn, rms_eps)
    weights = torch.sigmoid(scale.to(mixes.dtype) * mixes + base.to(mixes.dtype)) + eps
    return pre_mix(x, weights)


# ----------------------------------------------------------------------------------------------
# Gain magnitude (paper Sec. 3.1); more stability measures live in torchmhc.analysis
# ----------------------------------------------------------------------------------------------


def amax_gain(h: Tensor) -> tuple[Tensor, Tensor]:
    """Amax gain magnitudes of ``h [..., n, n]`` (paper Sec. 3.1) -> ``(forward [...], backward [...])``.

    forward = max_i |Σ_j h[i, j]| (max absolute row sum: how much a signal can grow going forward),
    backward = max_j |Σ_i h[i, j]| (max absolute column sum: the same for gradients).
    """
    check_square(h)
    return h.sum(-1).abs().amax(-1), h.sum(-2).abs().amax(-1)
