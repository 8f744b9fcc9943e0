"""Studies: the mHC initialization and mHC vs residual noise on the CPU, and the paper's claims at GPU scale.

    python benchmarks/studies.py init  [--inits uniform identity onehot] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/studies.py seeds [--variants residual hc mhc] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/studies.py render          # Markdown tables of everything measured so far
    python benchmarks/studies.py scale --preset gpu-small [--variants ...] [--seeds ...] [--time-budget 540]
    python benchmarks/studies.py scale-report [--out docs/scale_study.md]

``init`` trains mHC from each start of docs/math.md §8 (uniform b = 0, identity-biased, HC-style one-hot
H_pre); ``seeds`` trains each variant for each seed. Every finished run appends one JSON line to
``benchmarks/results/studies-cpu.jsonl`` (so studies can run in parallel processes and be
resumed), and ``render`` turns that file into the tables of docs/init_study.md and
docs/seed_study.md. All runs use the ``tiny`` preset unless ``--preset`` says otherwise.

``scale`` trains every variant for every seed of a GPU preset (residual, HC and mHC on a corpus
larger than one pass of the run, BPE tokens) and is made to be split across calls of limited
length: each run checkpoints and pauses before ``--time-budget`` seconds have passed (or after
``--step-budget`` steps, counted over the invocation), and the same command continues where it
stopped, each run resuming from its checkpoint exactly as if it had never stopped. With
``--whole-runs`` a run is started only if an earlier run of its variant took less time than is
left (for machines that do not outlive a call: a paused run's checkpoint would be lost). Finished runs
append one row each to ``benchmarks/results/scale-study.jsonl`` (``--results``) and their checkpoints are
deleted (``--keep-checkpoints`` keeps them; a GPU preset's take 0.7-2.5 GB a run); ``scale-report``
turns the rows into docs/scale_study.md: mean ± standard deviation over seeds of the final validation loss and of
the paired gap to the residual baseline, the largest composite gain, and the gradient-norm history.
A study whose budget is more than one pass over the training split is refused (``--allow-repeats``).
"""

import argparse
import hashlib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchmhc import analysis
from torchmhc.config import RunConfig, config_to_dict, load_config
from torchmhc.data import load_data
from torchmhc.models import build_model
from torchmhc.report import analyze_model, gain_snapshot
from torchmhc.train import (NonFiniteLossError, TimeBudget, latest_checkpoint, load_checkpoint,
                            read_checkpoint_state, resolve_device, train)

RESULTS = Path(__file__).resolve().parent / "results" / "studies-cpu.jsonl"
#: The scale study's rows, kept with the repository (the data behind docs/scale_study.md): a study
#: spread over machines that do not outlive a call goes on from the rows that came back.
GPU_RESULTS = Path(__file__).resolve().parent / "results" / "scale-study.jsonl"
#: Where scale-report's tables begin in its ``--out`` file: what stands above it is kept.
TABLES_MARKER = "<!-- tables: python benchmarks/studies.py scale-report --out <this file> replaces all below -->"
#: Points kept of a run's gradient-norm history (each the median and the maximum of its window).
HISTORY_POINTS = 100
#: Seconds of the time budget under which no run is started or resumed: setting one up (the model,
#: the first evaluation) and saving its checkpoint must fit in what is left.
START_MARGIN_S = 30.0


