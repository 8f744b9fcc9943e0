"""FSDP2 (``fully_shard``) over the data-parallel dimensions of the mesh.

Units, bottom-up (each unit all-gathers its parameters before use and reduce-scatters their
gradients after the backward):

- every hyper-connection and the stream head: their own units, with fp32 parameters whatever
  the mixed-precision policy, because the mHC coefficients are computed in fp32. Their
  parameters (``fn``, ``base``, ``scale``) are sharded like any other. They stay gathered from
  their forward to the end of their backward (``reshard_after_forward=False``; a few hundred
  kilobytes a layer): block recomputation replays them during the backward of later sub-layers.
- every transformer block (attention, FFN or MoE, norms): one unit in the compute dtype;
- the root (embedding, final norm, LM head) — the model, or a pipeline stage.

Mixed precision: bf16 parameters for the compute and fp32 gradient reduction (FSDP keeps fp32
sharded parameters for the optimizer); ``param_dtype=None`` computes and reduces in the
parameters' own dtype (fp32 on the CPU, fp64 in the tests that compare weights).
Inputs are never cast by FSDP (``cast_forward_inputs=False``): the model's autocast and its
stream dtype decide, as on one device.

With a 2-D mesh (``dp_replicate`` × ``dp_shard``) ``fully_shard`` is HSDP: sharded within a
``dp_shard`` group, replicated across groups. Gradients are averaged over all data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from torchmhc.layers import HyperConnection, StreamHead
from torchmhc.models.gpt import Block

__all__ = ["data_parallel_mesh", "apply_fsdp"]


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
) -> None:
    """``fully_shard`` the hyper-connections, stream heads, blocks and each root, in place.

    Args:
        roots: the model (no pipelining) or this rank's pipeline stages; each becomes an FSDP root.
        mesh: the data-parallel mesh (:func:`data_parallel_mesh`).
        param_dtype: compute dtype of the blocks and roots (``torch.bfloat16`` on GPUs; gradients
            are then reduced in fp32), or None to compute and reduce in the parameters' own dtype.
        reshard_after_forward: free gathered block parameters after the forward (ZeRO-3). With
            pipelining keep them (False): every microbatch would gather them again.
    """
    # Without mixed precision every unit computes and reduces in the parameters' own dtype.
    reduce_dtype = torch.float32 if param_dtype is not None else None
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(
        param_dtype=torch.float32 if param_dtype is not None else None, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    for root in roots:
        for module in root.modules():
            if isinstance(module, (HyperConnection, StreamHead)) and any(True for _ in module.parameters()):
                fully_shard(module, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
                if isinstance(module, HyperConnection) and root.cfg.recompute:
                    # Block recomputation calls `pre` directly instead of the module (see
                    # torchmhc.recompute): make it gather the parameters as a forward would.
                    register_fsdp_forward_method(module, "pre")
        for module in root.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh, mp_policy=compute, reshard_after_forward=reshard_after_forward)
                if root.cfg.recompute:
                    # ... and the branches directly instead of the block.
                    register_fsdp_forward_method(module, "attn_branch")
                    register_fsdp_forward_method(module, "ffn_branch")
        # The root's parameters are needed right at the start of the backward: keep them.
        fully_shard(root, mesh=mesh, mp_policy=compute, reshard_after_forward=False)
