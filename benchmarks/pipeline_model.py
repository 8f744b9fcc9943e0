"""What mHC costs under pipeline parallelism, before renting the GPUs: a model (no GPU needed).

    python benchmarks/pipeline_model.py --out benchmarks/results/pipeline_model.md
    python benchmarks/pipeline_model.py --times benchmarks/results/block_times_h100.json   # measured times

With n streams every pipeline-stage edge carries n·C values per token instead of C: at n = 4 four
times the bytes of a plain residual, each way (activations forward, their gradients backward). The
model puts numbers on what that does to a training step:

- traffic: bytes per stage edge per microbatch and per rank per step (bf16 streams);
- step time of a pipeline rank, simulated action by action in the order torch's schedules run
  them (the action lists come from ``torch.distributed.pipelining``'s own schedule classes, so
  1F1B and DualPipeV here are the ones ``torchmhc.distributed`` runs), from per-block forward,
  input-gradient and weight-gradient times and a link bandwidth;
- bubble (compute-free time with instant links) and exposed communication (the extra step time
  the links cause), for residual and mHC (n = 4), 1F1B and DualPipeV with and without the
  overlapped forward/backward pairs.

Simulation rules. An action starts when its rank is free and its inputs are there: F(s, m) after
F(s-1, m); a backward (full, or input part I) after F(s, m) and the backward of (s+1, m); W after
I. Between ranks an activation or gradient arrives ``bytes / bandwidth + latency`` after its
producer ends (sends are asynchronous, as in torch's runtime; links are full duplex and not shared
by two transfers at once — at the sizes here a transfer is much shorter than a chunk). Between
stages on one rank (the turn of the V) it is instant. DualPipeV's paired forward and backward
(OVERLAP_F_B) run one after the other without overlap; with overlap the pair starts as soon as
either half can and its kernels fill each other's waits: it ends at
``max(start + f + b, input_F + f, input_B + b)``. Stages are balanced by time (the LM head on the
last stage; the embedding is a lookup); one microbatch is one sequence.

torch's 1F1B loop also waits for each send together with the next receive, which couples
neighbours more tightly than modelled here; its runtime schedules (interleaved, ZBV, DualPipeV)
send asynchronously as modelled. Not modelled: FSDP/data-parallel and expert-parallel collectives, the slowdown of kernels that
share the GPU with NCCL, the optimizer step, memory (DualPipeV keeps two stages' weights and more
activations in flight), stage imbalance beyond whole blocks.

Per-block times come from a JSON (``--times``): ``benchmarks/block_times.py`` measures it on a GPU;
the default, ``benchmarks/results/block_times_assumed.json``, is *assumed*: derived from the
end-to-end step times of one H100 (``--write-assumed`` writes it; see :func:`assumed_times`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
    _Action,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_times import SHAPES, shape_config  # noqa: E402

from torchmhc.distributed.pipeline import balance_stages, block_flops, head_flops  # noqa: E402

DEFAULT_TIMES = Path(__file__).resolve().parent / "results" / "block_times_assumed.json"
#: name -> (GB/s per direction usable by one transfer, latency in µs)
LINKS = {"NVLink (H100)": (360.0, 5.0), "400G InfiniBand": (45.0, 10.0)}
BYTES_PER_VALUE = 2  # bf16 streams

# ----------------------------------------------------------------------------------------------
# Block times
# ----------------------------------------------------------------------------------------------

# What the default times are derived from: benchmarks/results/h100.md, session 6, run 15
# (gpu-moe-3b, batch 2 x 4096, compiled, one H100): residual 133.0 ms/step at 190 model TFLOP/s,
# mHC 143.6 ms/step.
_MEASURED_RATE_TFLOPS = 190.0
_MEASURED_MHC_EXTRA_MS = 143.6 - 133.0
_MEASURED_TOKENS, _MEASURED_BLOCKS, _MEASURED_DIM = 8192, 12, 1280


def assumed_times(tokens: int = 4096) -> dict:
    """Per-block times derived, not measured (the default input):

    - a block's forward takes its forward FLOPs (``torchmhc.distributed.pipeline.block_flops``, plain
      residual) at 190 TFLOP/s, the whole-step model rate measured for gpu-moe-3b on one H100
      (which spreads the optimizer step over the blocks: pessimistic); the input-gradient and the
      weight-gradient parts each take as long as the forward (each is one product per weight);
    - mHC adds, per block and token, the measured mHC step overhead of gpu-moe-3b divided by its
      12 blocks and 8192 tokens, scaled by C / 1280 for other widths (the mHC operations are
      memory-bound: n·C stream values per sub-layer); split like the stream traffic of the
      kernels: forward (4n + 2) : input gradient (7n + 4), weight gradient nothing;
    - the head (stream head, norm, LM head, loss): its FLOPs at the same rate, I = W = F.
    """
    n = 4
    shapes = {}
    for name in SHAPES:
        cfg = shape_config(name)
        seq = cfg.data.seq_len
        residual_cfg = dataclasses.replace(cfg.model, residual="residual")
        forward = tokens * block_flops(residual_cfg, seq) / (_MEASURED_RATE_TFLOPS * 1e9)  # ms
        head = tokens * head_flops(residual_cfg) / (_MEASURED_RATE_TFLOPS * 1e9)
        extra = _MEASURED_MHC_EXTRA_MS / (_MEASURED_BLOCKS * _MEASURED_TOKENS) * tokens * cfg.model.dim / _MEASURED_DIM
        fwd_share = (4 * n + 2) / ((4 * n + 2) + (7 * n + 4))
        plain = {"forward_ms": forward, "backward_input_ms": forward, "backward_weight_ms": forward}
        head_times = {"forward_ms": head, "backward_input_ms": head, "backward_weight_ms": head}
        shapes[name] = {
            "seq_len": seq, "num_layers": cfg.model.num_layers, "dim": cfg.model.dim,
            "vocab_size": cfg.model.vocab_size, "tokens": tokens,
            "variants": {
                "residual": {"block": plain, "head": head_times},
                "mhc": {
                    "block": {"forward_ms": forward + fwd_share * extra,
                              "backward_input_ms": forward + (1 - fwd_share) * extra,
                              "backward_weight_ms": forward},
                    "head": head_times,
                },
            },
        }  # fmt: skip
    return {
        "source": "ASSUMED, not measured per block: derived from end-to-end step times of gpu-moe-3b on one H100 "
        "(benchmarks/results/h100.md, session 6, run 15) by benchmarks/pipeline_model.py:assumed_times; "
        "replace with benchmarks/block_times.py measurements",
        "device": "H100 (derived)",
        "shapes": shapes,
    }


# ----------------------------------------------------------------------------------------------
# Schedules (torch's own action orders) and the simulation
# ----------------------------------------------------------------------------------------------

SCHEDULES = {  # name -> (torch class, stages per rank, runs OVERLAP_F_B overlapped)
    "1F1B": (Schedule1F1B, 1, False),
    "GPipe": (ScheduleGPipe, 1, False),
    "Interleaved 1F1B": (ScheduleInterleaved1F1B, 2, False),
    "ZBV": (ScheduleZBVZeroBubble, 2, False),
    "DualPipeV": (ScheduleDualPipeV, 2, False),
    "DualPipeV + overlap": (ScheduleDualPipeV, 2, True),
}


def _single_stage_orders(cls, ranks: int, microbatches: int) -> dict[int, list]:
    """GPipe and 1F1B run a hand-written loop rather than an action list: the order that loop
    follows on each rank (1F1B: ``min(M, P - r)`` forwards, then backward/forward pairs, then
    the remaining backwards)."""
    orders = {}
    for r in range(ranks):
        f = [_Action(r, FORWARD, m) for m in range(microbatches)]
        b = [_Action(r, FULL_BACKWARD, m) for m in range(microbatches)]
        if cls is ScheduleGPipe:
            orders[r] = f + b
            continue
        warmup = min(microbatches, ranks - r)
        order = f[:warmup]
        for m in range(microbatches):
            order.append(b[m])
            if warmup + m < microbatches:
                order.append(f[warmup + m])
        orders[r] = order
    return orders


def action_orders(cls, ranks: int, local_stages: int, microbatches: int) -> dict[int, list]:
    """Each rank's compute actions in the order ``cls`` runs them. The multi-stage schedules'
    planners are torch's own (built without processes: the order depends only on these numbers;
    the attributes set are those the planner reads)."""
    if cls in (Schedule1F1B, ScheduleGPipe):
        return _single_stage_orders(cls, ranks, microbatches)
    schedule = object.__new__(cls)
    schedule._n_microbatches = microbatches
    schedule._num_stages = schedule.num_stages = ranks * local_stages
    schedule.pp_group_size = ranks
    schedule.n_local_stages = local_stages
    if cls is ScheduleInterleaved1F1B:
        schedule.number_of_rounds = max(1, microbatches // ranks)
        schedule.microbatches_per_round = microbatches // schedule.number_of_rounds
    orders = {}
    for rank in range(ranks):
        schedule.rank = rank
        orders[rank] = schedule._calculate_single_rank_operations(rank)
    keep = ("F", "B", "I", "W", "OVERLAP_F_B")
    return {r: [a for a in acts if a is not None and a.computation_type.value in keep] for r, acts in orders.items()}


def stage_to_rank(stage: int, ranks: int, local_stages: int, v_shape: bool) -> int:
    if v_shape:
        return stage if stage < ranks else 2 * ranks - 1 - stage
    return stage % ranks


@dataclass
class StageTimes:
    """A stage's times per microbatch (ms); ``*_mhc``: the part the mHC operations add."""

    f: float
    i: float
    w: float
    f_mhc: float = 0.0
    i_mhc: float = 0.0


