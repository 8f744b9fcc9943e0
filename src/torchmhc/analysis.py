"""Stability measures of hyper-connections (docs/math.md §8) and a way to collect them from any model.

Legend: ``h [..., n, n]`` residual mixing matrices (paper orientation, row = destination),
``x [..., n, C]`` streams; ``...`` are tokens. Every measure returns fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .checks import check_square
from .functional import Coefficients, amax_gain
from .layers import HyperConnection

__all__ = [
    "amax_gain",
    "GainProfile",
    "gain_profile",
    "doubly_stochastic_error",
    "distance_from_identity",
    "distance_from_uniform",
    "stream_similarity",
    "LayerRecord",
    "collect_coefficients",
    "collect_h_res",
]


@dataclass
class GainProfile:
    """Token-averaged Amax gains per sub-layer l = 0..L-1 (each a ``[L]`` tensor; paper Fig. 3/7).

    ``single_*``: of H_res at layer l. ``composite_forward``: forward gain of H_l ⋯ H_0 (the map
    from the network's input to the output of layer l). ``composite_backward``: backward gain of
    H_{L-1} ⋯ H_l (the map gradients take from the last layer down to layer l).
    """

    single_forward: Tensor
    single_backward: Tensor
    composite_forward: Tensor
    composite_backward: Tensor

    def max_composite(self) -> float:
        """The largest composite gain anywhere, forward or backward."""
        return float(torch.cat([self.composite_forward, self.composite_backward]).max())


def gain_profile(h_list: Sequence[Tensor]) -> GainProfile:
    """Gains of a stack of sub-layers: ``h_list[l]`` is ``[..., n, n]`` with the same tokens for all l."""
    if len(h_list) == 0:
        raise ValueError("h_list must hold at least one [..., n, n] matrix")
    for i, h in enumerate(h_list):
        check_square(h, f"h_list[{i}]")
        if h.shape != h_list[0].shape:
            raise ValueError(f"h_list[{i}] has shape {list(h.shape)}, h_list[0] has {list(h_list[0].shape)}")

    def token_mean(t: Tensor) -> Tensor:
        return t.reshape(-1).mean()

    singles = [amax_gain(h) for h in h_list]
    forward, product = [], None
    for h in h_list:  # H_l ⋯ H_0
        product = h if product is None else h @ product
        forward.append(token_mean(amax_gain(product)[0]))
    backward, product = [], None
    for h in reversed(h_list):  # H_{L-1} ⋯ H_l
        product = h if product is None else product @ h
        backward.append(token_mean(amax_gain(product)[1]))
    return GainProfile(
        single_forward=torch.stack([token_mean(f) for f, _ in singles]),
        single_backward=torch.stack([token_mean(b) for _, b in singles]),
        composite_forward=torch.stack(forward),
        composite_backward=torch.stack(backward[::-1]),
    )


def doubly_stochastic_error(h: Tensor) -> Tensor:
    """Distance from the Birkhoff polytope's defining equations, ``[..., n, n]`` -> ``[...]``:
    the largest of |row sum − 1|, |column sum − 1| and the most negative entry's magnitude."""
    check_square(h)
    rows = (h.sum(-1) - 1).abs().amax(-1)
    cols = (h.sum(-2) - 1).abs().amax(-1)
    negative = (-h).clamp_min(0).flatten(-2).amax(-1)
    return torch.maximum(torch.maximum(rows, cols), negative)


def distance_from_identity(h: Tensor) -> Tensor:
    """Frobenius distance ‖h − I‖ per matrix, ``[..., n, n]`` -> ``[...]`` (0: streams never mix)."""
    check_square(h)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return torch.linalg.matrix_norm(h - eye)


def distance_from_uniform(h: Tensor) -> Tensor:
    """Frobenius distance ‖h − 11ᵀ/n‖ per matrix (0: every stream becomes the same average)."""
    check_square(h)
    return torch.linalg.matrix_norm(h - 1.0 / h.shape[-1])


def stream_similarity(x: Tensor) -> Tensor:
    """Token-averaged cosine similarity between streams: ``x [..., n, C]`` -> ``[n, n]`` fp32.

    Off-diagonal entries near 1 mean the streams have collapsed into copies of one another.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape [..., n, C]")
    unit = torch.nn.functional.normalize(x.float().reshape(-1, *x.shape[-2:]), dim=-1)
    return (unit @ unit.transpose(-1, -2)).mean(0)


@dataclass
class LayerRecord:
    """What one hyper-connection saw and computed for a batch (detached, fp32 coefficients)."""

    name: str
    layer_index: int
    coefficients: Coefficients  # h_pre [..., n], h_post [..., n], h_res [..., n, n]
    stream_similarity: Tensor  # [n, n], of the streams entering the layer


@torch.no_grad()
def collect_coefficients(model: nn.Module, *args, **kwargs) -> list[LayerRecord]:
    """Runs ``model(*args, **kwargs)`` once and returns one record per :class:`HyperConnection` call,
    in call order (forward order for a sequential stack). Hooks are removed afterwards, even on error.
    """
    names = {module: name for name, module in model.named_modules() if isinstance(module, HyperConnection)}
    if not names:
        raise ValueError("model contains no torchmhc.HyperConnection modules")
    records: list[LayerRecord] = []

    def record(module: HyperConnection, x: Tensor, coefficients: Coefficients) -> None:
        detached = Coefficients(*(c.detach() for c in coefficients))
        records.append(LayerRecord(names[module], module.layer_index, detached, stream_similarity(x)))

    handles = [module.register_coefficient_hook(record) for module in names]
    # Eager even where the model is compiled: the hooks would make torch.compile guard on each
    # connection's layer index and compile the block once per layer, until its recompile limit
    # sends every later call of the block, training included, to eager mode.
    try:
        with torch.compiler.set_stance("force_eager"):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return records


def collect_h_res(model: nn.Module, *args, **kwargs) -> list[Tensor]:
    """Every hyper-connection's ``h_res [..., n, n]`` (fp32) for one batch, in call order."""
    return [r.coefficients.h_res for r in collect_coefficients(model, *args, **kwargs)]
