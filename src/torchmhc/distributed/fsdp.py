"""FSDP2 (``fully_shard``) over the data-parallel dimensions of the mesh.

Units, bottom-up (each unit all-gathers its parameters before use and reduce-scatters their
gradients after the backward):

- every transformer block (attention, FFN or MoE): one unit in the compute dtype;
- the root (embedding, LM head) — the model, or a pipeline stage.

The hyper-connections' and stream heads' parameters (``fn``, ``base``, ``scale``) and the RMSNorm
weights are left out of the units (``ignored_params``): every rank keeps them whole, in fp32, and
:func:`average_replicated_gradients` averages their gradients over the data-parallel ranks in one
all-reduce after the backward. They are small (for gpu-dense-1b 38 MB, 0.7% of the model; the
norms add C values a sub-layer).

- The connections' parameters are used by many calls per block (``pre``, ``post_pre``, ``post``,
  recomputation): as units of their own they cost FSDP's hooks at every such call (with them,
  FSDP over one rank left an H100 30 ms idle per gpu-dense-1b step; on a hook-bound CPU probe they
  were a third of FSDP's cost), and they needed their methods registered as forward methods to be
  gathered. They stay in fp32 because the mHC coefficients are computed in fp32.
- The norms stay out so that they scale by their fp32 weights, as on one device: autocast leaves
  parameters as they are, while FSDP's ``param_dtype`` would round them to bf16 first.

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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from torchmhc.layers import HyperConnection, StreamHead
from torchmhc.models.gpt import Block

__all__ = ["data_parallel_mesh", "shard_block", "shard_root", "average_replicated_gradients"]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def shard_block(
    block: Block, mesh: DeviceMesh, *, param_dtype: torch.dtype | None, reshard_after_forward: bool, recompute: bool
) -> None:
    """``fully_shard`` one transformer block in place, its hyper-connections' parameters and norm
    weights left out.

    Call it on every block before :func:`shard_root` shards the root above them (bottom-up); a
    laid-out build calls it as each block is built, so the block's whole copy is freed at once.

    Args:
        block: a block on this rank's device.
        mesh: the data-parallel mesh (:func:`data_parallel_mesh`).
        param_dtype: compute dtype (``torch.bfloat16`` on GPUs; gradients are then reduced in
            fp32), or None to compute and reduce in the parameters' own dtype.
        reshard_after_forward: free the gathered parameters after the forward (ZeRO-3). With
            pipelining keep them (False): every microbatch would gather them again.
        recompute: the model runs under block recomputation (``model.recompute``), which calls
            the branches directly instead of the block: they gather the parameters too.
    """
    fully_shard(block, mesh=mesh, mp_policy=_policy(param_dtype), reshard_after_forward=reshard_after_forward,
                ignored_params=set(_replicated(block)))  # fmt: skip
    if recompute:
        register_fsdp_forward_method(block, "attn_branch")
        register_fsdp_forward_method(block, "ffn_branch")


def shard_root(root: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None) -> list[nn.Parameter]:
    """``fully_shard`` a root (the model, or a pipeline stage) in place: the embedding, final norm
    and LM head it holds become one unit, kept gathered from the forward to the backward (the
    backward needs them at once). Its blocks must be sharded already (:func:`shard_block`).

    Returns:
        The parameters left whole on every rank (hyper-connections, stream heads, norms), whose gradients
        :func:`average_replicated_gradients` must average after each backward.
    """
    kept = _replicated(root)
    fully_shard(root, mesh=mesh, mp_policy=_policy(param_dtype), reshard_after_forward=False, ignored_params=set(kept))
    return kept


def _replicated(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of the hyper-connections, stream heads and RMSNorms in ``module``, in module
    order, each once."""
    kept = (HyperConnection, StreamHead, nn.RMSNorm)
    return list(dict.fromkeys(p for m in module.modules() if isinstance(m, kept) for p in m.parameters()))


def _policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    # FSDP warns about every unit whose forward returns a view (an in-place change of it would
    # skip the unit's backward hook): the models here never change a unit's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)
    # Without mixed precision every unit computes and reduces in the parameters' own dtype.
    reduce_dtype = torch.float32 if param_dtype is not None else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)


@torch.no_grad()
def average_replicated_gradients(params: list[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average the gradients of ``params`` (left whole on every rank by :func:`shard_root`) over the
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
