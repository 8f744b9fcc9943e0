"""The one place that builds a model and lays it out over the mesh, in a fixed order:

1. build the model from the seed, block by block (``GPT(cfg, place_block=...)``), and lay each
   block out as soon as it is built, before the next one is:

   a. pipeline split (``parallel.pp_schedule`` with more than one stage): a block of another
      rank's stages goes to the meta device, having taken its random draws;
   b. this rank's block: to the parameter dtype, compiled in place (``train.compile``), moved to
      the device;
   c. FSDP2 over the data-parallel dimensions (``torchmhc.distributed.fsdp``) when there is more
      than one data-parallel rank: the block is sharded, its whole copy freed. One rank has
      nothing to shard, and FSDP2 over one rank is not free: on gpu-dense-1b (one H100, default
      torch.compile) it cost 27% of a step, its hooks leaving the GPU idle and its gathers and
      gradient copies moving bytes (``benchmarks/results/h100.md``); such a run keeps the model as
      on one device (fp32 parameters, bf16 autocast);
2. pipeline stages: this rank keeps its stages, each a run of whole blocks
   (``torchmhc.distributed.pipeline``), with the embedding on the first stage and the stream
   head, norm and LM head on the last; block recomputation runs inside each stage, never across a
   stage edge; for dualpipev on CUDA the FFN post-res kernels go to a high-priority stream;
3. the root of each stage (or of the model): embedding, stream head, norm and LM head to the
   dtype, the stream head compiled, moved to the device, then the FSDP2 root unit;
4. the pipeline schedule over the (possibly FSDP-wrapped) stages.

What a rank builds and holds: every rank draws every weight's random numbers, in the order of a
one-process build with the same seed, so every layout starts from the weights of a one-process
run; but it keeps only its part. While building it holds its own blocks (or their shards), the
one block being built, and the embedding and head (built whole, first and last, laid out at the
end), never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchmhc.config import ModelConfig
from torchmhc.distributed.config import ParallelConfig
from torchmhc.distributed.fsdp import data_parallel_mesh, shard_block, shard_root
from torchmhc.distributed.mesh import Layout, rank_layout
from torchmhc.distributed.overlap import prioritize_post_res
from torchmhc.distributed.pipeline import blocks_of_rank, build_schedule, split_model, stage_ranks
from torchmhc.models import GPT, Block
from torchmhc.train import compile_in_place

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
        replicated: parameters FSDP leaves whole on every rank (connections', norms'), whose
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
    cfg: ModelConfig,
    parallel: ParallelConfig,
    mesh: DeviceMesh,
    *,
    seed: int,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    compile_mode: str | None = None,
    overlap: bool = True,
) -> ParallelModel:
    """Build the model ``cfg`` describes and lay it out over ``mesh`` as ``parallel`` says (see the
    module docstring). Call on every rank.

    Args:
        cfg: a GPT (``arch`` "gpt" or "moe").
        parallel: the ``[parallel]`` config; resolved here against the mesh.
        mesh: from :func:`torchmhc.distributed.mesh.build_mesh`.
        seed: the weights are those of ``torch.manual_seed(seed); build_model(cfg)`` in one process
            (``train.seed``); this seeds the global random state.
        device: this rank's device (:func:`torchmhc.distributed.mesh.init_distributed`).
        batch_size: the global batch (``data.batch_size``).
        seq_len: the training sequence length.
        dtype: the parameters' dtype (fp32; fp64 to compare layouts without fp32 rounding). The
            weights are drawn in fp32 and converted, as ``build_model(cfg).to(dtype)``.
        compute_dtype: bf16 to train in mixed precision (FSDP's parameter dtype and the forward's
            autocast), None for fp32 throughout.
        compile_mode: ``torch.compile`` each block and the stream head in place in this mode
            (``train.compile_mode``; no wrapper: the zero-bubble and DualPipeV schedules refuse
            wrapped stages), or None to run eagerly.
        overlap: for dualpipev, overlap each paired forward and backward, and on CUDA run the FFN
            post-res kernels on a high-priority stream (see ``overlap.py``).
    """
    parallel = parallel.resolve(mesh.size(), num_layers=cfg.num_layers, batch_size=batch_size)
    layout = rank_layout(mesh)
    dp_mesh = data_parallel_mesh(mesh) if layout.dp_size > 1 else None
    held = blocks_of_rank(cfg, parallel, layout.pp_rank, seq_len=seq_len)

    def place_block(index: int, block: Block) -> Block:
        if index not in held:  # 1a. another pipeline rank's: its random draws are taken, its weights dropped
            return block.to("meta")
        block.to(dtype)  # 1b.
        if compile_mode is not None:
            compile_in_place(block, recompute=cfg.recompute, mode=compile_mode)
        block.to(device)
        if dp_mesh is not None:  # 1c. with pipelining keep the gathered weights for all microbatches
            shard_block(block, dp_mesh, param_dtype=compute_dtype, reshard_after_forward=not parallel.pipelined,
                        recompute=cfg.recompute)  # fmt: skip
        return block

    torch.manual_seed(seed)
    model = GPT(cfg, place_block=place_block)  # 1.
    # 2. this rank's stages; on a pipeline rank the embedding or head another rank holds goes with `model`
    if parallel.pipelined:
        part, stages, indices = split_model(model, parallel, layout.pp_rank, seq_len=seq_len, autocast_dtype=compute_dtype)
    else:
        part, stages, indices = model, [model], [0]
    del model
    if overlap and parallel.pp_schedule == "dualpipev" and device.type == "cuda":
        prioritize_post_res(stages, device=device)

    # 3. the roots: what the part holds besides its blocks (embedding, stream head, norm, LM head)
    roots = [module for name, module in part.named_children() if name != "blocks"]
    for module in roots:
        module.to(dtype)
    if compile_mode is not None and part.stream_head is not None:
        compile_in_place(part.stream_head, recompute=False, mode=compile_mode)
    for module in roots:
        module.to(device)
    replicated = []
    if dp_mesh is not None:
        replicated = [p for stage in stages for p in shard_root(stage, dp_mesh, param_dtype=compute_dtype)]
    if not parallel.pipelined:
        return ParallelModel(part, stages, indices, None, parallel, mesh, layout, device, compute_dtype, replicated=replicated)

    schedule = build_schedule(  # 4.
        stages,
        indices,
        parallel,
        group=mesh.get_group("pp"),
        device=device,
        microbatch_size=batch_size // layout.dp_size // parallel.microbatches,
        seq_len=seq_len,
        stream_dtype=compute_dtype or dtype,
        overlap=overlap,
    )
    tied_group = _tied_group(mesh, parallel) if cfg.tie_embeddings else None
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
