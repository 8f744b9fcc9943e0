"""Chooses between the fused Triton kernels and the reference math of ``torchmhc.functional``.

Mode, from the innermost :func:`use_kernels` block, else the ``TORCHMHC_KERNELS`` environment
variable (read at each call), else ``"auto"``:

- ``"auto"``: kernels for CUDA tensors whose shapes they handle; for fp32 CPU tensors the CPU
  path (``cpu.py``: the same functions in a few large PyTorch ops with hand-written backwards);
  the reference otherwise.
- ``"triton"``: kernels wherever they can run: CUDA tensors, or any tensors under Triton's CPU
  interpreter (``TRITON_INTERPRET=1``, how CI tests the kernels); a CPU tensor without the
  interpreter is an error. Shapes the kernels do not handle still take the reference.
- ``"reference"``: always the plain-PyTorch reference.

Shapes the kernels handle: n <= 8 streams, C a multiple of 64, bf16/fp16/fp32 streams, fp32
coefficients and parameters (fp64 inputs, used by gradient checks, take the reference), the
Sinkhorn manifold for mHC, and the original HC's coefficients (:func:`hc_coefficients`). The
kernels use no atomics: results are deterministic run to run.

Gradient chaining (:func:`mhc_pre`, and :func:`hc_pre` for HC): one sub-layer reads its streams x in
three ops (coefficients, pre-mix, post-res), so autograd would sum three dx tensors in two extra
elementwise passes (each reads 2·nC and writes nC). :func:`mhc_pre` runs the coefficients and the
pre-mix as one autograd node that also hands x on as a pass-through output for the post-res. In
backward the pre-mix only reduces ``dh_pre = dy·x`` (one read of x); the coefficient backward's dx
pass, which reads x and writes dx anyway, also sums ``h_pre ⊗ dy`` and the post-res gradient of the
pass-through. Per sub-layer that is 4 passes over stream-sized tensors (dh: x; dx pass: x, the
post-res gradient, dx; dy, C a token, is read once per stream) instead of 6 with a separate pre-mix
dx pass, or 10 with autograd's additions.

Across sub-layers (:func:`mhc_post_pre`): the post-res of sub-layer l, the coefficient pass of
l+1 and its pre-mix run as one kernel that writes x_{l+1} and reads it back for the pre-mix while it
is still in L2; they form one autograd node, whose backward is sub-layer l+1's chained backward
above followed by the post-res backward of l, in two stream passes, or (the default for n <= 4)
in one that forms x_{l+1}'s total gradient on-chip (x_{l+1} recomputed from x_l and f) and runs the
post-res backward of l from it (``transition_backward_op.py``: (4n + 4)·C a token instead of
(7n + 4)·C, and faster; see that file).

The Triton modules are imported at first use, so that importing torchmhc needs no Triton and
``TRITON_INTERPRET`` may be set after ``import torchmhc``. Under ``torch.compile`` the choice is
made while tracing (guarded on the mode); the registered ops then appear in the graph (fake impls give
their shapes). In eager mode the launchers run directly, without the ops' dispatch
(``_common.eager_or_compiled``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

from torchmhc import functional as ref
from torchmhc.checks import check_coefficient_options, check_rms_eps, check_streams
from torchmhc.kernels import cpu
from torchmhc.kernels._common import (
    CHANNEL_MULTIPLE,
    MAX_STREAMS,
    eager_or_compiled,
    flatten_tokens,
    interpreting,
    unflatten_tokens,
)

__all__ = [
    "KernelMode",
    "kernel_mode",
    "use_kernels",
    "triton_available",
    "mhc_coefficients",
    "mhc_pre",
    "mhc_post_pre",
    "hc_coefficients",
    "hc_pre",
    "pre_mix",
    "post_res",
    "post_res_coefficients",
    "head_mix",
]

KernelMode = Literal["auto", "triton", "reference"]
_MODES = ("auto", "triton", "reference")
ENV_VAR = "TORCHMHC_KERNELS"
_STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The use_kernels() override: a plain module value rather than a ContextVar, because torch.compile
# can read (and guard on) a global but cannot trace ContextVar.get; a compiled function is
# re-traced when the mode it was traced under changes.
_override: str | None = None


def _check_mode(mode: object, where: str) -> KernelMode:
    if mode not in _MODES:
        raise ValueError(f"{where} must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode  # type: ignore[return-value]


def kernel_mode() -> KernelMode:
    """The mode in force: innermost :func:`use_kernels`, else ``$TORCHMHC_KERNELS``, else ``"auto"``."""
    if _override is not None:
        return _override  # type: ignore[return-value]
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextmanager
def use_kernels(mode: KernelMode) -> Iterator[None]:
    """Forces ``mode`` (``"auto" | "triton" | "reference"``) inside the ``with`` block; overrides
    the environment variable. Process-wide while the block runs (not per thread)."""
    global _override
    previous, _override = _override, _check_mode(mode, "mode")
    try:
        yield
    finally:
        _override = previous


# Looked up once, at import (find_spec does not import Triton): torch.compile cannot trace find_spec,
# and CUDA tensors reach this check while a graph is traced.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed."""
    return _TRITON_INSTALLED


def _use_triton(x: Tensor, supported: bool) -> bool:
    mode = kernel_mode()
    if mode == "reference" or not supported:
        return False
    if x.device.type == "cuda":
        if mode == "triton" and not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (pip install torchmhc[triton])")
        return triton_available()
    if mode == "auto":
        return False
    if not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton needs CUDA tensors or Triton's CPU interpreter (TRITON_INTERPRET=1); "
            f"got tensors on {x.device}"
        )
    return True


def _use_cpu_path(*tensors: Tensor) -> bool:
    """The CPU path in the "auto" mode, for fp32 CPU tensors (shapes checked by the caller)."""
    return kernel_mode() == "auto" and cpu.supported(*tensors)


