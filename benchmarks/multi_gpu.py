"""The distributed path on several GPUs: correctness, data-parallel scaling, pipelines, the model.

    python benchmarks/multi_gpu.py --rows rows.jsonl --out multi_gpu.md --time-budget 540   # all sections
    python benchmarks/multi_gpu.py --only correctness,pipeline --gpus 2 4 --rows rows.jsonl --out multi_gpu.md
    python benchmarks/multi_gpu.py --device cpu --gpus 2 --rows rows.jsonl --out smoke.md   # gloo smoke run

One entry point; it launches ``torchrun`` itself (``python -m torch.distributed.run``, a free
port) once per section and world size, on the GPUs present (``--gpus``: 2 4 8, those that
``torch.cuda.device_count()`` allows; world size 1 is always added where a section compares
against one GPU). NCCL on GPUs, gloo with ``--device cpu`` (then ``--gpus`` counts processes and
every size is the tiny one). Sections (``--only``, default all), in this order:

- ``correctness``: ``torchmhc.distributed.runner``'s cases (``run_case``) in bf16, eager, on a
  4-block model of the ``email`` package of the standard library (byte-level): FSDP2, HSDP, pp = 2
  with every schedule, pp × dp, DualPipeV with its overlap and without, MoE; a DCP checkpoint
  saved at the largest world size after 2 of 4 steps and resumed at each smaller one (1 included).
  Each step's loss and gradient norm is compared with the one-GPU run (world size 1: the model as
  on one device, no FSDP). Tolerance (:data:`LOSS_RTOL`, :data:`GRAD_RTOL`): a bf16 value carries
  8 significant bits (relative spacing 2^-8 = 0.4%); the layouts round different tensors to bf16
  (FSDP computes with bf16 copies of every block weight, norms included, where autocast keeps
  them fp32; pipeline edges carry bf16 streams) and reduce in another order, so each step's
  numbers move by a few such roundings, amplified by AdamW over the 4 steps; a wrong reduction or
  a lost microbatch moves the loss by tens of percent. The same run in fp32 is reported beside
  it as the scale of what bf16 itself changes.
- ``scaling``: weak scaling of ``gpu-dense-1b`` and ``gpu-moe-3b``, residual and mHC: the preset's
  batch on every GPU, FSDP2 over N GPUs (N = 1: one GPU, no FSDP), blocks compiled in the default
  mode (CUDA graphs are refused with FSDP); tokens/s per GPU, efficiency against one GPU, and
  mHC's overhead over the residual model at each N.
- ``pipeline``: ``gpu-moe-3b`` cut into stages, pp = 2 and 4 (and pp × dp on the largest world),
  residual and mHC (n = 4), 1F1B and DualPipeV (with its overlap function), one sequence of 4096
  tokens per microbatch, :data:`MICROBATCHES` a step: step time, and the schedule's time alone
  (forward and backward of every microbatch, without the optimizer part); the bytes each stage edge carries
  (computed from the shapes: microbatch × T × n·C bf16 values, n = 1 for the residual model);
  a point-to-point send of exactly those tensors between two ranks, timed; and one profiled step
  per case (``torch.profiler``, CUDA kernels): per rank the idle share of the step (the bubble:
  no compute kernel running), the time of NCCL kernels and how much of it ran under compute
  kernels, and how much compute ran on two streams at once (DualPipeV's overlap); the busiest
  kernels of each stream. mHC cases write their rank-0 trace (``traces/*.json.gz``, for
  Perfetto or chrome://tracing) next to ``--out``.
- ``model``: ``benchmarks/pipeline_model.py``'s prediction for every pure-pipeline case measured,
  from per-block times that ``benchmarks/block_times.py --compile`` measures for the same shape
  on one GPU and the link speed the pipeline section measured: predicted against the measured
  schedule time (what the model simulates), idle share and mHC cost, with the error.

Every finished measurement is appended at once to ``--rows`` (JSON lines), so a run cut short
loses nothing; a re-run skips what the file holds. ``--time-budget S`` starts a launch only if it
is expected to fit the time left (from the durations of earlier ones, or :data:`ESTIMATE_S`),
and a launch starts a case only if it fits (the longest case so far); what is skipped is said.
``--out`` gets the markdown report (device, GPU count, torch and NCCL versions, commands, medians)
from all rows, rewritten after every launch.

Expected on 8 H100s (estimates: not yet run on several GPUs; a case's time is mostly building
the model on every rank and compiling its blocks): correctness ~3 min (4 launches of small
cases); scaling ~12-16 min (16 cases of ~45-60 s: one GPU and the largest world first);
pipeline ~10 min for pp = 2 and 4 alone (8 cases) and ~6 more for pp × dp (8 cases); model
~1 min. That is three calls of 10 minutes with ``--time-budget 540`` (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SECTIONS = ("correctness", "scaling", "pipeline", "model")
#: Relative tolerances of the correctness section against the one-GPU run (module docstring).
LOSS_RTOL, GRAD_RTOL = 2e-2, 5e-2
#: Correctness: optimizer steps per case, and the step after which the checkpoint is written.
CORRECTNESS_STEPS, SAVE_AT = 4, 2
#: Pipeline: microbatches (one sequence each) per step and data-parallel rank.
MICROBATCHES = 8
#: Timed steps after the warm-up steps (the first compiles).
WARMUP, STEPS = {"cuda": 2, "cpu": 1}, {"cuda": 5, "cpu": 2}
#: Seconds a launch is expected to take before any measurement of it (starting the processes,
#: NCCL) and a case of each section; measured durations replace the cases' (``case_s`` rows).
ESTIMATE_S = {
    "cuda": {"launch": 40, "correctness": 8, "scaling": 60, "pipeline": 45, "model": 60},
    "cpu": {"launch": 10, "correctness": 3, "scaling": 5, "pipeline": 5, "model": 10},
}
_HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# What each section runs
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One ``torchrun`` of ``world`` processes running ``cases`` of ``section`` in turn."""

    section: str
    world: int
    cases: list[dict] = field(default_factory=list)


