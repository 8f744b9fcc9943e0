"""A training run laid out over the processes of a job: what ``torchmhc.train.train`` runs under
``torchrun`` (``torchmhc train`` with a world size above 1 or a ``[parallel]`` section).

:class:`ParallelJob` does for the loop of ``torchmhc.train`` what ``torchmhc.train.LocalJob`` does
in one process, with the parts of this package:

- start: join the process group, open the corpus (rank 0 first: it may tokenize and cache it),
  build this rank's part of the model from the seed, block by block, laid out as it is built (the
  weights of a one-process run; :func:`~torchmhc.distributed.parallel_model.parallelize`), AdamW
  over this rank's part;
- step: this data-parallel rank's rows of the global batch (``data.py``), then the parallel
  ``train_step`` (``step.py``); the losses and gradient norms are global, the same on every rank;
- evaluate: the validation batches' mean loss, over the same rows and stages;
- checkpoints: DCP directories (``checkpoint.py``), loadable at any layout; a checkpoint of a
  one-process run is converted by rank 0 into a temporary DCP checkpoint and loaded from there.

Rank 0 writes the run directory (metrics, summary, config) and shows the progress; every rank
writes its shards of each checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torchmhc.config import RunConfig
from torchmhc.data import TokenData, load_data
from torchmhc.distributed.checkpoint import load_dcp_checkpoint, safetensors_to_dcp, save_dcp_checkpoint
from torchmhc.distributed.config import ParallelConfig
from torchmhc.distributed.data import local_batch, local_rows
from torchmhc.distributed.mesh import build_mesh, init_distributed
from torchmhc.distributed.parallel_model import ParallelModel, parallelize
from torchmhc.distributed.step import evaluate_loss, nonfinite_tensors, train_step
from torchmhc.train import (
    DCP_CHECKPOINT_FORMAT,
    StepStats,
    autocast_dtype,
    build_optimizer,
    check_vocabulary,
    checkpoint_format,
    learning_rate,
)

if TYPE_CHECKING:
    from torchmhc.train import _SavedActivationMeter

__all__ = ["ParallelJob", "build"]


def build(
    cfg: RunConfig,
    parallel: ParallelConfig,
    *,
    device_type: str = "cpu",
    overlap: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[ParallelModel, torch.optim.AdamW]:
    """Model, layout and optimizer of ``cfg`` laid out as ``parallel`` on the running job.

    Every rank builds its part of the model from ``train.seed`` (the weights of a one-process run;
    no rank holds the whole model) in ``dtype`` (fp64 to compare layouts without fp32 rounding),
    its blocks compiled in place with ``train.compile``
    (:func:`~torchmhc.distributed.parallel_model.parallelize`).
    """
    device = init_distributed(device_type)
    mesh = build_mesh(parallel, device_type)
    pm = parallelize(
        cfg.model, parallel, mesh, seed=cfg.train.seed, device=device, batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len, dtype=dtype, compute_dtype=autocast_dtype(device, cfg.train.dtype),
        compile_mode=cfg.train.compile_mode if cfg.train.compile else None, overlap=overlap,
    )  # fmt: skip
    return pm, build_optimizer(pm.part, cfg.optim)


class ParallelJob:
    """A run of ``cfg`` laid out over the job's processes (see the module docstring); the same
    methods as ``torchmhc.train.LocalJob``. Joins the process group; :meth:`close` leaves it.

    Args:
        cfg: the run; ``cfg.parallel`` must fit the job (``torchmhc.train.parallel_layout``).
        device_type: "cuda" (NCCL, one GPU per process: ``cuda:LOCAL_RANK``) or "cpu" (gloo).
        data: an already opened corpus, or None to open ``cfg.data``.
        progress: show the corpus preparation's progress (rank 0).
    """

    def __init__(self, cfg: RunConfig, device_type: str, *, data: TokenData | None, progress: bool) -> None:
        self.cfg = cfg
        self.device = init_distributed(device_type)
        try:
            self.is_main = dist.get_rank() == 0
            self.data = data if data is not None else _load_data_once(cfg, progress=progress and self.is_main)
            check_vocabulary(self.data, cfg)
            self.pm, self.optimizer = build(cfg, cfg.parallel, device_type=self.device.type)
            self.num_params = _global_num_params(self.pm)
        except BaseException:
            self.close()
            raise
        self.num_streams = cfg.model.effective_num_streams

    @property
    def model(self) -> nn.Module:
        """This rank's part of the model (``ParallelModel.part``: the FSDP-wrapped model without
        pipelining, else this rank's stages under the full model's parameter names)."""
        return self.pm.part

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's rows of training batch ``step``: int64 ``[B / dp, T]`` each."""
        tc, dc, layout = self.cfg.train, self.cfg.data, self.pm.layout
        return local_batch(
            self.data, step, batch_size=dc.batch_size, seq_len=dc.seq_len, seed=tc.seed,
            dp_rank=layout.dp_rank, dp_size=layout.dp_size,
        )  # fmt: skip

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> StepStats:
        """Optimizer step ``step`` (0-based) on this rank's rows ``batch`` (from :meth:`batch`)."""
        tc = self.cfg.train
        return train_step(
            self.pm, self.optimizer, batch, lr=learning_rate(step, tc.steps, self.cfg.optim),
            grad_clip=self.cfg.optim.grad_clip, on_nonfinite=tc.on_nonfinite, step=step,
        )  # fmt: skip

    def evaluate(self) -> float:
        """Mean validation loss over the first ``train.eval_batches`` validation batches (global)."""
        dc, layout = self.cfg.data, self.pm.layout
        total = 0.0
        # eager, as in one process: compiled blocks would compile again for the eval mode
        with torch.compiler.set_stance("force_eager"):
            for i in range(self.cfg.train.eval_batches):
                x, y = self.data.get_batch("val", i, batch_size=dc.batch_size, seq_len=dc.seq_len, seed=0)
                rows = (local_rows(t, layout.dp_rank, layout.dp_size) for t in (x, y))
                total += evaluate_loss(self.pm, *rows)
        return total / self.cfg.train.eval_batches

    def nonfinite(self) -> list[str]:
        """Names of the weights and optimizer state tensors that are not finite on some rank."""
        return nonfinite_tensors(self.pm.part, self.optimizer)

    def save(self, state: dict[str, Any]) -> Path:
        """A DCP checkpoint of the run (every rank writes its shards)."""
        return save_dcp_checkpoint(
            self.cfg.out_dir, self.pm.part, self.optimizer, state, keep=self.cfg.train.keep_checkpoints
        )

    def load(self, path: Path) -> dict[str, Any]:
        """Resume from checkpoint ``path``: a DCP checkpoint of any layout, or a one-process
        checkpoint (``torchmhc.train``'s format), which rank 0 converts first. The optimizer's
        settings stay this run's; its moments and step counts are the checkpoint's."""
        path = Path(path)
        if checkpoint_format(path) == DCP_CHECKPOINT_FORMAT:
            return load_dcp_checkpoint(path, self.pm.part, self.optimizer, hyperparameters="optimizer")
        # Converted next to the run's checkpoints (a directory every rank sees); a leftover of an
        # interrupted conversion is removed by the next save.
        scratch = self.cfg.out_dir / "checkpoints" / f".{path.name}.tmp-from-one-process"
        try:
            if self.is_main:
                shutil.rmtree(scratch, ignore_errors=True)
                safetensors_to_dcp(path, scratch, self.cfg.model, self.cfg.optim)
            dist.barrier()
            converted = scratch / "checkpoints" / path.name
            state = load_dcp_checkpoint(converted, self.pm.part, self.optimizer, hyperparameters="optimizer")
            dist.barrier()
        finally:
            if self.is_main:
                shutil.rmtree(scratch, ignore_errors=True)
        return state

    def peak_memory(self, meter: _SavedActivationMeter) -> tuple[int, str]:
        """This rank's: (bytes, "cuda") measured, or (bytes, "estimate") on the CPU (its shards of
        the weights, gradients and AdamW moments, and the activations saved in one step)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda"
        local = sum(_local(p).numel() * p.element_size() for p in self.pm.part.parameters())
        return 4 * local + meter.nbytes, "estimate"

    def close(self) -> None:
        """Leave the process group (once)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _global_num_params(pm: ParallelModel) -> int:
    """Parameters of the whole model: the sum of every pipeline rank's (DTensors count whole)."""
    count = torch.tensor(sum(p.numel() for p in pm.part.parameters()), dtype=torch.int64, device=pm.device)
    if pm.pp_group is not None:
        dist.all_reduce(count, group=pm.pp_group)
    return int(count.item())


def _load_data_once(cfg: RunConfig, *, progress: bool) -> TokenData:
    """The corpus, prepared by rank 0 alone (tokenizing and caching it) before the others open it."""
    if dist.get_rank() == 0:
        data = load_data(cfg.data, progress=progress)
    dist.barrier()
    if dist.get_rank() != 0:
        data = load_data(cfg.data, progress=False)
    return data