def _finite_numbers(*values: object, at_least: float = -math.inf) -> bool:
    """Every value an int or float (not bool), finite and >= ``at_least``."""
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= at_least for v in values
    )


def _streams_supported(x: Tensor, *coefficients: Tensor) -> bool:
    n, c = x.shape[-2:]
    return (
        1 <= n <= MAX_STREAMS
        and c >= 1  # C = 0 goes to the reference, whose check names it
        and c % CHANNEL_MULTIPLE == 0
        and x.dtype in _STREAM_DTYPES
        and all(t.dtype == torch.float32 for t in coefficients)
    )


def _coefficient_args_ok(x: Tensor, fn: object, scale: object, base: object) -> bool:
    """``fn [n²+2n, n·C]``, ``scale [3]``, ``base [n²+2n]`` on x's device (x already ``[..., n, C]``)."""
    n, c = x.shape[-2:]
    rows = n * n + 2 * n
    return (
        isinstance(fn, Tensor) and tuple(fn.shape) == (rows, n * c)
        and isinstance(scale, Tensor) and tuple(scale.shape) == (3,)
        and isinstance(base, Tensor) and tuple(base.shape) == (rows,)
    )  # fmt: skip


def _post_res_args_ok(x: object, f_out: object, h_post: object, h_res: object) -> bool:
    """``x [..., n, C]``, ``f_out [..., C]``, ``h_post [..., n]``, ``h_res [..., n, n]``, one device."""
    return (
        isinstance(x, Tensor) and x.dim() >= 2
        and isinstance(f_out, Tensor) and f_out.shape == x.shape[:-2] + x.shape[-1:]
        and f_out.dtype in _STREAM_DTYPES
        and isinstance(h_post, Tensor) and h_post.shape == x.shape[:-1]
        and isinstance(h_res, Tensor) and h_res.shape == x.shape[:-1] + x.shape[-2:-1]
        and x.device == f_out.device == h_post.device == h_res.device
    )  # fmt: skip


def _unflatten_coefficients(h_pre: Tensor, h_post: Tensor, h_res: Tensor, lead: torch.Size) -> ref.Coefficients:
    return ref.Coefficients(*(unflatten_tokens(t, lead) for t in (h_pre, h_post, h_res)))


def _linear_form_eps(eps: object) -> bool:
    """Whether the fused paths' V4 Sinkhorn (DeepSeek's linear form) computes the reference's
    function with ``eps``: a finite number at least the smallest normal fp32. The reference takes
    smaller ones (0 included) to the log domain and names invalid ones."""
    return _finite_numbers(eps, at_least=torch.finfo(torch.float32).tiny)


def _v4_sinkhorn_iters(iters: int, eps: float, manifold: ref.ResidualProjection | None) -> int | None:
    """``iters``, or a V4-convention ``manifolds.Sinkhorn``'s own with the same ``eps``; None for any
    other manifold (the fused paths compute the V4 Sinkhorn only)."""
    if manifold is None:
        return iters
    from torchmhc.manifolds import Sinkhorn

    if isinstance(manifold, Sinkhorn) and manifold.convention == "v4" and manifold.eps == eps:
        return manifold.iters
    return None


def _cpu_coefficient_iters(
    x: object, fn: object, scale: object, base: object, iters: int, eps: float, rms_eps: float, post_scale: float,
    manifold: ref.ResidualProjection | None,
) -> int | None:  # fmt: skip
    """The Sinkhorn iteration count the CPU path runs with, or None where the reference must run
    (its checks name invalid arguments)."""
    iters = _v4_sinkhorn_iters(iters, eps, manifold)
    ok = (
        isinstance(x, Tensor) and x.dim() >= 2
        and _coefficient_args_ok(x, fn, scale, base)
        and _use_cpu_path(x, fn, scale, base)
        and isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1
        and _linear_form_eps(eps)
        and _finite_numbers(rms_eps, at_least=0.0)
        and _finite_numbers(post_scale)
    )  # fmt: skip
    return iters if ok else None


def _coefficient_kernel_iters(
    x: Tensor, fn: object, scale: object, base: object, iters: int, eps: float, manifold: ref.ResidualProjection | None
) -> int | None:
    """The Sinkhorn iteration count the coefficient kernels run with, or None where the reference must
    run (a manifold other than V4 Sinkhorn with ``eps``, malformed arguments, unsupported shapes or
    mode). Raises ValueError for arguments that the kernels would take but that are invalid."""
    iters = _v4_sinkhorn_iters(iters, eps, manifold)
    if iters is None or not _linear_form_eps(eps):
        return None
    check_streams(x)  # the reference's error for anything that is not [..., n, C]
    # anything malformed goes to the reference, whose checks name the offending argument
    if not (_coefficient_args_ok(x, fn, scale, base) and _use_triton(x, _streams_supported(x, fn, scale, base))):
        return None
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if not (fn.device == scale.device == base.device == x.device):
        raise ValueError(f"fn, scale and base must be on x's device {x.device}")
    return iters


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
    manifold: ref.ResidualProjection | None = None,
) -> ref.Coefficients:
    """:func:`torchmhc.functional.mhc_coefficients`, fused on the GPU for the Sinkhorn manifold.

    Args:
        x: streams ``[..., n, C]`` (bf16/fp16/fp32).
        fn: ``[n*n + 2n, n*C]`` fp32, rows [pre | post | res (comb, [source, destination])].
        scale: ``[3]`` fp32 (α_pre, α_post, α_res). base: ``[n*n + 2n]`` fp32.
        iters, eps, rms_eps, post_scale, manifold: as in the reference. The kernels handle
            ``manifold=None`` and a V4-convention ``manifolds.Sinkhorn`` whose eps equals ``eps``
            (its ``iters`` is used); other manifolds take the reference.

    Returns:
        ``Coefficients(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32, paper orientation.
    """
    check_coefficient_options(iters, eps, rms_eps, post_scale)  # the kernels take them unchecked
    kernel_iters = _coefficient_kernel_iters(x, fn, scale, base, iters, eps, manifold)
    if kernel_iters is None:
        cpu_iters = _cpu_coefficient_iters(x, fn, scale, base, iters, eps, rms_eps, post_scale, manifold)
        if cpu_iters is not None:
            coefficients = cpu.mhc_coefficients(
                flatten_tokens(x, 2), fn, scale, base, cpu_iters, float(eps), float(rms_eps), float(post_scale)
            )
            return _unflatten_coefficients(*coefficients, x.shape[:-2])
        return ref.mhc_coefficients(
            x, fn, scale, base, iters=iters, eps=eps, rms_eps=rms_eps, post_scale=post_scale, manifold=manifold
        )
    from torchmhc.kernels.coefficients_op import Coefficients, coefficients_op

    h_pre, h_post, h_res, *_saved = eager_or_compiled(coefficients_op, Coefficients.apply, x)(
        flatten_tokens(x, 2), fn.contiguous(), scale.contiguous(), base.contiguous(),
        kernel_iters, float(eps), float(rms_eps), float(post_scale),
    )  # fmt: skip
    return _unflatten_coefficients(h_pre, h_post, h_res, x.shape[:-2])


