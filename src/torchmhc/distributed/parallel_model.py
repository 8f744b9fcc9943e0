"""The one place that lays a model out over the mesh, in a fixed order:

1. pipeline split (``parallel.pp_schedule`` with more than one stage): this rank keeps its stages,
   each a run of whole blocks (``torchmhc.distributed.pipeline``); block recomputation then runs
   inside each stage, never across a stage edge;
2. move to the device;
3. FSDP2 over the data-parallel dimensions (``torchmhc.distributed.fsdp``) when there is more
   than one data-parallel rank. One rank has nothing to shard, and FSDP2 over one rank is not free:
   on gpu-dense-1b (one H100, default torch.compile) it cost 27% of a step, its hooks leaving the
   GPU idle and its gathers and gradient copies moving bytes (``benchmarks/results/h100.md``);
   such a run keeps the model as on one device (fp32 parameters, bf16 autocast);
4. the pipeline schedule over the (possibly FSDP-wrapped) stages.

Every rank builds the full model from the same seed first and keeps its part, so every layout
starts from the same weights as a one-process run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchmhc.distributed.config import ParallelConfig
from torchmhc.distributed.fsdp import apply_fsdp, data_parallel_mesh
from torchmhc.distributed.mesh import Layout, rank_layout
from torchmhc.distributed.overlap import prioritize_post_res
from torchmhc.distributed.pipeline import build_schedule, split_model, stage_ranks
from torchmhc.models import GPT

__all__ = ["ParallelModel", "parallelize"]


@dataclass
class ParallelModel:
    """A model laid out over a mesh: what a training loop holds instead of a ``GPT``.

    Attributes:
        part: this rank's parameters under the full model's names: the GPT (FSDP-wrapped with
            several data-parallel ranks) without pipelining, else a :class:`~torchmhc.distributed.pipeline.ModelPart`. Give it to the
            optimizer and to checkpoints.
        stages: the modules the schedule runs (pipelined), else ``[part]``.
        stage_indices: their stage numbers (``[0]`` without pipelining).
        schedule: the ``torch.distributed.pipelining`` schedule, or None without pipelining.
        parallel: the resolved parallel config.
        mesh: the ``(pp, dp_replicate, dp_shard)`` mesh.
        layout: this rank's coordinates.
        device: this rank's device.
        compute_dtype: autocast dtype of the forward (bf16 on GPUs), None for fp32.
        tied_group: with tied embeddings, the two ranks whose first and last stages hold the two
            copies of the embedding matrix (``pipeline.sync_tied_gradients``); None where one rank
            holds both, or nothing is tied.
        replicated: parameters FSDP leaves whole on every rank (the connections'), whose
            gradients ``fsdp.average_replicated_gradients`` averages; empty without FSDP.
    """

    part: nn.Module
    stages: list[nn.Module]
    stage_indices: list[int]
    schedule: Any
    parallel: ParallelConfig
    mesh: DeviceMesh
    layout: Layout
    device: torch.device
    compute_dtype: torch.dtype | None
    tied_group: dist.ProcessGroup | None = None
    replicated: list[nn.Parameter] = field(default_factory=list)

    @property
    def has_first_stage(self) -> bool:
        """Whether this rank feeds the token ids (it holds the embedding)."""
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        """Whether this rank computes the loss (it holds the LM head)."""
        return self.parallel.num_stages - 1 in self.stage_indices

    @property
    def pp_group(self):
        """The pipeline process group, or None without pipelining."""
        return self.mesh.get_group("pp") if self.parallel.pipelined else None


def parallelize(
    model: GPT,
    parallel: ParallelConfig,
    mesh: DeviceMesh,
    *,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    compute_dtype: torch.dtype | None = None,
    overlap: bool = True,
) -> ParallelModel:
    """Lay ``model`` out over ``mesh`` as ``parallel`` says (see the module docstring).

    Args:
        model: the full model, built identically (same seed) on every rank, on the CPU (fp32, or
            fp64 for exact comparisons).
        parallel: the ``[parallel]`` config; resolved here against the mesh.
        mesh: from :func:`torchmhc.distributed.mesh.build_mesh`.
        device: this rank's device (:func:`torchmhc.distributed.mesh.init_distributed`).
        batch_size: the global batch (``data.batch_size``).
        seq_len: the training sequence length.
        compute_dtype: bf16 to train in mixed precision (FSDP's parameter dtype and the forward's
            autocast), None for fp32 throughout.
        overlap: for dualpipev, overlap each paired forward and backward, and on CUDA run the FFN
            post-res kernels on a high-priority stream (see ``overlap.py``).
    """
    parallel = parallel.resolve(mesh.size(), num_layers=model.cfg.num_layers, batch_size=batch_size)
    layout = rank_layout(mesh)
    dp_mesh = data_parallel_mesh(mesh)

    if not parallel.pipelined:
        model.to(device)
        replicated = []
        if layout.dp_size > 1:
            replicated = apply_fsdp([model], dp_mesh, param_dtype=compute_dtype, reshard_after_forward=True)
        return ParallelModel(
            model, [model], [0], None, parallel, mesh, layout, device, compute_dtype, replicated=replicated
        )

    part, stages, indices = split_model(model, parallel, layout.pp_rank, seq_len=seq_len, autocast_dtype=compute_dtype)
    part.to(device)
    if overlap and parallel.pp_schedule == "dualpipev" and device.type == "cuda":
        prioritize_post_res(stages, device=device)
    replicated = []
    if layout.dp_size > 1:
        replicated = apply_fsdp(stages, dp_mesh, param_dtype=compute_dtype, reshard_after_forward=False)
    schedule = build_schedule(
        stages,
        indices,
        parallel,
        group=mesh.get_group("pp"),
        device=device,
        microbatch_size=batch_size // layout.dp_size // parallel.microbatches,
        seq_len=seq_len,
        stream_dtype=compute_dtype or next(model.parameters()).dtype,
        overlap=overlap,
    )
    tied_group = _tied_group(mesh, parallel) if model.cfg.tie_embeddings else None
    return ParallelModel(
        part, list(stages), indices, schedule, parallel, mesh, layout, device, compute_dtype, tied_group, replicated
    )


def _tied_group(mesh: DeviceMesh, parallel: ParallelConfig) -> dist.ProcessGroup | None:
    """The process group of this rank's two copies of a tied embedding matrix (the first stage's
    rank and the last stage's at this data-parallel coordinate), or None if one rank holds both or
    this rank holds neither. Every rank creates every pair's group, in the same order."""
    ranks = stage_ranks(parallel)
    first, last = ranks[0], ranks[-1]
    if first == last:
        return None
    mine = None
    grid = mesh.mesh  # global ranks, [pp, dp_replicate, dp_shard]
    for r in range(grid.shape[1]):
        for s in range(grid.shape[2]):
            pair = [int(grid[first, r, s]), int(grid[last, r, s])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    return mine
