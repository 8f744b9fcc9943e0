"""End-to-end training step: residual vs HC vs mHC in the same language model, with memory and floor.

    python benchmarks/e2e.py --preset gpu-moe-3b --variants residual,mhc,mhc:recompute --out moe.md
    python benchmarks/e2e.py --preset tiny --device cpu --steps 3 --warmup 1      # CPU smoke run
    python benchmarks/e2e.py --preset gpu-dense-1b --variants mhc,mhc:distributed  # distributed path, 1 GPU
    python benchmarks/e2e.py --preset gpu-small --set train.compile=false         # eager

A variant is a ``model.residual`` name with optional modifiers: ``mhc:recompute`` turns on block
recomputation (``model.recompute``), ``mhc:reference`` forces the plain-PyTorch reference instead
of the fused kernels (``torchmhc.kernels.use_kernels``); ``mhc:recompute:reference`` both;
``mhc:unfused`` runs each sub-layer's post-res and the next one's pre as two ops (``model.fuse_transitions =
false``; the default fuses them, inside blocks and across); ``mhc:twopass`` runs the fused transitions'
backward in two passes over the streams instead of one (``TORCHMHC_TRANSITION_BACKWARD=two_pass``);
``mhc:branchnorm`` leaves each branch's RMSNorm in the branch, a kernel of its own after the transition
(``model.fuse_branch_norm = false``; the default runs it inside the fused transitions); ``mhc:distributed`` trains through ``torchmhc.distributed`` at world
size 1, as ``torchrun --nproc-per-node 1`` runs it (the distributed path's cost against ``mhc``);
``mhc:fsdp`` does too, with FSDP2 forced over the one rank (which ``torchmhc.distributed`` applies
only to several data-parallel ranks: FSDP's own cost; not with CUDA graphs). Every
variant gets the same preset, seed, batch and ``train.compile`` setting (the GPU benchmark presets
compile, block by block: ``torchmhc.train.apply_compile``).

For each variant, in one process: build the model on the device, ``--warmup`` untimed steps (the
first one compiles; its time is reported), ``--steps`` timed training steps (forward, backward,
clip, fused AdamW) on a fixed random batch, then one instrumented step for memory:

- activations: bytes allocated between the start and the end of the forward, i.e. what the
  forward leaves alive for the backward (saved tensors, bf16 weight copies, the loss). CUDA
  allocator statistics on the GPU; on the CPU the storages created during the forward that are
  still alive after it (a dispatch mode records them), the same quantity.
- peak: the CUDA allocator's peak over that step (weights, AdamW state, gradients, activations).

With a CUDA-graph compile mode (``train.compile_mode = "reduce-overhead"``, the GPU presets'),
activations live in the graphs' memory pool and a forward allocates nothing new, so the memory step
runs on the same model rebuilt and compiled in the default mode.

Three reports follow the step-time table (overhead vs residual, MFU against a bf16 matmul timed in
the same run, so that a slow baseline shows):

- memory: each variant's activations next to the formula for what the mHC connections keep
  (docs/math.md §9: the streams x_l, n·C per sub-layer; the layer input H_pre·x_l and the branch output
  f_l, C each; the fused kernels' fp32 coefficients) — and, for every ``X`` run with and without
  ``:recompute``, the measured saving against the formula's: recomputation drops x_l except at
  each block start and every H_pre·x_l.
- floor: the bytes the mHC operations must move per training step (per sub-layer and token, the
  per-kernel counts of torchmhc bench), divided by a device-to-device copy rate measured in
  the same run: the overhead that memory traffic alone explains, next to the measured overhead.

For a mixture-of-experts model the step table also gives the routing balance of one step after
the timed ones (the busiest expert's tokens over the mean, averaged over the MoE layers): routing
follows each variant's own hidden states, and the busiest expert sets a grouped GEMM's time, so
two variants' step times compare fairly only at similar balance.

``--profile K`` also records K more steps of each variant with ``torch.profiler`` and reports the
GPU time per step by kernel (the largest first), split into torchmhc's own kernels, the others
(inductor's, cuBLAS's, attention's) and the time no kernel runs: where an overhead goes. The time no
kernel runs is then broken down by the kernels on either side of each idle gap, the largest first:
where the GPU waits (for the host, at a CUDA graph's boundary, for a synchronization).

Prints progress as it goes; ``--out FILE`` gets the markdown report (rewritten after every
variant, so a run cut short keeps what it measured). Results belong in
``benchmarks/results/<device>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import torch

from torchmhc.config import CUDA_GRAPH_MODES, ModelConfig, RunConfig, load_config
from torchmhc.distributed.clip import clip_grad_norm_
from torchmhc.kernels import kernel_mode, use_kernels
from torchmhc.kernels._common import channel_block
from torchmhc.kernels.dispatch import ONE_PASS_MAX_STREAMS, TRANSITION_BACKWARD_ENV_VAR
from torchmhc.memory import NewStorages
from torchmhc.models import build_model
from torchmhc.models.moe import MoE
from torchmhc.recompute import block_starts, optimal_block_length
from torchmhc.train import apply_compile, autocast_context, build_optimizer, lm_loss, resolve_device, train_step

GiB = 2**30
MODIFIERS = ("recompute", "reference", "unfused", "twopass", "branchnorm", "distributed", "fsdp")

# ----------------------------------------------------------------------------------------------
# Rates of the device, measured in the same run
# ----------------------------------------------------------------------------------------------


def _median_cuda_seconds(fn, *, repeats: int, skip: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[skip:])


def matmul_tflops(device: torch.device) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s) of an 8192³ product, median of 20."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / _median_cuda_seconds(lambda: a @ b, repeats=25, skip=5) / 1e12


def copy_tbps(device: torch.device) -> float:
    """Measured device-to-device copy rate in TB/s (bytes read + written) of 512 MiB of bf16, as
    ``torchmhc bench`` measures it."""
    src = torch.randn(2**28, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = _median_cuda_seconds(lambda: dst.copy_(src), repeats=30, skip=5)
    return 2 * src.numel() * src.element_size() / seconds / 1e12


# ----------------------------------------------------------------------------------------------
# What the model must compute, keep and move (pure arithmetic; tests/test_e2e_bench.py)
# ----------------------------------------------------------------------------------------------


def flops_per_token(model: torch.nn.Module, cfg: RunConfig) -> float:
    """Training FLOPs per token: 6 × parameters a token touches (routed experts at top_k/E) plus
    causal attention's 6·L·C·T (QKᵀ and AV, half the square, forward and backward)."""
    params = sum(p.numel() for p in model.parameters())
    params -= model.tok_emb.weight.numel() * (not cfg.model.tie_embeddings)  # a lookup, not a product
    m = cfg.model
    if m.arch == "moe":
        routed = sum(p.numel() for name, p in model.named_parameters() if name.endswith(("ffn.w_gate_up", "ffn.w_down")))
        params -= routed * (1 - m.top_k / m.num_experts)
    return 6 * params + 6 * m.num_layers * m.dim * cfg.data.seq_len


