"""Shared helpers of the kernel tests: inputs, the reference comparison, tolerances (docs/math.md §10),
which autograd node made a tensor and which ops ran (:class:`RecordOps`).

Importing this module turns on Triton's CPU interpreter when there is no CUDA device, so that the
kernels run (slowly) on CPU tensors in CI. The kernel modules are imported lazily by the dispatch,
after this has run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Tolerances against an fp64 reference (docs/math.md §10). On CPU (interpreter) the kernels multiply in
#: fp32: the fp32 coefficient-math tolerances. On a GPU the products run on bf16 tensor cores with
#: operands split into ~16-bit parts: the TF32-GEMM tolerances, and for bf16 outputs the looser
#: one that also covers a product's cancellation against the 1/r term before rounding.
if DEVICE == "cpu":
    FP32_TOL = dict(rtol=1e-5, atol=2e-5)
    GRAD_TOL = None
    LOWP_TOL = None
else:
    FP32_TOL = dict(rtol=1e-3, atol=1e-3)
    GRAD_TOL = dict(rtol=1e-3, atol=3e-2)
    LOWP_TOL = dict(rtol=1.6e-2, atol=1e-3)


def streams(t: int, n: int, c: int, dtype: torch.dtype, device: str = DEVICE) -> Tensor:
    """Random streams ``[t, n, c]`` (never zeros: they hide unwritten outputs)."""
    return torch.randn(t, n, c, device=device).to(dtype)


def mhc_params(n: int, c: int, device: str = DEVICE) -> tuple[Tensor, Tensor, Tensor]:
    """fn ``[n²+2n, nC]``, scale ``[3]``, base ``[n²+2n]`` fp32, scaled so that logits have std ~1-3."""
    rows = n * n + 2 * n
    fn = torch.randn(rows, n * c, device=device) / (n * c) ** 0.5
    scale = torch.rand(3, device=device) + 0.5
    base = torch.randn(rows, device=device)
    return fn, scale, base


def hc_params(n: int, c: int, device: str = DEVICE) -> tuple[Tensor, Tensor, Tensor]:
    """HC's fn ``[n + 2, C]``, scale ``[3]``, base ``[n² + 2n]`` fp32, scaled so that the projections
    of the normalized streams have std 1.5 (tanh well inside its curved range)."""
    fn = 1.5 * torch.randn(n + 2, c, device=device) / c**0.5
    scale = torch.rand(3, device=device) + 0.5
    base = torch.randn(n * n + 2 * n, device=device)
    return fn, scale, base


def _for_reference(t: Tensor) -> Tensor:
    # fp32 becomes fp64 (the reference then computes in fp64); low-precision streams stay as they are
    out = t.detach().double() if t.dtype == torch.float32 else t.detach().clone()
    return out.requires_grad_(t.requires_grad)


def _assert_close(
    actual: Tensor, expected: Tensor, what: str, fp32_tol: dict, lowp_tol: dict | None, norm_tol: float | None
) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if norm_tol is not None:
        err = ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
        assert err < norm_tol, f"{what}: relative error {err:.2e} >= {norm_tol:.0e}"
    elif actual.dtype in (torch.bfloat16, torch.float16):
        tol = lowp_tol or {}
        torch.testing.assert_close(actual, expected.to(actual.dtype), **tol, msg=lambda m: f"{what}: {m}")
    else:
        # A sum of many fp32 terms is also allowed 16 units in the last place of its tensor's
        # largest entry (docs/math.md §10): an entry that cancels toward 0 keeps the rounding of
        # terms that size, whose order the CPU's vector width changes.
        atol = max(fp32_tol["atol"], 16 * torch.finfo(torch.float32).eps * expected.abs().max().item())
        tol = {**fp32_tol, "atol": atol}
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def check_fwd_bwd(
    kernel: Callable[..., Tensor | Sequence[Tensor]],
    reference: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor],
    *,
    fp32_tol: dict = FP32_TOL,
    grad_tol: dict | None = GRAD_TOL,
    lowp_tol: dict | None = LOWP_TOL,
    norm_tol: float | None = None,
) -> None:
    """Runs ``kernel`` and ``reference`` forward and backward on the same inputs and compares every
    output and every input gradient: fp32 against fp64 with ``fp32_tol`` (``grad_tol`` for
    gradients), bf16/fp16 with ``lowp_tol`` (default: torch's bf16/fp16 tolerances); with
    ``norm_tol``, every tensor by its relative error ‖a − e‖ / ‖e‖ instead."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_leaves = [_for_reference(t) for t in leaves]
    out = kernel(*leaves)
    out = [out] if isinstance(out, Tensor) else list(out)
    ref_out = reference(*ref_leaves)
    ref_out = [ref_out] if isinstance(ref_out, Tensor) else list(ref_out)
    grads = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in out]
    d_in = torch.autograd.grad(out, leaves, grads)
    d_ref = torch.autograd.grad(ref_out, ref_leaves, [g.to(r.dtype) for g, r in zip(grads, ref_out)])
    for i, (a, e) in enumerate(zip(out, ref_out)):
        _assert_close(a, e, f"output {i}", fp32_tol, lowp_tol, norm_tol)
    for i, (a, e) in enumerate(zip(d_in, d_ref)):
        _assert_close(a, e, f"gradient of input {i}", grad_tol or fp32_tol, lowp_tol, norm_tol)


