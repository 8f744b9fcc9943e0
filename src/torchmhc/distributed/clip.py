"""Gradient clipping by the global norm over every shard and every pipeline stage.

With FSDP each rank holds a shard of each block's gradient (a DTensor): the norm of the shards
is reduced over the data-parallel mesh (``DTensor.full_tensor``); the parameters every rank
holds whole (the connections' and the norms') count once. With pipelining each rank holds
the gradients of its stages only: the squared norms are summed over the pipeline group. Every
rank ends with the same norm, the one a single process would compute over all gradients, and
scales its own gradients by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    *,
    pp_group: dist.ProcessGroup | None = None,
    duplicates: Iterable[nn.Parameter] = (),
) -> Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``.

    Args:
        parameters: this rank's parameters (plain tensors or FSDP's DTensors, one mesh).
        max_norm: the largest global norm; ``math.inf`` measures without clipping.
        pp_group: the pipeline process group when the model is pipelined (None otherwise).
        duplicates: parameters whose gradient another parameter's already counts (a pipelined
            tied embedding's second copy): clipped, not counted.

    Returns:
        The global norm before clipping, an fp32 scalar tensor on the gradients' device (the
        same on every rank).
    """
    parameters = list(parameters)
    skip = {id(p) for p in duplicates}
    grads = [p.grad for p in parameters if p.grad is not None and id(p) not in skip]
    device = parameters[0].device if parameters else torch.device("cpu")
    # FSDP's shards (DTensors) and the parameters every rank holds whole (plain tensors, equal on
    # every data-parallel rank) are measured apart; a shard norm is reduced over the shards
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    squared = torch.zeros((), device=device)
    for group in (sharded, whole):
        if group:
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squared = squared + norm.float().square()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(squared, group=pp_group)
    norm = squared.sqrt()
    if max_norm != math.inf:
        with_grads = [p for p in parameters if p.grad is not None]
        for group in ([p for p in with_grads if isinstance(p.grad, DTensor)], [p for p in with_grads if not isinstance(p.grad, DTensor)]):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
