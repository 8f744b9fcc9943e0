"""The ``residual=`` kinds, as a registry: what each connection is, and what every module asks of it.

A kind is the plain residual, the original hyper-connections (HC), or a constraint on H_res from
``torchmhc.manifolds`` (mHC is the Sinkhorn one). Modules never compare ``residual=`` strings:
``HyperConnection`` asks a kind for its form (parameter layout and coefficient math), the configs
for its name and aliases, the models for its number of streams, the report for its label, colour,
description and whether H_res is doubly stochastic, the DeepSeek-V4 interop for its manifold.

===================  ====================  ===========  ==================  =====================
name (aliases)       form                  H_res        doubly stochastic   fused coefficients
===================  ====================  ===========  ==================  =====================
residual             one stream, x + F(x)  —            —                   —
hc                   static + tanh (HC)    unconstrained no                 yes (hc kernels)
mhc (sinkhorn)       manifold: sinkhorn    Sinkhorn     yes (t_max rounds)  yes (V4 convention)
mhc-lite (perm...)   manifold: permutation Σ softmax·P  yes, exactly        no (reference)
orthostochastic      manifold              Q∘Q          yes, exactly        no
spectral             manifold              W/‖W‖₂ ball  no                  no
identity             manifold              I            yes                 no
unconstrained        manifold              W            no                  no
===================  ====================  ===========  ==================  =====================

The pre-mix and post-res kernels serve every kind with n streams. A manifold registered later with
``manifolds.register`` becomes a kind of the same name (label = name), so
``HyperConnection(residual=name)`` and ``model.residual = name`` accept it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchmhc.manifolds import MANIFOLDS

__all__ = ["ResidualKind", "RESIDUALS", "get_residual", "residual_kinds"]

Form = Literal["residual", "hc", "manifold"]


@dataclass(frozen=True)
class ResidualKind:
    """One ``residual=`` kind.

    Attributes:
        name: the canonical ``residual=`` value (what modules and reports record).
        form: ``"residual"`` (one stream, no coefficients), ``"hc"`` (HC's static + tanh dynamic
            coefficients, ``fn [n + 2, C]``) or ``"manifold"`` (mHC's RMS-scaled projection,
            ``fn [2n + K, n·C]``, H_res from the manifold ``manifold``).
        label, description, color: how reports name, explain and draw it.
        manifold: the ``torchmhc.manifolds`` name for ``form == "manifold"``.
        aliases: other accepted ``residual=`` values.
        fused_coefficients: its coefficients (forward and backward) have fused kernels; every kind
            with n streams has them for the pre-mix and the post-res.
    """

    name: str
    form: Form
    label: str
    description: str
    color: str = "#000000"
    manifold: str | None = None
    aliases: tuple[str, ...] = ()
    fused_coefficients: bool = False

    @property
    def num_streams_fixed(self) -> int | None:
        """1 for the plain residual (whatever n says), else None (n streams)."""
        return 1 if self.form == "residual" else None

    @property
    def doubly_stochastic(self) -> bool:
        """Whether every H_res it makes is doubly stochastic (Sinkhorn: to t_max rounds' accuracy)."""
        return self.form == "manifold" and MANIFOLDS[self.manifold].doubly_stochastic


#: The built-in kinds, in the order reports list them.
RESIDUALS: dict[str, ResidualKind] = {
    kind.name: kind
    for kind in (
        ResidualKind("residual", "residual", "Residual", "plain residual x + F(x), one stream", "#555555"),
        ResidualKind(
            "hc", "hc", "HC", "original hyper-connections (Zhu et al.): n streams, unconstrained H_res", "#d62728",
            fused_coefficients=True,
        ),
        ResidualKind(
            "mhc", "manifold", "mHC", "manifold-constrained: H_res projected to doubly stochastic by Sinkhorn-Knopp",
            "#1f77b4", manifold="sinkhorn", aliases=("sinkhorn",), fused_coefficients=True,
        ),
        ResidualKind(
            "mhc-lite", "manifold", "mHC-lite",
            "H_res a convex mixture of permutation matrices (exactly doubly stochastic)", "#2ca02c",
            manifold="permutation", aliases=("permutation",),
        ),
        ResidualKind(
            "orthostochastic", "manifold", "Orthostochastic",
            "H_res = Q∘Q for an orthogonal Q (exactly doubly stochastic)", "#9467bd", manifold="orthostochastic",
        ),
        ResidualKind(
            "spectral", "manifold", "Spectral", "H_res in the spectral-norm unit ball", "#17becf", manifold="spectral"
        ),
        ResidualKind(
            "identity", "manifold", "Identity (no mixing)", "n streams, H_res = I (no mixing between streams)",
            "#8c564b", manifold="identity",
        ),
        ResidualKind(
            "unconstrained", "manifold", "Unconstrained",
            "n streams, H_res unconstrained with the mHC parameterization", "#ff7f0e", manifold="unconstrained",
        ),
    )
}


def _all_kinds() -> dict[str, ResidualKind]:
    """Built-in kinds plus one per manifold that none of them uses (registered later by a user)."""
    used = {kind.manifold for kind in RESIDUALS.values()}
    extra = {
        name: ResidualKind(name, "manifold", name, f"H_res from the {name!r} manifold", manifold=name)
        for name in MANIFOLDS
        if name not in used and name not in RESIDUALS
    }
    return {**RESIDUALS, **extra}


def residual_kinds() -> tuple[str, ...]:
    """Every canonical ``residual=`` name (aliases not included)."""
    return tuple(_all_kinds())


def get_residual(name: object) -> ResidualKind:
    """The kind named ``name`` (or one of its aliases); ValueError listing the kinds otherwise."""
    kinds = _all_kinds()
    if isinstance(name, str):
        if name in kinds:
            return kinds[name]
        for kind in kinds.values():
            if name in kind.aliases:
                return kind
    aliases = [alias for kind in kinds.values() for alias in kind.aliases]
    raise ValueError(f"residual must be one of {', '.join(kinds)} (aliases: {', '.join(aliases)}); got {name!r}")
