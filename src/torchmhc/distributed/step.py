"""One optimizer step of a laid-out model: the parallel counterpart of ``torchmhc.train.train_step``.

Forward and backward run through FSDP (no pipelining: the local rows in ``microbatches``
gradient-accumulation chunks) or through the pipeline schedule. Either way the gradient is that
of the global batch's mean loss, as in one process: each microbatch's loss is its mean over
tokens, microbatch gradients are averaged, and FSDP averages over the data-parallel ranks. Then
the global gradient norm (all shards, all stages), the non-finite guard, clipping, AdamW, and the
MoE router-bias update with the load of the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchmhc.distributed.clip import clip_grad_norm_
from torchmhc.distributed.fsdp import average_replicated_gradients
from torchmhc.distributed.moe import update_router_bias
from torchmhc.distributed.parallel_model import ParallelModel
from torchmhc.distributed.pipeline import sync_tied_gradients
from torchmhc.train import StepStats, check_skippable, nonfinite_names, step_unless_nonfinite, token_cross_entropy

__all__ = ["train_step", "forward_backward", "evaluate_loss", "nonfinite_tensors"]


def _all_reduce_dp_mean(value: Tensor, pm: ParallelModel) -> Tensor:
    """Mean of ``value`` over the data-parallel ranks (in place; returns it)."""
    for name in ("dp_shard", "dp_replicate"):
        if pm.mesh[name].size() > 1:
            dist.all_reduce(value, group=pm.mesh.get_group(name))
    return value.div_(pm.layout.dp_size)


def forward_backward(pm: ParallelModel, x: Tensor, y: Tensor) -> Tensor:
    """Forward and backward of this rank's rows; gradients end in the (sharded) parameters.

    Args:
        x, y: this rank's inputs and targets, int64 ``[B / dp, T]`` (see ``torchmhc.distributed.data``).

    Returns:
        The global batch's mean loss, an fp32 scalar, the same on every rank.
    """
    num_microbatches = pm.parallel.microbatches
    if pm.schedule is None:
        model = pm.part
        autocast = (
            torch.autocast(pm.device.type, dtype=pm.compute_dtype) if pm.compute_dtype else contextlib.nullcontext()
        )
        loss = torch.zeros((), device=pm.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(num_microbatches), y.chunk(num_microbatches))):
            if isinstance(model, FSDPModule):  # (one data-parallel rank: a plain model, no FSDP)
                # Gradients are reduced once, after the last microbatch.
                model.set_requires_gradient_sync(i == num_microbatches - 1)
            with autocast:
                microbatch_loss = token_cross_entropy(model(xm), ym) / num_microbatches
            microbatch_loss.backward()
            loss += microbatch_loss.detach()
    else:
        losses: list[Tensor] = []
        args = (x,) if pm.has_first_stage else ()
        if pm.has_last_stage:
            pm.schedule.step(*args, target=y, losses=losses, return_outputs=False)
        else:
            pm.schedule.step(*args, return_outputs=False)
        # Only the rank with the last stage has the loss: the others add zero.
        loss = torch.stack(losses).float().mean().detach() if losses else torch.zeros((), device=pm.device)
        if pm.parallel.pp > 1:
            dist.all_reduce(loss, group=pm.pp_group)
    return _all_reduce_dp_mean(loss, pm)


def train_step(
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    *,
    lr: float,
    grad_clip: float,
    on_nonfinite: str,
    step: int,
) -> StepStats:
    """Forward, backward, global norm, non-finite guard, clip, AdamW, router-bias update.

    Args:
        pm: from :func:`torchmhc.distributed.parallel_model.parallelize`.
        optimizer: over ``pm.part``'s parameters (``torchmhc.train.build_optimizer(pm.part, ...)``).
        batch: this rank's rows (``torchmhc.distributed.data.local_batch``), on any device.
        lr, grad_clip, on_nonfinite, step: as ``torchmhc.train.train_step``.

    Returns:
        The step's global loss and gradient norm (equal on every rank).
    """
    x, y = (t.to(pm.device) for t in batch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(pm, x, y)
    average_replicated_gradients(pm.replicated, pm.mesh)  # connections' and norms' (FSDP leaves them whole)
    duplicates = []
    if pm.schedule is not None:  # a pipelined tied embedding: both copies get the summed gradient
        sync_tied_gradients(pm.part, pm.tied_group)
        duplicates = [p for p in (pm.part.tied_copy,) if p is not None]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm_t = clip_grad_norm_(params, max_norm, pp_group=pm.pp_group, duplicates=duplicates)
    loss_value, grad_norm = step_unless_nonfinite(
        optimizer, loss, grad_norm_t.to(loss.device), lambda keep: update_router_bias(pm.part, pm.mesh, keep)
    )
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))  # on every rank alike: both are global
    if skipped:
        check_skippable(step, loss_value, grad_norm, nonfinite_tensors(pm.part, optimizer), on_nonfinite)
    return StepStats(loss_value, grad_norm, lr, skipped=skipped)


def nonfinite_tensors(part: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """``torchmhc.train.nonfinite_tensors`` over all ranks: the names of the weights and optimizer
    state tensors that hold a NaN or an Inf on any rank (each rank checks its shards; a collective,
    the same list on every rank)."""
    named = list(part.state_dict().items())
    if optimizer is not None:
        names = {id(p): name for name, p in part.named_parameters()}
        named += [
            (f"optimizer state {names[id(p)]}.{key}", value)
            for p, entry in optimizer.state.items()
            for key, value in entry.items()
            if isinstance(value, Tensor)
        ]
    local = nonfinite_names([(name, t.to_local() if isinstance(t, DTensor) else t) for name, t in named])
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, local)
    return sorted(set().union(*everyone))


@contextlib.contextmanager
def _no_local_gradient_handover(schedule) -> Iterator[None]:
    """torch 2.13's ``eval()`` of a V-shaped schedule still hands the (absent) input gradient from
    one local stage to the other at the turn of the V, and the stage asserts that it has a
    backward: make that hand-over a no-op while evaluating."""
    stages = getattr(schedule, "_stages", [])
    for stage in stages:
        stage.get_local_bwd_output = lambda mb: ()
        stage.set_local_bwd_input = lambda grads, mb: None
    try:
        yield
    finally:
        for stage in stages:
            del stage.get_local_bwd_output, stage.set_local_bwd_input


@torch.no_grad()
def evaluate_loss(pm: ParallelModel, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy of a batch in eval mode (MoE loads are not counted), the same on every rank.

    Args:
        x, y: this rank's rows of the batch, int64 ``[B / dp, T]`` (with pipelining ``B`` must be
            the training batch size: the stages were built for its microbatch shape).
    """
    x, y = x.to(pm.device), y.to(pm.device)
    modules = [pm.part, *pm.stages]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        if pm.schedule is None:
            autocast = (
                torch.autocast(pm.device.type, dtype=pm.compute_dtype) if pm.compute_dtype else contextlib.nullcontext()
            )
            with autocast:
                loss = token_cross_entropy(pm.part(x), y).float()
        else:
            losses: list[Tensor] = []
            args = (x,) if pm.has_first_stage else ()
            with _no_local_gradient_handover(pm.schedule):
                if pm.has_last_stage:
                    pm.schedule.eval(*args, target=y, losses=losses)
                else:
                    pm.schedule.eval(*args)
            loss = torch.stack(losses).float().mean() if losses else torch.zeros((), device=pm.device)
            if pm.parallel.pp > 1:
                dist.all_reduce(loss, group=pm.pp_group)
        return _all_reduce_dp_mean(loss, pm).item()
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
