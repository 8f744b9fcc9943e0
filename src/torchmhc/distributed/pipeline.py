"""Pipeline parallelism: the GPT (dense or MoE) cut into stages of contiguous blocks, run by a
``torch.distributed.pipelining`` schedule.

- The first stage embeds the tokens and expands them into the n streams; the last applies the
  stream head, the final norm and the LM head (the schedule applies the loss). Every stage edge
  carries one contiguous ``[microbatch, T, n, C]`` tensor in the stream dtype: n·C values per
  token, n times a plain residual's.
- Receive buffers take the sender's strides, and gloo refuses (NCCL silently garbles) a
  non-contiguous send: each stage returns a contiguous output, and the gradient it sends back for
  its input is made contiguous by :class:`ContiguousGrad`.
- Stage shapes are given to ``PipelineStage`` up front (static metadata), so the schedule never
  runs a stage on made-up inputs to find them: such a run would count MoE router loads.
- Stages are balanced by forward FLOPs per token so that the busiest *rank* has the least work
  (the LM head counted on the last stage, which the V placement puts on rank 0 next to the
  first; the embedding is a lookup, nearly free); ``parallel.stage_boundaries`` overrides it.
- Placement: gpipe, 1f1b and interleaved-1f1b put stage s on rank s mod pp ("loop");
  zbv and dualpipev put stages r and 2·pp - 1 - r on rank r ("V").
- Block recomputation runs inside each stage over that stage's blocks only, so a recomputation
  block never crosses a stage edge and L_r* is computed per stage (``torchmhc.models.gpt.run_blocks``).
- Tied embeddings (``model.tie_embeddings``): the last stage's LM head gets its own copy of the
  embedding matrix. After each backward the two gradients are summed into both copies
  (:func:`sync_tied_gradients`: an all-reduce between the first and last stage's ranks, or a sum
  where one rank holds both), so the optimizer keeps the copies equal; the gradient norm counts the
  matrix once, and checkpoints store one optimizer state for it, as a one-process run does.

Legend: L blocks, S stages, P pipeline ranks, C model dim, n streams, V vocab, T sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from torchmhc.config import ModelConfig
from torchmhc.distributed.config import V_SCHEDULES, ParallelConfig
from torchmhc.models import GPT
from torchmhc.models.gpt import embed_streams, run_blocks, streams_to_logits
from torchmhc.train import token_cross_entropy

__all__ = [
    "ContiguousGrad",
    "GPTStage",
    "ModelPart",
    "sync_tied_gradients",
    "block_flops",
    "head_flops",
    "balance_stages",
    "stage_ranks",
    "stage_block_ranges",
    "blocks_of_rank",
    "stages_of_rank",
    "split_model",
    "build_schedule",
]


# ----------------------------------------------------------------------------------------------
# Where to cut
# ----------------------------------------------------------------------------------------------


def _hc_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one hyper-connection: coefficient projection [n·C -> n² + 2n],
    pre-mix (n·C) and post-res (n²·C + n·C); the normalization and Sinkhorn are negligible."""
    n, c = cfg.effective_num_streams, cfg.dim
    if n == 1:
        return 0.0
    return 2 * (n * n + 2 * n) * n * c + 2 * n * c + 2 * (n * n + n) * c


def block_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one transformer block at sequence length ``seq_len``."""
    c = cfg.dim
    attention = 2 * 4 * c * c + 2 * seq_len * c  # projections; causal scores and values (T/2 each)
    if cfg.arch == "moe":
        h = cfg.effective_expert_hidden
        ffn = 2 * c * cfg.num_experts + (cfg.top_k + cfg.num_shared_experts) * 2 * 3 * c * h
    else:
        ffn = 2 * 3 * c * cfg.effective_ffn_hidden
    return attention + ffn + 2 * _hc_flops(cfg)


def head_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the stream head and LM head (the last stage's extra work)."""
    n, c = cfg.effective_num_streams, cfg.dim
    return 2 * c * cfg.vocab_size + (2 * n * n * c if n > 1 else 0)


