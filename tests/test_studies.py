"""benchmarks/studies.py's study at GPU scale, on a tiny CPU config: variants x seeds, a run split
across invocations equal to one that was not, the one-pass guard and the report."""

import json
import statistics

import pytest

from benchmark_scripts import load_benchmark
from torchmhc.train import TimeBudget
from train_helpers import cli_overrides, tiny_config

studies = load_benchmark("studies")


def _study(tmp_path, label: str, *extra: str) -> list[str]:
    cfg = tiny_config(tmp_path, "train.steps=4", "train.eval_interval=2", f"train.out_dir='{tmp_path / label / '{name}'}'")
    return ["scale", "--preset", "tiny", *cli_overrides(cfg), "--variants", "residual", "mhc", "--seeds", "0", "1",
            "--results", str(tmp_path / f"{label}.jsonl"), "--quiet", *extra]


def _rows(tmp_path, label):
    return {(r["variant"], r["seed"]): r for r in map(json.loads, (tmp_path / f"{label}.jsonl").read_text().splitlines())}


def test_a_study_split_across_invocations_equals_one_that_was_not(tmp_path):
    studies.main(_study(tmp_path, "whole"))
    whole = _rows(tmp_path, "whole")
    assert len(whole) == 4
    calls = 0
    while not (tmp_path / "split.jsonl").is_file() or len(_rows(tmp_path, "split")) < 4:
        studies.main(_study(tmp_path, "split", "--step-budget", "3"))  # pauses runs mid-way (4 steps each)
        calls += 1
        assert calls <= 8
    assert calls == 6  # 16 steps, 3 an invocation
    split = _rows(tmp_path, "split")
    for key, row in whole.items():
        for field in ("val_loss", "train_loss", "val_history", "grad_norm_history", "gain_history", "max_composite_gain"):
            assert split[key][field] == row[field], (key, field)
    studies.main(_study(tmp_path, "split"))  # everything done: nothing trains, no row is added
    assert len((tmp_path / "split.jsonl").read_text().splitlines()) == 4
    assert not list((tmp_path / "split").glob("*/checkpoints"))  # deleted once a run's row is written

    report = studies.render_scale(list(whole.values()))
    gap = [whole[("mhc", s)]["val_loss"] - whole[("residual", s)]["val_loss"] for s in (0, 1)]
    assert f"{statistics.mean(gap):+.4f} ± {statistics.stdev(gap):.4f}" in report
    assert f"| step 4 |\n" in report  # the validation curve's last column: the final losses and their gap
    assert f"| mhc − residual | " in report and report.count(f"{statistics.mean(gap):+.4f} ± {statistics.stdev(gap):.4f}") == 2
    assert "| residual | 0, 1 |" in report and f"{whole[('mhc', 0)]['passes']:.2f} passes" in report
    assert whole[("mhc", 0)]["max_composite_gain"] >= 1 and len(whole[("mhc", 0)]["grad_norm_history"]) == 4


def test_a_diverged_run_is_a_row_that_says_where_it_stopped(tmp_path):
    studies.main(_study(tmp_path, "div", "--set", "optim.lr=1e9", "--set", "optim.grad_clip=0",
                        "--variants", "hc", "--seeds", "0"))
    (row,) = _rows(tmp_path, "div").values()
    assert "non-finite" in row["stopped"] and row["val_loss"] != row["val_loss"]  # NaN
    assert "| hc | 0 | – |" in studies.render_scale([row]) and "1 of 1 |" in studies.render_scale([row])


def test_a_study_longer_than_one_pass_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="passes over|times"):
        studies.main(_study(tmp_path, "long", "--set", "train.steps=5000"))


def test_time_budget_pauses_before_a_step_that_would_end_late():
    now = [0.0]
    budget = TimeBudget(10.0, clock=lambda: now[0])
    pause = budget.pause()
    assert not pause(0)
    now[0] = 4.0  # a step took 4 s: the next would end at 8
    assert not pause(1)
    now[0] = 6.5  # 2.5 s, but the longest was 4: 6.5 + 4 > 10
    assert pause(2)
    assert budget.remaining() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="time budget"):
        TimeBudget(0)


def test_whole_runs_starts_only_runs_that_fit_the_time_left(tmp_path):
    args = _study(tmp_path, "fit")
    seeds = args.index("--seeds")
    studies.main(args[: seeds + 1] + ["0"] + args[seeds + 3 :])  # seed 0 of both variants, timed
    path = tmp_path / "fit.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["wall_s"] > 0 for r in rows)
    for r in rows:  # residual "took" longer than the budget below; mHC's real time fits
        r["wall_s"] = 1e4 if r["variant"] == "residual" else r["wall_s"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    studies.main(args + ["--time-budget", "600", "--whole-runs"])
    assert set(_rows(tmp_path, "fit")) == {("residual", 0), ("mhc", 0), ("mhc", 1)}
    studies.main(args + ["--time-budget", "600"])  # without it, a run is started and paused if need be
    assert ("residual", 1) in _rows(tmp_path, "fit")


def test_scale_report_keeps_the_prose_above_its_tables(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"study": "scale", "preset": "p", "config_key": "k", "variant": "residual", "seed": 0,
                                "steps": 4, "tokens": 8, "passes": 0.1, "corpus_train_tokens": 80, "corpus": "c",
                                "device": "cpu", "val_loss": 2.5, "train_loss": 2.4, "max_composite_gain": 1.0,
                                "max_composite_gain_during": 1.0, "grad_norm_history": [[4, 1.0, 2.0]],
                                "val_history": [[0, 3.0], [4, 2.5]], "command": "cmd"}) + "\n")
    out = tmp_path / "study.md"
    studies.main(["scale-report", "--results", str(rows), "--out", str(out)])
    first = out.read_text()
    assert first.startswith(studies.TABLES_MARKER) and "| residual | 0 | 2.5000 |" in first
    out.write_text("# Findings\n\nprose\n\n" + first.replace("2.5000", "9.9999"))  # stale tables below the prose
    studies.main(["scale-report", "--results", str(rows), "--out", str(out)])
    assert out.read_text() == "# Findings\n\nprose\n\n" + first
    out.write_text("# Findings, no marker yet\n\n")
    studies.main(["scale-report", "--results", str(rows), "--out", str(out)])
    assert out.read_text() == "# Findings, no marker yet\n\n" + first
