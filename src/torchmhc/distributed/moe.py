"""MoE router-bias balancing across data-parallel ranks.

Each MoE layer counts the tokens routed to each expert during the step's forward passes
(``MoE.expert_load``) and moves its router bias by ``± u`` after the optimizer step. With data
parallelism every rank has counted only its own rows: the counts are summed over the
data-parallel ranks before the update, so every rank sees the load of the whole global batch and
applies the same update, the one a single process would. With pipelining each stage owns its
MoE layers and sums them over its own data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from torchmhc.models.moe import MoE

__all__ = ["all_reduce_expert_load", "update_router_bias"]


@torch.no_grad()
def all_reduce_expert_load(module: nn.Module, mesh: DeviceMesh) -> None:
    """Sum every MoE layer's ``expert_load`` in ``module`` over the mesh's data-parallel ranks
    (one collective per data-parallel dimension for all layers together)."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        return
    groups = [mesh.get_group(name) for name in ("dp_shard", "dp_replicate") if mesh[name].size() > 1]
    if not groups:
        return
    loads = torch.cat([m.expert_load for m in layers])  # counts: exact in fp32 below 2**24 a step
    for group in groups:
        dist.all_reduce(loads, group=group)
    for m, load in zip(layers, loads.split([m.num_experts for m in layers])):
        m.expert_load.copy_(load)


def update_router_bias(module: nn.Module, mesh: DeviceMesh, keep: Tensor | float = 1.0) -> None:
    """The balancing step of every MoE layer in ``module`` with the global batch's loads; ``keep``
    as :meth:`torchmhc.models.moe.MoE.update_router_bias` takes it."""
    all_reduce_expert_load(module, mesh)
    for m in module.modules():
        if isinstance(m, MoE):
            m.update_router_bias(keep)
