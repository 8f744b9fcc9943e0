"""FSDP2 (``fully_shard``) over the data-parallel dimensions of the mesh.

Units, bottom-up (each unit all-gathers its parameters before use and reduce-scatters their
gradients after the backward):

- every transformer block (attention, FFN or MoE, norms): one unit in the compute dtype;
- the root (embedding, final norm, LM head) — the model, or a pipeline stage.

The hyper-connections' and stream heads' parameters (``fn``, ``base``, ``scale``) are left out of
the units (``ignored_params``): every rank keeps them whole, in fp32 (the mHC coefficients are
computed in fp32), and :func:`average_replicated_gradients` averages their gradients over the
data-parallel ranks in one all-reduce after the backward. They are small (for gpu-dense-1b 38 MB,
0.7% of the model) and used by many calls per block (``pre``, ``post_pre``, ``post``, recomputation):
as units of their own they cost FSDP's hooks at every such call (with them, FSDP over one rank left
an H100 30 ms idle per gpu-dense-1b step; on a hook-bound CPU probe they were a third of FSDP's
cost), and they needed their methods registered as forward methods to be gathered.

Mixed precision: bf16 parameters for the compute and fp32 gradient reduction (FSDP keeps fp32
sharded parameters for the optimizer); ``param_dtype=None`` computes and reduces in the
parameters' own dtype (fp32 on the CPU, fp64 in the tests that compare weights).
Inputs are never cast by FSDP (``cast_forward_inputs=False``): the model's autocast and its
stream dtype decide, as on one device.

With a 2-D mesh (``dp_replicate`` × ``dp_shard``) ``fully_shard`` is HSDP: sharded within a
``dp_shard`` group, replicated across groups. Gradients are averaged over all data-parallel ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from torchmhc.layers import HyperConnection, StreamHead
from torchmhc.models.gpt import Block

__all__ = ["data_parallel_mesh", "apply_fsdp", "average_replicated_gradients"]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def apply_fsdp(
    roots: Iterable[nn.Module],
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
) -> list[nn.Parameter]:
    """``fully_shard`` the blocks and each root, in place, leaving the connections' parameters out.

    Args:
        roots: the model (no pipelining) or this rank's pipeline stages; each becomes an FSDP root.
        mesh: the data-parallel mesh (:func:`data_parallel_mesh`).
        param_dtype: compute dtype of the blocks and roots (``torch.bfloat16`` on GPUs; gradients
            are then reduced in fp32), or None to compute and reduce in the parameters' own dtype.
        reshard_after_forward: free gathered block parameters after the forward (ZeRO-3). With
            pipelining keep them (False): every microbatch would gather them again.

    Returns:
        The parameters left whole on every rank (hyper-connections, stream heads), whose gradients
        :func:`average_replicated_gradients` must average after each backward.
    """
    # Without mixed precision every unit computes and reduces in the parameters' own dtype.
    reduce_dtype = torch.float32 if param_dtype is not None else None
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # FSDP warns about every unit whose forward returns a view (an in-place change of it would
    # skip the unit's backward hook): the models here never change a unit's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)
    replicated: list[nn.Parameter] = []
    for root in roots:
        kept = list(dict.fromkeys(  # in module order, each once
            p for m in root.modules() if isinstance(m, (HyperConnection, StreamHead)) for p in m.parameters()
        ))  # fmt: skip
        for module in (m for m in root.modules() if isinstance(m, Block)):
            fully_shard(module, mesh=mesh, mp_policy=compute, reshard_after_forward=reshard_after_forward,
                        ignored_params=set(kept))  # fmt: skip
            if root.cfg.recompute:
                # block recomputation calls the branches directly instead of the block
                register_fsdp_forward_method(module, "attn_branch")
                register_fsdp_forward_method(module, "ffn_branch")
        # The root's parameters are needed right at the start of the backward: keep them.
        fully_shard(root, mesh=mesh, mp_policy=compute, reshard_after_forward=False, ignored_params=set(kept))
        replicated += kept
    return replicated


@torch.no_grad()
def average_replicated_gradients(params: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average the gradients of ``params`` (left whole on every rank by :func:`apply_fsdp`) over the
    data-parallel ranks of ``mesh`` (the job's ``(pp, dp_replicate, dp_shard)`` mesh): one
    all-reduce of their flattened gradients per data-parallel dimension. Call on every rank."""
    dims = [name for name in ("dp_shard", "dp_replicate") if mesh[name].size() > 1]
    if not params or not dims:
        return
    for p in params:  # a parameter no microbatch reached still takes part, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    for name in dims:
        dist.all_reduce(flat, group=mesh.get_group(name))
    flat /= math.prod(mesh[name].size() for name in dims)
    for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(averaged)
