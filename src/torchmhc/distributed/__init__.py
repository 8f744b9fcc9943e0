"""Training across processes and GPUs on PyTorch's own distributed stack.

FSDP2 (``fully_shard``) for data parallelism, ``torch.distributed.pipelining`` for pipeline
parallelism with n-stream stage edges, DCP (``torch.distributed.checkpoint``) for checkpoints that
load at any layout, and ``torchrun`` to launch: ``torchrun --nproc-per-node N -m torchmhc train
--set parallel.pp=2 ...`` trains one run over N processes (``torchmhc.train.train`` lays it out
when the world size is above 1 or the run has a ``[parallel]`` section). One file per concern:

    config.py       ParallelConfig: the [parallel] section (degrees, schedule, microbatches)
    mesh.py         process group and the (pp, dp_replicate, dp_shard) DeviceMesh
    pipeline.py     stage split, stage modules, schedules
    overlap.py      DualPipeV's overlapped forward/backward chunks
    fsdp.py         fully_shard units and mixed precision
    parallel_model.py  parallelize(): the one place that builds the model and composes the above, in order
    clip.py         gradient clipping by the global norm over shards and stages
    moe.py          router-bias balancing with the global batch's expert loads
    data.py         each data-parallel rank's rows of the global batch
    step.py         one optimizer step (the parallel train_step)
    checkpoint.py   DCP checkpoints, atomic, resharding, and safetensors conversion
    job.py          a training run over the job's processes: what torchmhc.train's loop runs
    runner.py       several short runs in one launch (the tests' workhorse)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchmhc.distributed.config import ParallelConfig
    from torchmhc.distributed.data import local_batch, local_rows
    from torchmhc.distributed.mesh import build_mesh, init_distributed, rank_layout
    from torchmhc.distributed.parallel_model import ParallelModel, parallelize
    from torchmhc.distributed.step import evaluate_loss, forward_backward, train_step

# Imported on first use: ``torchmhc.config`` needs ParallelConfig (a plain dataclass) without
# torch.distributed, and the modules below import ``torchmhc.config`` and ``torchmhc.train``.
_WHERE = {
    "ParallelConfig": "config",
    "local_batch": "data",
    "local_rows": "data",
    "build_mesh": "mesh",
    "init_distributed": "mesh",
    "rank_layout": "mesh",
    "ParallelModel": "parallel_model",
    "parallelize": "parallel_model",
    "evaluate_loss": "step",
    "forward_backward": "step",
    "train_step": "step",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'torchmhc.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"torchmhc.distributed.{_WHERE[name]}"), name)
