"""Gradient clipping by the global norm over every shard and every pipeline stage.

With FSDP each rank holds a shard of each gradient (a DTensor): the norm of the shards is
reduced over the data-parallel mesh (``DTensor.full_tensor``). With pipelining each rank holds
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
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the sum of squares over the data-parallel shards
    else:  # a pipeline rank whose stages have no gradient yet still joins the reduction below
        device = parameters[0].device if parameters else torch.device("cpu")
        norm = torch.zeros((), device=device)
    norm = norm.float()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = norm.square()
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    if any(p.grad is not None for p in parameters) and max_norm != math.inf:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
