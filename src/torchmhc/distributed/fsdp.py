"""FSDP2 (``fully_shard``) over the data-parallel dimensions of the mesh.

Units, bottom-up (each unit all-gathers its parameters before use and reduce-scatters their
gradients after the backward):

- every hyper-connection and the stream head: their own units, with fp32 parameters whatever
  the mixed-precision policy, because the mHC coefficients are computed in fp32. Their
  parameters (``fn``, ``base``, ``scale``) are sharded like any other. They stay gathered from
  their forward to the end of their backward (``reshard_after_forward=False``; a few hundred
  kilobytes a layer): block recomputation replays them during the backward of later sub-layers.
  The model calls some of their methods directly rather than the modules (``pre``, and
  ``post_pre``, which computes the next connection's coefficients): those are registered as
  forward methods of the unit whose parameters they read.
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

import warnings
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
    # FSDP warns about every unit whose forward returns a view (an in-place change of it would
    # skip the unit's backward hook): the models here never change a unit's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)
    for root in roots:
        blocks = [m for m in root.modules() if isinstance(m, Block)]
        # Block recomputation (torchmhc.recompute) and the fused transition (Block.forward) call
        # `pre` directly instead of the module: make it gather the parameters as a forward would.
        pre_called_directly = root.cfg.recompute or any(b.fuse_transition for b in blocks)
        for module in root.modules():
            if isinstance(module, (HyperConnection, StreamHead)) and _has_parameters(module):
                fully_shard(module, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
                if isinstance(module, HyperConnection) and pre_called_directly:
                    register_fsdp_forward_method(module, "pre")
        for module in blocks:
            if module.fuse_transition:
                _gather_for_post_pre(module.attn_hc, module.ffn_hc)
            fully_shard(module, mesh=mesh, mp_policy=compute, reshard_after_forward=reshard_after_forward)
            if root.cfg.recompute:
                # ... and block recomputation the branches directly instead of the block.
                register_fsdp_forward_method(module, "attn_branch")
                register_fsdp_forward_method(module, "ffn_branch")
        # The root's parameters are needed right at the start of the backward: keep them.
        fully_shard(root, mesh=mesh, mp_policy=compute, reshard_after_forward=False)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _gather_for_post_pre(hc: HyperConnection, next_hc: HyperConnection) -> None:
    """Make ``hc.post_pre(ctx, f_out, next_hc)`` a forward method of ``next_hc``'s FSDP unit.

    The fused transition (``Block.forward``) computes ``next_hc``'s coefficients inside
    ``hc.post_pre``, from ``next_hc``'s parameters and not ``hc``'s (those were used by ``hc.pre``):
    ``next_hc``'s unit must be gathered around that call, and its gradients are reduced once the
    backward has passed it.
    """
    if not _has_parameters(next_hc):  # the plain residual: nothing to gather
        return
    post_pre = hc.post_pre
    # An instance attribute, so that register_fsdp_forward_method can wrap it.
    next_hc.post_pre_from_previous = lambda ctx, f_out: post_pre(ctx, f_out, next_hc)
    register_fsdp_forward_method(next_hc, "post_pre_from_previous")
    hc.post_pre = lambda ctx, f_out, _next_hc: next_hc.post_pre_from_previous(ctx, f_out)
