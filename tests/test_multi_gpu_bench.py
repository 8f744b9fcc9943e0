"""benchmarks/multi_gpu.py: its plans fit every world size, its trace summary and link fit are
right, and the whole script runs end to end on the CPU (gloo, 2 processes), resumes and keeps to
its time budget. On 2 or more GPUs: the correctness section on NCCL in bf16."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_scripts import DIR as _DIR, load_benchmark
from torchmhc.config import load_config
from torchmhc.distributed.config import ParallelConfig

_SRC = Path(__file__).resolve().parents[1] / "src"
mg = load_benchmark("multi_gpu")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_planned_case_is_a_valid_layout_at_8_gpus(device, tmp_path):
    """Each case's degrees multiply to its launch's world size and fit its model and batch, for
    the largest machine (2, 4 and 8 GPUs), so that no case fails on a machine that cannot be debugged."""
    worlds = [2, 4, 8]
    launches = mg.correctness_plan(worlds, device, tmp_path) + mg.scaling_plan(worlds, device) + mg.pipeline_plan(worlds, device)
    assert {launch.world for launch in launches} == {1, 2, 4, 8}
    keys = [c["key"] for launch in launches for c in launch.cases]
    assert len(keys) == len(set(keys)), "case keys are unique"
    for launch in launches:
        for case in launch.cases:
            cfg = load_config(case.get("preset"), case["overrides"])
            parallel = ParallelConfig(**case["parallel"])
            parallel.resolve(launch.world, num_layers=cfg.model.num_layers, batch_size=cfg.data.batch_size)
    pipeline = [c for launch in launches if launch.section == "pipeline" for c in launch.cases]
    assert {(c["pp"], c["dp"]) for c in pipeline} == {(2, 1), (4, 1), (2, 4), (4, 2)}
    resumes = [c for launch in launches for c in launch.cases if c.get("resume_from")]
    assert {c["world"] for c in resumes} == {1, 2, 4}, "the 8-GPU checkpoint resumes at every other size"


def test_trace_summary_counts_busy_idle_communication_and_concurrency():
    def kernel(name, stream, start, end):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": start * 1e3, "dur": (end - start) * 1e3, "args": {"stream": stream}}

    events = [
        kernel("gemm", 7, 0, 4),
        kernel("post_res", 9, 2, 5),  # 2 ms beside the gemm on another stream
        kernel("ncclDevKernel_SendRecv", 13, 4.5, 8),  # 0.5 ms under compute
        kernel("gemm", 7, 9, 10),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1e6},  # ignored: GPU kernels exist
    ]
    s = mg.summarize_trace(events, top=1)
    assert s["window"] == pytest.approx(10)
    assert s["busy"] == pytest.approx(6)  # [0, 5] and [9, 10]
    assert s["idle"] == pytest.approx(0.4)
    assert s["comm"] == pytest.approx(3.5) and s["comm_under_compute"] == pytest.approx(0.5)
    assert s["concurrent_compute"] == pytest.approx(2)
    assert s["streams"]["7"] == {"ms": pytest.approx(5), "kernels": [["gemm", pytest.approx(5)]]}


def test_link_fit_recovers_rate_and_latency():
    rate, latency = 200e9, 8e-6  # bytes/s, s
    edges = {k: {"bytes": b, "seconds": b / rate + latency} for k, b in (("n1", 10_000_000), ("n4", 40_000_000))}
    gbps, latency_us = mg._link(edges)
    assert gbps == pytest.approx(200) and latency_us == pytest.approx(8)


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(_SRC), OMP_WAIT_POLICY="PASSIVE")
    env.pop("TRITON_INTERPRET", None)  # the GPU run needs the compiled kernels; the CPU run uses none
    result = subprocess.run([sys.executable, str(_DIR / "multi_gpu.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["section"] != "command"]


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_section_resumes_and_keeps_its_budget(tmp_path):
    """Every section end to end on gloo (2 processes, tiny models; about 2 minutes on 2 cores)."""
    rows_path, out = tmp_path / "rows.jsonl", tmp_path / "out" / "report.md"
    common = ["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)]
    _script("--rows", str(rows_path), *common, cwd=tmp_path)
    rows = mg.read_rows(rows_path)
    by_section = {s: [r for r in rows if r["section"] == s] for s in mg.SECTIONS}

    planned = [c["key"] for launch in mg.correctness_plan([2], "cpu", tmp_path) for c in launch.cases]
    assert sorted(r["key"] for r in by_section["correctness"]) == sorted(planned)
    results = mg.correctness_results(rows)
    assert len(results) == len(planned) - 3  # all but the three one-GPU references
    assert all(r["ok"] for r in results), results
    resumed = next(r for r in results if r["key"] == "w1/resume-dp1")
    assert resumed["steps"] == [3, 4], "the resumed run continues after the checkpoint's step"

    assert len(by_section["scaling"]) == 8  # 2 presets x 2 variants x world 1 and 2
    for r in by_section["scaling"]:
        assert math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 and r["tokens_per_s_per_gpu"] > 0

    cases = [r for r in by_section["pipeline"] if "case" in r]
    assert len(cases) == 4  # pp 2: residual, mHC x 1F1B, DualPipeV
    for r in cases:
        assert len(r["ranks"]) == 2 and all(0 <= x["idle"] <= 1 and x["window"] > 0 for x in r["ranks"])
        assert 0 < r["ms_schedule"] < math.inf
        assert r["edge_bytes"] == 32 * r["num_streams"] * 64 * 4  # one sequence x n x C, fp32 on the CPU
    assert {r["num_streams"] for r in cases} == {1, 4}
    p2p = next(r for r in by_section["pipeline"] if r.get("kind") == "p2p")
    assert all(e["seconds"] > 0 for e in p2p["edges"].values())
    for r in cases:
        if r["trace"]:
            assert (out.parent / r["trace"]).stat().st_size > 0

    predictions = [r for r in by_section["model"] if r.get("kind") == "prediction"]
    assert len(predictions) == 4 and all(math.isfinite(r["rel_error"]) and r["predicted_ms"] > 0 for r in predictions)
    text = out.read_text()
    for heading in ("## Correctness", "## Data-parallel scaling", "## Pipeline", "## The pipeline model"):
        assert heading in text

    # the same command again: everything is done, nothing is launched or measured again
    again = _script("--rows", str(rows_path), *common, cwd=tmp_path)
    assert _measured(mg.read_rows(rows_path)) == _measured(rows)
    assert "done before" in again.stdout

    # no time left: every launch is skipped, and said to be
    fresh = tmp_path / "fresh.jsonl"
    skipped = _script("--rows", str(fresh), *common, "--time-budget", "0", cwd=tmp_path)
    assert _measured(mg.read_rows(fresh)) == []
    assert skipped.stdout.count("skipped: needs") == 2 + 2 + 1  # correctness, scaling (worlds 2, 1), pipeline
    assert "model skipped" in skipped.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_correctness_section_on_two_gpus(tmp_path):
    """NCCL, bf16: FSDP2, pp = 2 with every schedule, DualPipeV's overlap, a DCP checkpoint of 2
    GPUs resumed on one: each step's loss and gradient norm within bf16 tolerance of one GPU."""
    rows_path = tmp_path / "rows.jsonl"
    _script("--only", "correctness", "--gpus", "2", "--rows", str(rows_path), "--work", str(tmp_path / "work"), cwd=tmp_path)
    rows = mg.read_rows(rows_path)
    assert not [r for r in rows if "error" in r]
    results = mg.correctness_results(rows)
    planned = [c for launch in mg.correctness_plan([2], "cuda", tmp_path) for c in launch.cases]
    assert len(results) == len(planned) - 3
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
