"""DualPipeV with real overlap: the paired forward and backward chunks run concurrently.

In its steady state ``ScheduleDualPipeV`` pairs the forward of one microbatch on one of the
rank's two stages with the backward of another microbatch on the other stage (an
``OVERLAP_F_B`` action). torch runs the pair one after the other unless a function is registered
for the action (``schedule.register_custom_function``); :func:`register_overlap` registers
:func:`overlap_forward_backward`, which does what torch's runtime does for a ``FORWARD`` and a
``FULL_BACKWARD`` action (wait for the received input, run the chunk, compute the loss on the
last stage, hand the result to the other local stage when the V turns on this rank), but:

- on CUDA, the forward runs on a side stream of its own stage, while the backward is issued
  from the current stream; autograd runs each backward kernel on the stream of its forward
  kernel, so the backward lands on the *other* stage's streams and the two chunks' kernels
  overlap on the GPU. The sends and receives stay asynchronous (torch's runtime posts them around
  the action; nothing here waits on the host). The current stream waits for the side stream at
  the end, so the following sends see finished outputs.
- :func:`prioritize_post_res` moves the post-res kernels of every FFN hyper-connection onto a
  high-priority stream (forward and, through autograd's stream rule, backward), so that the
  memory-bound stream update is not starved by the other chunk's GEMMs (the DeepSeek mHC paper's
  overlap design puts it there too).
- on the CPU the pair runs forward then backward: the same operations in the same order as
  without the function, hence the same numbers (the tests check this).

The function reads the schedule's bookkeeping (``fwd_recv_ops``, ``bwd_recv_ops``,
``backward_counter``, ``_maybe_compute_loss``), the same fields torch's own action runner uses in
torch 2.13; the custom-function protocol gives it no other way to take part in the schedule.
Outputs of the last stage are not kept for ``step(return_outputs=True)`` (training does not ask).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.pipelining.schedules import (
    FULL_BACKWARD,
    OVERLAP_F_B,
    FORWARD,
    ScheduleDualPipeV,
)
from torch.utils._pytree import tree_leaves

from torchmhc.layers import HyperConnection

__all__ = ["register_overlap", "overlap_forward_backward", "prioritize_post_res"]


def register_overlap(schedule: ScheduleDualPipeV) -> None:
    """Run ``schedule``'s ``OVERLAP_F_B`` actions with :func:`overlap_forward_backward`."""
    if not isinstance(schedule, ScheduleDualPipeV):
        raise TypeError(f"schedule must be a ScheduleDualPipeV, got {type(schedule).__name__}.")
    streams: dict[int, torch.cuda.Stream] = {}

    def run(action, ctx) -> None:
        overlap_forward_backward(action, ctx, streams)

    schedule.register_custom_function(OVERLAP_F_B, run)


def _wait(works) -> None:
    for work in works:
        work.wait()


def _wait_forward_input(schedule, stage, mb: int, local: dict) -> None:
    """Wait for a forward chunk's input from the previous rank (none when it is local)."""
    if not stage.is_first and stage.stage_index - 1 not in local:
        _wait(schedule.fwd_recv_ops.pop((stage.stage_index, mb)))


def _forward(schedule, stage, mb: int, ctx, local: dict) -> None:
    """What torch's runtime does for a FORWARD action once its input is there (without keeping
    last-stage outputs)."""
    output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
    if stage.stage_index + 1 in local:  # the V turns here: the next stage is on this rank
        local[stage.stage_index + 1].set_local_fwd_input(output, mb)


def _wait_backward_input(schedule, stage, mb: int, local: dict) -> None:
    """Wait for a backward chunk's gradient from the next rank (none when it is local)."""
    if not stage.is_last and stage.stage_index + 1 not in local:
        _wait(schedule.bwd_recv_ops.pop((stage.stage_index, mb)))


