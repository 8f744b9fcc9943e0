"""Training across processes, for real: gloo, ``torchrun``, 4 and 2 processes on the CPU.

Every layout must give the one-process run (``torchmhc.train.train_step`` on the whole batch):
the same loss and gradient norm at every step and the same weights at the end. Starting
processes is the slow part, so each world size is launched once (``torchmhc.distributed.runner``
runs all its cases in turn) and the tests below read what the cases wrote.

Tolerances. fp64 cases (parameters, streams and reductions in fp64; the loss and a few
operations stay fp32 by design) must match within 1e-5 relative in loss and gradient norm and
1e-6 per weight tensor (relative 2-norm of the difference): no other rounding than the order of
the reductions. fp32 cases must match within 1e-5 in loss and gradient norm; their weights within
1e-4 per tensor: AdamW divides each gradient by its running RMS, so for gradients at the rounding
noise floor (the hyper-connection gates start saturated, gradients ~1e-12) any other summation
order moves the weight by up to the learning rate; three steps of that reach ~1e-5 of a small
tensor's norm whatever the layout, while a wrong reduction shows up at ~1e-2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchmhc
from torchmhc.config import load_config
from torchmhc.data import load_data
from torchmhc.distributed.mesh import free_port
from torchmhc.models import build_model
from torchmhc.train import (
    autocast_context,
    build_optimizer,
    evaluate,
    learning_rate,
    load_checkpoint,
    save_checkpoint,
    train_step,
)

from train_helpers import make_corpus

STEPS = 3
MOE = ("model.arch=moe", "model.num_experts=4", "model.top_k=2")
TIED = "model.tie_embeddings=true"  # after _overrides' false
EIGHT = ("model.num_layers=8", "model.dim=64")  # blocks outweigh the embedding and head


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    make_corpus(root / "corpus")
    load_data(load_config(None, _overrides(root)).data, progress=False)  # tokenized once, before the launches
    return root


def _overrides(root: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """A 4-block model (so that pp = 2 with two stages a rank still has a block a stage), batch 8 x 16."""
    return [
        f"data.path='{root / 'corpus'}'",
        f"data.cache_dir='{root / 'cache'}'",
        "data.val_fraction=0.25",
        "data.seq_len=16",
        "data.batch_size=8",
        "model.dim=32",
        "model.num_layers=4",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "model.tie_embeddings=false",
        "optim.warmup_steps=1",
        f"train.steps={steps}",
        *extra,
    ]


def _case(root: Path, name: str, parallel: dict, *extra: str, dtype: str = "float64", steps: int = STEPS, **more) -> dict:
    # steps = 0 (the initial weights) in a run of one step: a run has at least one
    return {"name": name, "overrides": _overrides(root, *extra, steps=max(steps, 1)), "parallel": parallel,
            "steps": steps, "dtype": dtype, **more}  # fmt: skip


def _launch(world_size: int, cases: list[dict], out: Path, *, device: str = "cpu") -> Path:
    """Run ``cases`` under ``torchrun --nproc-per-node world_size`` (one launch)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    src = str(Path(torchmhc.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "torchmhc.distributed.runner", str(out / "cases.json"), str(out), "--device", device,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed ({result.returncode}):\n{result.stderr[-8000:]}")
    return out


def _cases4(root: Path) -> list[dict]:
    dcp = dict(save_at=2, checkpoint_dir=str(root / "ckpt4"))
    return [
        _case(root, "fsdp4", {"dp_shard": 4}),
        _case(root, "fsdp4-fp32", {"dp_shard": 4}, dtype="float32"),
        _case(root, "hsdp-moe", {"dp_replicate": 2, "dp_shard": 2}, *MOE),
        _case(root, "pp2dp2-moe-fp32", {"pp": 2, "dp_shard": 2, "microbatches": 2}, *MOE, "model.recompute=true",
              dtype="float32"),  # fmt: skip
        # trains 4 steps, checkpointed after 2 (resumed by the cases below and by the 2-process launch)
        _case(root, "pp2dp2-moe", {"pp": 2, "dp_shard": 2, "microbatches": 2}, *MOE, steps=4, **dcp),
        _case(root, "resume-dp4-moe", {"dp_shard": 4}, *MOE, steps=4, resume_from=str(root / "ckpt4")),
        # tied embeddings: the last stage's copy on another rank, FSDP-sharded; checkpointed after 2
        # steps and resumed at dp 4 (one tied matrix) and at pp 2 (by the 2-process launch)
        _case(root, "pp2dp2-tied", {"pp": 2, "dp_shard": 2, "microbatches": 2}, TIED, steps=4,
              save_at=2, checkpoint_dir=str(root / "ckpt4-tied")),  # fmt: skip
        _case(root, "resume-dp4-tied", {"dp_shard": 4}, TIED, steps=4, resume_from=str(root / "ckpt4-tied")),
        # no steps: the initial weights, and what building them cost each rank
        _case(root, "init-pp2dp2", {"pp": 2, "dp_shard": 2, "microbatches": 2}, dtype="float32", steps=0),
        _case(root, "init-fsdp4", {"dp_shard": 4}, *EIGHT, dtype="float32", steps=0, measure_build=True),
        _case(root, "init-pp4", {"pp": 4}, *EIGHT, dtype="float32", steps=0, measure_build=True),
    ]


def _cases2(root: Path) -> list[dict]:
    schedules = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")
    return [
        _case(root, "fsdp2", {"dp_shard": 2}),
        _case(root, "fsdp2-fp32", {"dp_shard": 2}, dtype="float32"),
        _case(root, "fsdp2-moe", {"dp_shard": 2}, *MOE),
        _case(root, "fsdp2-recompute", {"dp_shard": 2}, "model.recompute=true"),
        _case(root, "fsdp2-accumulate", {"dp_shard": 2, "microbatches": 2}),  # gradient accumulation
        *(_case(root, f"pp2-{s}", {"pp": 2, "pp_schedule": s, "microbatches": 4}) for s in schedules),
        _case(root, "pp2-1f1b-fp32", {"pp": 2, "microbatches": 4}, dtype="float32"),
        _case(root, "pp2-1f1b-moe", {"pp": 2, "microbatches": 2}, *MOE),
        _case(root, "pp2-dualpipev-moe", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, *MOE),
        _case(root, "pp2-dualpipev-recompute", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, "model.recompute=true"),
        _case(root, "pp2-dualpipev-sequential", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, overlap=False),
        # both V stages on each rank, FSDP over the two ranks (the schedule gathers and frees them)
        _case(root, "pp1dp2-dualpipev-moe", {"dp_shard": 2, "pp_schedule": "dualpipev", "microbatches": 2}, *MOE),
        # the 4-process checkpoint (pp 2 x dp 2) resumed at pp 2 (dualpipev) ...
        _case(root, "resume-pp2-moe", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, *MOE, steps=4,
              resume_from=str(root / "ckpt4")),  # fmt: skip
        # ... and a one-process safetensors checkpoint converted to DCP, resumed with FSDP
        _case(root, "resume-converted", {"dp_shard": 2}, steps=4, resume_from=str(root / "converted")),
        # tied embeddings: the two copies on two ranks (1f1b) or on one (dualpipev's V)
        _case(root, "pp2-1f1b-tied", {"pp": 2, "microbatches": 4}, TIED),
        _case(root, "pp2-dualpipev-tied", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, TIED),
        _case(root, "resume-pp2-tied", {"pp": 2, "microbatches": 4}, TIED, steps=4, resume_from=str(root / "ckpt4-tied")),
        # no steps: the initial weights
        _case(root, "init-fsdp2-moe", {"dp_shard": 2}, *MOE, dtype="float32", steps=0),
        _case(root, "init-pp2-tied", {"pp": 2, "microbatches": 4}, TIED, dtype="float32", steps=0),
        _case(root, "init-pp2-dualpipev", {"pp": 2, "pp_schedule": "dualpipev", "microbatches": 4}, dtype="float32", steps=0),
    ]


@pytest.fixture(scope="module")
def runs4(workdir: Path) -> Path:
    return _launch(4, _cases4(workdir), workdir / "out4")


@pytest.fixture(scope="module")
def runs2(workdir: Path, runs4: Path) -> Path:
    from torchmhc.distributed.checkpoint import safetensors_to_dcp

    # A one-process run's step-2 checkpoint (torchmhc.train format), converted for "resume-converted".
    cfg = load_config(None, _overrides(workdir, steps=4))
    model, optimizer = _reference_model(cfg, torch.float64)
    _reference_steps(cfg, model, optimizer, range(2))
    path = save_checkpoint(workdir / "one-process", model, optimizer, {"step": 2})
    with _float64_default():
        safetensors_to_dcp(path, workdir / "converted", cfg.model, cfg.optim)
    return _launch(2, _cases2(workdir), workdir / "out2")


# ----------------------------------------------------------------------------------------------
# One-process references
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _float64_default():
    """Build models in fp64 (the conversion helpers build the one-process model themselves)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _reference_model(cfg, dtype, device="cpu"):
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dtype).to(device)
    model.train()
    return model, build_optimizer(model, cfg.optim)


def _reference_steps(cfg, model, optimizer, steps, autocast=None) -> list[dict]:
    data = load_data(cfg.data, progress=False)
    device = next(model.parameters()).device
    rows = []
    for step in steps:
        x, y = data.get_batch("train", step, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=cfg.train.seed)
        stats = train_step(
            model, optimizer, (x.to(device), y.to(device)), lr=learning_rate(step, cfg.train.steps, cfg.optim),
            grad_clip=cfg.optim.grad_clip, on_nonfinite="stop", autocast=autocast or contextlib.nullcontext(), step=step,
        )  # fmt: skip
        rows.append({"step": step + 1, "loss": stats.loss, "grad_norm": stats.grad_norm})
    return rows


def _val_loss(cfg, model) -> float:
    """The first validation batch's loss (what the runner measures after training)."""
    device = next(model.parameters()).device
    autocast = autocast_context(device, cfg.train.dtype) if device.type == "cuda" else contextlib.nullcontext()
    return evaluate(model, load_data(cfg.data, progress=False), num_batches=1, batch_size=cfg.data.batch_size,
                    seq_len=cfg.data.seq_len, device=device, autocast=autocast)  # fmt: skip


@functools.lru_cache(maxsize=None)
def _reference(overrides: tuple[str, ...], dtype: str, steps: int) -> tuple[list[dict], dict[str, torch.Tensor], float]:
    """Metrics, final weights and validation loss of the one-process run."""
    cfg = load_config(None, list(overrides))
    model, optimizer = _reference_model(cfg, getattr(torch, dtype))
    rows = _reference_steps(cfg, model, optimizer, range(steps))
    return rows, {k: v.detach().clone() for k, v in model.state_dict().items()}, _val_loss(cfg, model)


def _case_by_name(cases: list[dict], name: str) -> dict:
    return next(c for c in cases if c["name"] == name)


def _check(out: Path, case: dict, *, first_step: int = 0) -> None:
    rows, weights, val_loss = _reference(tuple(case["overrides"]), case["dtype"], case["steps"])
    metrics = json.loads((out / case["name"] / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(val_loss, rel=1e-5), case["name"]
    got = metrics["train"]
    assert [r["step"] for r in got] == [r["step"] for r in rows[first_step:]]
    for mine, ref in zip(got, rows[first_step:]):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5), (case["name"], mine, ref)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (case["name"], mine, ref)
    parts = _gathered_weights(out / case["name"])
    assert set(parts) == set(weights), "every weight of the model is somewhere"
    tolerance = 1e-6 if case["dtype"] == "float64" else 1e-4
    for key, ref in weights.items():
        error = ((parts[key] - ref).norm() / ref.norm()).item()
        assert error <= tolerance, (case["name"], key, error)


def _gathered_weights(case_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights a case wrote, one file per pipeline rank."""
    parts = {}
    for path in sorted(case_dir.glob("weights_pp*.safetensors")):
        part = load_file(str(path))
        assert not set(part) & set(parts), "pipeline ranks hold disjoint parameters"
        parts.update(part)
    return parts


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _kept_bytes(block: torch.nn.Module, dp: int) -> int:
    """What one of ``dp`` FSDP ranks keeps of ``block``: the hyper-connections' parameters and the
    buffers whole, of every other parameter a dim-0 shard (ceil(rows / dp) rows)."""
    total = sum(b.numel() * b.element_size() for b in block.buffers())
    for name, p in block.named_parameters():
        rows = p.shape[0] if "_hc." in name else -(-p.shape[0] // dp)
        total += rows * (p.numel() // p.shape[0]) * p.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp4", "fsdp4-fp32", "hsdp-moe", "pp2dp2-moe-fp32", "pp2dp2-moe", "pp2dp2-tied"])
def test_four_processes_match_one(runs4, workdir, name):
    _check(runs4, _case_by_name(_cases4(workdir), name))


@pytest.mark.parametrize(
    "name",
    [
        "fsdp2", "fsdp2-fp32", "fsdp2-moe", "fsdp2-recompute", "fsdp2-accumulate",
        "pp2-gpipe", "pp2-1f1b", "pp2-interleaved-1f1b", "pp2-zbv", "pp2-dualpipev",
        "pp2-1f1b-fp32", "pp2-1f1b-moe", "pp2-dualpipev-moe", "pp2-dualpipev-recompute", "pp1dp2-dualpipev-moe",
        "pp2-1f1b-tied", "pp2-dualpipev-tied",
    ],
)  # fmt: skip
def test_two_processes_match_one(runs2, workdir, name):
    _check(runs2, _case_by_name(_cases2(workdir), name))


def test_dualpipev_overlap_matches_sequential(runs2):
    """The registered OVERLAP_F_B function gives exactly the numbers of torch's sequential order."""
    overlapped, sequential = runs2 / "pp2-dualpipev", runs2 / "pp2-dualpipev-sequential"
    assert json.loads((overlapped / "metrics.json").read_text()) == json.loads((sequential / "metrics.json").read_text())
    for path in overlapped.glob("weights_pp*.safetensors"):
        a, b = load_file(str(path)), load_file(str(sequential / path.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "world,name",
    [(4, "resume-dp4-moe"), (2, "resume-pp2-moe"), (2, "resume-converted"), (4, "resume-dp4-tied"), (2, "resume-pp2-tied")],
)
def test_resume_at_another_layout_continues_the_run(runs4, runs2, workdir, world, name):
    """Saved at pp 2 x dp 2 (or by one process), resumed at dp 4, pp 2 (V-shaped) or FSDP 2: steps
    3 and 4 and the final weights are those of the uninterrupted one-process run."""
    cases = _cases4(workdir) if world == 4 else _cases2(workdir)
    _check(runs4 if world == 4 else runs2, _case_by_name(cases, name), first_step=2)


@pytest.mark.parametrize(
    "world,name",
    [(2, "init-fsdp2-moe"), (2, "init-pp2-tied"), (2, "init-pp2-dualpipev"), (4, "init-pp2dp2"), (4, "init-fsdp4"), (4, "init-pp4")],
)  # fmt: skip
def test_initial_weights_are_those_of_one_process_bit_for_bit(runs4, runs2, workdir, world, name):
    """Each rank builds only its part, laying blocks out as they are built, yet the gathered weights
    are a one-process build's from the same seed, bit for bit (the same random draws in order)."""
    case = _case_by_name(_cases4(workdir) if world == 4 else _cases2(workdir), name)
    cfg = load_config(None, case["overrides"])
    torch.manual_seed(cfg.train.seed)
    reference = build_model(cfg.model).state_dict()
    parts = _gathered_weights((runs4 if world == 4 else runs2) / name)
    assert set(parts) == set(reference)
    for key, ref in reference.items():
        assert parts[key].dtype == ref.dtype and torch.equal(parts[key], ref), (name, key)


@pytest.mark.parametrize("name", ["init-fsdp4", "init-pp4"])
def test_no_rank_holds_the_whole_model_while_building_it(runs4, workdir, name):
    """The peak bytes of CPU tensors alive while a rank builds and lays out an 8-block model (4
    ranks: FSDP, or 4 pipeline stages) stay below its own share of the blocks + 2 blocks + the
    embedding and head, a bound that building the whole model, measured the same way, exceeds."""
    from torchmhc.distributed import ParallelConfig
    from torchmhc.distributed.pipeline import blocks_of_rank
    from torchmhc.memory import NewStorages

    case = _case_by_name(_cases4(workdir), name)
    cfg = load_config(None, case["overrides"])
    torch.manual_seed(cfg.train.seed)
    with NewStorages() as whole:
        model = build_model(cfg.model)
    block = _nbytes(model.blocks[0])
    embedding_and_head = _nbytes(model) - sum(_nbytes(b) for b in model.blocks)
    parallel = ParallelConfig(**case["parallel"]).resolve(4, num_layers=cfg.model.num_layers, batch_size=cfg.data.batch_size)
    ranks = json.loads((runs4 / name / "metrics.json").read_text())["build"]
    assert len(ranks) == 4
    for rank in ranks:
        held = blocks_of_rank(cfg.model, parallel, rank["pp_rank"], seq_len=cfg.data.seq_len)
        own = sum(_kept_bytes(model.blocks[i], parallel.dp) for i in held)
        bound = own + 2 * block + embedding_and_head
        assert rank["peak_cpu_bytes"] < bound < whole.peak, (name, rank, bound, whole.peak)


def test_resume_in_one_process(runs4, workdir):
    """The 4-process DCP checkpoint, converted to torchmhc.train's format, continues in one process."""
    from torchmhc.distributed.checkpoint import dcp_to_safetensors, latest_checkpoint

    case = _case_by_name(_cases4(workdir), "pp2dp2-moe")
    cfg = load_config(None, case["overrides"])
    with _float64_default():
        path = dcp_to_safetensors(latest_checkpoint(workdir / "ckpt4"), workdir / "converted-back", cfg.model, cfg.optim)
    model, optimizer = _reference_model(cfg, torch.float64)
    assert load_checkpoint(path, model, optimizer)["step"] == 2
    rows = _reference_steps(cfg, model, optimizer, range(2, 4))
    ref_rows, ref_weights, _ = _reference(tuple(case["overrides"]), "float64", 4)
    for mine, ref in zip(rows, ref_rows[2:]):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for key, ref in ref_weights.items():
        assert ((model.state_dict()[key] - ref).norm() / ref.norm()).item() <= 1e-6, key


# ----------------------------------------------------------------------------------------------
# On one GPU (NCCL, bf16): the lead's machine
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_one_gpu_fsdp_and_dualpipev_overlap(workdir):
    """World size 1 on CUDA in bf16: the distributed path (no FSDP over the one rank), and DualPipeV
    with both V stages on the GPU, whose overlap function runs each paired forward and backward on
    separate streams (and the FFN post-res on a high-priority stream). Overlapped = sequential;
    both = the one-device loop within bf16 rounding."""
    bf16 = ("train.dtype=bf16", "model.dim=64")
    v = {"pp_schedule": "dualpipev", "microbatches": 2}
    cases = [
        _case(workdir, "gpu-fsdp1", {}, *bf16, dtype="float32"),
        _case(workdir, "gpu-v-overlap", v, *bf16, dtype="float32"),
        _case(workdir, "gpu-v-sequential", v, *bf16, dtype="float32", overlap=False),
        _case(workdir, "gpu-v-overlap-moe", v, *bf16, *MOE, "model.recompute=true", dtype="float32"),
        _case(workdir, "gpu-v-sequential-moe", v, *bf16, *MOE, "model.recompute=true", dtype="float32", overlap=False),
    ]
    out = _launch(1, cases, workdir / "out-gpu", device="cuda")
    device = torch.device("cuda")
    for name in ("gpu-fsdp1", "gpu-v-overlap", "gpu-v-overlap-moe"):
        case = _case_by_name(cases, name)
        cfg = load_config(None, case["overrides"])
        model, optimizer = _reference_model(cfg, torch.float32, device)
        rows = _reference_steps(cfg, model, optimizer, range(STEPS), autocast_context(device, "bf16"))
        got = json.loads((out / name / "metrics.json").read_text())["train"]
        for mine, ref in zip(got, rows):
            assert mine["loss"] == pytest.approx(ref["loss"], rel=2e-2), (name, mine, ref)
    for overlapped, sequential in [("gpu-v-overlap", "gpu-v-sequential"), ("gpu-v-overlap-moe", "gpu-v-sequential-moe")]:
        a = json.loads((out / overlapped / "metrics.json").read_text())["train"]
        b = json.loads((out / sequential / "metrics.json").read_text())["train"]
        for x, y in zip(a, b):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-3) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-2)
        wa, wb = load_file(str(out / overlapped / "weights_pp0.safetensors")), load_file(str(out / sequential / "weights_pp0.safetensors"))
        for key in wa:
            assert ((wa[key] - wb[key]).norm() / wb[key].norm()).item() <= 1e-3, (overlapped, key)