def coefficient_bytes_kept(n: int) -> int:
    """fp32 bytes per token and sub-layer that the fused kernels' autograd keeps besides the
    streams: h_pre, h_post [n], h_res [n²] and the coefficient backward's m_pp [16], m_res [NP²],
    1/r [1] (``kernels/coefficients_op.py``: ``empty_coefficient_outputs``; NP = max(4, n rounded
    up to a power of two))."""
    np_ = max(4, 1 << (n - 1).bit_length())
    return 4 * (2 * n + n * n + 16 + np_ * np_ + 1)


@dataclass
class ConnectionMemory:
    """Per-token bytes that the hyper-connections of a model keep for the backward (docs/math.md §9).

    ``kept``: without recomputation: every sub-layer's streams x_l (n·C), its layer input
    H_pre·x_l (C; saved by the branch's pre-norm), its branch output f_l (C; saved by the post-res)
    and the fp32 coefficients; and the last streams x_L (n·C), the stream head's input.
    ``kept_recompute``: with block recomputation: x_l only at block starts, no layer inputs.
    ``saving`` = ``kept - kept_recompute``. ``residual``: what the plain residual keeps of its
    stream (the pre-norm's input, C per sub-layer), so that ``kept - residual`` is mHC's extra
    over the baseline (the final norm keeps C in both). A sub-layer whose branch RMSNorm runs inside
    its transition (``model.fuse_branch_norm``) keeps the norm's fp32 1/rms (4 bytes) instead of its
    layer input.
    """

    kept: int
    kept_recompute: int
    residual: int
    num_blocks: int

    @property
    def saving(self) -> int:
        return self.kept - self.kept_recompute


def connection_memory(
    *, num_streams: int, dim: int, num_sublayers: int, elem_bytes: int, block_length: int = 0, fused_norms: int = 0
) -> ConnectionMemory:
    """:class:`ConnectionMemory` for n = ``num_streams``, C = ``dim``, L = ``num_sublayers`` and streams
    of ``elem_bytes`` bytes; ``block_length`` 0 takes the recomputation default L_r*; ``fused_norms``
    sub-layers with the branch norm inside the transition (:func:`fused_norm_sublayers`)."""
    n, c, L, e = num_streams, dim, num_sublayers, elem_bytes
    length = block_length or optimal_block_length(n, L)
    blocks = len(block_starts(L, length))
    coef = coefficient_bytes_kept(n)
    head = n * c * e
    kept = L * (n * c * e + 2 * c * e + coef) + head - fused_norms * (c * e - 4)
    kept_recompute = blocks * n * c * e + L * (c * e + coef) + head
    return ConnectionMemory(kept=kept, kept_recompute=kept_recompute, residual=L * c * e, num_blocks=blocks)