def made_by(t, name):
    """True when ``t`` is (a view of) an output of an autograd node whose type name contains ``name``."""
    node = t.grad_fn
    while node is not None and type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return node is not None and name in type(node).__name__


def branch(u, w):
    """A branch F with a parameter: ``tanh(u @ w)`` in w's precision, ``[T, C] -> [T, C]`` in u.dtype."""
    return torch.tanh(u.to(w.dtype) @ w).to(u.dtype)


def sublayers(pre, coefficients, reference_coefficients):
    """``(chained, unchained, reference)``: one sub-layer ``(x, fn, scale, base, w) -> [T, n, C]``
    around :func:`branch`, its first half as ``pre`` runs it (coefficients and pre-mix as one node),
    as separate ``coefficients`` and pre-mix ops, and in the reference with ``reference_coefficients``."""
    from torchmhc import functional as ref
    from torchmhc.kernels import post_res, pre_mix

    def chained(x, fn, scale, base, w):
        layer_input, x_for_post, (_, h_post, h_res) = pre(x, fn, scale, base)
        return post_res(x_for_post, branch(layer_input, w), h_post, h_res)

    def unchained(x, fn, scale, base, w):
        h_pre, h_post, h_res = coefficients(x, fn, scale, base)
        return post_res(x, branch(pre_mix(x, h_pre), w), h_post, h_res)

    def reference(x, fn, scale, base, w):
        h_pre, h_post, h_res = reference_coefficients(x, fn, scale, base)
        return ref.post_res(x, branch(ref.pre_mix(x, h_pre), w), h_post, h_res)

    return chained, unchained, reference


class RecordOps(TorchDispatchMode):
    """Records every op that runs below autograd: its overload packet and its (first) output's shape
    (Triton launches are not torch ops, and eager mode calls the launchers without the registered
    ops: :class:`Launches` counts those)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.ops.append((func.overloadpacket, tuple(first.shape) if isinstance(first, torch.Tensor) else None))
        return out

    def stream_adds(self, shape):
        """Elementwise additions whose result has the shape of the streams."""
        return sum(packet in (torch.ops.aten.add, torch.ops.aten.add_) and s == tuple(shape) for packet, s in self.ops)


class Launches:
    """Counts calls of the kernels' launchers, by function name, inside the ``with`` block (eager
    mode calls them directly; compiled graphs call them through the registered ops)."""

    NAMES = (
        "coefficients_fwd", "coefficients_bwd", "pre_mix_fwd", "pre_mix_bwd", "pre_mix_dh",
        "post_res_fwd", "post_res_bwd", "post_res_coefficients_fwd", "post_res_coefficients_pre_mix_fwd",
        "hc_coefficients_fwd", "hc_coefficients_bwd", "transition_bwd_streams",
        "post_res_coefficients_pre_mix_norm_fwd", "norm_dh",
    )  # fmt: skip

    def __init__(self):
        self.monkeypatch = pytest.MonkeyPatch()
        self.counts = dict.fromkeys(self.NAMES, 0)

    def __enter__(self):
        import importlib
        import pkgutil

        import torchmhc.kernels as package

        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name in self.NAMES:
                if callable(getattr(module, name, None)):
                    self.monkeypatch.setattr(module, name, self._counting(name, getattr(module, name)))
        return self

    def _counting(self, name, launcher):
        def launch(*args, **kwargs):
            self.counts[name] += 1
            return launcher(*args, **kwargs)

        return launch

    def __exit__(self, *exc):
        self.monkeypatch.undo()

    def calls(self, name):
        return self.counts[name]
