"""Training across processes and GPUs on PyTorch's own distributed stack.

FSDP2 (``fully_shard``) for data parallelism, ``torch.distributed.pipelining`` for pipeline
parallelism with n-stream stage edges, DCP (``torch.distributed.checkpoint``) for checkpoints that
load at any layout, and ``torchrun`` to launch. One file per concern:

    config.py       ParallelConfig: the [parallel] section (degrees, schedule, microbatches)
    mesh.py         process group and the (pp, dp_replicate, dp_shard) DeviceMesh
    pipeline.py     stage split, stage modules, schedules
    overlap.py      DualPipeV's overlapped forward/backward chunks
    fsdp.py         fully_shard units and mixed precision
    parallelize.py  the one place that composes the above, in order
    clip.py         gradient clipping by the global norm over shards and stages
    moe.py          router-bias balancing with the global batch's expert loads
    data.py         each data-parallel rank's rows of the global batch
    step.py         one optimizer step (the parallel train_step)
    checkpoint.py   DCP checkpoints, atomic, resharding, and safetensors conversion
    runner.py       several short runs in one launch (the tests' workhorse)
"""

from torchmhc.distributed.config import ParallelConfig
from torchmhc.distributed.data import local_batch, local_rows
from torchmhc.distributed.mesh import build_mesh, init_distributed, rank_layout
from torchmhc.distributed.parallelize import ParallelModel, parallelize
from torchmhc.distributed.step import evaluate_loss, forward_backward, train_step

__all__ = [
    "ParallelConfig",
    "ParallelModel",
    "build_mesh",
    "evaluate_loss",
    "forward_backward",
    "init_distributed",
    "local_batch",
    "local_rows",
    "parallelize",
    "rank_layout",
    "train_step",
]
