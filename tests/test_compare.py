"""``torchmhc compare`` end to end (2 steps) and the ``torchmhc`` command line."""

import json
import math

import pytest
from train_helpers import cli_overrides, tiny_config

from torchmhc.cli import main
from torchmhc.report import format_gain, run_compare


def test_compare_two_steps_writes_a_report_with_this_runs_numbers(tmp_path):
    cfg = tiny_config(tmp_path)
    index = run_compare(cfg, progress=False, command="torchmhc compare (test)")
    report = index.parent
    for name in ("index.html", "summary.md", "data.json", "loss.png", "grad_norm.png", "gains.png",
                 "gain_history.png", "hres_hc.png", "hres_mhc.png"):
        assert (report / name).stat().st_size > 0, name
    assert not (report / "hres_residual.png").exists()  # one stream: nothing to mix

    data = json.loads((report / "data.json").read_text())
    page = index.read_text()
    table = (report / "summary.md").read_text()
    assert list(data["variants"]) == ["residual", "hc", "mhc"]
    assert "<h1>Residual vs HC vs mHC — preset" in page  # the title names the variants compared
    for variant, entry in data["variants"].items():
        summary = entry["summary"]
        run_summary = json.loads((tmp_path / "runs" / f"t-{variant}" / "summary.json").read_text())
        assert summary["val_loss"] == run_summary["val_loss"]
        assert summary["steps"] == 2 and math.isfinite(summary["val_loss"])
        assert f"{summary['val_loss']:.4f}" in page and f"{summary['val_loss']:.4f}" in table
        assert f"{summary['val_bpb']:.4f}" in page
        assert f"{summary['tokens_per_s']:,.0f}" in page
    assert data["variants"]["residual"]["analysis"] is None

    mhc = data["variants"]["mhc"]["analysis"]
    assert len(mhc["single_forward"]) == 2 == len(mhc["composite_backward"])  # 1 block = 2 sub-layers
    assert mhc["single_forward_max_deviation"] <= 1e-3
    assert mhc["max_composite_gain"] < 2
    assert format_gain(mhc["max_composite_gain"]) in page
    hc = data["variants"]["hc"]["analysis"]
    assert format_gain(hc["max_composite_gain"]) in page
    # the gain history has one point per evaluation (steps 0, 1, 2)
    assert [e["step"] for e in data["variants"]["mhc"]["evals"]] == [0, 1, 2]
    assert all("max_composite_gain" in e for e in data["variants"]["mhc"]["evals"])
    assert "torchmhc compare (test)" in page


def test_cli_compare_and_train(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "cli-report"
    assert main(["compare", "--quiet", "--variants", "residual,mhc", "--out", str(out), *cli_overrides(cfg)]) == 0
    data = json.loads((out / "data.json").read_text())
    assert list(data["variants"]) == ["residual", "mhc"]
    assert "report:" in capsys.readouterr().out
    assert data["command"].startswith("torchmhc compare --quiet --variants residual,mhc --out ")

    assert main(["train", "--quiet", *cli_overrides(cfg), "--set", "train.steps=3"]) == 0
    assert main(["train", "--quiet", *cli_overrides(cfg), "--set", "train.steps=4", "--resume"]) == 0
    rows = (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if '"train"' in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "model.residual=bogus"], "model.residual"),
    (["train", "--set", "model.dim='x'"], "model.dim"),
    (["compare", "--preset", "nope"], "unknown preset"),
    (["compare", "--variants", "residual,gru"], "compare.variants"),
])
def test_cli_user_errors_are_one_sentence(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchmhc: error:") and message in err


def test_a_diverging_variant_is_reported_not_fatal(tmp_path, monkeypatch):
    import torchmhc.train as train_module

    original = train_module.lm_loss
    calls = {"n": 0}

    def loss(model, x, y):  # the second training step of the second variant (hc) turns NaN
        value = original(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return value * math.nan
        return value

    monkeypatch.setattr(train_module, "lm_loss", loss)
    index = run_compare(tiny_config(tmp_path), progress=False)
    data = json.loads((index.parent / "data.json").read_text())
    hc = data["variants"]["hc"]
    assert hc["summary"]["stopped"] and hc["summary"]["steps"] == 1
    assert hc["analysis"] is not None  # measured on the last good weights
    assert data["variants"]["mhc"]["summary"]["stopped"] is None
    page = index.read_text()
    assert "stopped at step 1 (non-finite)" in page


def test_cli_bench_passes_arguments_to_the_benchmark(capfd):
    # the benchmark ships in the package (works from a wheel); its own options pass through
    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "usage: torchmhc bench" in out and "--shapes" in out


def test_missing_plot_extra_fails_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match=r"torchmhc\[plots\]"):
        run_compare(tiny_config(tmp_path), progress=False)
    assert not (tmp_path / "runs").exists()