def _email_corpus() -> str:
    import email

    return str(Path(email.__file__).parent)


def correctness_overrides(device: str, work: Path, *extra: str) -> list[str]:
    """A 4-block byte-level model (two stages a rank for the V schedules at pp = 2), batch 16."""
    dtype = "bf16" if device == "cuda" else "fp32"
    return [
        f"data.path='{_email_corpus()}'", "data.glob='*.py'", f"data.cache_dir='{work / 'cache'}'",
        "data.seq_len=64", "data.batch_size=16", "model.dim=128", "model.num_layers=4", "model.num_heads=2",
        "model.max_seq_len=64", "model.tie_embeddings=false", "optim.warmup_steps=1", "optim.lr=1e-3",
        f"train.steps={CORRECTNESS_STEPS}", f"train.dtype={dtype}", "train.compile=false", *extra,
    ]  # fmt: skip


MOE = ("model.arch=moe", "model.num_experts=4", "model.top_k=2")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")


def correctness_plan(worlds: list[int], device: str, work: Path) -> list[Launch]:
    """Largest world first (it writes the checkpoint the smaller ones resume), one GPU last."""
    top = max(worlds)
    ckpt = str(work / "correctness" / f"ckpt-w{top}")

    def case(world: int, name: str, parallel: dict, *extra: str, **more) -> dict:
        return {"key": f"w{world}/{name}", "name": name, "world": world, "parallel": parallel,
                "overrides": correctness_overrides(device, work, *extra), "steps": CORRECTNESS_STEPS,
                "out_dir": str(work / "correctness" / f"w{world}"), **more}  # fmt: skip

    launches = []
    for w in sorted({*worlds, 1}, reverse=True):
        cases = []
        if w == 1:
            cases += [case(1, "one-gpu", {}), case(1, "one-gpu-fp32", {}, "train.dtype=fp32"), case(1, "one-gpu-moe", {}, *MOE)]
        else:
            cases += [case(w, f"fsdp{w}", {"dp_shard": w}), case(w, f"fsdp{w}-moe", {"dp_shard": w}, *MOE)]
        if w >= 4:
            h = w // 2
            cases += [
                case(w, f"hsdp2x{h}", {"dp_replicate": 2, "dp_shard": h}),
                case(w, f"pp2dp{h}-1f1b", {"pp": 2, "dp_shard": h, "microbatches": 2}),
                case(w, f"pp2dp{h}-dualpipev", {"pp": 2, "dp_shard": h, "pp_schedule": "dualpipev", "microbatches": 4}),
                case(w, "pp4-1f1b" if w == 4 else f"pp4dp{w // 4}-1f1b", {"pp": 4, "dp_shard": w // 4, "microbatches": 4}),
            ]
        if w == 2:
            cases += [case(2, f"pp2-{s}", {"pp": 2, "pp_schedule": s, "microbatches": 4}) for s in SCHEDULES]
            v = {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}
            cases += [case(2, "pp2-dualpipev-sequential", v, overlap=False), case(2, "pp2-dualpipev-moe", v, *MOE)]
        if w == top and w > 1:  # trains all steps, checkpointed half way
            layout = {"pp": 2, "dp_shard": w // 2, "microbatches": 2} if w >= 4 else {"dp_shard": w}
            cases.append(case(w, "save", layout, *MOE, save_at=SAVE_AT, checkpoint_dir=ckpt))
        elif w < top:
            cases.append(case(w, f"resume-dp{w}", {"dp_shard": w}, *MOE, resume_from=ckpt))
            if w == 2:
                cases.append(case(2, "resume-pp2-dualpipev", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4},
                                  *MOE, resume_from=ckpt))  # fmt: skip
        launches.append(Launch("correctness", w, cases))
    return launches


def scaling_overrides(device: str, preset: str, world: int) -> tuple[str, list[str]]:
    """(preset, overrides): the preset's batch on every GPU, default compile; tiny on the CPU."""
    if device == "cpu":
        per_gpu = 2
        extra = ["model.dim=64", "model.num_layers=2", "model.num_heads=2", "data.seq_len=32", "model.max_seq_len=32",
                 "model.vocab_size=256", "train.compile=false", "train.device=cpu", "train.dtype=fp32"]  # fmt: skip
        if preset == "gpu-moe-3b":
            extra += ["model.num_experts=4", "model.top_k=2", "model.expert_hidden=64"]
    else:
        from torchmhc.config import load_config

        per_gpu = load_config(preset).data.batch_size
        extra = ["train.compile_mode=default"]
    return preset, [*extra, f"data.batch_size={per_gpu * world}"]


def scaling_plan(worlds: list[int], device: str) -> list[Launch]:
    """One GPU and the largest world first (the widest view if the budget ends), then the others."""
    launches = []
    for w in sorted({1, *worlds}, key=lambda w: (w != 1, w != max(worlds), w)):
        cases = []
        for preset in ("gpu-dense-1b", "gpu-moe-3b"):
            name, overrides = scaling_overrides(device, preset, w)
            for variant in ("residual", "mhc"):
                cases.append({"key": f"{preset}/{variant}/w{w}", "preset": name, "variant": variant, "world": w,
                              "overrides": [*overrides, f"model.residual={variant}"], "parallel": {"dp_shard": w}})  # fmt: skip
        launches.append(Launch("scaling", w, cases))
    return launches


def pipeline_overrides(device: str) -> list[str]:
    """gpu-moe-3b, one sequence a microbatch; on the CPU shrunk to 8 small blocks (pp = 4 in a V: 8 stages)."""
    if device == "cpu":
        return ["model.dim=64", "model.num_layers=8", "model.num_heads=2", "data.seq_len=32", "model.max_seq_len=32",
                "model.vocab_size=256", "model.num_experts=4", "model.top_k=2", "model.num_shared_experts=1",
                "model.expert_hidden=64", "train.compile=false", "train.device=cpu", "train.dtype=fp32"]  # fmt: skip
    return ["train.compile_mode=default"]


def pipeline_layouts(worlds: list[int]) -> list[tuple[int, int]]:
    """(pp, dp): pp = 2 and 4 alone, then with the largest world's data parallelism."""
    top = max(worlds)
    layouts = [(pp, 1) for pp in (2, 4) if pp in worlds]
    layouts += [(pp, top // pp) for pp in (2, 4) if top // pp > 1 and top % pp == 0]
    return layouts


def pipeline_plan(worlds: list[int], device: str) -> list[Launch]:
    launches = []
    for pp, dp in pipeline_layouts(worlds):
        cases = []
        for schedule in ("1f1b", "dualpipev"):
            for variant in ("residual", "mhc"):
                overrides = [*pipeline_overrides(device), f"data.batch_size={MICROBATCHES * dp}", f"model.residual={variant}"]
                cases.append({"key": f"pp{pp}dp{dp}/{variant}/{schedule}", "pp": pp, "dp": dp, "variant": variant,
                              "schedule": schedule, "world": pp * dp, "preset": "gpu-moe-3b", "overrides": overrides,
                              "parallel": {"pp": pp, "dp_shard": dp, "pp_schedule": schedule, "microbatches": MICROBATCHES},
                              "trace": variant == "mhc" and dp == 1})  # fmt: skip
        launches.append(Launch("pipeline", pp * dp, cases))
    return launches


# ----------------------------------------------------------------------------------------------
# The worker: runs one launch's cases under torchrun
# ----------------------------------------------------------------------------------------------


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _environment(device: torch.device) -> dict:
    import torch.distributed as dist

    env = {"torch": torch.__version__, "world": dist.get_world_size(), "backend": dist.get_backend()}
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        env.update(device=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))  # fmt: skip
    else:
        env.update(device="cpu", gpus=0)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(cfg, pm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's rows of a random batch (fixed per rank)."""
    rows = cfg.data.batch_size // pm.layout.dp_size
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed + pm.layout.dp_rank)
    shape = (rows, cfg.data.seq_len)
    return tuple(torch.randint(0, cfg.model.vocab_size, shape, device=device, generator=gen) for _ in range(2))


def _seconds(call, device: torch.device, times: int) -> list[float]:
    """Wall seconds of each of ``times`` calls of ``call()``, the device synchronized around each."""
    out = []
    for i in range(times):
        _sync(device)
        t0 = time.perf_counter()
        call(i)
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _timed_steps(pm, optimizer, batch, cfg, device: torch.device, *, warmup: int, steps: int) -> dict:
    """Training steps on ``batch``: the first one's seconds (compiling) and the median of ``steps``
    after ``warmup`` (each step ends in a collective, so every rank times the same step)."""
    from torchmhc.distributed import train_step

    def step(i: int) -> None:
        train_step(pm, optimizer, batch, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip, on_nonfinite="skip", step=i)

    times = _seconds(step, device, warmup + steps)
    timed = times[warmup:]
    return {"first_step_s": times[0], "ms_per_step": statistics.median(timed) * 1e3, "ms_min": min(timed) * 1e3}


def _timed_schedule(pm, optimizer, batch, device: torch.device, *, steps: int) -> float:
    """Median ms of the forward and backward of every microbatch alone, the slowest rank's: the part of a
    training step that ``pipeline_model.py`` simulates (a step adds the replicated gradients' average,
    the global norm, clipping and the optimizer step)."""
    import torch.distributed as dist

    from torchmhc.distributed.step import forward_backward

    x, y = (t.to(pm.device) for t in batch)

    def schedule(_: int) -> None:
        forward_backward(pm, x, y)
        optimizer.zero_grad(set_to_none=True)  # each call starts from no gradients, as a step does

    median = torch.tensor([statistics.median(_seconds(schedule, device, steps)) * 1e3], dtype=torch.float64, device=pm.device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def _free(device: torch.device) -> None:
    gc.collect()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _run_correctness(case: dict, out: Path, device: torch.device) -> dict:
    from torchmhc.config import load_config
    from torchmhc.data import load_data
    from torchmhc.distributed.runner import run_case

    if case.get("save_at"):
        shutil.rmtree(case["checkpoint_dir"], ignore_errors=True)
    # every case reads the same corpus, prepared by the driver before the launch
    data = load_data(load_config(None, case["overrides"]).data, progress=False)
    run_case(case, Path(case["out_dir"]), data=data, device_type=device.type)
    metrics = json.loads((Path(case["out_dir"]) / case["name"] / "metrics.json").read_text())
    return {"train": metrics["train"], "val_loss": metrics["val_loss"]}


def _run_training(case: dict, device: torch.device) -> tuple[dict, Any, Any, Any, Any]:
    from torchmhc.config import load_config
    from torchmhc.distributed.config import ParallelConfig
    from torchmhc.distributed.job import build

    cfg = load_config(case["preset"], case["overrides"])
    pm, optimizer = build(cfg, ParallelConfig(**case["parallel"]), device_type=device.type)
    batch = _random_batch(cfg, pm, device)
    result = _timed_steps(pm, optimizer, batch, cfg, device, warmup=WARMUP[device.type], steps=STEPS[device.type])
    result["tokens_per_s_per_gpu"] = cfg.data.batch_size * cfg.data.seq_len / (result["ms_per_step"] / 1e3) / case["world"]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result, cfg, pm, optimizer, batch


def _run_scaling(case: dict, out: Path, device: torch.device) -> dict:
    result, *_ = _run_training(case, device)
    return result


def _run_pipeline(case: dict, out: Path, device: torch.device) -> dict:
    import torch.distributed as dist

    result, cfg, pm, optimizer, batch = _run_training(case, device)
    result["ms_schedule"] = _timed_schedule(pm, optimizer, batch, device, steps=STEPS[device.type])
    trace = out / "traces" / f"{case['key'].replace('/', '-')}-rank0.json.gz" if case["trace"] and dist.get_rank() == 0 else None
    summary = profile_step(pm, optimizer, batch, cfg, device, trace=trace)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": dist.get_rank(), "pp_rank": pm.layout.pp_rank, **summary})
    n, c, t = cfg.model.effective_num_streams, cfg.model.dim, cfg.data.seq_len
    elem = 2 if pm.compute_dtype == torch.bfloat16 else 4
    result.update(ranks=everyone, edge_bytes=(cfg.data.batch_size // case["dp"] // MICROBATCHES) * t * n * c * elem,
                  num_streams=n, trace=str(trace.relative_to(out)) if trace else None)  # fmt: skip
    return result


def p2p_time(device: torch.device, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, repeats: int = 10) -> dict:
    """Rank 0 sends a tensor of each shape to rank 1 ``repeats`` times: the median seconds of
    one send, from after a barrier to the received tensor (both ranks synchronized)."""
    import torch.distributed as dist

    out = {}
    rank = dist.get_rank()
    for name, shape in shapes.items():
        x = torch.ones(shape, device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 2):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
            elif rank == 1:
                dist.recv(x, 0)
            _sync(device)
            times.append(time.perf_counter() - t0)
        # rank 1's view: from leaving the barrier to the data in its buffer
        medians: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(medians, statistics.median(times[2:]))
        out[name] = {"bytes": x.numel() * x.element_size(), "seconds": medians[1]}
    return out


# ----------------------------------------------------------------------------------------------
# Profiles: the summary of one step's trace
# ----------------------------------------------------------------------------------------------

_COMM = ("nccl", "gloo", "sendrecv", "c10d::")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_trace(events: list[dict], *, top: int = 3) -> dict:
    """What one profiled step's kernels did, from a Chrome trace's events (``torch.profiler``'s
    ``export_chrome_trace``): complete events (``ph`` "X") of category "kernel" (GPU kernels; on the
    CPU, where there are none, the "cpu_op" events stand in), grouped by stream (``args.stream``,
    else the thread). Communication kernels are those whose name has nccl, gloo, SendRecv or c10d:: in it.

    Returns (times in ms): ``window`` (first kernel start to last kernel end), ``busy`` (some compute
    kernel running), ``idle`` (1 - busy / window: the bubble, and any other wait), ``comm`` (some
    communication kernel running), ``comm_under_compute`` (of it, while compute ran too),
    ``concurrent_compute`` (compute kernel time beyond ``busy``: what ran beside other compute, on
    another stream), ``streams``: per stream its kernel time and ``top`` kernels by time.
    """
    kind = "kernel" if any(e.get("cat") == "kernel" for e in events) else "cpu_op"
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == kind and e.get("dur", 0) > 0]
    if not kernels:
        return {"window": 0.0, "busy": 0.0, "idle": 0.0, "comm": 0.0, "comm_under_compute": 0.0,
                "concurrent_compute": 0.0, "streams": {}}  # fmt: skip
    compute, comm, streams = [], [], {}
    for e in kernels:
        span = (e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3)
        is_comm = any(word in e["name"].lower() for word in _COMM)
        (comm if is_comm else compute).append(span)
        stream = streams.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))), {"ms": 0.0, "kernels": {}})
        stream["ms"] += e["dur"] / 1e3
        stream["kernels"][e["name"]] = stream["kernels"].get(e["name"], 0.0) + e["dur"] / 1e3
    window = max(b for _, b in compute + comm) - min(a for a, _ in compute + comm)
    busy, comm_u = _union(compute), _union(comm)
    for stream in streams.values():
        ranked = sorted(stream["kernels"].items(), key=lambda kv: -kv[1])
        stream["kernels"] = [[name, ms] for name, ms in ranked[:top]]
    return {
        "window": window,
        "busy": _length(busy),
        "idle": 1 - _length(busy) / window if window else 0.0,
        "comm": _length(comm_u),
        "comm_under_compute": _intersection(comm_u, busy),
        "concurrent_compute": sum(b - a for a, b in compute) - _length(busy),
        "streams": streams,
    }