def run_one(cfg, data, probe, *, study: str, command: str) -> dict:
    """Train ``cfg``; append and return its final numbers and hyper-connection measurements."""
    started = time.perf_counter()
    row = {"study": study, "preset": cfg.name.split("-")[0], "variant": cfg.model.residual,
           "init": cfg.model.hc_init or "default", "seed": cfg.train.seed, "command": command}
    try:
        result = train(cfg, progress=False, data=data)
        row.update({k: result.summary[k] for k in ("train_loss", "val_loss", "val_bpb", "tokens_per_s")})
        info = analyze_model(result.model, probe)
        if info is not None:
            result.model.eval()
            records = analysis.collect_coefficients(result.model, probe)
            similarity = records[-1].stream_similarity  # [n, n] cosine of the streams entering the last layer
            n = similarity.shape[0]
            row.update(
                max_composite_gain=info["max_composite_gain"],
                single_forward_max_deviation=info["single_forward_max_deviation"],
                identity_distance=statistics.mean(info["identity_distance"]),
                uniform_distance=statistics.mean(
                    float(analysis.distance_from_uniform(r.coefficients.h_res).mean()) for r in records),
                stream_cosine_last=float((similarity.sum() - n) / (n * n - n)),
            )
    except NonFiniteLossError as exc:
        row.update(val_loss=float("nan"), stopped=str(exc))
    row["wall_s"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _cells(rows: list[dict], key: str, spec: str) -> str:
    return " / ".join(format(r[key], spec) if key in r else "–" for r in rows)


def render(rows: list[dict]) -> str:
    """Markdown tables of the init study and of the seed comparison."""
    out = []
    init_rows: dict[str, list[dict]] = {}
    for r in rows:
        if r["study"] == "init":
            init_rows.setdefault(r["init"], []).append(r)
    if init_rows:
        out += [
            "### Initialization (mHC, tiny preset)", "",
            "| mHC start | val loss (mean ± std over seeds) | val loss per seed | max composite gain | "
            "mean ‖H_res − I‖_F | mean ‖H_res − 11ᵀ/n‖_F | stream cosine, last layer | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for init, group in init_rows.items():
            group = sorted(group, key=lambda r: r["seed"])
            out.append(
                f"| {init} | {_mean_std([r['val_loss'] for r in group])} | {_cells(group, 'val_loss', '.4f')} | "
                f"{_cells(group, 'max_composite_gain', '.4g')} | {_cells(group, 'identity_distance', '.3f')} | "
                f"{_cells(group, 'uniform_distance', '.3f')} | {_cells(group, 'stream_cosine_last', '.3f')} | "
                f"{_cells(group, 'wall_s', '.0f')} |")
        out += ["", f"Seeds: {sorted({r['seed'] for g in init_rows.values() for r in g})}.", ""]

    by_variant: dict[str, dict[int, dict]] = {}
    for r in rows:
        key = r["variant"] if r["study"] == "seeds" else f"mhc ({r['init']} start)"
        by_variant.setdefault(key, {})[r["seed"]] = r
    baseline = by_variant.get("residual")
    if baseline:
        seeds = sorted(baseline)
        out += [
            "### Validation loss by seed (tiny preset)", "",
            "| variant | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean ± std | paired Δ vs residual, mean ± std | max composite gain |",
            "|---|" + "---|" * (len(seeds) + 3),
        ]
        for name, per_seed in by_variant.items():
            if not all(s in per_seed for s in seeds):
                continue
            group = [per_seed[s] for s in seeds]
            deltas = [per_seed[s]["val_loss"] - baseline[s]["val_loss"] for s in seeds]
            delta = "–" if name == "residual" else (
                f"{statistics.mean(deltas):+.4f} ± {statistics.stdev(deltas):.4f}" if len(seeds) > 1 else f"{deltas[0]:+.4f}")
            out.append(f"| {name} | " + " | ".join(f"{r['val_loss']:.4f}" for r in group)
                       + f" | {_mean_std([r['val_loss'] for r in group])} | {delta} | "
                       + (_cells(group, "max_composite_gain", ".4g") if name != "residual" else "1") + " |")
    commands = sorted({r["command"] for r in rows})
    out += ["", "Commands:", "", *[f"    {c}" for c in commands]]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# The study at GPU scale: variants x seeds, resumable, split across calls
# ----------------------------------------------------------------------------------------------


def config_key(cfg: RunConfig) -> str:
    """Hash of everything that makes a run of the study, except its variant, seed and where it is written."""
    d = config_to_dict(cfg)
    d.pop("name"), d.pop("description")
    d["model"].pop("residual")
    d["train"].pop("seed"), d["train"].pop("out_dir")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def grad_norm_history(history: list[dict], points: int = HISTORY_POINTS) -> list[list[float]]:
    """``[last step, median, max]`` of the gradient norm in each of ``points`` windows of the run."""
    values = [(r["step"], r["grad_norm"]) for r in history if r["kind"] == "train"]
    size = max(1, math.ceil(len(values) / points))
    out = []
    for i in range(0, len(values), size):
        window = [g for _, g in values[i : i + size]]
        out.append([values[i : i + size][-1][0], statistics.median(window), max(window)])
    return out


def _scale_row(cfg: RunConfig, *, preset: str, key: str, summary: dict, history: list[dict], evals: list[dict],
               info: dict | None, corpus_tokens: int, command: str) -> dict:
    tokens = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    gains = [e["max_composite_gain"] for e in evals if "max_composite_gain" in e]
    return {
        "study": "scale", "preset": preset, "config_key": key, "name": cfg.name, "variant": cfg.model.residual,
        "seed": cfg.train.seed, "command": command, "steps": cfg.train.steps, "tokens": tokens,
        "corpus": summary.get("corpus"), "corpus_train_tokens": corpus_tokens, "passes": tokens / corpus_tokens,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "num_params": summary.get("num_params"),
        **{k: summary.get(k) for k in ("train_loss", "val_loss", "val_bpb", "tokens_per_s", "train_time_s", "stopped")},
        # a run that diverged has no final validation loss (its last one is in val_history)
        **({"val_loss": math.nan, "val_bpb": math.nan} if summary.get("stopped") else {}),
        "max_composite_gain": info["max_composite_gain"] if info else 1.0,
        "max_composite_gain_during": max(gains, default=1.0),
        "gain_history": [[e["step"], e["max_composite_gain"]] for e in evals if "max_composite_gain" in e],
        "val_history": [[e["step"], e["val_loss"]] for e in evals],
        "grad_norm_history": grad_norm_history(history),
    }


def _read_run(cfg: RunConfig, probe: torch.Tensor, device: torch.device) -> tuple[dict, list, list, dict | None]:
    """Summary, history, evaluations and analysis of a run that ended on disk (finished or stopped)."""
    rows = [json.loads(line) for line in (cfg.out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((cfg.out_dir / "summary.json").read_text())
    latest = latest_checkpoint(cfg.out_dir)  # none: diverged before its weights could be saved
    info = None
    if latest is not None:
        model = build_model(cfg.model).to(device)
        load_checkpoint(latest, model)
        info = analyze_model(model, probe)
    return summary, [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"], info


def run_scale(args: argparse.Namespace, command: str) -> None:
    """Train (or continue) the runs of the study that have no row in ``args.results`` yet, until the
    time or step budget is spent."""
    budget = TimeBudget(args.time_budget) if args.time_budget else None
    steps_left = args.step_budget
    base = load_config(args.preset, ["train.out_dir='runs/studies/{name}'", *args.overrides])
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    preset = Path(args.preset).stem
    key = config_key(base)
    data = load_data(base.data)
    tokens = base.train.steps * base.data.batch_size * base.data.seq_len
    passes = tokens / len(data.train)
    print(f"{preset}: {tokens:,} training tokens a run = {passes:.2f} passes over {len(data.train):,} "
          f"({data.source})", flush=True)
    if passes > 1 and not args.allow_repeats:
        raise SystemExit(f"the study's runs would see the training split {passes:.2f} times; lower train.steps (or "
                         f"data.batch_size), or pass --allow-repeats.")
    device = resolve_device(base.train.device)
    probe, _ = data.get_batch("val", 0, batch_size=base.data.batch_size, seq_len=base.data.seq_len, seed=0)
    probe = probe.to(device)
    rows = [r for r in _rows(args.results) if r.get("study") == "scale"]
    done = {(r["name"], r["config_key"]) for r in rows}
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    for variant, seed in runs:
        cfg = replace(base, name=f"{preset}-{variant}-s{seed}-{key}", model=replace(base.model, residual=variant),
                      train=replace(base.train, seed=seed))
        if (cfg.name, key) in done:
            continue
        if (budget is not None and budget.remaining() < START_MARGIN_S) or steps_left == 0:
            break
        latest = latest_checkpoint(cfg.out_dir)
        at = read_checkpoint_state(latest, ("step",))["step"] if latest is not None else 0
        if args.whole_runs and budget is not None and latest is None:
            # a run paused at the end of a device call is lost with the machine (its checkpoint
            # stays there): start one only where an earlier run of the variant says it fits
            known = [r["wall_s"] for r in rows if r["config_key"] == key and r["variant"] == variant and r.get("wall_s")]
            if known and budget.remaining() < max(known) + START_MARGIN_S:
                continue
        started = time.monotonic()
        if at >= cfg.train.steps and (cfg.out_dir / "summary.json").is_file():
            summary, history, evals, info = _read_run(cfg, probe, device)  # finished, its row not yet written
        else:
            pause_time = budget.pause() if budget is not None else None
            start = at

            def pause(step: int) -> bool:
                over_steps = steps_left is not None and step - start >= steps_left
                return over_steps or (pause_time is not None and pause_time(step))

            try:
                result = train(cfg, resume=latest is not None, progress=not args.quiet, data=data,
                               eval_hook=lambda m: gain_snapshot(m, probe), pause=pause)
            except NonFiniteLossError:  # diverged (HC may): its summary says where, its last good weights are kept
                result = None
            if result is not None and result.paused:
                print(f"{cfg.name}: paused at step {result.summary['steps']}; run the same command to continue")
                return
            if result is None:
                summary, history, evals, info = _read_run(cfg, probe, device)
            else:
                summary, history, evals = result.summary, result.history, result.evals
                info = analyze_model(result.model, probe)
            if steps_left is not None:
                steps_left -= summary["steps"] - at
        row = _scale_row(cfg, preset=preset, key=key, summary=summary, history=history, evals=evals, info=info,
                         corpus_tokens=len(data.train), command=command)
        # wall seconds of a run made in one invocation: setup, compilation, evaluations, analysis
        row["wall_s"] = time.monotonic() - started if at == 0 else None
        rows.append(row)
        _append(args.results, row)
        if not args.keep_checkpoints:  # the row holds what the report needs
            shutil.rmtree(cfg.out_dir / "checkpoints", ignore_errors=True)
    remaining = [(v, s) for v, s in runs if (f"{preset}-{v}-s{s}-{key}", key) not in
                 {(r["name"], r["config_key"]) for r in _rows(args.results)}]
    print(f"{preset}: {len(runs) - len(remaining)} of {len(runs)} runs done"
          + ("" if remaining else f"; python benchmarks/studies.py scale-report --results {args.results}"))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("history")}), flush=True)


def _pm(values: list[float], spec: str = ".4f", signed: bool = False) -> str:
    """``mean ± std`` (the sample standard deviation; the value alone for one)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = format(statistics.mean(values), ("+" if signed else "") + spec)
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):{spec}}"


def _at_fraction(history: list[list[float]], fraction: float, column: int) -> float:
    """The history's value (``column`` 1: window median, 2: window max) at ``fraction`` of the run."""
    if not history:
        return math.nan
    return history[min(len(history) - 1, max(0, round(fraction * len(history)) - 1))][column]


def render_scale(rows: list[dict]) -> str:
    """Markdown tables of the scale study: one section per preset and configuration."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("study") == "scale":
            groups.setdefault((r["preset"], r["config_key"]), []).append(r)
    out = []
    fractions = (0.1, 0.25, 0.5, 0.75, 1.0)
    for (preset, key), group in groups.items():
        first = group[0]
        by_variant: dict[str, dict[int, dict]] = {}
        for r in group:
            by_variant.setdefault(r["variant"], {})[r["seed"]] = r
        base = by_variant.get("residual", {})
        out += [
            f"### {preset} (configuration {key})", "",
            f"{first['steps']} steps, {first['tokens']:,} tokens a run = {first['passes']:.2f} passes over the "
            f"training split ({first['corpus_train_tokens']:,} tokens of {first['corpus']}); {first['device']}.", "",
            "| variant | seeds | final val loss | Δ val loss vs residual (paired) | final train loss | "
            "largest composite gain, end | largest composite gain, during | diverged |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant, per_seed in by_variant.items():
            seeds = sorted(per_seed)
            rs = [per_seed[s] for s in seeds]
            paired = [per_seed[s]["val_loss"] - base[s]["val_loss"] for s in seeds if s in base]
            delta = "–" if variant == "residual" or not paired else _pm(paired, signed=True)
            gains_end = " / ".join(f"{r['max_composite_gain']:.4g}" for r in rs)
            gains_during = " / ".join(f"{r['max_composite_gain_during']:.4g}" for r in rs)
            diverged = sum(1 for r in rs if r.get("stopped"))
            out.append(f"| {variant} | {', '.join(map(str, seeds))} | {_pm([r['val_loss'] for r in rs])} | {delta} | "
                       f"{_pm([r['train_loss'] for r in rs])} | {gains_end} | {gains_during} | {diverged} of {len(rs)} |")
        out += ["", "Gradient norm before clipping (median of its window, mean ± std over seeds) at a fraction of the run:",
                "", "| variant | " + " | ".join(f"{f:.0%}" for f in fractions) + " | largest |",
                "|---|" + "---|" * (len(fractions) + 1)]
        for variant, per_seed in by_variant.items():
            rs = [per_seed[s] for s in sorted(per_seed)]
            cells = [_pm([_at_fraction(r["grad_norm_history"], f, 1) for r in rs], ".3g") for f in fractions]
            largest = _pm([max((w[2] for w in r["grad_norm_history"]), default=math.nan) for r in rs], ".3g")
            out.append(f"| {variant} | " + " | ".join(cells) + f" | {largest} |")
        # when a gap opens or closes: the validation loss at each evaluation, paired with the baseline
        steps = sorted({s for r in group for s, _ in r["val_history"]})
        marks = sorted({steps[min(len(steps) - 1, max(0, round(f * (len(steps) - 1))))] for f in fractions}) if steps else []
        out += ["", "Validation loss during training (mean ± std over seeds; below each variant, its paired gap to "
                "the residual baseline):", "", "| variant | " + " | ".join(f"step {m}" for m in marks) + " |",
                "|---|" + "---|" * len(marks)]
        for variant, per_seed in by_variant.items():
            at = {s: dict(map(tuple, per_seed[s]["val_history"])) for s in per_seed}
            out.append(f"| {variant} | " + " | ".join(_pm([at[s].get(m, math.nan) for s in at]) for m in marks) + " |")
            if variant != "residual" and base:
                base_at = {s: dict(map(tuple, base[s]["val_history"])) for s in base}
                gaps = [[at[s].get(m, math.nan) - base_at[s].get(m, math.nan) for s in at if s in base_at] for m in marks]
                out.append(f"| {variant} − residual | " + " | ".join(_pm(g, signed=True) for g in gaps) + " |")
        out += ["", "Command:", "", *[f"    {c}" for c in sorted({r['command'] for r in group})], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["init", "seeds", "render", "scale", "scale-report"])
    parser.add_argument("--preset", default=None, help="a preset name or config file (default: tiny; scale: gpu-small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", default=["uniform", "identity", "onehot"])
    parser.add_argument("--variants", nargs="+", default=["residual", "hc", "mhc"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results", type=Path, default=None,
                        help=f"scale: the rows file (default {GPU_RESULTS.relative_to(GPU_RESULTS.parents[2])})")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="scale: pause (checkpoint, exit) before a step would end later than this; leave a "
                             "margin for an evaluation and a checkpoint")
    parser.add_argument("--step-budget", type=int, default=None, metavar="STEPS",
                        help="scale: pause after this many training steps in this invocation")
    parser.add_argument("--whole-runs", action="store_true",
                        help="scale: with --time-budget, start a run only if an earlier run of its variant (same "
                             "config) took less than the time left, so that no run is left half done")
    parser.add_argument("--allow-repeats", action="store_true", help="scale: allow runs longer than one pass")
    parser.add_argument("--keep-checkpoints", action="store_true", help="scale: keep finished runs' checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="scale-report: write the Markdown here (default: print)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    command = "python benchmarks/studies.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.study in ("scale", "scale-report"):
        args.results = args.results or GPU_RESULTS
        if args.study == "scale-report":
            text = render_scale(_rows(args.results))
            if args.out:
                # what stands above the marker (the findings) stays, the tables below it are replaced;
                # a file without the marker is kept whole, the tables added below it
                old = args.out.read_text() if args.out.is_file() else ""
                head = old[: old.index(TABLES_MARKER)] if TABLES_MARKER in old else old
                args.out.write_text(f"{head}{TABLES_MARKER}\n\n{text}")
            else:
                print(text)
            return
        args.preset = args.preset or "gpu-small"
        run_scale(args, command)
        return
    args.preset = args.preset or "tiny"
    if args.study == "render":
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        print(render(rows))
        return

    base = load_config(args.preset, ["train.out_dir='runs/studies/{name}'", *args.overrides])
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    data = load_data(base.data)
    probe, _ = data.get_batch("val", 0, batch_size=base.data.batch_size, seq_len=base.data.seq_len, seed=0)
    if args.study == "init":
        runs = [(init, "mhc", seed) for init in args.inits for seed in args.seeds]
    else:
        runs = [("", variant, seed) for seed in args.seeds for variant in args.variants]
    for init, variant, seed in runs:
        cfg = replace(base, name=f"{base.name}-{args.study}-{variant}-{init or 'default'}-s{seed}",
                      model=replace(base.model, residual=variant, hc_init=init),
                      train=replace(base.train, seed=seed))
        run_one(cfg, data, probe, study=args.study, command=command)


if __name__ == "__main__":
    main()