def simulate(orders, rank_of, times: list[StageTimes], transfer_ms: float, overlap: bool, hide: float = 0.0) -> float:
    """Step time (ms) of the slowest rank under the rules of the module docstring (``hide``: the
    share of the mHC operations' time an overlapped pair hides behind the other half's work)."""
    num_stages = len(times)
    end: dict[tuple[str, int, int], float] = {}  # ("F" | "I" | "W", stage, microbatch) -> end time

    def arrival(kind: str, src: int, dst: int, mb: int) -> float | None:
        t = end.get((kind, src, mb))
        if t is None:
            return None
        return t + (transfer_ms if rank_of[src] != rank_of[dst] else 0.0)

    def ready(a) -> float | None:
        kind, s, m = a.computation_type.value, a.stage_index, a.microbatch_index
        if kind == "F":
            return 0.0 if s == 0 else arrival("F", s - 1, s, m)
        if kind in ("B", "I"):
            own = end.get(("F", s, m))
            nxt = 0.0 if s == num_stages - 1 else arrival("I", s + 1, s, m)
            return None if own is None or nxt is None else max(own, nxt)
        return end.get(("I", s, m))  # W

    def duration(a) -> float:
        t = times[a.stage_index]
        return {"F": t.f, "B": t.i + t.w, "I": t.i, "W": t.w}[a.computation_type.value]

    def mhc_part(a) -> float:
        t = times[a.stage_index]
        return {"F": t.f_mhc, "B": t.i_mhc, "I": t.i_mhc, "W": 0.0}[a.computation_type.value]

    def finish(a, t: float) -> None:
        kind, s, m = a.computation_type.value, a.stage_index, a.microbatch_index
        if kind == "B":
            end[("I", s, m)] = end[("W", s, m)] = t
        else:
            end[(kind, s, m)] = t

    free = {r: 0.0 for r in orders}
    position = {r: 0 for r in orders}
    while any(position[r] < len(orders[r]) for r in orders):
        progress = False
        for r, actions in orders.items():
            while position[r] < len(actions):
                a = actions[position[r]]
                parts = a.sub_actions if a.sub_actions else (a,)
                starts = [ready(p) for p in parts]
                if any(s is None for s in starts):
                    break
                if len(parts) == 1:
                    t = max(free[r], starts[0]) + duration(a)
                    finish(a, t)
                else:
                    # without overlap torch's order (forward first); with it, whichever half can
                    # start first, and the second half shortened by what the pair hides
                    pairs = list(zip(starts, parts))
                    if overlap:
                        pairs.sort(key=lambda sp: sp[0])
                    saved = hide * sum(mhc_part(p) for p in parts) if overlap else 0.0
                    t = free[r]
                    for k, (s, p) in enumerate(pairs):
                        t = max(t, s) + duration(p) - (saved if k == 1 else 0.0)
                        finish(p, t)
                free[r] = t
                position[r] += 1
                progress = True
        if not progress:
            raise RuntimeError("the schedule cannot make progress (malformed action order)")
    return max(free.values())


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def stage_times(shape: dict, variant: str, rank_of: list[int], tokens: int) -> list[StageTimes]:
    """Per-stage times, stages balanced over the ranks (``torchmhc.distributed.pipeline.balance_stages``:
    whole blocks, the busiest rank least loaded, the head on the last stage)."""
    v, plain = shape["variants"][variant], shape["variants"]["residual"]
    scale = tokens / shape["tokens"]
    blk, head = v["block"], v["head"]
    keys = ("forward_ms", "backward_input_ms", "backward_weight_ms")
    starts = balance_stages(shape["num_layers"], rank_of, last_extra=sum(head[k] for k in keys) / sum(blk[k] for k in keys))
    ends = [*starts[1:], shape["num_layers"]]
    extra = {k: blk[k] - plain["block"][k] for k in keys}
    out = []
    for s, (a, b) in enumerate(zip(starts, ends)):
        k, last = b - a, s == len(rank_of) - 1
        f, i, w = (scale * (k * blk[key] + (head[key] if last else 0.0)) for key in keys)
        out.append(StageTimes(f, i, w, scale * k * extra["forward_ms"], scale * k * extra["backward_input_ms"]))
    return out