def profile_step(pm, optimizer, batch, cfg, device: torch.device, *, trace: Path | None) -> dict:
    """One more training step under ``torch.profiler``: :func:`summarize_trace` of its kernels,
    and its trace gzipped to ``trace`` if given."""
    from torch.profiler import ProfilerActivity, profile

    from torchmhc.distributed import train_step

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    _sync(device)
    with profile(activities=[activity]) as prof:
        train_step(pm, optimizer, batch, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip, on_nonfinite="skip", step=0)
        _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        text = path.read_text()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_bytes(gzip.compress(text.encode()))
    events = json.loads(text)
    return summarize_trace(events["traceEvents"] if isinstance(events, dict) else events)


_RUNNERS = {"correctness": _run_correctness, "scaling": _run_scaling, "pipeline": _run_pipeline}


def worker(section: str, cases_path: Path, rows_path: Path, out: Path, deadline: float, device_type: str) -> None:
    """One launch (under torchrun): every case of ``cases_path`` that fits before ``deadline``
    (epoch seconds); rank 0 appends a row per finished case to ``rows_path``."""
    import torch.distributed as dist

    from torchmhc.distributed.mesh import init_distributed

    device = init_distributed(device_type)
    cases = json.loads(cases_path.read_text())
    rank = dist.get_rank()
    env = _environment(device)
    if section == "pipeline" and dist.get_world_size() >= 2:
        # one microbatch's stage edge for the residual model (n = 1) and mHC (n = 4), bf16
        from torchmhc.config import load_config

        cfg = load_config(cases[0]["preset"], cases[0]["overrides"])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shapes = {f"n{n}": (cfg.data.seq_len, n, cfg.model.dim) for n in (1, 4)}
        timing = p2p_time(device, shapes, dtype)
        if rank == 0:
            _append(rows_path, {"section": "pipeline", "key": f"p2p/w{dist.get_world_size()}", "kind": "p2p",
                                "env": env, "edges": timing})  # fmt: skip
    longest = 0.0
    for case in cases:
        # rank 0 decides for all: a case every rank starts, or none
        decision = [time.time() + max(longest, case["estimate_s"]) <= deadline]
        dist.broadcast_object_list(decision, src=0)
        if not decision[0]:
            if rank == 0:
                print(f"[multi_gpu] {section}: {case['key']} skipped: it would end after the time budget", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            result = _RUNNERS[section](case, out, device)
        except Exception as exc:
            # The other ranks may wait in a collective for this one: leave the launch (torchrun
            # stops them), with a row that marks the case as failed, so that the driver's next
            # launch goes on with the cases after it.
            message = f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _append(rows_path, {"section": section, "key": case["key"], "env": env, "error": message[:500]})
            raise
        seconds = time.perf_counter() - t0
        longest = max(longest, seconds)
        if rank == 0:
            row = {"section": section, "key": case["key"], "case": {k: v for k, v in case.items() if k != "estimate_s"},
                   "env": env, "case_s": seconds, **result}  # fmt: skip
            _append(rows_path, row)
            print(f"[multi_gpu] {section}: {case['key']} done in {seconds:.0f} s", flush=True)
        _free(device)
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` (a line cut off by a kill is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _estimate(section: str, rows: list[dict], device: str, key_prefix: str = "") -> float:
    """A case's expected seconds: the longest like it so far, else the default."""
    seen = [r["case_s"] for r in rows if r.get("section") == section and "case_s" in r and r["key"].startswith(key_prefix)]
    return max(seen) if seen else ESTIMATE_S[device][section]


def _torchrun(world: int, args: list[str], *, device: str, timeout: float) -> int:
    from torchmhc.distributed.mesh import free_port

    src = str(_HERE.parent / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    if device == "cuda":
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (the lent machines require it)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(Path(__file__).resolve()), *args,
    ]  # fmt: skip
    # its own process group, so that a launch past the budget is stopped with all its workers
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[multi_gpu] a {world}-process launch ran past the time budget and was stopped", flush=True)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return -1


@dataclass
class Driver:
    device: str
    worlds: list[int]
    rows_path: Path
    out: Path | None
    work: Path
    deadline: float
    command: str

    def run_launch(self, launch: Launch, *, redo: frozenset[str] = frozenset()) -> None:
        """Run the cases of ``launch`` that ``rows`` lacks (and those in ``redo``), if they fit."""
        rows = read_rows(self.rows_path)
        done = {r["key"] for r in rows if r.get("section") == launch.section} - redo
        todo = [dict(c) for c in launch.cases if c["key"] not in done]
        if not todo:
            print(f"[multi_gpu] {launch.section} at {launch.world}: done before", flush=True)
            return
        for c in todo:
            prefix = c["key"].split("/")[0] if launch.section != "scaling" else c["key"].rsplit("/", 1)[0]
            c["estimate_s"] = _estimate(launch.section, rows, self.device, "" if launch.section == "correctness" else prefix)
        need = ESTIMATE_S[self.device]["launch"] + min(c["estimate_s"] for c in todo)
        left = self.deadline - time.time()
        if need > left:
            print(f"[multi_gpu] {launch.section} at {launch.world} skipped: needs ~{need:.0f} s, {left:.0f} s left "
                  f"({len(todo)} cases not run)", flush=True)  # fmt: skip
            return
        cases_path = self.work / f"{launch.section}-w{launch.world}.json"
        cases_path.parent.mkdir(parents=True, exist_ok=True)
        cases_path.write_text(json.dumps(todo))
        results = self.out.parent if self.out else self.work
        args = ["--worker", launch.section, "--cases", str(cases_path), "--rows", str(self.rows_path),
                "--results", str(results), "--deadline", str(self.deadline), "--device", self.device]  # fmt: skip
        print(f"[multi_gpu] {launch.section} at {launch.world}: {len(todo)} cases, {left:.0f} s left", flush=True)
        code = _torchrun(launch.world, args, device=self.device, timeout=max(left, 1.0) + 30)
        if code != 0:
            print(f"[multi_gpu] {launch.section} at {launch.world}: torchrun exited with {code}", flush=True)
            new = read_rows(self.rows_path)[len(rows):]
            if code > 0 and new:
                # a case failed (its row says so) after others finished: go on with the rest
                self.run_launch(launch, redo=redo - {r["key"] for r in new})

    def run_correctness(self) -> None:
        launches = correctness_plan(self.worlds, self.device, self.work)
        cases = [c for launch in launches for c in launch.cases]
        done = {r["key"] for r in read_rows(self.rows_path) if r.get("section") == "correctness"}
        # A resume needs the checkpoint on this machine: if an earlier call wrote it (and the machine
        # is another one now), the save case runs again.
        pending = [c for c in cases if c.get("resume_from") and c["key"] not in done]
        redo = frozenset(c["key"] for c in cases if c.get("save_at") and pending
                         and not (Path(c["checkpoint_dir"]) / "checkpoints" / "latest").exists())  # fmt: skip
        from torchmhc.config import load_config
        from torchmhc.data import load_data

        load_data(load_config(None, cases[0]["overrides"]).data, progress=False)  # tokenized once, here
        for launch in launches:
            self.run_launch(launch, redo=redo)
            self.write_report()

    def run_model(self) -> None:
        """Predictions of ``pipeline_model.py`` for the pure-pipeline cases measured so far."""
        import pipeline_model

        rows = read_rows(self.rows_path)
        measured = {k: r for k, r in _by_key(rows, "pipeline").items() if "case" in r and r["case"]["dp"] == 1}
        if not measured:
            print("[multi_gpu] model skipped: no pipeline measurements (run the pipeline section first)", flush=True)
            return
        times = next((r["times"] for r in rows if r.get("section") == "model" and r.get("kind") == "block_times"), None)
        if times is None:
            need = ESTIMATE_S[self.device]["model"]
            if self.deadline - time.time() < need:
                print(f"[multi_gpu] model skipped: measuring the block times needs ~{need} s", flush=True)
                return
            times = self._block_times()
            _append(self.rows_path, {"section": "model", "key": "block_times", "kind": "block_times", "times": times})
        shape = times["shapes"]["gpu-moe-3b"]
        p2p = next((r["edges"] for r in rows if r.get("kind") == "p2p"), None)
        link = pipeline_model.LINKS["NVLink (H100)"] if p2p is None else _link(p2p)
        predicted_before = {r["key"] for r in rows if r.get("section") == "model"}
        for key, r in measured.items():
            if f"model/{key}" in predicted_before:
                continue
            c = r["case"]
            name = "1F1B" if c["schedule"] == "1f1b" else "DualPipeV + overlap"
            predicted = {v: pipeline_model.run(shape, v, name, c["pp"], MICROBATCHES, link) for v in ("residual", "mhc")}
            other = measured.get(f"pp{c['pp']}dp1/residual/{c['schedule']}")
            row = {
                "section": "model", "key": f"model/{key}", "kind": "prediction", "pp": c["pp"],
                "variant": c["variant"], "schedule": c["schedule"], "link_gbps": link[0], "link_latency_us": link[1],
                "predicted_ms": predicted[c["variant"]]["step_ms"], "measured_ms": r["ms_schedule"],
                "rel_error": predicted[c["variant"]]["step_ms"] / r["ms_schedule"] - 1,
                "predicted_idle": predicted[c["variant"]]["idle"],
                "measured_idle": statistics.mean(x["idle"] for x in r["ranks"]),
                "predicted_cost": predicted["mhc"]["step_ms"] / predicted["residual"]["step_ms"] - 1
                if c["variant"] == "mhc" else None,
                "measured_cost": r["ms_schedule"] / other["ms_schedule"] - 1 if c["variant"] == "mhc" and other else None,
            }  # fmt: skip
            _append(self.rows_path, row)

    def _block_times(self) -> dict:
        """``block_times.py`` on one GPU (or the CPU) for the pipeline section's shape."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "times.json"
            args = [sys.executable, str(_HERE / "block_times.py"), "--shape", "gpu-moe-3b", "--out", str(path)]
            for item in pipeline_overrides(self.device):
                args += ["--set", item]
            if self.device == "cuda":
                args += ["--compile", "--tokens", "4096"]
            else:
                args += ["--device", "cpu", "--tokens", "32", "--warmup", "1", "--repeats", "3"]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p))
            if self.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
            return json.loads(path.read_text())

    def write_report(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(report(read_rows(self.rows_path), self.command))


def _link(edges: dict) -> tuple[float, float]:
    """(GB/s, latency µs) through the two measured sends (residual and mHC edge): time = bytes /
    rate + latency."""
    (b1, t1), (b4, t4) = ((edges[k]["bytes"], edges[k]["seconds"]) for k in ("n1", "n4"))
    rate = (b4 - b1) / (t4 - t1) if t4 > t1 else b4 / t4
    return rate / 1e9, max(0.0, t1 - b1 / rate) * 1e6


def correctness_results(rows: list[dict]) -> list[dict]:
    """Each correctness case against the one-GPU run of its model: the largest relative difference
    in loss and gradient norm over the steps it ran, and whether both are within tolerance."""
    cases = {r["key"]: r for r in rows if r.get("section") == "correctness" and "train" in r}
    references = {"dense": cases.get("w1/one-gpu"), "moe": cases.get("w1/one-gpu-moe")}
    out = []
    for key, row in cases.items():
        if key.startswith("w1/one-gpu"):
            continue
        ref = references["moe" if any(o.startswith("model.arch=moe") for o in row["case"]["overrides"]) else "dense"]
        if ref is None:
            continue
        by_step = {r["step"]: r for r in ref["train"]}
        loss = max(abs(r["loss"] / by_step[r["step"]]["loss"] - 1) for r in row["train"])
        grad = max(abs(r["grad_norm"] / by_step[r["step"]]["grad_norm"] - 1) for r in row["train"])
        out.append({"key": key, "world": row["case"]["world"], "parallel": row["case"]["parallel"],
                    "steps": [r["step"] for r in row["train"]], "loss_rdiff": loss, "grad_rdiff": grad,
                    "ok": loss <= LOSS_RTOL and grad <= GRAD_RTOL})  # fmt: skip
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _by_key(rows: list[dict], section: str) -> dict[str, dict]:
    return {r["key"]: r for r in rows if r.get("section") == section and "error" not in r}


def report(rows: list[dict], command: str) -> str:
    envs = [r["env"] for r in rows if "env" in r]
    env = max(envs, key=lambda e: e.get("world", 0)) if envs else {}
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("section") == "command"))
    lines = [
        "# The distributed path on several GPUs",
        "",
        f"Device: {env.get('device', '?')}, {env.get('gpus', '?')} GPUs; torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda', '–')}, NCCL {env.get('nccl', '–')} (backend {env.get('backend', '?')}). "
        "Produced by `benchmarks/multi_gpu.py` (its docstring says what each section runs):",
        "",
        "```",
        *(commands or [command]),
        "```",
    ]
    lines += _correctness_report(rows) + _scaling_report(rows) + _pipeline_report(rows) + _model_report(rows)
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Failed cases", ""] + [f"- `{r['key']}`: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _correctness_report(rows: list[dict]) -> list[str]:
    results = correctness_results(rows)
    if not results:
        return []
    cases = _by_key(rows, "correctness")
    lines = ["", "## Correctness: each layout against one GPU", "",
             f"Per step, the loss and the gradient norm against the one-GPU run of the same model and batch "
             f"(largest relative difference over the steps compared; tolerance {LOSS_RTOL:g} and {GRAD_RTOL:g}). "
             f"`resume-*` start from the checkpoint that `save` wrote after {SAVE_AT} steps and are compared on "
             "the steps after it.", ""]  # fmt: skip
    bf16, fp32 = cases.get("w1/one-gpu"), cases.get("w1/one-gpu-fp32")
    if bf16 and fp32:
        gap = max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(bf16["train"], fp32["train"]))
        gap_g = max(abs(a["grad_norm"] / b["grad_norm"] - 1) for a, b in zip(bf16["train"], fp32["train"]))
        lines += [f"What bf16 itself changes (the one-GPU run in bf16 against fp32): loss {gap:.2e}, "
                  f"gradient norm {gap_g:.2e}.", ""]  # fmt: skip
    seq, ovl = cases.get("w2/pp2-dualpipev-sequential"), cases.get("w2/pp2-dualpipev")
    if seq and ovl:
        same = max(abs(a["loss"] / b["loss"] - 1) for a, b in zip(ovl["train"], seq["train"]))
        lines += [f"DualPipeV with its overlap function against torch's sequential order: loss {same:.2e}.", ""]
    lines += ["| case | GPUs | layout | steps | loss | grad norm | within |", "|---|---:|---|---|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (-r["world"], r["key"])):
        layout = ", ".join(f"{k} {v}" for k, v in r["parallel"].items()) or "one GPU"
        lines.append(f"| {r['key'].split('/', 1)[1]} | {r['world']} | {layout} | {r['steps'][0]}–{r['steps'][-1]} | "
                     f"{r['loss_rdiff']:.2e} | {r['grad_rdiff']:.2e} | {'yes' if r['ok'] else '**no**'} |")  # fmt: skip
    return lines


def _scaling_report(rows: list[dict]) -> list[str]:
    got = _by_key(rows, "scaling")
    if not got:
        return []
    lines = ["", "## Data-parallel scaling (weak: the preset's batch on every GPU, FSDP2 over N > 1)", "",
             f"Median of {STEPS['cuda']} steps after {WARMUP['cuda']} warm-up steps (the first compiles), blocks "
             "compiled in torch.compile's default mode; one GPU runs the model without FSDP. Efficiency = tokens/s "
             "per GPU against one GPU's.", "",
             "| preset | GPUs | residual ms/step | tokens/s per GPU | efficiency | mHC ms/step | tokens/s per GPU | "
             "efficiency | mHC overhead | peak GiB (mHC) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    presets = sorted({r["case"]["preset"] for r in got.values()})
    worlds = sorted({r["case"]["world"] for r in got.values()})
    for preset in presets:
        for w in worlds:
            res, mhc = got.get(f"{preset}/residual/w{w}"), got.get(f"{preset}/mhc/w{w}")
            cells = []
            for variant, r in (("residual", res), ("mhc", mhc)):
                one = got.get(f"{preset}/{variant}/w1")
                eff = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"] if r and one else None
                cells += [_fmt(r and r["ms_per_step"]), _fmt(r and r["tokens_per_s_per_gpu"], ",.0f"),
                          _fmt(eff and 100 * eff, ".1f") + ("%" if eff else "")]  # fmt: skip
            overhead = mhc["ms_per_step"] / res["ms_per_step"] - 1 if res and mhc else None
            lines.append(f"| {preset} | {w} | {' | '.join(cells)} | {_fmt(overhead and 100 * overhead, '+.1f')}"
                         f"{'%' if overhead is not None else ''} | {_fmt(mhc and mhc.get('peak_gib'), '.1f')} |")  # fmt: skip
    return lines


def _pipeline_report(rows: list[dict]) -> list[str]:
    got = _by_key(rows, "pipeline")
    cases = {k: r for k, r in got.items() if "case" in r}
    if not cases:
        return []
    lines = ["", f"## Pipeline: gpu-moe-3b, {MICROBATCHES} microbatches of one 4096-token sequence a step and "
             "data-parallel rank", ""]  # fmt: skip
    for key, r in got.items():
        if r.get("kind") == "p2p":
            e1, e4 = r["edges"]["n1"], r["edges"]["n4"]
            lines += [f"Point-to-point send of one microbatch's stage edge between two GPUs ({key}): residual "
                      f"{e1['bytes'] / 1e6:.1f} MB in {e1['seconds'] * 1e3:.3f} ms ({e1['bytes'] / e1['seconds'] / 1e9:.0f} GB/s), "
                      f"mHC n = 4 {e4['bytes'] / 1e6:.1f} MB in {e4['seconds'] * 1e3:.3f} ms "
                      f"({e4['bytes'] / e4['seconds'] / 1e9:.0f} GB/s).", ""]  # fmt: skip
    lines += ["Edge = bytes one stage edge carries per microbatch each way, computed from the shapes (microbatch × T × "
              "n·C bf16 values; n = 1 for the residual model). From one profiled step, mean over ranks: idle = the "
              "share of the step with no compute kernel running (bubble and waits); NCCL = time some communication "
              "kernel ran (it includes waiting for the peer), 'under compute' the part of it with compute running too; "
              "concurrent = compute kernel time that ran beside other compute (DualPipeV's overlapped pairs).", "",
              "| pp × dp | variant | schedule | ms/step | tokens/s per GPU | edge MB | idle | NCCL ms | under compute | "
              "concurrent ms | mHC cost |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key in sorted(cases, key=lambda k: (cases[k]["case"]["pp"] * cases[k]["case"]["dp"], k)):
        r, c = cases[key], cases[key]["case"]
        ranks = r["ranks"]
        mean = {k: statistics.mean(x[k] for x in ranks) for k in ("idle", "comm", "comm_under_compute", "concurrent_compute")}
        res = cases.get(f"pp{c['pp']}dp{c['dp']}/residual/{c['schedule']}")
        cost = r["ms_per_step"] / res["ms_per_step"] - 1 if c["variant"] == "mhc" and res else None
        under = mean["comm_under_compute"] / mean["comm"] if mean["comm"] else None
        lines.append(f"| {c['pp']} × {c['dp']} | {c['variant']} | {c['schedule']} | {r['ms_per_step']:.1f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['edge_bytes'] / 1e6:.1f} | {mean['idle']:.1%} | "
                     f"{mean['comm']:.1f} | {_fmt(under and 100 * under, '.0f')}{'%' if under is not None else ''} | "
                     f"{mean['concurrent_compute']:.1f} | {_fmt(cost and 100 * cost, '+.1f')}{'%' if cost is not None else ''} |")  # fmt: skip
    single = _by_key(rows, "scaling")
    res1, mhc1 = single.get("gpu-moe-3b/residual/w1"), single.get("gpu-moe-3b/mhc/w1")
    if res1 and mhc1:
        lines += ["", f"mHC's overhead on one GPU (scaling section, same compile mode): "
                  f"{100 * (mhc1['ms_per_step'] / res1['ms_per_step'] - 1):+.1f}%."]  # fmt: skip
    for key, r in cases.items():
        if not r.get("trace"):
            continue
        rank0 = r["ranks"][0]
        lines += ["", f"### Trace of `{key}`, rank 0 (`{r['trace']}`): busiest kernels per stream", "",
                  f"Window {rank0['window']:.1f} ms, compute busy {rank0['busy']:.1f} ms, NCCL {rank0['comm']:.1f} ms "
                  f"({rank0['comm_under_compute']:.1f} under compute), concurrent compute {rank0['concurrent_compute']:.1f} ms.",
                  "", "| stream | kernel ms | busiest kernels (ms) |", "|---|---:|---|"]  # fmt: skip
        for stream, s in sorted(rank0["streams"].items(), key=lambda kv: -kv[1]["ms"]):
            names = "; ".join(f"`{n[:60]}` {ms:.1f}" for n, ms in s["kernels"])
            lines.append(f"| {stream} | {s['ms']:.1f} | {names} |")
    return lines


def _model_report(rows: list[dict]) -> list[str]:
    got = [r for r in rows if r.get("section") == "model" and r.get("kind") == "prediction"]
    if not got:
        return []
    lines = ["", "## The pipeline model against the measurements", "",
             "`benchmarks/pipeline_model.py` simulates torch's action lists from per-block times "
             "(`benchmarks/block_times.py --compile`, one GPU, the same shape) and the link speed measured above. "
             "It simulates the schedule alone: measured is the forward and backward of every microbatch, timed "
             "apart from the rest of a training step (gradient averaging, norm, clipping, optimizer step), the "
             "slowest rank's median. Error = predicted / measured - 1.", "",
             "| pp | variant | schedule | predicted ms | measured ms | error | predicted idle | measured idle | "
             "predicted mHC cost | measured mHC cost |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(got, key=lambda r: r["key"]):
        pc, mc = r.get("predicted_cost"), r.get("measured_cost")
        lines.append(f"| {r['pp']} | {r['variant']} | {r['schedule']} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} | "
                     f"{100 * r['rel_error']:+.1f}% | {r['predicted_idle']:.1%} | {r['measured_idle']:.1%} | "
                     f"{_fmt(pc and 100 * pc, '+.1f')}{'%' if pc is not None else ''} | "
                     f"{_fmt(mc and 100 * mc, '+.1f')}{'%' if mc is not None else ''} |")  # fmt: skip
    errors = [abs(r["rel_error"]) for r in got]
    lines += ["", f"Step-time error: mean |error| {100 * statistics.mean(errors):.1f}%, largest {100 * max(errors):.1f}%."]
    return lines


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--gpus", type=int, nargs="+", default=None,
                        help="world sizes (default 2 4 8 on GPUs, those that fit the GPUs present; 2 on the CPU)")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="NCCL on GPUs or gloo on the CPU")
    parser.add_argument("--rows", type=Path, default=Path("multi_gpu.jsonl"), help="JSON lines, appended (and read to skip what is done)")
    parser.add_argument("--out", type=Path, default=None, help="the markdown report (traces go next to it)")
    parser.add_argument("--work", type=Path, default=Path("runs/multi_gpu"), help="checkpoints, corpora cache, case lists")
    parser.add_argument("--time-budget", type=float, default=math.inf, help="seconds: start only what fits")
    # internal: one launch's worker under torchrun
    parser.add_argument("--worker", choices=SECTIONS[:3], help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.cases, args.rows, args.results, args.deadline, args.device)
        return 0

    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")
    available = torch.cuda.device_count() if args.device == "cuda" else math.inf
    wanted = args.gpus or ([2, 4, 8] if args.device == "cuda" else [2])
    worlds = sorted({w for w in wanted if 2 <= w <= available})
    if not worlds:
        parser.error(f"no world size of {wanted} fits: {available} GPUs (each needs 2 or more)")
    command = "python benchmarks/multi_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.work.mkdir(parents=True, exist_ok=True)
    args.rows.parent.mkdir(parents=True, exist_ok=True)
    _append(args.rows, {"section": "command", "key": command, "command": command.strip()})
    driver = Driver(args.device, worlds, args.rows.resolve(), args.out and args.out.resolve(), args.work.resolve(),
                    time.time() + args.time_budget, command.strip())  # fmt: skip
    print(f"[multi_gpu] sections {sections} at world sizes {worlds} on {args.device}", flush=True)
    for section in SECTIONS:
        if section not in sections:
            continue
        if section == "correctness":
            driver.run_correctness()
        elif section == "model":
            driver.run_model()
        else:
            plan = scaling_plan(worlds, args.device) if section == "scaling" else pipeline_plan(worlds, args.device)
            for launch in plan:
                driver.run_launch(launch)
                driver.write_report()
        driver.write_report()
    if args.out:
        print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
