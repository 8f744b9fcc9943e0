"""CPU memory accounting for measurements: the storages that tensor operations create.

Used where the CUDA allocator's counters are not available: the activation memory of a CPU
training step (``benchmarks/e2e.py``) and the peak memory of building a model laid out over ranks
(``torchmhc.distributed.runner``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["NewStorages"]


class NewStorages(TorchDispatchMode):
    """Records the CPU storages that tensor operations create while active.

    :meth:`alive_bytes` sums those still alive (after a forward: what it left for the backward);
    ``peak`` is the most bytes alive at once, checked after each operation. Storages made before
    the mode are not counted, and an output that shares an input's storage (a view, an in-place
    operation) creates nothing; a DTensor counts its local shard. Nested ``saved_tensors_hooks``
    (block recomputation uses them) do not hide anything from it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        # The weak references keep each storage's record (not its memory) alive, so that a new
        # storage object at a freed one's address replaces the record instead of being taken for it.
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage creates nothing (a view, an in-place change, `.cpu()`
        # of a CPU tensor inside Triton's interpreter): parameters would otherwise count as activations
        inputs = {key for t in tree_leaves((args, kwargs)) if (key := _storage_key(t)) is not None}
        for t in tree_leaves(out):
            key = _storage_key(t)
            if key is None or key in inputs:
                continue
            known = self.storages.get(key)
            if known is None or known[0].expired():  # new, or a freed one's record reused
                storage = _local(t).untyped_storage()
                self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
        self.storages = {key: entry for key, entry in self.storages.items() if not entry[0].expired()}
        self.peak = max(self.peak, self.alive_bytes())
        return out

    def alive_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.storages.values() if not ref.expired())


def _local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def _storage_key(t) -> int | None:
    """The address of a CPU tensor's storage object (shared by its views), None for anything else.
    Not the data pointer: some storages (FSDP's, being set up) refuse to give it."""
    t = _local(t)
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return None
    return t.untyped_storage()._cdata