# The coefficient ops a chained sub-layer can run, by kind: "mhc" (``coefficients_op.py``, config
# ``(iters, eps, rms_eps, post_scale)``) and "hc" (``hc_coefficients_op.py``, config ``(rms_eps,)``).
CoefficientKind = Literal["mhc", "hc"]


def _coefficients_forward(
    kind: CoefficientKind, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, config: tuple
) -> tuple[Tensor, ...]:
    """The ``kind`` coefficient kernel on ``x [T, n, C]`` -> ``(h_pre, h_post, h_res, *saved)``."""
    if kind == "mhc":
        from torchmhc.kernels.coefficients_op import coefficients_fwd, coefficients_op

        return eager_or_compiled(coefficients_op, coefficients_fwd, x)(x, fn, scale, base, *config)
    from torchmhc.kernels.hc_coefficients_op import hc_coefficients_fwd, hc_coefficients_op

    return eager_or_compiled(hc_coefficients_op, hc_coefficients_fwd, x)(x, fn, scale, base, *config)


def _grad_or_zeros(g: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A coefficient gradient for a backward kernel: ``g`` contiguous, or zeros of ``shape`` (like's
    dtype and device) where autograd passed None."""
    return like.new_zeros(shape) if g is None else g.contiguous()


def _chained_pre_backward(
    kind: CoefficientKind,
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    h_pre: Tensor,
    saved: list[Tensor],
    config: tuple,
    dy: Tensor | None,
    d_pass: Tensor | None,
    d_pre: Tensor | None,
    d_post: Tensor | None,
    d_res: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Backward of a sub-layer's first half (coefficients + pre-mix of ``x [T, n, C]``, x also
    handed on as a pass-through) -> ``(dx, dfn, dscale, dbase)``, None where nothing reached them.

    The pre-mix backward reduces only ``dh_pre = dy·x`` (reads x); the coefficient backward's one
    pass over dx then sums all three gradients of x: its own, ``h_pre ⊗ dy`` and ``d_pass``.
    ``saved`` and ``config`` are what :func:`_coefficients_forward` saved and was given."""
    from torchmhc.kernels.pre_mix_op import pre_mix_dh_op, pre_mix_dh

    d_pass = None if d_pass is None else d_pass.contiguous()
    if dy is not None:
        dy = dy.contiguous()
        dh_mix = eager_or_compiled(pre_mix_dh_op, pre_mix_dh, x)(dy, x)
        d_pre = dh_mix if d_pre is None else d_pre + dh_mix
    if d_pre is None and d_post is None and d_res is None:  # neither the coefficients nor y were used
        return d_pass, None, None, None

    t, n = h_pre.shape
    grads = (
        _grad_or_zeros(d_pre, (t, n), h_pre),
        _grad_or_zeros(d_post, (t, n), h_pre),
        _grad_or_zeros(d_res, (t, n, n), h_pre),
    )
    mix_h = None if dy is None else h_pre
    if kind == "mhc":
        from torchmhc.kernels.coefficients_op import coefficients_backward_op, coefficients_backward

        iters, eps, _rms_eps, post_scale = config
        return eager_or_compiled(coefficients_backward_op, coefficients_backward, x)(
            x, fn, scale, base, *saved, *grads, iters, eps, post_scale, d_pass, dy, mix_h
        )  # fmt: skip
    from torchmhc.kernels.hc_coefficients_op import hc_coefficients_backward_op, hc_coefficients_backward

    return eager_or_compiled(hc_coefficients_backward_op, hc_coefficients_backward, x)(
        x, fn, scale, *saved, *grads, d_pass, dy, mix_h
    )


#: The transition backward (:func:`mhc_post_pre`) when its ``one_pass_backward`` is None: ``one_pass``
#: (the default; n > 4 takes two passes anyway) or ``two_pass``, read at each call (under
#: torch.compile, when the backward is traced).
TRANSITION_BACKWARD_ENV_VAR = "TORCHMHC_TRANSITION_BACKWARD"
#: Streams the one-pass transition backward handles: its tiles of all n streams spill registers
#: beyond (n = 8: 668 bytes a thread at 16 tokens x 16 channels, 8 warps; offline sm_90a compile,
#: benchmarks/registers.py).
ONE_PASS_MAX_STREAMS = 4


def _one_pass_backward(choice: bool | None) -> bool:
    if choice is not None:
        return bool(choice)
    value = os.environ.get(TRANSITION_BACKWARD_ENV_VAR, "one_pass").strip().lower() or "one_pass"
    if value not in ("one_pass", "two_pass"):
        raise ValueError(f"{TRANSITION_BACKWARD_ENV_VAR} must be one_pass or two_pass; got {value!r}")
    return value == "one_pass"


class _ChainedPre(torch.autograd.Function):
    """Coefficients and pre-mix of one sub-layer as one node whose backward chains x's gradients.

    Forward (``x [T, n, C]``): the ``kind`` coefficient kernel and the pre-mix kernel, unchanged; returns
    ``(y [T, C], x_pass, h_pre, h_post, h_res)`` where ``x_pass`` is x itself (autograd makes it a
    view of x with this node as its grad_fn), for the post-res to read. Backward
    (:func:`_chained_pre_backward`): what reaches x is the sum of all three ops' gradients, made in
    the coefficient backward's one pass over dx.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, kind: CoefficientKind, config: tuple
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from torchmhc.kernels.pre_mix_op import pre_mix_fwd, pre_mix_op

        h_pre, h_post, h_res, *saved = _coefficients_forward(kind, x, fn, scale, base, config)
        y = eager_or_compiled(pre_mix_op, pre_mix_fwd, x)(x, h_pre)
        ctx.save_for_backward(x, fn, scale, base, h_pre, *saved)
        ctx.kind, ctx.config = kind, config
        # absent gradients stay None: no zero tensors to read for an unused output
        ctx.set_materialize_grads(False)
        return y, x, h_pre, h_post, h_res

    @staticmethod
    def backward(
        ctx, dy: Tensor | None, d_pass: Tensor | None, d_pre: Tensor | None, d_post: Tensor | None, d_res: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, fn, scale, base, h_pre, *saved = ctx.saved_tensors
        grads = _chained_pre_backward(
            ctx.kind, x, fn, scale, base, h_pre, saved, ctx.config, dy, d_pass, d_pre, d_post, d_res
        )
        # one gradient per input: (x, fn, scale, base, kind, config)
        return *grads, None, None


class _ChainedPostPre(torch.autograd.Function):
    """Sub-layer l's post-res and sub-layer l+1's mHC coefficients and pre-mix as one node.

    Forward: the fused post-res + coefficient op (one pass over the streams, writes x_{l+1}) with
    the pre-mix of x_{l+1} in the same kernel (``mix``: each program reads back the x_{l+1} it has
    just written, from L2 where it is still there), or without ``mix`` followed by the pre-mix
    kernel; returns ``(y [T, C], x_next [T, n, C], h_pre, h_post, h_res)`` of l+1, the same bits
    either way. Backward: with ``one_pass`` (and n <= 4, and gradients for both y and x_next),
    ``transition_backward_op.transition_backward``; otherwise :func:`_chained_pre_backward` for l+1
    (its dx pass also adds the gradient x_next got downstream), then the post-res backward of l.
    With ``norm_weight`` (and ``mix``) y comes out through sub-layer l+1's branch RMSNorm
    (``post_res_coefficients_pre_mix_norm_fwd``), and the backward is
    ``transition_backward_norm``, or the norm's backward on its own (:func:`_rms_norm_backward`)
    before the other form.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor, fn: Tensor, scale: Tensor, base: Tensor,
        norm_weight: Tensor | None, iters: int, eps: float, rms_eps: float, post_scale: float, norm_eps: float,
        mix: bool, one_pass: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        from torchmhc.kernels.post_res_coefficients_op import (
            post_res_coefficients_fwd,
            post_res_coefficients_op,
            post_res_coefficients_pre_mix_fwd,
            post_res_coefficients_pre_mix_norm_fwd,
            post_res_coefficients_pre_mix_norm_op,
            post_res_coefficients_pre_mix_op,
        )
        from torchmhc.kernels.pre_mix_op import pre_mix_fwd, pre_mix_op

        args = (x, f_out, h_post, h_res, fn, scale, base, iters, eps, rms_eps, post_scale)
        rnorm = None
        if norm_weight is not None:  # with mix (mhc_post_pre sees to it)
            x_next, y, h_pre2, h_post2, h_res2, *saved, rnorm = eager_or_compiled(
                post_res_coefficients_pre_mix_norm_op, post_res_coefficients_pre_mix_norm_fwd, x
            )(*args[:7], norm_weight, *args[7:], norm_eps)
        elif mix:
            x_next, y, h_pre2, h_post2, h_res2, *saved = eager_or_compiled(
                post_res_coefficients_pre_mix_op, post_res_coefficients_pre_mix_fwd, x
            )(*args)
        else:
            x_next, h_pre2, h_post2, h_res2, *saved = eager_or_compiled(
                post_res_coefficients_op, post_res_coefficients_fwd, x
            )(*args)
            y = eager_or_compiled(pre_mix_op, pre_mix_fwd, x)(x_next, h_pre2)
        norm = () if norm_weight is None else (norm_weight, rnorm)
        ctx.save_for_backward(x, f_out, h_post, h_res, x_next, fn, scale, base, h_pre2, *saved, *norm)
        ctx.config = (iters, eps, rms_eps, post_scale)
        ctx.one_pass = one_pass and x.shape[1] <= ONE_PASS_MAX_STREAMS
        ctx.norm = norm_weight is not None
        ctx.set_materialize_grads(False)
        return y, x_next, h_pre2, h_post2, h_res2

    @staticmethod
    def backward(
        ctx, dy: Tensor | None, d_next: Tensor | None, d_pre: Tensor | None, d_post: Tensor | None, d_res: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        from torchmhc.kernels.post_res_op import post_res_backward_op, post_res_bwd

        x, f_out, h_post, h_res, x_next, fn, scale, base, h_pre, *saved = ctx.saved_tensors
        norm = saved[3:] if ctx.norm else ()  # (norm_weight, rnorm)
        saved = saved[:3]
        # one gradient per input after the first seven: (norm_weight, iters, eps, rms_eps, post_scale, norm_eps,
        # mix, one_pass)
        tail = (None,) * 7
        if ctx.one_pass and dy is not None and d_next is not None:
            from torchmhc.kernels import transition_backward_op as tb

            t, n = h_pre.shape
            iters, eps, _rms_eps, post_scale = ctx.config
            op, launch = (tb.transition_backward_norm_op, tb.transition_backward_norm) if norm else (
                tb.transition_backward_op, tb.transition_backward
            )  # fmt: skip
            grads = eager_or_compiled(op, launch, x)(
                dy.contiguous(), d_next.contiguous(), _grad_or_zeros(d_pre, (t, n), h_pre),
                _grad_or_zeros(d_post, (t, n), h_pre), _grad_or_zeros(d_res, (t, n, n), h_pre), x, f_out, h_post,
                h_res, x_next, fn, scale, base, h_pre, *saved, *norm, iters, eps, post_scale,
            )  # fmt: skip
            return *grads[:7], grads[7] if norm else None, *tail
        dnorm_weight = None
        if norm and dy is not None:  # the norm's backward on its own, then the plain chain from dy
            dy, dnorm_weight = _rms_norm_backward(dy, x_next, h_pre, *norm)
        d_next, dfn, dscale, dbase = _chained_pre_backward(
            "mhc", x_next, fn, scale, base, h_pre, saved, ctx.config, dy, d_next, d_pre, d_post, d_res
        )
        dx = df = dh_post = dh_res = None
        if d_next is not None:  # else nothing downstream depended on x_next
            dx, df, dh_post, dh_res = eager_or_compiled(post_res_backward_op, post_res_bwd, x)(d_next, x, f_out, h_post, h_res)
        return dx, df, dh_post, dh_res, dfn, dscale, dbase, dnorm_weight, *tail


def _rms_norm_backward(
    dz: Tensor, x_next: Tensor, h_pre: Tensor, norm_weight: Tensor, rnorm: Tensor
) -> tuple[Tensor, Tensor]:
    """The branch RMSNorm's backward where the transition's one pass does not run (two passes, more
    than ``ONE_PASS_MAX_STREAMS`` streams, or no gradient for x_{l+1}): y recomputed by the pre-mix
    kernel (the forward's bits), then plain PyTorch -> ``(dy [T, C] in x_next.dtype, dnorm_weight
    [C] in its dtype)``; ``dz = ∂L/∂z`` of ``z = y·rnorm·norm_weight``."""
    from torchmhc.kernels.pre_mix_op import pre_mix_fwd, pre_mix_op

    y = eager_or_compiled(pre_mix_op, pre_mix_fwd, x_next)(x_next, h_pre).float()
    dz, r = dz.float(), rnorm[:, None]
    g = dz * norm_weight.float()
    k = r**3 * (g * y).sum(-1, keepdim=True) / y.shape[-1]
    dy = r * g - k * y
    return dy.to(x_next.dtype), (dz * y * r).sum(0).to(norm_weight.dtype)


def _cpu_pre(pre: Callable[..., tuple], x: Tensor, *args: object) -> tuple[Tensor, Tensor, ref.Coefficients]:
    """``cpu.mhc_pre`` or ``cpu.hc_pre`` on ``x [..., n, C]`` -> ``(layer_input [..., C],
    x_for_post [..., n, C], Coefficients)``."""
    lead = x.shape[:-2]
    y, x_for_post, coefficients = pre(flatten_tokens(x, 2), *args)
    return unflatten_tokens(y, lead), unflatten_tokens(x_for_post, lead), _unflatten_coefficients(*coefficients, lead)


def mhc_pre(
    x: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    rms_eps: float = 1e-6,
    post_scale: float = 2.0,
    manifold: ref.ResidualProjection | None = None,
) -> tuple[Tensor, Tensor, ref.Coefficients]:
    """The first half of an mHC sub-layer: coefficients and layer input, with chained x-gradients.

    Same values as ``c = mhc_coefficients(x, ...)``, ``layer_input = pre_mix(x, c.h_pre)``. Where
    the coefficient kernels apply, both run as one autograd node and ``x_for_post`` is a view of x
    produced by that node: pass it (not x) to :func:`post_res`, and the post-res gradient of the
    streams is summed into dx inside the kernels' backward passes instead of by autograd (see the
    module docstring). Elsewhere ``x_for_post`` is x itself and the ops are the unchained ones.

    Args:
        x, fn, scale, base, iters, eps, rms_eps, post_scale, manifold: as in :func:`mhc_coefficients`.

    Returns:
        ``(layer_input [..., C] in x.dtype, x_for_post [..., n, C], Coefficients(h_pre [..., n],
        h_post [..., n], h_res [..., n, n]) fp32)``.
    """
    check_coefficient_options(iters, eps, rms_eps, post_scale)
    kernel_iters = _coefficient_kernel_iters(x, fn, scale, base, iters, eps, manifold)
    if kernel_iters is None:
        cpu_iters = _cpu_coefficient_iters(x, fn, scale, base, iters, eps, rms_eps, post_scale, manifold)
        if cpu_iters is not None:
            return _cpu_pre(
                cpu.mhc_pre, x, fn, scale, base, cpu_iters, float(eps), float(rms_eps), float(post_scale)
            )  # fmt: skip
        coefficients = ref.mhc_coefficients(
            x, fn, scale, base, iters=iters, eps=eps, rms_eps=rms_eps, post_scale=post_scale, manifold=manifold
        )
        return pre_mix(x, coefficients.h_pre), x, coefficients
    return _chained_pre(x, fn, scale, base, "mhc", (kernel_iters, float(eps), float(rms_eps), float(post_scale)))


def _chained_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, kind: CoefficientKind, config: tuple
) -> tuple[Tensor, Tensor, ref.Coefficients]:
    """:class:`_ChainedPre` on ``x [..., n, C]`` -> ``(layer_input [..., C], x_for_post [..., n, C],
    Coefficients)``."""
    lead = x.shape[:-2]
    y, x_pass, h_pre, h_post, h_res = _ChainedPre.apply(
        flatten_tokens(x, 2), fn.contiguous(), scale.contiguous(), base.contiguous(), kind, config
    )
    coefficients = _unflatten_coefficients(h_pre, h_post, h_res, lead)
    return unflatten_tokens(y, lead), unflatten_tokens(x_pass, lead), coefficients


def mhc_post_pre(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    rms_eps: float = 1e-6,
    post_scale: float = 2.0,
    manifold: ref.ResidualProjection | None = None,
    fused_pre_mix: bool = True,
    one_pass_backward: bool | None = None,
    norm_weight: Tensor | None = None,
    norm_eps: float = 1e-6,
) -> tuple[Tensor, Tensor, ref.Coefficients]:
    """Sub-layer l's post-res and sub-layer l+1's first half (:func:`mhc_pre`) in one call, and
    optionally sub-layer l+1's branch RMSNorm on its layer input.

    Same values as ``x_next = post_res(x, f_out, h_post, h_res)`` followed by
    ``layer_input, x_for_post, c = mhc_pre(x_next, fn, scale, base, ...)``. Where the post-res
    kernel and the coefficient kernels (for sub-layer l+1's ``manifold``, as in
    :func:`mhc_coefficients`) both apply, all of it is one autograd node (``_ChainedPostPre``): the
    post-res and the coefficient pass read the streams of l once, the pre-mix reads back the
    x_{l+1} that the same kernel has just written (from L2 where it is still there; see
    ``post_res_coefficients_op.py``), and in backward the three
    gradients of x_{l+1} are summed in the coefficient backward's one pass over them (see the
    module docstring). Elsewhere: exactly the two calls above.

    Args:
        x: streams of sub-layer l ``[..., n, C]`` (bf16/fp16/fp32); f_out: its branch output
            ``[..., C]``; h_post ``[..., n]``, h_res ``[..., n, n]``: its coefficients (fp32).
        fn, scale, base, iters, eps, rms_eps, post_scale, manifold: sub-layer l+1's, as in
            :func:`mhc_coefficients`.
        fused_pre_mix: False runs sub-layer l+1's pre-mix as a kernel of its own after the fused
            pass (which then writes x_{l+1} only), reading x_{l+1} from memory once more: the
            previous form, kept for benchmarks. Same results, bit for bit.
        one_pass_backward: the backward's stream work in one pass (``transition_backward_op.py``:
            x_{l+1}'s gradient kept on-chip, x_{l+1} recomputed; n <= 4, more streams take two) or
            in two (the coefficient dx pass, then the post-res backward), which move more bytes in
            more time (H100: 326 against 352 µs at T = 8192, C = 2048; 216 against 244 at
            C = 1280). None: ``$TORCHMHC_TRANSITION_BACKWARD`` (``one_pass`` or ``two_pass``), else
            one pass. Results agree to rounding (the two passes round x_{l+1}'s gradient to the
            stream dtype in between).
        norm_weight: the weight ``[C]`` (any float dtype) of an RMSNorm that sub-layer l+1's branch
            would apply first: the layer input then comes out as
            ``torch.nn.functional.rms_norm(y, (C,), norm_weight, norm_eps)`` of the pre-mix y. With
            the fused pre-mix the same kernel writes the normalized y and the transition backward's
            passes form the norm's backward, so the norm moves no bytes of its own (a norm after
            this call reads and writes C a token forward, 3·C backward); elsewhere the two calls.
        norm_eps: the RMSNorm's eps (> 0).

    Returns:
        ``(layer_input [..., C], x_next [..., n, C], both in x.dtype, Coefficients(h_pre [..., n],
        h_post [..., n], h_res [..., n, n]) fp32)`` of sub-layer l+1; pass ``x_next`` to its
        :func:`post_res` (it plays the part of :func:`mhc_pre`'s ``x_for_post``).
    """
    check_coefficient_options(iters, eps, rms_eps, post_scale)
    if norm_weight is not None:
        _check_norm(norm_weight, norm_eps, x)
    kernel_iters = None
    if _post_res_args_ok(x, f_out, h_post, h_res) and _streams_supported(x, h_post, h_res):
        kernel_iters = _coefficient_kernel_iters(x, fn, scale, base, iters, eps, manifold)
    fused_norm = norm_weight is not None and fused_pre_mix and kernel_iters is not None
    if kernel_iters is None:
        x_next = post_res(x, f_out, h_post, h_res)
        y, x_next, coefficients = mhc_pre(
            x_next, fn, scale, base, iters=iters, eps=eps, rms_eps=rms_eps, post_scale=post_scale, manifold=manifold
        )
    else:
        y, x_next, h_pre2, h_post2, h_res2 = _ChainedPostPre.apply(
            flatten_tokens(x, 2), flatten_tokens(f_out, 1), flatten_tokens(h_post, 1), flatten_tokens(h_res, 2),
            fn.contiguous(), scale.contiguous(), base.contiguous(), norm_weight.contiguous() if fused_norm else None,
            kernel_iters, float(eps), float(rms_eps), float(post_scale), float(norm_eps), bool(fused_pre_mix),
            _one_pass_backward(one_pass_backward),
        )  # fmt: skip
        lead = x.shape[:-2]
        coefficients = _unflatten_coefficients(h_pre2, h_post2, h_res2, lead)
        y, x_next = unflatten_tokens(y, lead), unflatten_tokens(x_next, lead)
    if norm_weight is not None and not fused_norm:
        y = torch.nn.functional.rms_norm(y, (y.shape[-1],), norm_weight, norm_eps)
    return y, x_next, coefficients


def _check_norm(norm_weight: object, norm_eps: object, x: Tensor) -> None:
    """``norm_weight``: a float tensor ``[C]`` on x's device; ``norm_eps``: a finite number > 0."""
    c = x.shape[-1] if isinstance(x, Tensor) and x.dim() else None
    if not (isinstance(norm_weight, Tensor) and norm_weight.is_floating_point() and norm_weight.dim() == 1):
        got = f"{norm_weight.dtype} tensor of shape {list(norm_weight.shape)}" if isinstance(norm_weight, Tensor) else type(norm_weight).__name__
        raise ValueError(f"norm_weight must be a float tensor of shape [C={c}], got {got}")
    if norm_weight.shape[0] != c or norm_weight.device != x.device:
        raise ValueError(
            f"norm_weight must have shape [C={c}] on {x.device}, got {list(norm_weight.shape)} on {norm_weight.device}"
        )
    if not _finite_numbers(norm_eps) or norm_eps <= 0:
        raise ValueError(f"norm_eps must be a finite number > 0, got {norm_eps!r}")


def _hc_kernels_apply(x: object, fn: object, scale: object, base: object) -> bool:
    """True where the HC coefficient kernels run. Anything malformed (``x [..., n, C]``,
    ``fn [n + 2, C]``, ``scale [3]``, ``base [n² + 2n]``, one device) goes to the reference, whose
    checks name the offending argument."""
    if not (isinstance(x, Tensor) and x.dim() >= 2):
        return False
    n, c = x.shape[-2:]
    well_formed = (
        isinstance(fn, Tensor) and tuple(fn.shape) == (n + 2, c)
        and isinstance(scale, Tensor) and tuple(scale.shape) == (3,)
        and isinstance(base, Tensor) and tuple(base.shape) == (n * n + 2 * n,)
        and x.device == fn.device == scale.device == base.device
    )  # fmt: skip
    return well_formed and _use_triton(x, _streams_supported(x, fn, scale, base))


def _hc_args_ok(x: object, fn: object, scale: object, base: object, rms_eps: object) -> bool:
    """``x [..., n, C]``, ``fn [n + 2, C]``, ``scale [3]``, ``base [n² + 2n]``, finite rms_eps >= 0."""
    if not (isinstance(x, Tensor) and x.dim() >= 2):
        return False
    n, c = x.shape[-2:]
    return (
        isinstance(fn, Tensor) and tuple(fn.shape) == (n + 2, c)
        and isinstance(scale, Tensor) and tuple(scale.shape) == (3,)
        and isinstance(base, Tensor) and tuple(base.shape) == (n * n + 2 * n,)
        and _finite_numbers(rms_eps, at_least=0.0)
    )  # fmt: skip


def hc_coefficients(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, rms_eps: float = 1e-6) -> ref.Coefficients:
    """:func:`torchmhc.functional.hc_coefficients` (the original HC: static + tanh dynamic), fused
    on the GPU, on the CPU path for fp32 CPU tensors, the reference elsewhere.

    Args:
        x: streams ``[..., n, C]`` (bf16/fp16/fp32).
        fn: ``[n + 2, C]`` fp32, θᵀ shared by the streams, rows [pre | post | res to destination 0..n-1].
        scale: ``[3]`` fp32 gates (pre, post, res). base: ``[n*n + 2n]`` fp32 static part.
        rms_eps: epsilon of each stream's RMS normalization.

    Returns:
        ``Coefficients(h_pre [..., n], h_post [..., n], h_res [..., n, n])``, fp32, paper orientation.
    """
    check_rms_eps(rms_eps)  # the kernels take it unchecked
    if _hc_kernels_apply(x, fn, scale, base):
        from torchmhc.kernels.hc_coefficients_op import HcCoefficients, hc_coefficients_op

        h_pre, h_post, h_res, *_saved = eager_or_compiled(hc_coefficients_op, HcCoefficients.apply, x)(
            flatten_tokens(x, 2), fn.contiguous(), scale.contiguous(), base.contiguous(), float(rms_eps)
        )
        return _unflatten_coefficients(h_pre, h_post, h_res, x.shape[:-2])
    if _hc_args_ok(x, fn, scale, base, rms_eps) and _use_cpu_path(x, fn, scale, base):
        coefficients = cpu.hc_coefficients(flatten_tokens(x, 2), fn, scale, base, float(rms_eps))
        return _unflatten_coefficients(*coefficients, x.shape[:-2])
    return ref.hc_coefficients(x, fn, scale, base, rms_eps=rms_eps)


def hc_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, rms_eps: float = 1e-6
) -> tuple[Tensor, Tensor, ref.Coefficients]:
    """The first half of an HC sub-layer: coefficients and layer input, with chained x-gradients.

    Same values as ``c = hc_coefficients(x, ...)``, ``layer_input = pre_mix(x, c.h_pre)``; where the
    kernels or the CPU path apply, both run as one autograd node and ``x_for_post`` is a view of x
    that it produces, for :func:`post_res`, exactly as in :func:`mhc_pre`. Elsewhere ``x_for_post``
    is x itself.

    Args:
        x, fn, scale, base, rms_eps: as in :func:`hc_coefficients`.

    Returns:
        ``(layer_input [..., C] in x.dtype, x_for_post [..., n, C], Coefficients(h_pre [..., n],
        h_post [..., n], h_res [..., n, n]) fp32)``.
    """
    check_rms_eps(rms_eps)  # the kernels take it unchecked
    if _hc_kernels_apply(x, fn, scale, base):
        return _chained_pre(x, fn, scale, base, "hc", (float(rms_eps),))
    if _hc_args_ok(x, fn, scale, base, rms_eps) and _use_cpu_path(x, fn, scale, base):
        return _cpu_pre(cpu.hc_pre, x, fn, scale, base, float(rms_eps))
    coefficients = ref.hc_coefficients(x, fn, scale, base, rms_eps=rms_eps)
    return pre_mix(x, coefficients.h_pre), x, coefficients


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """:func:`torchmhc.functional.pre_mix`, fused on the GPU: ``x [..., n, C]``, ``h_pre [..., n]``
    fp32 -> ``[..., C]`` in x.dtype."""
    ok = isinstance(x, Tensor) and x.dim() >= 2 and isinstance(h_pre, Tensor) and h_pre.shape == x.shape[:-1]
    if ok and _use_cpu_path(x, h_pre):
        return unflatten_tokens(cpu.pre_mix(flatten_tokens(x, 2), flatten_tokens(h_pre, 1)), x.shape[:-2])
    if not (ok and x.device == h_pre.device and _use_triton(x, _streams_supported(x, h_pre))):
        return ref.pre_mix(x, h_pre)
    from torchmhc.kernels.pre_mix_op import PreMix, pre_mix_op

    y = eager_or_compiled(pre_mix_op, PreMix.apply, x)(flatten_tokens(x, 2), flatten_tokens(h_pre, 1))
    return unflatten_tokens(y, x.shape[:-2])


