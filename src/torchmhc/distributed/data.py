"""Each data-parallel rank's rows of the global batch.

``data.batch_size`` stays the global batch. Batch ``step`` is drawn as one process draws it
(``TokenData.get_batch`` is a pure function of the seed and the step) and data-parallel rank
``r`` of ``D`` takes rows ``[r·B/D, (r+1)·B/D)``. The rows of all ranks together are the
one-process batch, in the same order, whatever the layout: a run's samples, and therefore its
losses, do not depend on how it is laid out. Drawing the whole batch costs B window reads from a
memory-mapped corpus per step on every rank, nothing next to a training step.
"""

from __future__ import annotations

from torch import Tensor

from torchmhc.data import TokenData

__all__ = ["local_rows", "local_batch"]


def local_rows(batch: Tensor, dp_rank: int, dp_size: int) -> Tensor:
    """Rows ``[dp_rank·B/dp_size, (dp_rank+1)·B/dp_size)`` of ``batch [B, ...]`` (a view)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}.")
    rows = batch.shape[0]
    if rows % dp_size:
        raise ValueError(f"the batch has {rows} rows, not divisible by the {dp_size} data-parallel ranks.")
    per_rank = rows // dp_size
    return batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def local_batch(
    data: TokenData, step: int, *, batch_size: int, seq_len: int, seed: int, dp_rank: int, dp_size: int
) -> tuple[Tensor, Tensor]:
    """This rank's inputs and targets of training batch ``step``: int64 ``[batch_size / dp_size, seq_len]`` each."""
    x, y = data.get_batch("train", step, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return local_rows(x, dp_rank, dp_size), local_rows(y, dp_rank, dp_size)
