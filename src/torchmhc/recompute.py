"""Block recomputation of the mHC stream operations (paper Sec. 4.3.2, docs/math.md §9).

A run of L sub-layers is cut into blocks of ``L_r`` consecutive sub-layers. Autograd keeps, per
block, the streams at its start (n·C per token) and every branch output f_l (C per token), as it
would anyway; the streams ``x_l`` inside a block and the layer inputs ``H_pre·x_l`` are not kept:
when backward first needs one of them, the block's mHC operations (coefficients, pre-mix,
post-res; cheap, memory-bound) are replayed from the block start and the stored f_l, and the
replayed tensors are freed once backward is through the block. The branches (attention, FFN)
are never re-run. Blocks never cross a boundary the caller marks (pipeline stages).

How: ``torch.autograd.graph.saved_tensors_hooks`` around each sub-layer swap every saved tensor
that shares storage with ``x_l`` or ``H_pre·x_l`` for a small placeholder; the placeholder's
unpack replays the block. Nothing else that the branch saves is touched. The replay uses the
same deterministic operations as the forward, so gradients are bit-identical to a run without
recomputation.

Legend: L sub-layers, n streams, C channels, T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchmhc.layers import HyperConnection

__all__ = ["SubLayer", "RecomputeStats", "optimal_block_length", "block_starts", "run_sublayers"]

#: One sub-layer: its hyper-connection and its branch F, ``[..., C] -> [..., C]``.
SubLayer = tuple[HyperConnection, Callable[[Tensor], Tensor]]


@dataclass
class RecomputeStats:
    """What :func:`run_sublayers` left to recomputation (filled during the forward)."""

    block_starts: list[int] = field(default_factory=list)
    #: bytes of the distinct tensors (x_l, H_pre·x_l) that autograd no longer keeps
    dropped_bytes: int = 0


def optimal_block_length(num_streams: int, num_sublayers: int) -> int:
    """``L_r* = round(sqrt(n·L / (n + 2)))`` (docs/math.md §9), clipped to ``[1, L]``."""
    if num_streams < 1 or num_sublayers < 1:
        raise ValueError(f"num_streams and num_sublayers must be >= 1, got {num_streams}, {num_sublayers}")
    best = round(math.sqrt(num_streams * num_sublayers / (num_streams + 2)))
    return min(max(best, 1), num_sublayers)


def block_starts(num_sublayers: int, block_length: int, boundaries: Iterable[int] = ()) -> list[int]:
    """Indices of the sub-layers that start a block: every ``block_length`` sub-layers, counting
    again from each boundary (a boundary always starts a block)."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    cuts = sorted({0, *boundaries})
    if cuts[-1] >= num_sublayers or cuts[0] < 0:
        raise ValueError(f"boundaries must be sub-layer indices in [1, {num_sublayers - 1}], got {sorted(boundaries)}")
    starts: list[int] = []
    for a, b in zip(cuts, cuts[1:] + [num_sublayers]):
        starts.extend(range(a, b, block_length))
    return starts


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Block:
    """One block's forward record and, during backward, its replayed streams."""

    def __init__(self, x_start: Tensor) -> None:
        self.x_start = x_start
        self.steps: list[tuple[HyperConnection, Tensor]] = []  # (hyper-connection, branch output)
        self.replayed: tuple[list[Tensor], list[Tensor]] | None = None
        self.pending = 0  # placeholders not yet unpacked
        self.dropped: set[tuple[int, bool]] = set()  # (sub-layer, is_stream) already counted

    def replay(self) -> tuple[list[Tensor], list[Tensor]]:
        """Streams ``x_l`` and layer inputs ``H_pre·x_l`` of every sub-layer of the block."""
        if self.replayed is None:
            xs, us = [], []
            x = self.x_start
            with torch.no_grad():
                for hc, f_out in self.steps:
                    xs.append(x)
                    # HyperConnection.pre / post without the analysis hooks (already called once)
                    layer_input, ctx, _ = hc.pre_with_coefficients(x)
                    us.append(layer_input)
                    x = hc.post(ctx, f_out)
            self.replayed = (xs, us)
        return self.replayed


@dataclass
class _Placeholder:
    block: _Block
    index: int  # sub-layer within the block
    is_stream: bool  # x_l, else H_pre·x_l
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the tensor it views


def _unpack(saved: object) -> Tensor:
    if not isinstance(saved, _Placeholder):
        return saved  # type: ignore[return-value]
    block = saved.block
    xs, us = block.replay()
    base = (xs if saved.is_stream else us)[saved.index]
    out = base.as_strided(saved.shape, saved.stride, base.storage_offset() + saved.offset)
    block.pending -= 1
    if block.pending <= 0:  # backward is through this block: free the replayed tensors
        block.replayed = None
    return out


def run_sublayers(
    x: Tensor,
    sublayers: Sequence[SubLayer],
    *,
    block_length: int | None = None,
    boundaries: Iterable[int] = (),
    stats: RecomputeStats | None = None,
) -> Tensor:
    """Runs ``x_{l+1} = hc_l(x_l, F_l)`` over the sub-layers with block recomputation.

    Args:
        x: streams ``[..., n, C]`` entering the first sub-layer.
        sublayers: ``(HyperConnection, branch)`` pairs, in order.
        block_length: sub-layers per block; default :func:`optimal_block_length` (n, L).
        boundaries: sub-layer indices that must start a block (e.g. the first sub-layer of each
            pipeline stage).
        stats: filled with the block starts and the bytes left to recomputation.

    Returns:
        The streams after the last sub-layer, ``[..., n, C]``; same values and gradients as calling
        the sub-layers one after another.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape [..., n, C], got {getattr(x, 'shape', type(x).__name__)}")
    if len(sublayers) == 0:
        raise ValueError("sublayers must hold at least one (HyperConnection, branch) pair")
    boundaries = list(boundaries)
    length = optimal_block_length(x.shape[-2], len(sublayers)) if block_length is None else block_length
    starts = set(block_starts(len(sublayers), length, boundaries))
    if stats is not None:
        stats.block_starts = sorted(starts)
    block: _Block | None = None
    for index, (hc, branch) in enumerate(sublayers):
        if index in starts or block is None:
            block = _Block(x)
        current = {"x": x if x.is_contiguous() else None, "u": None, "index": len(block.steps)}

        def pack(t: Tensor, block: _Block = block, current: dict = current) -> object:
            for key, is_stream in (("x", True), ("u", False)):
                ref = current[key]
                # the block start itself is kept; everything else sharing x_l's / u_l's storage goes
                if ref is None or (is_stream and current["index"] == 0) or not _same_storage(t, ref):
                    continue
                block.pending += 1
                if stats is not None and (current["index"], is_stream) not in block.dropped:
                    block.dropped.add((current["index"], is_stream))
                    stats.dropped_bytes += ref.numel() * ref.element_size()
                return _Placeholder(
                    block, current["index"], is_stream, t.shape, t.stride(), t.storage_offset() - ref.storage_offset()
                )
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            layer_input, ctx = hc.pre(x)
            if layer_input.is_contiguous():
                current["u"] = layer_input
            f_out = branch(layer_input)
            x = hc.post(ctx, f_out)
        block.steps.append((hc, f_out))
        # autograd keeps `pack` (and its `current`) as long as the saved tensors: without this,
        # the streams and layer inputs it left out would stay alive through it
        current["x"] = current["u"] = None
    return x
