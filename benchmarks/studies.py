"""CPU studies behind two library decisions: the mHC initialization, and mHC vs residual noise.

    python benchmarks/studies.py init  [--inits uniform identity onehot] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/studies.py seeds [--variants residual hc mhc] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/studies.py render          # Markdown tables of everything measured so far

``init`` trains mHC from each start of docs/math.md §8 (uniform b = 0, identity-biased, HC-style one-hot
H_pre); ``seeds`` trains each variant for each seed. Every finished run appends one JSON line to
``benchmarks/results/studies-cpu.jsonl`` (so studies can run in parallel processes and be
resumed), and ``render`` turns that file into the tables of docs/init_study.md and
docs/seed_study.md. All runs use the ``tiny`` preset unless ``--preset`` says otherwise.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from torchmhc import analysis
from torchmhc.config import load_config
from torchmhc.data import load_data
from torchmhc.report import analyze_model
from torchmhc.train import NonFiniteLossError, train

RESULTS = Path(__file__).resolve().parent / "results" / "studies-cpu.jsonl"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["init", "seeds", "render"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", default=["uniform", "identity", "onehot"])
    parser.add_argument("--variants", nargs="+", default=["residual", "hc", "mhc"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.study == "render":
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        print(render(rows))
        return

    base = load_config(args.preset, ["train.out_dir='runs/studies/{name}'", *args.overrides])
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    command = "python " + " ".join(sys.argv)
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
