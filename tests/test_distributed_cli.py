"""``torchmhc train`` laid out over processes, through the normal entry point: ``torchrun
--nproc-per-node 2 -m torchmhc train --preset tiny --set parallel...`` on the CPU (gloo, fp32).

Every run must write the metrics of the one-process ``torchmhc train`` run of the same global
batch (loss, gradient norm and validation loss within 1e-5 relative), also when it resumes a
checkpoint written at another layout or by one process, and a one-process run must continue a
checkpoint written by a laid-out run. Starting processes is the slow part (seconds each on 2
cores): three launches train (two of them resuming), so that every path runs once. The runs use a
constant learning rate, so that runs of different lengths train alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchmhc
from torchmhc.cli import main
from torchmhc.config import load_config
from torchmhc.data import load_data
from torchmhc.distributed.mesh import free_port
from torchmhc.models import build_model
from torchmhc.train import DCP_CHECKPOINT_FORMAT, checkpoint_format, latest_checkpoint, load_training_checkpoint

from train_helpers import make_corpus

LONGEST = 6  # steps of the one-process reference


def _overrides(root: Path, out: str, *extra: str, steps: int = 4) -> list[str]:
    """The tiny preset shrunk to 4 blocks (two stages a rank for DualPipeV), batch 8 x 16."""
    sets = [
        f"data.path='{root / 'corpus'}'", f"data.cache_dir='{root / 'cache'}'", "data.val_fraction=0.25",
        "data.seq_len=16", "data.batch_size=8", "model.dim=32", "model.num_layers=4", "model.num_heads=2",
        "model.max_seq_len=16", "model.tie_embeddings=false", "optim.warmup_steps=1", "optim.schedule=constant",
        f"train.steps={steps}", "train.eval_interval=1", "train.eval_batches=2", "train.num_threads=1",
        f"train.out_dir='{root / out}'", *extra,
    ]  # fmt: skip
    return sets


def _train_args(root: Path, out: str, *extra: str, steps: int = 4) -> list[str]:
    args = ["train", "--preset", "tiny", "--quiet"]
    for item in _overrides(root, out, *extra, steps=steps):
        args += ["--set", item]
    return args


def _torchrun(args: list[str], *, nproc: int = 2) -> subprocess.CompletedProcess:
    src = str(Path(torchmhc.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "torchmhc", *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    result = _torchrun(args)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed ({result.returncode}):\n{result.stderr[-8000:]}")
    assert result.stdout.count("run: ") == 1, "rank 0 alone reports"
    return result


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(rows: list[dict], reference: list[dict]) -> None:
    """Every row of ``rows`` equals the reference's row of the same kind and step."""
    by_key = {(r["kind"], r["step"]): r for r in reference}
    assert rows
    for row in rows:
        ref = by_key[(row["kind"], row["step"])]
        for key in ("loss", "grad_norm", "val_loss"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], rel=1e-5), (row, ref)
        if row["kind"] == "train":
            assert row["tokens"] == ref["tokens"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed-cli")
    make_corpus(root / "corpus")
    load_data(load_config(None, _overrides(root, "x")).data, progress=False)  # tokenized once, before the launches
    return root


@pytest.fixture(scope="module")
def reference(root) -> list[dict]:
    """The one-process run (today's path: no [parallel], no launcher)."""
    assert main(_train_args(root, "one", steps=LONGEST)) == 0
    return _rows(root / "one")


@pytest.fixture(scope="module")
def fsdp(root) -> Path:
    """FSDP over 2 ranks from scratch, checkpoints (DCP) after steps 2 and 4."""
    _launch(_train_args(root, "fsdp", "parallel.dp_shard=2", "train.checkpoint_interval=2", "train.keep_checkpoints=2"))
    return root / "fsdp"


@pytest.fixture(scope="module")
def pipeline_1f1b(root) -> Path:
    """2 steps in one process (a safetensors checkpoint), resumed by pp = 2 under 1F1B."""
    assert main(_train_args(root, "pp-1f1b", steps=2)) == 0
    _launch(_train_args(root, "pp-1f1b", "parallel.pp=2", "parallel.pp_schedule=1f1b") + ["--resume"])
    return root / "pp-1f1b"


@pytest.fixture(scope="module")
def pipeline_v(root, fsdp) -> Path:
    """DualPipeV (pp = 2, two stages a rank) resuming FSDP's step-2 checkpoint."""
    _launch(
        _train_args(root, "pp-v", "parallel.pp=2", "parallel.pp_schedule=dualpipev")
        + ["--resume-from", str(fsdp / "checkpoints" / "step_000002")]
    )
    return root / "pp-v"


def test_fsdp_run_equals_the_one_process_run(fsdp, reference):
    rows = _rows(fsdp)
    _assert_same_run(rows, reference)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert sorted(p.name for p in (fsdp / "checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    assert checkpoint_format(latest_checkpoint(fsdp)) == DCP_CHECKPOINT_FORMAT
    config = json.loads((fsdp / "config.json").read_text())
    assert config["parallel"]["dp_shard"] == 2
    summary = json.loads((fsdp / "summary.json").read_text())
    one = json.loads((fsdp.parent / "one" / "summary.json").read_text())
    assert summary["num_params"] == one["num_params"] and summary["steps"] == 4


def test_pipeline_runs_equal_the_one_process_run(pipeline_1f1b, pipeline_v, reference):
    """1F1B resuming a one-process checkpoint (converted on the fly); DualPipeV resuming FSDP's
    checkpoint, with an evaluation of two batches between its steps (an evaluation of a V
    schedule must leave it ready to evaluate and train again)."""
    rows = _rows(pipeline_1f1b)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # 1-2 from the one process
    _assert_same_run(rows, reference)
    assert not list((pipeline_1f1b / "checkpoints").glob(".*")), "the conversion left nothing behind"
    summary = json.loads((pipeline_1f1b / "summary.json").read_text())
    assert summary["num_params"] == json.loads((pipeline_1f1b.parent / "one" / "summary.json").read_text())["num_params"]

    rows = _rows(pipeline_v)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 3), ("eval", 3), ("train", 4), ("eval", 4)]
    _assert_same_run(rows, reference)


def test_one_process_resumes_a_pipelined_checkpoint(pipeline_1f1b, reference, root):
    """The pp = 2 run's DCP checkpoint, resumed by the one-process path (no [parallel], no
    launcher), continues exactly; its new checkpoints are single files again."""
    run = root / "pp-1f1b-continued"
    shutil.copytree(pipeline_1f1b, run)
    assert checkpoint_format(latest_checkpoint(run)) == DCP_CHECKPOINT_FORMAT
    assert main(_train_args(root, "pp-1f1b-continued", steps=LONGEST) + ["--resume"]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, LONGEST + 1))
    _assert_same_run(rows, reference)
    assert checkpoint_format(latest_checkpoint(run)) == 1