def edge_bytes(shape: dict, variant: str, tokens: int) -> int:
    """Bytes one stage edge carries per microbatch, each way."""
    n = 4 if variant == "mhc" else 1
    return tokens * n * shape["dim"] * BYTES_PER_VALUE


def run(shape: dict, variant: str, schedule: str, ranks: int, microbatches: int, link: tuple[float, float],
        hide: float = 0.0) -> dict:  # fmt: skip
    """Step time, idle share and exposed communication of one configuration."""
    cls, local, overlap = SCHEDULES[schedule]
    num_stages = ranks * local
    tokens = shape["seq_len"]
    v_shape = cls in (ScheduleZBVZeroBubble, ScheduleDualPipeV)
    rank_of = [stage_to_rank(s, ranks, local, v_shape) for s in range(num_stages)]
    times = stage_times(shape, variant, rank_of, tokens)
    orders = action_orders(cls, ranks, local, microbatches)
    gbps, latency_us = link
    transfer = edge_bytes(shape, variant, tokens) / (gbps * 1e6) + latency_us / 1e3
    ideal = simulate(orders, rank_of, times, 0.0, overlap, hide)
    real = simulate(orders, rank_of, times, transfer, overlap, hide)
    saved = hide * sum(t.f_mhc + t.i_mhc for t in times) * microbatches if overlap else 0.0  # upper bound
    work = (microbatches * sum(t.f + t.i + t.w for t in times) - saved) / ranks  # a rank's mean compute
    return {"step_ms": real, "idle": max(0.0, 1 - work / real), "exposed": (real - ideal) / real}


