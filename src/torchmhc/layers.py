"""nn.Modules: a hyper-connection around a branch, and the network's two ends.

Legend: ``x [..., n, C]`` streams, ``h [..., C]`` a single hidden state, fp32 coefficients.

A transformer with hyper-connections looks like::

    x = expand_streams(embed(tokens), n)          # [B, T, n, C]
    for block in blocks:                          # 2 hyper-connections per block
        x = block.hc_attn(x, block.attn)          # F = attention (with its own pre-norm)
        x = block.hc_ffn(x, block.ffn)
    h = head(x)                                   # StreamHead: [B, T, C]
    logits = lm_head(final_norm(h))

or, in the split form, with the attention's post fused with the FFN's pre (same values; for
mHC the post-res and the next coefficient pass read the streams once; on an H100 two sub-layers
forward + backward are 1.7-2.9% faster with it; the models here use the form above until that is
measured end to end)::

    for block in blocks:
        u, ctx = block.hc_attn.pre(x)                                       # u [B, T, C]
        u, ctx = block.hc_attn.post_pre(ctx, block.attn(u), block.hc_ffn)
        x = block.hc_ffn.post(ctx, block.ffn(u))                            # [B, T, n, C]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import kernels
from .checks import (
    check_branch_output,
    check_coefficient_options,
    check_eps,
    check_floating,
    check_int,
    check_real,
    check_rms_eps,
    check_streams,
)
from .functional import Coefficients
from .manifolds import IDENTITY_WEIGHT, get_manifold
from .residuals import get_residual

__all__ = ["HyperConnection", "HyperConnectionContext", "StreamHead", "expand_streams", "INITS"]


# mHC starts (docs/math.md §8). The default is the one the initialization study measured best
# (docs/init_study.md).
Init = Literal["uniform", "identity", "onehot"]
INITS = ("uniform", "identity", "onehot")
DEFAULT_INIT: Init = "onehot"

CoefficientHook = Callable[["HyperConnection", Tensor, Coefficients], None]


def expand_streams(h: Tensor, n: int) -> Tensor:
    """Copies a hidden state into n streams (docs/math.md §7, no 1/n scaling): ``[..., C]`` -> ``[..., n, C]``."""
    check_floating(h, "h")
    if h.dim() < 1:
        raise ValueError("h must have shape [..., C], got a scalar")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


def _logit(p: float) -> float:
    p = min(max(p, 1 - IDENTITY_WEIGHT), IDENTITY_WEIGHT)  # finite biases, even for n = 1
    return math.log(p / (1 - p))


class HyperConnectionContext(NamedTuple):
    """What :meth:`HyperConnection.post` needs from :meth:`HyperConnection.pre`."""

    x: Tensor  # [..., n, C] streams entering the sub-layer
    h_post: Tensor  # [..., n] fp32
    h_res: Tensor  # [..., n, n] fp32


class HyperConnection(nn.Module):
    """One hyper-connection around a sub-layer ``F`` (attention or FFN, with its own pre-norm).

    ``x_next = H_res · x + H_postᵀ · F(H_pre · x)`` with per-token coefficients. ``forward(x, F)``
    runs it all; the split form is :meth:`pre` -> F -> :meth:`post`, or :meth:`post_pre`, which
    runs one sub-layer's post and the next one's pre together.

    Args:
        dim: C, the hidden size of one stream.
        n: number of streams. Ignored by ``residual="residual"``, which has one.
        residual: a kind of ``torchmhc.residuals``: ``"residual"`` (plain ``x + F(x)``), ``"hc"``
            (original HC, unconstrained), ``"mhc"`` (Sinkhorn), ``"mhc-lite"`` (permutation
            mixture), ``orthostochastic``, ``spectral``, ``identity``, ``unconstrained``, or a
            manifold registered in ``torchmhc.manifolds``; aliases (``"sinkhorn"``) are recorded
            under the kind's name (``self.residual == "mhc"``).
        layer_index: which sub-layer this is (0-based); HC and ``init="onehot"`` read stream
            ``layer_index mod n`` at the start.
        init: mHC start: ``"uniform"`` (all biases 0: H_pre = ½, H_post = 1, H_res ≈ 1/n),
            ``"identity"`` (H_res ≈ I, H_pre = 1/n, H_post = 1), ``"onehot"`` (H_res ≈ I,
            H_pre ≈ one-hot on stream ``layer_index mod n``, H_post = 1).
        iters, eps: Sinkhorn t_max and DeepSeek's epsilon. rms_eps: RMS-normalization epsilon.
        post_scale: H_post = post_scale · σ(·) (2 in the paper).
        alpha_init: initial gates α (0.01, paper Table 5; HC's s).
        Every argument is checked here (ValueError naming it): integers, finite numbers, eps >= 0,
        rms_eps > 0, post_scale > 0 (``torchmhc.checks``).

    Parameters (DeepSeek-V4 layout, fp32): ``fn [2n + K, n*C]``, ``base [2n + K]``, ``scale [3]``
    with K = n² for mHC; for HC ``fn [n + 2, C]`` (θᵀ) and ``base [n² + 2n]`` (static part).
    ``fn`` starts at N(0, 1/(n·C)) for mHC so that each dynamic logit has unit variance before
    α — it also breaks the symmetry between streams copied from one embedding, which zero
    weights would keep forever; HC's θ starts at zero as in its paper.
    """

    def __init__(
        self,
        dim: int,
        n: int = 4,
        residual: str = "mhc",
        *,
        layer_index: int = 0,
        init: Init = DEFAULT_INIT,
        iters: int = 20,
        eps: float = 1e-6,
        rms_eps: float = 1e-6,
        post_scale: float = 2.0,
        alpha_init: float = 0.01,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        self.kind = get_residual(residual)  # what this connection is (torchmhc.residuals)
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        check_int(layer_index, "layer_index", minimum=0)
        check_coefficient_options(iters, eps, rms_eps, post_scale)
        check_real(alpha_init, "alpha_init")
        self.dim, self.residual, self.layer_index, self.init = dim, self.kind.name, layer_index, init
        self.num_streams = self.kind.num_streams_fixed or n
        self.eps, self.rms_eps, self.post_scale = eps, rms_eps, post_scale
        self.manifold = None
        self._coefficient_hooks: OrderedDict[int, CoefficientHook] = OrderedDict()
        if self.kind.form == "residual":
            return

        n = self.num_streams
        read_stream = layer_index % n
        if self.kind.form == "hc":
            fn = torch.zeros(n + 2, dim)
            pre = torch.nn.functional.one_hot(torch.tensor(read_stream), n).float()
            res = torch.eye(n).flatten()  # comb = I = H_res
            base = torch.cat([pre, torch.ones(n), res])
        else:
            options = {"iters": iters, "eps": eps} if self.kind.manifold == "sinkhorn" else {}
            self.manifold = get_manifold(self.kind.manifold, **options)
            num_res = self.manifold.num_logits(n)
            fn = torch.randn(2 * n + num_res, n * dim) / math.sqrt(n * dim)
            if init == "uniform":
                pre = torch.zeros(n)  # docs/math.md §8's "b = 0" start: H_pre = ½ on every stream
            elif init == "onehot":
                pre = torch.full((n,), _logit(1 - IDENTITY_WEIGHT))
                pre[read_stream] = _logit(IDENTITY_WEIGHT)
            else:
                pre = torch.full((n,), _logit(1 / n))  # H_pre = 1/n: the mean of the streams
            post = torch.full((n,), _logit(1 / post_scale))  # H_post = 1
            res = self.manifold.init_logits(n, "uniform" if init == "uniform" else "identity")
            base = torch.cat([pre, post, res])
        self.fn = nn.Parameter(fn)
        self.base = nn.Parameter(base)
        self.scale = nn.Parameter(torch.full((3,), float(alpha_init)))

    # -- the split form, for code that cannot pass its branch as a callable ---------------------

    def coefficients(self, x: Tensor) -> Coefficients:
        """Per-token ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32."""
        if self.kind.form == "residual":
            ones = torch.ones(x.shape[:-2] + (1,), dtype=torch.float32, device=x.device)
            return Coefficients(ones, ones, ones.unsqueeze(-1))
        # fused kernels on CUDA where they apply, the reference elsewhere (torchmhc.kernels.dispatch)
        if self.kind.form == "hc":
            return kernels.hc_coefficients(x, self.fn, self.scale, self.base, rms_eps=self.rms_eps)
        return kernels.mhc_coefficients(
            x, self.fn, self.scale, self.base,
            eps=self.eps, rms_eps=self.rms_eps, post_scale=self.post_scale, manifold=self.manifold,
        )

    def pre(self, x: Tensor) -> tuple[Tensor, HyperConnectionContext]:
        """``x [..., n, C]`` -> (layer input ``[..., C]`` in x.dtype, context for :meth:`post`)."""
        self._check_input(x)
        if self.kind.form == "residual" and not self._coefficient_hooks:
            return self.mix_in(x, None)  # nothing to compute or record
        layer_input, ctx, coefficients = self.pre_with_coefficients(x)
        for hook in self._coefficient_hooks.values():
            hook(self, x, coefficients)
        return layer_input, ctx

    def pre_with_coefficients(self, x: Tensor) -> tuple[Tensor, HyperConnectionContext, Coefficients]:
        """:meth:`pre` without the input check and the hooks, also returning the coefficients.
        Block recomputation replays sub-layers through this.

        For HC and mHC the coefficients and the pre-mix run as one op (``kernels.hc_pre``,
        ``kernels.mhc_pre``) and the context holds its pass-through view of x, so that in backward
        the three gradients of x (coefficients, pre-mix, post-res) are summed inside the kernels'
        dx passes."""
        if self.kind.form == "residual":
            coefficients = self.coefficients(x)
            return (*self.mix_in(x, coefficients), coefficients)
        if self.kind.form == "hc":
            layer_input, x_for_post, coefficients = kernels.hc_pre(
                x, self.fn, self.scale, self.base, rms_eps=self.rms_eps
            )
        else:
            layer_input, x_for_post, coefficients = kernels.mhc_pre(
                x, self.fn, self.scale, self.base,
                eps=self.eps, rms_eps=self.rms_eps, post_scale=self.post_scale, manifold=self.manifold,
            )  # fmt: skip
        return layer_input, HyperConnectionContext(x_for_post, coefficients.h_post, coefficients.h_res), coefficients

    def mix_in(self, x: Tensor, coefficients: Coefficients | None) -> tuple[Tensor, HyperConnectionContext]:
        """The pre-mix for coefficients computed elsewhere (no checks, no hooks, no gradient
        chaining); ``coefficients`` may be None for ``residual="residual"``."""
        if self.kind.form == "residual":
            return x[..., 0, :], HyperConnectionContext(x, None, None)
        return kernels.pre_mix(x, coefficients.h_pre), HyperConnectionContext(x, coefficients.h_post, coefficients.h_res)

    def post(self, ctx: HyperConnectionContext, f_out: Tensor) -> Tensor:
        """Streams after the sub-layer: ``[..., n, C]`` in x.dtype."""
        if self.kind.form == "residual":
            check_branch_output(ctx.x, f_out)  # the other kinds' post_res checks it
            return ctx.x + f_out.unsqueeze(-2)
        return kernels.post_res(ctx.x, f_out, ctx.h_post, ctx.h_res)

    def post_pre(
        self, ctx: HyperConnectionContext, f_out: Tensor, next_hc: HyperConnection, norm: nn.RMSNorm | None = None
    ) -> tuple[Tensor, HyperConnectionContext]:
        """Post of this sub-layer and pre of the next one (``next_hc``) in one call: the values of
        ``next_hc.pre(self.post(ctx, f_out))``, next_hc's input check and coefficient hooks included,
        and with ``norm`` (the next branch's pre-norm) the layer input ``norm(layer_input)``.

        When this connection is not the plain residual and ``next_hc`` is mHC (has a manifold),
        both run as ``kernels.mhc_post_pre``: where the kernels apply, the post-res and the next
        coefficient pass read the streams once, and x's gradients are chained as in
        :meth:`pre_with_coefficients`. Otherwise the plain composition. (H100, two sub-layers
        forward + backward: 4669 µs against 4803 without it at T = 16384, C = 4096, 865 against
        880 at T = 8192, C = 1280, 1266 against 1304 at C = 2048; ``benchmarks/results/h100.md``.)

        Args:
            ctx: this connection's context (from :meth:`pre` or an earlier ``post_pre``).
            f_out: this sub-layer's branch output ``[..., C]``.
            next_hc: the next sub-layer's HyperConnection, same ``num_streams`` and ``dim``.
            norm: an ``nn.RMSNorm`` over ``dim`` with a weight and an eps, which the next branch
                would apply to its input first: with the fused op it runs inside it
                (``kernels.mhc_post_pre``'s ``norm_weight``: no pass over memory of its own),
                elsewhere after it.

        Returns:
            (next layer input ``[..., C]`` in x.dtype (normalized with ``norm``), ``next_hc``'s
            context for its :meth:`post`).
        """
        if not isinstance(next_hc, HyperConnection):
            raise ValueError(f"next_hc must be a HyperConnection, got {type(next_hc).__name__}")
        if (next_hc.num_streams, next_hc.dim) != (self.num_streams, self.dim):
            raise ValueError(
                f"next_hc must have n={self.num_streams}, C={self.dim} like this HyperConnection, "
                f"got n={next_hc.num_streams}, C={next_hc.dim}"
            )
        if norm is not None and not callable(norm):
            raise ValueError(f"norm must be an nn.RMSNorm (or a callable on [..., C]), got {type(norm).__name__}")
        fusable_norm = (
            isinstance(norm, nn.RMSNorm) and norm.weight is not None and norm.eps is not None
            and tuple(norm.normalized_shape) == (self.dim,)
        )  # fmt: skip
        # the fused op computes this connection's post as kernels.post_res: every kind but "residual"
        if self.kind.form == "residual" or next_hc.manifold is None:
            layer_input, next_ctx = next_hc.pre(self.post(ctx, f_out))
            return (layer_input if norm is None else norm(layer_input)), next_ctx
        next_hc._check_input(ctx.x)  # x_next has ctx.x's shape and dtype
        layer_input, x_next, coefficients = kernels.mhc_post_pre(
            ctx.x, f_out, ctx.h_post, ctx.h_res, next_hc.fn, next_hc.scale, next_hc.base,
            eps=next_hc.eps, rms_eps=next_hc.rms_eps, post_scale=next_hc.post_scale, manifold=next_hc.manifold,
            **({"norm_weight": norm.weight, "norm_eps": norm.eps} if fusable_norm else {}),
        )  # fmt: skip
        if norm is not None and not fusable_norm:
            layer_input = norm(layer_input)
        for hook in next_hc._coefficient_hooks.values():
            hook(next_hc, x_next, coefficients)
        return layer_input, HyperConnectionContext(x_next, coefficients.h_post, coefficients.h_res)

    def forward(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """``x [..., n, C]``, ``branch: [..., C] -> [..., C]`` -> next streams ``[..., n, C]``."""
        layer_input, ctx = self.pre(x)
        return self.post(ctx, branch(layer_input))

    def _check_input(self, x: Tensor) -> None:
        n, c = check_streams(x)
        if (n, c) != (self.num_streams, self.dim):
            raise ValueError(
                f"x must have shape [..., n={self.num_streams}, C={self.dim}] for this HyperConnection, "
                f"got {list(x.shape)}"
            )

    def register_coefficient_hook(self, hook: CoefficientHook) -> RemovableHandle:
        """Calls ``hook(module, x, coefficients)`` on every :meth:`pre` (see ``torchmhc.analysis``)."""
        handle = RemovableHandle(self._coefficient_hooks)
        self._coefficient_hooks[handle.id] = hook
        return handle

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.num_streams}, residual={self.residual!r}, layer_index={self.layer_index}, init={self.init!r}"


class StreamHead(nn.Module):
    """Streams out of the network (DeepSeek-V4 ``hc_head``, docs/math.md §7): ``[..., n, C]`` -> ``[..., C]``.

    ``y = Σ_i (σ(α·m_i + b_i) + ε)·x_i`` with ``m`` the RMS-scaled projection ``fn [n, n*C]``.
    Starts as the mean of the streams (b = logit(1/n)), α = ``alpha_init``.
    """

    def __init__(self, dim: int, n: int, *, eps: float = 1e-6, rms_eps: float = 1e-6, alpha_init: float = 0.01):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        check_eps(eps)
        check_rms_eps(rms_eps)
        check_real(alpha_init, "alpha_init")
        self.dim, self.num_streams, self.eps, self.rms_eps = dim, n, eps, rms_eps
        self.fn = nn.Parameter(torch.randn(n, n * dim) / math.sqrt(n * dim))
        self.base = nn.Parameter(torch.full((n,), _logit(1 / n)))
        self.scale = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: Tensor) -> Tensor:
        n, c = check_streams(x)
        if (n, c) != (self.num_streams, self.dim):
            raise ValueError(f"x must have shape [..., n={self.num_streams}, C={self.dim}] for this StreamHead, got {list(x.shape)}")
        return kernels.head_mix(x, self.fn, self.scale, self.base, eps=self.eps, rms_eps=self.rms_eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.num_streams}"