def test_a_world_size_that_does_not_fit_is_one_line(root):
    result = _torchrun(_train_args(root, "mismatch", "parallel.pp=2", "parallel.dp_shard=2"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "torchmhc: error:" in line]
    assert errors == [
        "torchmhc: error: the world size 2 must equal parallel.pp x parallel.dp_replicate x parallel.dp_shard = "
        "2 x 1 x 2 = 4; change the degrees or the number of processes (torchrun --nproc-per-node)."
    ]
    assert not (root / "mismatch").exists()


# ----------------------------------------------------------------------------------------------
# One process with a [parallel] section (world size 1): in this process, no launcher
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_job(monkeypatch):
    """The environment torchrun would give a one-process job (restored afterwards)."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def test_a_non_finite_loss_stops_a_laid_out_run_with_its_last_good_checkpoint(root, reference, monkeypatch, one_rank_job):
    import torch.distributed as dist

    import torchmhc.distributed.step as step_module
    from torchmhc.train import NonFiniteLossError, train

    original, calls = step_module.token_cross_entropy, {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        value = original(logits, targets)
        return value * float("nan") if calls["n"] == 3 else value  # the third step's loss

    monkeypatch.setattr(step_module, "token_cross_entropy", poisoned)
    cfg = load_config("tiny", _overrides(root, "stopped", "parallel.dp_shard=1", "train.eval_interval=0"))
    with pytest.raises(NonFiniteLossError, match="non-finite training signal at step 2") as info:
        train(cfg, progress=False)
    assert not dist.is_initialized(), "the process group is left on errors too"
    assert info.value.checkpoint == latest_checkpoint(cfg.out_dir) and info.value.checkpoint.name == "step_000002"
    assert checkpoint_format(info.value.checkpoint) == DCP_CHECKPOINT_FORMAT
    assert json.loads((cfg.out_dir / "summary.json").read_text())["stopped"]
    _assert_same_run(_rows(cfg.out_dir), reference)  # steps 1 and 2
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    assert load_training_checkpoint(info.value.checkpoint, model, optimizer)["step"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


# ----------------------------------------------------------------------------------------------
# On one GPU (NCCL, bf16, compiled blocks): the lead's machine
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_one_gpu_laid_out_runs_with_compiled_blocks(root):
    """``torchmhc train`` on one GPU with ``parallel.dp_shard=1`` (the distributed path at world size 1:
    no FSDP over the one rank) and with
    ``parallel.pp_schedule=dualpipev`` (both V stages on the GPU, the overlap function's streams):
    NCCL, bf16, blocks compiled in place before the layout, DCP checkpoints. The losses are the
    one-device run's within bf16 rounding, and the one-device path resumes the FSDP checkpoint."""
    gpu = ("train.device=cuda", "train.dtype=bf16", "train.compile=true", "model.dim=64", "train.eval_interval=2")
    src = str(Path(torchmhc.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))

    def run(out: str, *extra: str, steps: int = 4, resume: bool = False) -> None:
        args = _train_args(root, out, *gpu, *extra, steps=steps) + (["--resume"] if resume else [])
        result = subprocess.run([sys.executable, "-m", "torchmhc", *args], env=env, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-8000:]

    run("gpu-one")
    one = _rows(root / "gpu-one")
    for out, extra in (("gpu-fsdp", "parallel.dp_shard=1"), ("gpu-v", "parallel.pp_schedule=dualpipev")):
        run(out, extra)
        rows = _rows(root / out)
        assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in one]
        for a, b in zip(rows, one):
            for key in ("loss", "val_loss"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=2e-2), (out, a, b)
        assert checkpoint_format(latest_checkpoint(root / out)) == DCP_CHECKPOINT_FORMAT
    run("gpu-fsdp", steps=LONGEST, resume=True)
    assert [r["step"] for r in _rows(root / "gpu-fsdp") if r["kind"] == "train"] == list(range(1, LONGEST + 1))