def report(times: dict, microbatches: dict[str, int], ranks: dict[str, list[int]], hide: float) -> str:
    # an overlapped pair that hides nothing ends as the sequential one does: its rows would repeat
    schedules = ["1F1B", "DualPipeV"] + (["DualPipeV + overlap"] if hide else [])
    lines = [
        "# Pipeline parallelism with n-stream stage edges: a model",
        "",
        f"Block times: {times['source']}.",
        "",
        f"Links: {', '.join(f'{k} {v[0]:.0f} GB/s per direction and {v[1]:.0f} µs a transfer' for k, v in LINKS.items())}. "
        "Streams bf16; one microbatch = one sequence. mHC: n = 4. Step = the slowest rank's time for "
        "the microbatches of one step (forward and backward; no optimizer, no data-parallel traffic). "
        "Idle = the share of the step a rank on average does not compute (bubble, imbalance between "
        "ranks, waiting for links); exposed = the share the links add to the step. "
        "DualPipeV runs its paired chunks one after the other as torch does"
        + ("; run concurrently they would hide none of the mHC kernels' time behind the other half's "
           "products (measured on one H200, `benchmarks/overlap.py`, benchmarks/results/h200.md: a second "
           "CUDA stream hid -4% to +6% of it, the products' tiles holding every multiprocessor), so no "
           "'+ overlap' rows (`--overlap-hide` adds them)"
           if hide == 0 else f"; '+ overlap' runs whichever half is ready first and hides {hide:.0%} of the pair's "
           "mHC kernel time behind the other half's products (ASSUMED: measured, a second CUDA stream hid none)")
        + ". Rules and limits: `benchmarks/pipeline_model.py`.",
        "",
    ]
    for name, ranks_list in ranks.items():
        shape = times["shapes"][name]
        tokens, m = shape["seq_len"], microbatches[name]
        lines += [f"## {name}: {shape['num_layers']} blocks, C = {shape['dim']}, sequence {tokens}, "
                  f"{m} microbatches a step", ""]  # fmt: skip
        lines += ["| per microbatch of one sequence | residual | mHC (n = 4) |", "|---|---:|---:|"]
        for label, key in (("forward (ms per block)", "forward_ms"), ("input gradient (ms per block)", "backward_input_ms"),
                           ("weight gradient (ms per block)", "backward_weight_ms")):  # fmt: skip
            lines.append(f"| {label} | {shape['variants']['residual']['block'][key]:.2f} | "
                         f"{shape['variants']['mhc']['block'][key]:.2f} |")  # fmt: skip
        lines.append(f"| stage edge, each way (MB) | {edge_bytes(shape, 'residual', tokens) / 1e6:.1f} | "
                     f"{edge_bytes(shape, 'mhc', tokens) / 1e6:.1f} |")  # fmt: skip
        for link, spec in LINKS.items():
            r = edge_bytes(shape, "residual", tokens) / (spec[0] * 1e6) + spec[1] / 1e3
            mh = edge_bytes(shape, "mhc", tokens) / (spec[0] * 1e6) + spec[1] / 1e3
            lines.append(f"| one transfer over {link} (ms) | {r:.3f} | {mh:.3f} |")
        lines += ["", "GB sent per rank and step (mHC; residual: a quarter): 1F1B sends an activation and a gradient "
                  "per microbatch, the V-shaped schedules two of each.", ""]  # fmt: skip
        lines += ["| ranks | stages | schedule | link | residual: step ms | idle | exposed | "
                  "mHC: step ms | idle | exposed | mHC cost | GB sent |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for ranks_ in ranks_list:
            for schedule in schedules:
                _, local, _ = SCHEDULES[schedule]
                if ranks_ * local > shape["num_layers"] or (local == 2 and m < 2 * ranks_):
                    continue
                for link, spec in LINKS.items():
                    res = run(shape, "residual", schedule, ranks_, m, spec, hide)
                    mhc = run(shape, "mhc", schedule, ranks_, m, spec, hide)
                    gb = 2 * m * local * edge_bytes(shape, "mhc", tokens) / 1e9
                    lines.append(
                        f"| {ranks_} | {ranks_ * local} | {schedule} | {link} | {res['step_ms']:.0f} | {res['idle']:.1%} | "
                        f"{res['exposed']:.1%} | {mhc['step_ms']:.0f} | {mhc['idle']:.1%} | {mhc['exposed']:.1%} | "
                        f"{mhc['step_ms'] / res['step_ms'] - 1:+.1%} | {gb:.1f} |"
                    )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--times", type=Path, default=DEFAULT_TIMES, help="per-block times JSON")
    parser.add_argument("--write-assumed", action="store_true", help=f"(re)write {DEFAULT_TIMES.name} and use it")
    parser.add_argument("--overlap-hide", type=float, default=0.0,
                        help="share of the mHC kernel time an overlapped pair hides (measured: none, "
                             "benchmarks/overlap.py)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    if args.write_assumed:
        DEFAULT_TIMES.write_text(json.dumps(assumed_times(), indent=2) + "\n")
    times = json.loads(args.times.read_text())
    # pipeline ranks (1F1B has that many stages, the V-shaped schedules twice as many); the
    # microbatches of a step stay fixed, at least two per V stage
    ranks = {"gpu-moe-3b": [2, 3, 6, 12], "dsv3-27b": [4, 8, 16, 32, 64]}
    microbatches = {"gpu-moe-3b": 24, "dsv3-27b": 128}
    ranks = {k: v for k, v in ranks.items() if k in times["shapes"]}
    text = report(times, microbatches, ranks, args.overlap_hide)
    command = "python benchmarks/pipeline_model.py " + " ".join(sys.argv[1:])
    text = text.replace("# Pipeline parallelism with n-stream stage edges: a model\n",
                        f"# Pipeline parallelism with n-stream stage edges: a model\n\n`{command.strip()}`\n", 1)  # fmt: skip
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
