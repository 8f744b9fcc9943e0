"""Constraints on the residual mixing matrix H_res, as a registry (docs/math.md §5–6).

A manifold turns ``K`` free logits per token into ``H_res [..., n, n]`` (fp32, paper orientation:
row = destination). Adding one is one small class with ``name``, ``num_logits``, ``project`` and
``init_logits``, decorated with :func:`register`.

============== ============================================ ========== ===================
name           H_res                                        logits K   doubly stochastic
============== ============================================ ========== ===================
sinkhorn       Sinkhorn-Knopp(exp(ℓ)) (mHC)                 n²         to t_max's accuracy
permutation    Σ_k softmax(ℓ)_k P_k over n! perms (mHC-lite) n!         exactly (n ≤ 5)
orthostochastic Q∘Q, Q = Cayley(skew(ℓ))                     n(n-1)/2   exactly
spectral       W / max(1, ‖W‖₂) (sHC-style ball)            n²         no (‖H‖₂ ≤ 1)
identity       I                                            0          exactly
unconstrained  W (HC-style, no constraint)                  n²         no
============== ============================================ ========== ===================

Logits with n² entries use DeepSeek's ``comb`` order ([source j, destination k] row-major), so the
V4 parameter layout carries over unchanged.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .functional import comb_to_paper, paper_to_comb, sinkhorn_knopp

__all__ = ["Manifold", "register", "get_manifold", "MANIFOLDS"]

InitTarget = Literal["uniform", "identity"]

# A diagonal weight this close to 1 makes an identity start "a residual block, nearly",
# while leaving σ'/softmax' large enough (≈ 1e-2) for the mixing to learn.
IDENTITY_WEIGHT = 0.99


class Manifold:
    """One H_res constraint. Subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str]
    #: Every H_res it makes is doubly stochastic (Sinkhorn: to the accuracy of its rounds).
    doubly_stochastic: ClassVar[bool] = False

    def num_logits(self, n: int) -> int:
        """How many free logits per token parameterize an ``n × n`` H_res."""
        raise NotImplementedError

    def project(self, logits: Tensor, n: int) -> Tensor:
        """``logits [..., K]`` (fp32) -> ``H_res [..., n, n]`` (fp32, paper orientation)."""
        raise NotImplementedError

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        """Bias ``[K]`` (fp32) whose projection is the uniform matrix or (nearly) the identity."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


MANIFOLDS: dict[str, type[Manifold]] = {}


def register(cls: type[Manifold]) -> type[Manifold]:
    """Class decorator adding a manifold to the registry under ``cls.name``."""
    MANIFOLDS[cls.name] = cls
    return cls


def get_manifold(name: str, **options) -> Manifold:
    """Builds the manifold registered as ``name`` (e.g. ``get_manifold("sinkhorn", iters=10)``)."""
    if name not in MANIFOLDS:
        raise ValueError(f"unknown manifold {name!r}; registered: {sorted(MANIFOLDS)}")
    return MANIFOLDS[name](**options)


def _check_logits(logits: Tensor, expected: int, name: str) -> None:
    if logits.shape[-1] != expected:
        raise ValueError(f"{name} expects {expected} logits per token in the last dim, got {list(logits.shape)}")


def _identity_comb(n: int, diagonal: float, off_diagonal: float = 0.0) -> Tensor:
    eye = torch.eye(n, dtype=torch.float32)
    return paper_to_comb(eye * diagonal + (1 - eye) * off_diagonal)


@register
class Sinkhorn(Manifold):
    """mHC: Sinkhorn-Knopp projection onto the Birkhoff polytope (see ``functional.sinkhorn_knopp``)."""

    name = "sinkhorn"
    doubly_stochastic = True

    def __init__(self, iters: int = 20, eps: float = 1e-6, convention: Literal["v4", "paper"] = "v4"):
        self.iters, self.eps, self.convention = iters, eps, convention

    def num_logits(self, n: int) -> int:
        return n * n

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, n * n, self.name)
        return sinkhorn_knopp(comb_to_paper(logits, n), self.iters, self.eps, convention=self.convention)

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        if target == "uniform" or n == 1:
            return torch.zeros(n * n)
        # A symmetric matrix with equal rows is already doubly stochastic: diag weight e^d/(e^d + n - 1).
        return _identity_comb(n, math.log(IDENTITY_WEIGHT * (n - 1) / (1 - IDENTITY_WEIGHT)))

    def __repr__(self) -> str:
        return f"Sinkhorn(iters={self.iters}, eps={self.eps}, convention={self.convention!r})"


@register
class Permutation(Manifold):
    """mHC-lite: a convex combination of the n! permutation matrices — exact, no iterations."""

    name = "permutation"
    doubly_stochastic = True
    max_streams: ClassVar[int] = 5  # 5! = 120 logits per token; 6! = 720 is no longer practical

    def __init__(self) -> None:
        self._matrices: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def _permutation_matrices(self, n: int, like: Tensor) -> Tensor:
        key = (n, like.device, like.dtype)
        if key not in self._matrices:
            perms = torch.tensor(list(itertools.permutations(range(n))), device=like.device)  # [n!, n]
            # P_k[i, j] = 1 when destination i takes source perms[k][i]; perms[0] is the identity.
            self._matrices[key] = torch.nn.functional.one_hot(perms, n).to(like.dtype)
        return self._matrices[key]

    def num_logits(self, n: int) -> int:
        if n > self.max_streams:
            raise ValueError(f"permutation (mHC-lite) needs n! logits; n={n} > {self.max_streams} is impractical")
        return math.factorial(n)

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, self.num_logits(n), self.name)
        weights = torch.softmax(logits, dim=-1)
        return torch.einsum("...k,kij->...ij", weights, self._permutation_matrices(n, weights))

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        logits = torch.zeros(self.num_logits(n))
        if target == "identity" and n > 1:
            logits[0] = math.log(IDENTITY_WEIGHT * (len(logits) - 1) / (1 - IDENTITY_WEIGHT))
        return logits


@register
class Orthostochastic(Manifold):
    """H = Q∘Q (entrywise square) of an orthogonal Q = (I − A)⁻¹(I + A), A skew-symmetric (Cayley).

    Rows and columns of Q have unit norm, so H is exactly doubly stochastic. Logits are A's strict
    upper triangle; zero logits give Q = I, so there is no uniform start for general n.
    """

    name = "orthostochastic"
    doubly_stochastic = True

    def num_logits(self, n: int) -> int:
        return n * (n - 1) // 2

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, self.num_logits(n), self.name)
        rows, cols = torch.triu_indices(n, n, offset=1, device=logits.device)
        upper = logits.new_zeros(logits.shape[:-1] + (n, n))
        upper[..., rows, cols] = logits
        skew = upper - upper.transpose(-1, -2)
        eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
        q = torch.linalg.solve(eye - skew, eye + skew)
        return q.square()

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        if target == "uniform" and n > 1:
            raise ValueError("orthostochastic has no uniform start for general n (zero logits give I); use init='identity'")
        return torch.zeros(self.num_logits(n))


@register
class Spectral(Manifold):
    """sHC-style: H = W / max(1, ‖W‖₂), the spectral-norm unit ball; entries may be negative."""

    name = "spectral"

    def num_logits(self, n: int) -> int:
        return n * n

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, n * n, self.name)
        w = comb_to_paper(logits, n)
        norm = torch.linalg.matrix_norm(w, ord=2)
        return w / norm.clamp_min(1.0)[..., None, None]

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        return _identity_comb(n, 1.0) if target == "identity" else torch.full((n * n,), 1.0 / n)


@register
class Identity(Manifold):
    """H_res = I: n streams that never mix (ablation). H_pre and H_post stay dynamic; with them
    fixed too, streams copied from one embedding would stay identical: the plain residual."""

    name = "identity"
    doubly_stochastic = True

    def num_logits(self, n: int) -> int:
        return 0

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, 0, self.name)
        eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
        return eye.expand(logits.shape[:-1] + (n, n))

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        return torch.zeros(0)


@register
class Unconstrained(Manifold):
    """H_res = W, no constraint: the HC baseline's mixing inside mHC's coefficient pipeline."""

    name = "unconstrained"

    def num_logits(self, n: int) -> int:
        return n * n

    def project(self, logits: Tensor, n: int) -> Tensor:
        _check_logits(logits, n * n, self.name)
        return comb_to_paper(logits, n)

    def init_logits(self, n: int, target: InitTarget) -> Tensor:
        return _identity_comb(n, 1.0) if target == "identity" else torch.full((n * n,), 1.0 / n)