def balance_stages(num_blocks: int, stage_ranks: Sequence[int], *, last_extra: float = 0.0) -> list[int]:
    """First block of each stage, chosen so that the busiest pipeline rank has the least work.

    All blocks of a model cost the same (they have the same shape), so the split is about how
    many blocks each stage gets: blocks go one at a time to the least loaded rank, and within it to
    its least loaded stage (water-filling: optimal for the busiest rank). The ranks, not the stages,
    are balanced: in a V-shaped placement rank 0 holds the first stage and the last, head included.

    Args:
        num_blocks: L, the model's blocks.
        stage_ranks: the pipeline rank of each stage, in stage order (each stage gets >= 1 block).
        last_extra: the work of the LM head, in blocks, carried by the last stage.

    Returns:
        ``len(stage_ranks)`` increasing block indices, the first 0.
    """
    num_stages = len(stage_ranks)
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"the number of stages must be in [1, {num_blocks}] (one block per stage at least), got {num_stages}.")
    sizes = [1] * num_stages
    extra = [0.0] * (num_stages - 1) + [last_extra]
    load: dict[int, float] = {}
    for s, r in enumerate(stage_ranks):
        load[r] = load.get(r, 0.0) + sizes[s] + extra[s]
    for _ in range(num_blocks - num_stages):
        rank = min(load, key=lambda r: (load[r], r))
        stage = min((s for s, r in enumerate(stage_ranks) if r == rank), key=lambda s: (sizes[s] + extra[s], s))
        sizes[stage] += 1
        load[rank] += 1
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return starts


def stage_ranks(parallel: ParallelConfig) -> list[int]:
    """The pipeline rank of every stage, in stage order (loop or V placement)."""
    ranks = [0] * parallel.num_stages
    for rank in range(parallel.pp):
        for stage in stages_of_rank(rank, parallel):
            ranks[stage] = rank
    return ranks


def stage_block_ranges(cfg: ModelConfig, parallel: ParallelConfig, seq_len: int) -> list[range]:
    """The blocks of every pipeline stage, in stage order (``parallel.stage_boundaries`` if given,
    else balanced by FLOPs over the ranks, the LM head counted on the last stage)."""
    num_stages = parallel.num_stages
    if num_stages > cfg.num_layers:
        raise ValueError(
            f"model.num_layers = {cfg.num_layers} is fewer than the {num_stages} pipeline stages; "
            f"each stage needs at least one block."
        )
    if parallel.stage_boundaries:
        starts = [0, *parallel.stage_boundaries]
        if starts[-1] >= cfg.num_layers:
            raise ValueError(
                f"parallel.stage_boundaries must be block indices < model.num_layers = {cfg.num_layers}, "
                f"got {list(parallel.stage_boundaries)}."
            )
    else:
        head_in_blocks = head_flops(cfg) / block_flops(cfg, seq_len)
        starts = balance_stages(cfg.num_layers, stage_ranks(parallel), last_extra=head_in_blocks)
    ends = [*starts[1:], cfg.num_layers]
    return [range(a, b) for a, b in zip(starts, ends)]


def blocks_of_rank(cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int, *, seq_len: int) -> set[int]:
    """The indices of the blocks pipeline rank ``pp_rank``'s stages hold (all of them without pipelining)."""
    ranges = stage_block_ranges(cfg, parallel, seq_len)
    return {i for stage in stages_of_rank(pp_rank, parallel) for i in ranges[stage]}


def stages_of_rank(pp_rank: int, parallel: ParallelConfig) -> list[int]:
    """Stage indices pipeline rank ``pp_rank`` holds, in increasing order."""
    num_stages, pp = parallel.num_stages, parallel.pp
    if parallel.pp_schedule in V_SCHEDULES:
        return sorted({pp_rank, num_stages - 1 - pp_rank})
    return list(range(pp_rank, num_stages, pp))