def _backward(schedule, stage, mb: int, local: dict) -> None:
    """What torch's runtime does for a FULL_BACKWARD action."""
    _wait_backward_input(schedule, stage, mb, local)
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[stage.stage_index] += 1
    last = schedule.backward_counter[stage.stage_index] == schedule._n_microbatches
    stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
    if stage.stage_index - 1 in local:
        local[stage.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def overlap_forward_backward(action, ctx, streams: dict[int, torch.cuda.Stream] | None = None) -> None:
    """Run an ``OVERLAP_F_B`` action's forward and backward chunks (see the module docstring).

    Args:
        action: the schedule's action; its ``sub_actions`` are one FORWARD and one FULL_BACKWARD.
        ctx: the schedule's ``_PipelineContext``.
        streams: side CUDA streams by stage index, created on first use (ignored on the CPU).
    """
    schedule = ctx.schedule_ref
    local = {stage.stage_index: stage for stage in schedule._stages}
    forward = [a for a in action.sub_actions if a.computation_type == FORWARD]
    backward = [a for a in action.sub_actions if a.computation_type == FULL_BACKWARD]
    if len(forward) != 1 or len(backward) != 1 or len(action.sub_actions) != 2:
        raise RuntimeError(f"expected one FORWARD and one FULL_BACKWARD sub-action, got {action.sub_actions}")
    f, b = forward[0], backward[0]
    f_stage, b_stage = local[f.stage_index], local[b.stage_index]
    if not b_stage.has_backward:  # schedule.eval(): forward only
        _wait_forward_input(schedule, f_stage, f.microbatch_index, local)
        _forward(schedule, f_stage, f.microbatch_index, ctx, local)
        # The schedule still posted the backward's (empty) receive: consume it as torch's runtime
        # does, or the next run of the schedule finds it pending ("Recv twice").
        _wait_backward_input(schedule, b_stage, b.microbatch_index, local)
        return
    for stage in (f_stage, b_stage):
        schedule._assert_unsharded(stage)

    _wait_forward_input(schedule, f_stage, f.microbatch_index, local)
    if not f_stage.device.type == "cuda":
        _forward(schedule, f_stage, f.microbatch_index, ctx, local)
        _backward(schedule, b_stage, b.microbatch_index, local)
        return

    streams = {} if streams is None else streams
    if f.stage_index not in streams:
        streams[f.stage_index] = torch.cuda.Stream(device=f_stage.device)
    side = streams[f.stage_index]
    current = torch.cuda.current_stream(f_stage.device)
    # The received input was waited for on the current stream: order the side stream after it.
    side.wait_stream(current)
    with torch.cuda.stream(side):
        _forward(schedule, f_stage, f.microbatch_index, ctx, local)
    # Issued while the forward's kernels may still run: autograd puts these on other streams.
    _backward(schedule, b_stage, b.microbatch_index, local)
    current.wait_stream(side)


def prioritize_post_res(modules: Iterable[nn.Module], *, device: torch.device | None = None) -> torch.cuda.Stream | None:
    """Run the post-res of every FFN hyper-connection in ``modules`` on one high-priority CUDA
    stream (no-op, returning None, without CUDA). Values are unchanged: only the stream differs.

    The connection's ``post`` and ``post_pre`` (its post-res fused with the next block's
    coefficients and pre-mix, ``model.fuse_transitions``) are replaced on the instance (as
    ``Block.compile_branches`` replaces the branches); the current stream waits for the results
    before anything reads them.
    """
    if not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    _, highest = torch.cuda.Stream.priority_range()
    stream = torch.cuda.Stream(device=device, priority=highest)
    for module in modules:
        for name, hc in module.named_modules():
            if isinstance(hc, HyperConnection) and name.endswith("ffn_hc") and hc.residual != "residual":
                hc.post = _on_stream(hc.post, stream)
                hc.post_pre = _on_stream(hc.post_pre, stream)
    return stream


def _on_stream(method, stream: torch.cuda.Stream):
    # Outside torch.compile: a compiled block calls this wrapper, and dynamo can trace neither the
    # stream hand-off (a graph break) nor record_stream (functionalization rejects it). The
    # wrapped post-res is a custom op of Triton kernels either way, so the compiled block loses
    # only a graph split here.
    @torch.compiler.disable
    def on_stream(*args, **kwargs):
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = method(*args, **kwargs)
        current.wait_stream(stream)
        for t in tree_leaves(out):  # allocated on `stream`, used and freed on the current one
            if isinstance(t, torch.Tensor):
                t.record_stream(current)
        return out

    return on_stream