def fused_norm_sublayers(m: ModelConfig) -> int:
    """Sub-layers of model ``m`` whose branch RMSNorm runs inside a fused transition: every one but
    the first (``models.gpt.run_blocks``), with ``model.fuse_transitions`` and ``fuse_branch_norm``
    and without recomputation (which runs the sub-layers one by one)."""
    return 2 * m.num_layers - 1 if m.fuse_transitions and m.fuse_branch_norm and not m.recompute else 0


def mhc_traffic_bytes(
    *, num_streams: int, dim: int, elem_bytes: int, recompute: bool = False, fused: float = 0.0, one_pass: float = 0.0,
    norm: float = 0.0,
) -> dict[str, int]:
    """Bytes the mHC operations of one sub-layer must move per token, by pass (the per-kernel counts
    of torchmhc bench: every input read once, every output written once).

    forward: coefficients read nC; pre-mix read nC, write C; post-res read nC + C, write nC
    (docs/math.md §9: (3n+1)C read, (n+1)C write). backward, as the chained kernels run it:
    pre-mix dh_pre reads dy and x (nC + C); the coefficient dx pass reads x, dy and the post-res
    gradient of x and writes dx (3nC + C); post-res reads dout, x, f, writes dx, df (3nC + 2C).
    ``fused``: the share of sub-layers whose post-res is fused with the next sub-layer's
    coefficients and pre-mix (``model.fuse_transitions``: all but the last). Each such pair
    reads x_{l+1} twice less forward (2nC: the coefficient pass and the pre-mix read it in the kernel
    that writes it, the pre-mix from L2, counted as free). ``one_pass``: the share of sub-layers
    (at most ``fused``) whose transition backward runs its stream work in one pass
    (``transition_backward_op``: reads x_l, f, dy and x_{l+1}'s gradient, writes dx and df, (3n + 3)C,
    after the pre-mix dh's (n + 1)C, plus its fp32 partial sums of dh_post and dh_res, written and
    read once: 2·(C / 32)·(n + n²)·4 bytes) instead of the dx pass and the post-res backward. fp32 coefficient traffic,
    (3n² + 4n + 40)·4 bytes per coefficient pass, forward and backward. recompute: the forward of
    the connections once more in the backward (block recomputation replays coefficients, pre-mix
    and post-res, unfused). ``norm``: the share of sub-layers (at most ``fused``) whose branch
    RMSNorm runs inside the transition (``model.fuse_branch_norm``): it then moves nothing of its
    own (the transition writes the normalized layer input instead of y; its backward reads dz
    instead of dy), where as a kernel of its own after the pre-mix it moves 5C (read y, write z;
    backward read dz and y, write dy), counted under ``"norm"``. ``residual``: what mHC replaces:
    the plain residual's own add (read 2C, write C) and what the residual model's norm costs, which
    its compiled graph fuses with the add (write z; backward read dz): 2C.
    """
    n, c, e = num_streams, dim, elem_bytes
    small = (3 * n * n + 4 * n + 40) * 4
    partials = 2 * (c // channel_block(c, 32)) * (n + n * n) * 4
    out = {
        "forward": round(((4 * n + 2) - 2 * fused * n) * c * e) + small,
        "backward": round((1 - one_pass) * (7 * n + 4) * c * e + one_pass * ((4 * n + 4) * c * e + partials)) + small,
        "recompute": (4 * n + 2) * c * e + small if recompute else 0,
        "norm": round((1 - norm) * 5 * c * e),
    }
    out["total"] = sum(out.values())
    out["residual"] = 5 * c * e
    return out


@dataclass
class Floor:
    """The memory-traffic floor of the mHC connections for one training step."""

    bytes_per_step: int  # mHC operations, all sub-layers and tokens
    net_bytes_per_step: int  # minus the residual adds they replace
    copy_tbps: float

    @property
    def ms(self) -> float:
        return self.net_bytes_per_step / (self.copy_tbps * 1e12) * 1e3


def mhc_floor(cfg: RunConfig, *, copy_tbps: float, elem_bytes: int, one_pass: bool = True) -> Floor:
    """:class:`Floor` of ``cfg``'s model and batch (2 sub-layers per block; ``model.recompute``
    replays the connections, ``model.fuse_transitions`` fuses every transition: 2L - 1 of them,
    whose backward runs in one pass where ``one_pass`` (all but the ``:twopass`` variants) and
    n <= 4)."""
    m = cfg.model
    sublayers = 2 * m.num_layers
    fused = (sublayers - 1) / sublayers if m.fuse_transitions and not m.recompute else 0.0
    one_pass_share = fused if one_pass and m.num_streams <= ONE_PASS_MAX_STREAMS else 0.0
    per = mhc_traffic_bytes(
        num_streams=m.num_streams, dim=m.dim, elem_bytes=elem_bytes, recompute=m.recompute, fused=fused,
        one_pass=one_pass_share, norm=fused_norm_sublayers(m) / sublayers,
    )  # fmt: skip
    units = 2 * m.num_layers * cfg.data.batch_size * cfg.data.seq_len  # sub-layer-tokens
    return Floor(per["total"] * units, (per["total"] - per["residual"]) * units, copy_tbps)


def stream_bytes(cfg: RunConfig, device: torch.device) -> int:
    """Bytes of one stream element: the autocast dtype (the model casts the embedding), else fp32."""
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    return 2 if bf16 else 4


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One row: a ``model.residual`` name and its modifiers (``mhc:recompute:reference``, ``mhc:unfused``)."""

    spec: str
    residual: str
    recompute: bool = False
    reference: bool = False
    unfused: bool = False
    twopass: bool = False
    branchnorm: bool = False
    distributed: bool = False
    fsdp: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        residual, *mods = spec.strip().split(":")
        bad = [m for m in mods if m not in MODIFIERS]
        if bad or not residual:
            raise ValueError(
                f"variant {spec!r}: expected NAME[:recompute][:reference][:unfused][:twopass][:branchnorm][:distributed][:fsdp], got modifiers {bad}"
            )
        flags = {m: m in mods for m in MODIFIERS}
        return cls(spec.strip(), residual, **flags)

    def config(self, base: RunConfig) -> RunConfig:
        fused = base.model.fuse_transitions and not self.unfused
        norm = base.model.fuse_branch_norm and not self.branchnorm
        model = replace(
            base.model, residual=self.residual, recompute=self.recompute, fuse_transitions=fused, fuse_branch_norm=norm
        )
        return replace(base, model=model)


@dataclass
class Result:
    spec: str
    num_params: int = 0
    flops_per_token: float = 0.0
    first_step_s: float = math.nan  # includes compiling
    ms_per_step: float = math.nan
    ms_min: float = math.nan
    tokens_per_s: float = math.nan
    activation_bytes: int | None = None
    peak_bytes: int | None = None
    error: str | None = None
    # --profile: (kernel name, calls per step, GPU ms per step), largest first; GPU busy ms per step
    kernels: list[tuple[str, float, float]] | None = None
    gpu_busy_ms: float | None = None
    # --profile: (kernel before, kernel after, gaps per step, idle ms per step), largest first
    gaps: list[tuple[str, str, float, float]] | None = None
    # MoE models: tokens of the busiest expert over the mean, averaged over the MoE layers
    expert_load: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_step(model, optimizer, batch, cfg: RunConfig, device: torch.device, autocast) -> tuple[int, int | None]:
    """One training step split at the end of the forward: (activation bytes, peak bytes or None)."""
    x, y = batch
    # Garbage in reference cycles (frames, closures) would otherwise be freed at a random point.
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with autocast:
            loss = lm_loss(model, x, y)
        gc.collect()
        _sync(device)
        activations = torch.cuda.memory_allocated(device) - before
    else:
        meter = NewStorages()
        with meter, autocast:
            loss = lm_loss(model, x, y)
        gc.collect()
        activations = meter.alive_bytes()
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # the distributed path's clip: FSDP's shards and the parameters it leaves whole are measured apart
    clip_grad_norm_(params, cfg.optim.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_router_bias()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return activations, peak


def expert_load_balance(model: torch.nn.Module, step) -> float | None:
    """Runs ``step()`` once -> its routed tokens per expert, busiest over mean (1.0: perfectly
    balanced), averaged over the model's MoE layers; None without MoE layers.

    The busiest expert's rows set how long a grouped GEMM takes, and routing follows the hidden
    states, which differ between variants (even last-bit differences change some top-k choices):
    two variants of one MoE model compare fairly only at similar balance. Read in the balancing
    step, which sees each layer's loads just before it resets them."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    ratios: list[torch.Tensor] = []
    for moe in layers:
        def record(keep=1.0, moe: MoE = moe, update=moe.update_router_bias) -> None:
            ratios.append(moe.expert_load.max() / moe.expert_load.mean())
            update(keep)

        moe.update_router_bias = record  # an instance attribute: shadows the method until deleted
    try:
        step()
    finally:
        for moe in layers:
            del moe.update_router_bias
    return torch.stack(ratios).mean().item() if ratios else None


def kernel_profile(
    step, steps: int, device: torch.device
) -> tuple[list[tuple[str, float, float]], float, list[tuple[str, str, float, float]]]:
    """Runs ``step(i)`` ``steps`` times under ``torch.profiler`` -> ([(kernel, calls per step, GPU ms
    per step)], largest first; the GPU's summed kernel time per step in ms; :func:`idle_gaps` of
    the GPU's work in the profiled steps)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        _sync(device)
    rows = [
        (e.key, e.count / steps, e.self_device_time_total / steps / 1e3)
        for e in prof.key_averages()
        # GPU-side ranges of record_function annotations (the optimizer's, say) span kernels that
        # are listed themselves: left out, so that the kernel times add up to the GPU's busy time
        if e.device_type == torch.autograd.DeviceType.CUDA
        and e.self_device_time_total > 0
        and not getattr(e, "is_user_annotation", False)
    ]
    rows.sort(key=lambda r: -r[2])
    with tempfile.TemporaryDirectory() as tmp:  # the trace has each kernel's start and end
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    spans = [
        (e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in GPU_WORK_CATEGORIES
    ]
    return rows, sum(r[2] for r in rows), idle_gaps(spans, steps)


#: Chrome-trace categories of the GPU's own work (kernels, copies, fills) in torch.profiler's export.
GPU_WORK_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_gaps(spans: list[tuple[str, float, float]], steps: int) -> list[tuple[str, str, float, float]]:
    """Where the GPU is idle: ``spans`` of its work ``(name, start µs, end µs)`` in any order, over
    ``steps`` steps -> ``[(kernel before, kernel after, gaps per step, idle ms per step)]``, largest
    idle time first. A gap is a time no span covers between the first start and the last end
    (spans may overlap, on several CUDA streams); it is put down to the span that ended last before
    it and the one that starts after it."""
    totals: dict[tuple[str, str], list[float]] = {}
    last_name, last_end = None, -math.inf
    for name, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        if last_name is not None and start > last_end:
            entry = totals.setdefault((last_name, name), [0, 0.0])
            entry[0] += 1
            entry[1] += start - last_end
        if end >= last_end:
            last_name, last_end = name, end
    rows = [(before, after, count / steps, us / steps / 1e3) for (before, after), (count, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[3])


def _build(cfg: RunConfig, device: torch.device, compile_mode: str):
    """(model, AdamW) of ``cfg`` on ``device``, seeded (every build has the same weights), compiled
    block by block with ``compile_mode`` when ``train.compile``."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):  # parameters initialized on the device
        model = build_model(cfg.model)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.train.compile:
        apply_compile(model, mode=compile_mode)
    return model, optimizer


def _build_distributed(cfg: RunConfig, device: torch.device, compile_mode: str, *, fsdp: bool):
    """(model, AdamW, ParallelModel): the same model laid out by ``torchmhc.distributed`` in this one
    process, what ``torchrun --nproc-per-node 1`` runs (built block by block from the seed, each
    compiled in place): one data-parallel rank, so no FSDP. ``fsdp``: FSDP2 over the one rank all
    the same (bf16 parameters for the compute, as with several ranks), to measure what FSDP itself
    costs."""
    from torchmhc.distributed import ParallelConfig, build_mesh, init_distributed, parallelize
    from torchmhc.distributed.fsdp import data_parallel_mesh, shard_block, shard_root

    if fsdp and cfg.train.compile and compile_mode in CUDA_GRAPH_MODES:
        # FSDP's gathers between the graphs defeat their replay (gpu-dense-1b on an H100: 4106 ms a
        # step against 181 without FSDP, results/log 2026-12-06)
        raise ValueError(f"{compile_mode!r} replays CUDA graphs, which FSDP does not support: --set train.compile_mode=default")
    init_distributed(device.type)  # a one-process group without torchrun
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    mesh = build_mesh(ParallelConfig(), device.type)
    compute_dtype = torch.bfloat16 if bf16 else None
    pm = parallelize(
        cfg.model, ParallelConfig(), mesh, seed=cfg.train.seed, device=device, batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len, compute_dtype=compute_dtype, compile_mode=compile_mode if cfg.train.compile else None,
    )  # fmt: skip
    if fsdp:
        dp_mesh = data_parallel_mesh(mesh)
        for block in pm.part.blocks:
            shard_block(block, dp_mesh, param_dtype=compute_dtype, reshard_after_forward=False,
                        recompute=cfg.model.recompute)  # fmt: skip
        shard_root(pm.part, dp_mesh, param_dtype=compute_dtype)
    return pm.part, build_optimizer(pm.part, cfg.optim), pm


def run_variant(
    variant: Variant, base: RunConfig, device: torch.device, *, steps: int, warmup: int, profile_steps: int = 0
) -> Result:
    """Build, (compile,) time and measure one variant (and profile it when ``profile_steps``)."""
    cfg = variant.config(base)
    result = Result(variant.spec)

    def build(compile_mode: str):
        if variant.distributed or variant.fsdp:
            return _build_distributed(cfg, device, compile_mode, fsdp=variant.fsdp)
        return (*_build(cfg, device, compile_mode), None)

    model, optimizer, pm = build(cfg.train.compile_mode)
    result.num_params = model.num_params()
    result.flops_per_token = flops_per_token(model, cfg)
    autocast = autocast_context(device, cfg.train.dtype)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    batch = tuple(torch.randint(0, cfg.model.vocab_size, shape, device=device, generator=gen) for _ in range(2))
    kernels = contextlib.ExitStack()
    if variant.reference:
        kernels.enter_context(use_kernels("reference"))
    if variant.twopass:  # read when each compiled block's backward is traced
        kernels.enter_context(mock.patch.dict(os.environ, {TRANSITION_BACKWARD_ENV_VAR: "two_pass"}))

    def step(i: int) -> None:
        if pm is not None:  # the distributed path: its train_step autocasts itself
            from torchmhc.distributed import train_step as parallel_train_step

            parallel_train_step(pm, optimizer, batch, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                                on_nonfinite="skip", step=i)
        else:
            train_step(model, optimizer, batch, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip,
                       on_nonfinite="skip", autocast=autocast, step=i)

    times = []
    with kernels:
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            step(i)
            _sync(device)
            dt = time.perf_counter() - t0
            if i == 0:
                result.first_step_s = dt
                print(f"  {variant.spec}: first step {dt:.1f} s" + (" (compiling)" if cfg.train.compile else ""), flush=True)
            if i >= warmup:
                times.append(dt)
        result.expert_load = expert_load_balance(model, lambda: step(warmup + steps))
        if profile_steps:
            result.kernels, result.gpu_busy_ms, result.gaps = kernel_profile(step, profile_steps, device)
        if cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES:
            # CUDA graphs keep activations in a memory pool that is allocated when a graph is
            # recorded: the allocator then sees no new bytes in a forward. Memory is measured on
            # the same model (same seed, same weights) compiled without graphs.
            del model, optimizer
            torch.compiler.reset()  # also frees the CUDA graphs and their memory pool
            gc.collect()
            torch.cuda.empty_cache()
            model, optimizer, pm = build("default")
            step(0)  # compiles
        result.activation_bytes, result.peak_bytes = memory_step(model, optimizer, batch, cfg, device, autocast)
    result.ms_per_step = statistics.median(times) * 1e3
    result.ms_min = min(times) * 1e3
    result.tokens_per_s = shape[0] * shape[1] / (result.ms_per_step / 1e3)
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(nbytes: float | None) -> str:
    """GiB with 2 decimals; small amounts (CPU smoke runs) in MiB."""
    if nbytes is None:
        return "–"
    return f"{nbytes / GiB:.2f}" if abs(nbytes) >= GiB / 8 else f"{nbytes / 2**20:.1f} MiB"


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def report(args, base: RunConfig, device: torch.device, name: str, rates: dict, results: dict[str, Result]) -> str:
    """The markdown report: step times, memory, floor."""
    m, d = base.model, base.data
    elem = stream_bytes(base, device)
    lines = [
        f"# End-to-end training step, {name}",
        "",
        f"Preset `{args.preset}` ({m.arch}, {m.num_layers} blocks, dim {m.dim}, n = {m.num_streams}, "
        f"batch {d.batch_size} x {d.seq_len} tokens, dtype {base.train.dtype}, streams {8 * elem}-bit, "
        f"compile {base.train.compile_mode if base.train.compile else 'off'}); torch {torch.__version__}; "
        f"median of {args.steps} steps after {args.warmup} warm-up steps (the first compiles)."
        + (f" Measured bf16 matmul: {rates['matmul_tflops']:.0f} TFLOP/s." if rates.get("matmul_tflops") else "")
        + (f" Measured device-to-device copy: {rates['copy_tbps']:.2f} TB/s." if rates.get("copy_tbps") else ""),
    ]
    ok = {spec: r for spec, r in results.items() if not r.error}
    base_ms = ok["residual"].ms_per_step if "residual" in ok else None
    lines += _speed_table(results, base_ms, rates.get("matmul_tflops"))
    lines += _memory_tables(base, device, elem, ok)
    if rates.get("copy_tbps") and base_ms:
        lines += _floor_table(base, elem, ok, base_ms, rates["copy_tbps"])
    lines += _kernel_tables(ok, getattr(args, "profile_top", 25))
    return "\n".join(lines) + "\n"


#: Name prefixes of torchmhc's own Triton kernels (``torchmhc.kernels``); inductor names its kernels
#: ``triton_*``. A test checks that every kernel of the package matches one.
TORCHMHC_KERNEL_PREFIXES = ("_coef_", "_hc_", "_post_res_", "_pre_mix_", "_pack_fn_", "_split_bf16_", "_transition_")


def is_torchmhc_kernel(name: str) -> bool:
    return name.startswith(TORCHMHC_KERNEL_PREFIXES)


def _kernel_tables(ok: dict[str, Result], top: int) -> list[str]:
    lines = []
    for spec, r in ok.items():
        if not r.kernels:
            continue
        ours = [(calls, ms) for name, calls, ms in r.kernels if is_torchmhc_kernel(name)]
        ours_ms = sum(ms for _, ms in ours)
        lines += [
            "",
            f"#### GPU time by kernel: {spec} ({r.gpu_busy_ms:.1f} ms of kernels per step, "
            f"{r.gpu_busy_ms / r.ms_per_step:.0%} of the {r.ms_per_step:.1f} ms step)",
            "",
            f"torchmhc's kernels {ours_ms:.2f} ms ({sum(c for c, _ in ours):.0f} launches), other kernels "
            f"{r.gpu_busy_ms - ours_ms:.2f} ms, no kernel running {r.ms_per_step - r.gpu_busy_ms:.2f} ms a step.",
            "",
            "| kernel | calls/step | ms/step | share of kernel time |",
            "|---|---:|---:|---:|",
        ]
        for name, calls, ms in r.kernels[:top]:
            lines.append(f"| `{_short(name, 90)}` | {calls:.0f} | {ms:.2f} | {ms / r.gpu_busy_ms:.1%} |")
        rest = sum(ms for _, _, ms in r.kernels[top:])
        if rest:
            lines.append(f"| {len(r.kernels) - top} others | | {rest:.2f} | {rest / r.gpu_busy_ms:.1%} |")
        if r.gaps:
            idle = sum(ms for *_, ms in r.gaps)
            lines += [
                "",
                f"Idle between kernels (from the profiled steps' first kernel to their last), {idle:.2f} ms a "
                "step, by the kernels on either side:",
                "",
                "| kernel before | kernel after | gaps/step | idle ms/step |",
                "|---|---|---:|---:|",
            ]
            lines += [f"| `{_short(a, 60)}` | `{_short(b, 60)}` | {n:.0f} | {ms:.3f} |" for a, b, n, ms in r.gaps[:top]]
    return lines


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _speed_table(results: dict[str, Result], base_ms: float | None, peak_tflops: float | None) -> list[str]:
    moe = any(r.expert_load is not None for r in results.values())
    lines = [
        "",
        "| variant | ms/step | tokens/s | overhead vs residual | first step (s) | params | model TFLOP/s | MFU |"
        + (" expert load, busiest / mean |" if moe else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if moe else ""),
    ]
    for spec, r in results.items():
        if r.error:
            lines.append(f"| {spec} | {r.error} | | | | | | |" + (" |" if moe else ""))
            continue
        overhead = _pct(r.ms_per_step / base_ms - 1) if base_ms and spec != "residual" else "–"
        tflops = r.tokens_per_s * r.flops_per_token / 1e12
        mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "–"
        balance = "–" if r.expert_load is None else f"{r.expert_load:.2f}"
        load = f" {balance} |" if moe else ""
        lines.append(f"| {spec} | {r.ms_per_step:.1f} | {r.tokens_per_s:,.0f} | {overhead} | {r.first_step_s:.1f} | "
                     f"{r.num_params / 1e6:.1f} M | {tflops:.0f} | {mfu} |{load}")
    return lines


def _memory_tables(base: RunConfig, device: torch.device, elem: int, ok: dict[str, Result]) -> list[str]:
    """Measured activations vs the connection formula; recomputation's saving vs the formula's."""
    m, tokens = base.model, base.data.batch_size * base.data.seq_len

    def memory_of(variant: Variant) -> ConnectionMemory:
        return connection_memory(num_streams=m.num_streams, dim=m.dim, num_sublayers=2 * m.num_layers, elem_bytes=elem,
                                 block_length=m.recompute_block_length,
                                 fused_norms=fused_norm_sublayers(variant.config(base).model))  # fmt: skip

    cm = memory_of(Variant.parse("mhc:recompute"))
    kind = "CUDA allocator" if device.type == "cuda" else "storages alive after the forward (CPU)"
    lines = [
        "",
        f"## Memory (activations: bytes the forward leaves for the backward, {kind})",
        "",
        "| variant | activations (GiB) | peak (GiB) | minus residual's activations (GiB) | formula: connections' extra (GiB) | measured / formula |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    res_act = ok["residual"].activation_bytes if "residual" in ok else None
    fused = device.type == "cuda" or kernel_mode() == "triton"  # else "mhc" runs the reference too
    for spec, r in ok.items():
        variant = Variant.parse(spec)
        extra = r.activation_bytes - res_act if res_act is not None and variant.residual != "residual" else None
        formula = None  # the formula describes the fused kernels' autograd, not HC's or the reference's
        if variant.residual not in ("residual", "hc") and not variant.reference and fused:
            cv = memory_of(variant)
            formula = ((cv.kept_recompute if variant.recompute else cv.kept) - cv.residual) * tokens
        ratio = f"{extra / formula:.2f}" if extra is not None and formula else "–"
        lines.append(f"| {spec} | {_gib(r.activation_bytes)} | {_gib(r.peak_bytes)} | {_gib(extra)} | "
                     f"{_gib(formula)} | {ratio} |")
    pairs = [(s, s.replace(":recompute", "")) for s in ok if ":recompute" in s and s.replace(":recompute", "") in ok]
    if not pairs:
        return lines
    lines += [
        "",
        f"Recomputation ({cm.num_blocks} blocks): measured saving (without minus with `:recompute`) vs the "
        "formula's (the streams x_l except at block starts, every layer input H_pre·x_l).",
        "",
        "| variant | saving: activations (GiB) | saving: peak (GiB) | formula (GiB) | measured / formula |",
        "|---|---:|---:|---:|---:|",
    ]
    for with_rc, without in pairs:
        a, b = ok[without], ok[with_rc]
        # the formula is mHC's; a plain residual or HC run shows its measured saving only
        formula = None
        if Variant.parse(with_rc).residual not in ("residual", "hc"):
            formula = (memory_of(Variant.parse(without)).kept - memory_of(Variant.parse(with_rc)).kept_recompute) * tokens
        saving = a.activation_bytes - b.activation_bytes
        peak = a.peak_bytes - b.peak_bytes if a.peak_bytes is not None and b.peak_bytes is not None else None
        ratio = f"{saving / formula:.2f}" if formula else "–"
        lines.append(f"| {with_rc} | {_gib(saving)} | {_gib(peak)} | {_gib(formula)} | {ratio} |")
        if formula and saving < formula / 2:
            lines.append(f"\n**{with_rc} freed less than half of what it drops from autograd: something still "
                         "references the dropped streams (see tests/test_e2e_bench.py).**\n")
    return lines


def _floor_table(base: RunConfig, elem: int, ok: dict[str, Result], base_ms: float, copy: float) -> list[str]:
    """Memory traffic of the mHC operations (at the measured copy rate) vs the measured overhead."""
    lines = [
        "",
        "## Floor: the overhead that the mHC operations' memory traffic explains",
        "",
        "Bytes per step = per sub-layer and token (torchmhc bench counts: forward (4n+2)·C, chained "
        "backward (7n+4)·C stream elements, plus fp32 coefficients; a fused transition saves 2nC forward (the "
        "next coefficients and pre-mix read x_{l+1} in the kernel that writes it) and, with its backward in "
        "one pass (n <= 4; not `:twopass`), 3nC backward less fp32 partial sums; the models fuse all "
        "2L - 1; with recomputation the forward once more; the branch RMSNorm 5C where it runs on its own "
        "(`:branchnorm`, the first sub-layer), nothing inside a fused transition) "
        "× sub-layers × tokens, net of what they replace (the residual adds, and the residual model's "
        "norms fused with them, 5C); divided by the measured copy rate.",
        "",
        "| variant | GB moved per step | floor (ms) | floor / residual step | measured overhead | share explained |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for spec, r in ok.items():
        variant = Variant.parse(spec)
        if variant.residual in ("residual", "hc"):
            continue
        floor = mhc_floor(variant.config(base), copy_tbps=copy, elem_bytes=elem, one_pass=not variant.twopass)
        overhead_ms = r.ms_per_step - base_ms
        share = f"{100 * floor.ms / overhead_ms:.0f}%" if overhead_ms > 0 else "–"
        lines.append(f"| {spec} | {floor.net_bytes_per_step / 1e9:.1f} | {floor.ms:.1f} | {_pct(floor.ms / base_ms)} | "
                     f"{_pct(overhead_ms / base_ms)} | {share} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu-small")
    parser.add_argument("--variants", default="residual,hc,mhc", help="comma-separated NAME[:recompute][:reference]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="profile K more steps: GPU time by kernel")
    parser.add_argument("--profile-top", type=int, default=25, help="kernels listed per variant with --profile")
    args = parser.parse_args()
    if args.profile < 0:
        parser.error("--profile must be >= 0")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step compiles and is never timed)")
    variants = [Variant.parse(s) for s in args.variants.split(",")]

    base = load_config(args.preset, [f"train.device={args.device}", *args.overrides])
    device = resolve_device(base.train.device)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"e2e: preset {args.preset} on {name}, variants {[v.spec for v in variants]}", flush=True)
    rates = {}
    if device.type == "cuda":
        rates = {"matmul_tflops": matmul_tflops(device), "copy_tbps": copy_tbps(device)}
        print(f"  bf16 matmul {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_tbps']:.2f} TB/s", flush=True)
    results: dict[str, Result] = {}
    for variant in variants:
        t0 = time.perf_counter()
        try:
            results[variant.spec] = run_variant(
                variant, base, device, steps=args.steps, warmup=args.warmup, profile_steps=args.profile
            )
        except torch.cuda.OutOfMemoryError as exc:
            results[variant.spec] = Result(variant.spec, error="out of memory")
            print(f"  {variant.spec}: OUT OF MEMORY: {str(exc).splitlines()[0]}", flush=True)
        except Exception as exc:  # report it loudly, keep the other variants' results
            results[variant.spec] = Result(variant.spec, error=f"failed: {type(exc).__name__}")
            print(f"  {variant.spec}: FAILED\n{traceback.format_exc()}", flush=True)
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        scalars = {k: v for k, v in vars(results[variant.spec]).items() if k not in ("kernels", "gaps")}  # in the tables
        print(f"  {variant.spec} ({time.perf_counter() - t0:.0f} s): {json.dumps(scalars)}", flush=True)
        table = report(args, base, device, name, rates, results)
        if args.out:
            Path(args.out).write_text(table)
    print(table, flush=True)
    if torch.distributed.is_initialized():  # made by a :distributed or :fsdp variant
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