# ----------------------------------------------------------------------------------------------
# Stage modules
# ----------------------------------------------------------------------------------------------


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gradient of a stage's input is
    sent to the previous stage, whose receive buffer is contiguous."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`~torchmhc.models.GPT`: blocks ``blocks`` of ``model``, plus
    the embedding if ``is_first`` and the stream head, norm and LM head if ``is_last``.

    Parameters keep the full model's names (``blocks.7.attn_hc.fn``, ``lm_head.weight``), so state
    dicts and checkpoints do not depend on the layout.

    ``forward``: first stage ids ``[mb, T]`` int64, other stages streams ``[mb, T, n, C]``;
    returns streams ``[mb, T, n, C]`` (contiguous, not a view) or, on the last stage, logits ``[mb, T, V]``.
    """

    def __init__(
        self,
        model: GPT,
        blocks: range,
        *,
        is_first: bool,
        is_last: bool,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.num_streams = model.num_streams
        # The forward runs under autocast here, not around the schedule: the schedule also runs
        # backward passes, which (as in the one-device loop) must not run under autocast.
        self.autocast_dtype = autocast_dtype
        self.tok_emb = model.tok_emb if is_first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.stream_head = model.stream_head if is_last else None
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        if is_last and model.cfg.tie_embeddings:  # its own copy of the embedding matrix (module docstring)
            weight = model.tok_emb.weight
            self.lm_head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        with self._autocast(x.device.type):
            if self.tok_emb is not None:
                x = embed_streams(self.tok_emb, x, self.num_streams)  # [mb, T, n, C]
            else:
                x = ContiguousGrad.apply(x)
            x = run_blocks(self.blocks.values(), x, self.cfg)  # [mb, T, n, C]
            if self.lm_head is not None:
                return streams_to_logits(self.stream_head, self.norm, self.lm_head, x)  # [mb, T, V]
            # a contiguous edge that is not a view either: the zero-bubble schedules (zbv,
            # dualpipev) detach stage outputs in place, which a view (the fused ops' outputs are
            # reshaped to [mb, T, n, C]) refuses; one copy of the edge where it is one
            return x.clone(memory_format=torch.contiguous_format) if x._is_view() else x.contiguous()

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


class ModelPart(nn.Module):
    """The stages one pipeline rank holds, as one module under the full model's parameter names
    (what the optimizer, gradient clipping and checkpoints see). Not called itself."""

    def __init__(self, stages: Sequence[GPTStage]) -> None:
        super().__init__()
        first = [s for s in stages if s.tok_emb is not None]
        last = [s for s in stages if s.lm_head is not None]
        self.cfg = stages[0].cfg
        self.num_streams = stages[0].num_streams
        self.tok_emb = first[0].tok_emb if first else None
        blocks = sorted((int(k), b) for s in stages for k, b in s.blocks.items())
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks})
        self.stream_head = last[0].stream_head if last else None
        self.norm = last[0].norm if last else None
        self.lm_head = last[0].lm_head if last else None

    @property
    def tied_copy(self) -> nn.Parameter | None:
        """The LM head's copy of a tied embedding matrix, if this part holds the last stage."""
        return self.lm_head.weight if self.cfg.tie_embeddings and self.lm_head is not None else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("a ModelPart is run by its pipeline schedule, not called")


@torch.no_grad()
def sync_tied_gradients(part: ModelPart, group: dist.ProcessGroup | None) -> None:
    """Sum the tied embedding matrix's two gradients (the embedding's, the LM head copy's) into both.

    ``group``: the two ranks holding the first and the last stage at this data-parallel
    coordinate, or None where one rank holds both (V schedules) or the model is not tied.
    With FSDP the gradients are shards, the same shard on both ranks: their local tensors are summed.
    """
    if not part.cfg.tie_embeddings:
        return
    grads = [p.grad for p in (part.tok_emb.weight if part.tok_emb is not None else None, part.tied_copy)
             if p is not None and p.grad is not None]  # fmt: skip
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if group is None:  # both on this rank
        if len(local) == 2:
            local[0].add_(local[1])
            local[1].copy_(local[0])
        return
    if local:
        dist.all_reduce(local[0], group=group)


