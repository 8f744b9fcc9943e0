"""Argument checks shared by the reference math, the modules, the kernels' dispatch and the analysis.

A user error raises ``ValueError`` (wrong value or shape) or ``TypeError`` (not a tensor, not a
floating dtype) with a sentence naming the argument, what was expected and what was received;
never an ``assert``. Shapes use the library's legend: ``x [..., n, C]`` streams, ``h [..., n, n]``
mixing matrices, ``f_out [..., C]`` a branch output.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

__all__ = [
    "check_floating",
    "check_streams",
    "check_shape",
    "check_same_device",
    "check_square",
    "check_branch_output",
    "check_int",
    "check_real",
    "check_eps",
    "check_rms_eps",
    "check_coefficient_options",
]


def check_floating(t: object, name: str) -> Tensor:
    """``t`` is a tensor of a floating dtype; returns it."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (bf16, fp16, fp32 or fp64), got {t.dtype}")
    return t


def check_streams(x: object, name: str = "x") -> tuple[int, int]:
    """``x`` is floating ``[..., n, C]`` with n, C >= 1; returns (n, C)."""
    x = check_floating(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., n, C] (at least 2 dims), got {tuple(x.shape)}")
    n, c = x.shape[-2:]
    if n < 1 or c < 1:
        raise ValueError(f"{name} must have n >= 1 streams and C >= 1 channels, got shape {tuple(x.shape)}")
    return n, c


def check_same_device(reference: Tensor, **tensors: Tensor) -> None:
    """Every tensor in ``tensors`` is on ``reference``'s device (``reference`` is the streams x)."""
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but x is on {reference.device}; move both to one device")


def check_shape(t: object, name: str, expected: tuple[int, ...], why: str = "") -> Tensor:
    """``t`` is floating with exactly the shape ``expected``; ``why`` explains it in the message."""
    t = check_floating(t, name)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}{why}, got {list(t.shape)}")
    return t


def check_square(h: object, name: str = "h") -> int:
    """``h`` is floating ``[..., n, n]`` with n >= 1; returns n."""
    if not isinstance(h, Tensor) or not h.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(h, 'dtype', type(h).__name__)}")
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"{name} must have shape [..., n, n], got {list(h.shape)}")
    if h.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., n, n] with n >= 1, got {list(h.shape)}")
    return h.shape[-1]


def check_branch_output(x: Tensor, f_out: object, name: str = "f_out") -> Tensor:
    """``f_out`` is floating ``[..., C]`` for streams ``x [..., n, C]``, on x's device."""
    check_floating(f_out, name)
    expected = list(x.shape[:-2]) + [x.shape[-1]]
    if list(f_out.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (x without its stream dim), got {list(f_out.shape)}")
    check_same_device(x, **{name: f_out})
    return f_out


def check_int(value: object, name: str, *, minimum: int) -> int:
    """``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(value: object, name: str, *, minimum: float | None = None, exclusive: bool = False) -> float:
    """``value`` is a finite real number (not a bool), ``>= minimum`` (``> minimum`` if ``exclusive``)."""
    bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if not ok:
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_eps(eps: object, name: str = "eps") -> float:
    """DeepSeek's epsilon (added to H_pre and the Sinkhorn sums): finite, >= 0."""
    return check_real(eps, name, minimum=0.0)


def check_rms_eps(rms_eps: object, name: str = "rms_eps") -> float:
    """Epsilon of an RMS normalization: finite and > 0, so that an all-zero token stays finite."""
    return check_real(rms_eps, name, minimum=0.0, exclusive=True)


def check_coefficient_options(iters: object, eps: object, rms_eps: object, post_scale: object) -> None:
    """The scalar options of the mHC coefficients: ``iters`` an integer >= 1, ``eps`` >= 0,
    ``rms_eps`` > 0 and ``post_scale`` > 0, all finite."""
    check_int(iters, "iters", minimum=1)
    check_eps(eps)
    check_rms_eps(rms_eps)
    check_real(post_scale, "post_scale", minimum=0.0, exclusive=True)