def post_res(x: Tensor, f_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """:func:`torchmhc.functional.post_res`, fused on the GPU: ``x [..., n, C]``, ``f_out [..., C]``,
    ``h_post [..., n]``, ``h_res [..., n, n]`` fp32 -> ``[..., n, C]`` in x.dtype."""
    ok = _post_res_args_ok(x, f_out, h_post, h_res)
    if ok and _use_cpu_path(x, f_out, h_post, h_res):
        out = cpu.post_res(
            flatten_tokens(x, 2), flatten_tokens(f_out, 1), flatten_tokens(h_post, 1), flatten_tokens(h_res, 2)
        )
        return unflatten_tokens(out, x.shape[:-2])
    if not (ok and _use_triton(x, _streams_supported(x, h_post, h_res))):
        return ref.post_res(x, f_out, h_post, h_res)
    from torchmhc.kernels.post_res_op import PostRes, post_res_op

    out = eager_or_compiled(post_res_op, PostRes.apply, x)(flatten_tokens(x, 2), flatten_tokens(f_out, 1), flatten_tokens(h_post, 1), flatten_tokens(h_res, 2))
    return unflatten_tokens(out, x.shape[:-2])


def post_res_coefficients(
    x: Tensor,
    f_out: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    fn: Tensor,
    scale: Tensor,
    base: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    rms_eps: float = 1e-6,
    post_scale: float = 2.0,
) -> tuple[Tensor, ref.Coefficients]:
    """Sub-layer l's post-res and sub-layer l+1's coefficients in one pass over the streams.

    Same result as ``x_next = post_res(x, f_out, h_post, h_res)`` followed by
    ``mhc_coefficients(x_next, fn, scale, base, ...)``, with x_next never read back (see
    ``post_res_coefficients_op.py``).

    Args:
        x: streams of sub-layer l ``[..., n, C]``; f_out: its branch output ``[..., C]``;
            h_post ``[..., n]``, h_res ``[..., n, n]``: its coefficients (fp32).
        fn, scale, base, iters, eps, rms_eps, post_scale: sub-layer l+1's, as in :func:`mhc_coefficients`.

    Returns:
        ``(x_next [..., n, C] in x.dtype, Coefficients of sub-layer l+1)``.
    """
    check_coefficient_options(iters, eps, rms_eps, post_scale)
    ok = (
        _post_res_args_ok(x, f_out, h_post, h_res)
        and _coefficient_args_ok(x, fn, scale, base)
        and fn.device == scale.device == base.device == x.device
        and _linear_form_eps(eps)
    )  # fmt: skip
    if not (ok and _use_triton(x, _streams_supported(x, h_post, h_res, fn, scale, base))):
        x_next = ref.post_res(x, f_out, h_post, h_res)
        coefficients = ref.mhc_coefficients(
            x_next, fn, scale, base, iters=iters, eps=eps, rms_eps=rms_eps, post_scale=post_scale
        )
        return x_next, coefficients
    from torchmhc.kernels.post_res_coefficients_op import PostResCoefficients, post_res_coefficients_op

    x_next, h_pre2, h_post2, h_res2, *_saved = eager_or_compiled(post_res_coefficients_op, PostResCoefficients.apply, x)(
        flatten_tokens(x, 2), flatten_tokens(f_out, 1), flatten_tokens(h_post, 1), flatten_tokens(h_res, 2),
        fn.contiguous(), scale.contiguous(), base.contiguous(), iters, float(eps), float(rms_eps), float(post_scale),
    )  # fmt: skip
    lead = x.shape[:-2]
    return unflatten_tokens(x_next, lead), _unflatten_coefficients(h_pre2, h_post2, h_res2, lead)


def head_mix(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, eps: float = 1e-6, rms_eps: float = 1e-6
) -> Tensor:
    """:func:`torchmhc.functional.head_mix` (DeepSeek-V4's ``hc_head``): ``x [..., n, C]``,
    ``fn [n, n*C]``, ``scale [1]``, ``base [n]`` fp32 -> ``[..., C]``; on the CPU path for fp32 CPU
    tensors, the reference elsewhere."""
    ok = isinstance(x, Tensor) and x.dim() >= 2
    if ok:
        n, c = x.shape[-2:]
        ok = (
            isinstance(fn, Tensor) and tuple(fn.shape) == (n, n * c)
            and isinstance(scale, Tensor) and tuple(scale.shape) == (1,)
            and isinstance(base, Tensor) and tuple(base.shape) == (n,)
            and _finite_numbers(eps, rms_eps, at_least=0.0)
        )  # fmt: skip
    if not (ok and _use_cpu_path(x, fn, scale, base)):
        return ref.head_mix(x, fn, scale, base, eps=eps, rms_eps=rms_eps)
    return unflatten_tokens(cpu.head_mix(flatten_tokens(x, 2), fn, scale, base, float(eps), float(rms_eps)), x.shape[:-2])