def split_model(
    model: GPT,
    parallel: ParallelConfig,
    pp_rank: int,
    *,
    seq_len: int,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[ModelPart, list[GPTStage], list[int]]:
    """This pipeline rank's stages of ``model``.

    Args:
        model: the model, built the same way on every rank; the blocks of other ranks' stages may
            be on the meta device (``parallel_model.parallelize`` drops them as they are built).
        parallel: a resolved config (``ParallelConfig.resolve``).
        pp_rank: this process's pipeline rank.
        seq_len: training sequence length (for the balance).
        autocast_dtype: run each stage's forward under autocast to this dtype (None: no autocast).

    Returns:
        (the rank's part, its stage modules in increasing stage order, their stage indices).
    """
    ranges = stage_block_ranges(model.cfg, parallel, seq_len)
    indices = stages_of_rank(pp_rank, parallel)
    last = parallel.num_stages - 1
    stages = [
        GPTStage(model, ranges[s], is_first=s == 0, is_last=s == last, autocast_dtype=autocast_dtype) for s in indices
    ]
    return ModelPart(stages), stages, indices


# ----------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------

_SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


def _stage_io(stage: GPTStage, microbatch: int, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Meta tensors with the shapes, dtypes and (contiguous) strides of a stage's input and output."""
    cfg = stage.cfg
    streams = torch.empty(microbatch, seq_len, stage.num_streams, cfg.dim, dtype=dtype, device="meta", requires_grad=True)
    if stage.tok_emb is not None:
        inputs = torch.empty(microbatch, seq_len, dtype=torch.int64, device="meta")
    else:
        inputs = streams
    if stage.lm_head is not None:
        outputs = torch.empty(microbatch, seq_len, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    else:
        outputs = streams
    return inputs, outputs


def build_schedule(
    stages: Sequence[GPTStage],
    stage_indices: Sequence[int],
    parallel: ParallelConfig,
    *,
    group: dist.ProcessGroup,
    device: torch.device,
    microbatch_size: int,
    seq_len: int,
    stream_dtype: torch.dtype,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = token_cross_entropy,
    overlap: bool = True,
):
    """The ``parallel.pp_schedule`` schedule over this rank's stages.

    Args:
        stages, stage_indices: from :func:`split_model` (FSDP may have wrapped the stages since).
        parallel: a resolved config.
        group: the pipeline process group (the mesh's "pp" dimension).
        device: this process's device.
        microbatch_size: rows per microbatch on this rank (local batch / microbatches).
        seq_len: T.
        stream_dtype: dtype of the streams between stages (bf16 under autocast, else fp32).
        loss_fn: ``(logits [mb, T, V], targets [mb, T]) -> scalar`` mean over the microbatch;
            gradients are divided by the number of microbatches, so the step's gradient is that of
            the batch mean.
        overlap: for dualpipev, register :func:`torchmhc.distributed.overlap.overlap_forward_backward`
            for its paired forward/backward chunks (False: torch runs them one after the other).
    """
    pipeline_stages = []
    for module, index in zip(stages, stage_indices):
        inputs, outputs = _stage_io(module, microbatch_size, seq_len, stream_dtype)
        pipeline_stages.append(
            PipelineStage(
                module, index, parallel.num_stages, device, input_args=inputs, output_args=outputs, group=group
            )
        )
    cls = _SCHEDULES[parallel.pp_schedule]
    if parallel.pp_schedule in ("gpipe", "1f1b"):
        (stage,) = pipeline_stages
        return cls(stage, parallel.microbatches, loss_fn=loss_fn, scale_grads=True)
    schedule = cls(pipeline_stages, parallel.microbatches, loss_fn=loss_fn, scale_grads=True)
    if parallel.pp_schedule == "dualpipev" and overlap:
        from torchmhc.distributed.overlap import register_overlap

        register_overlap(schedule)
    return schedule
