"""A small runner: train a few steps of several laid-out runs in one launch and record them.

Starting processes is the slow part of a multi-process test (on 2 CPU cores, seconds each), so
one launch runs a list of cases::

    torchrun --nproc-per-node 4 -m torchmhc.distributed.runner cases.json out/ [--device cuda]

``cases.json`` is a list of objects: ``name``, ``overrides`` (``section.key=value`` strings for
``torchmhc.config.load_config``), ``parallel`` (``ParallelConfig`` fields), ``steps`` (how many
optimizer steps in all), and optionally ``dtype`` ("float32" or "float64", the parameters'),
``overlap`` (dualpipev's overlap function, default true), ``measure_build`` (record every
rank's peak bytes of CPU tensors while it builds and lays out the model, :class:`torchmhc.memory.NewStorages`),
``save_at`` (a step count) with ``checkpoint_dir`` (a run directory: a DCP checkpoint is written
under it after that many steps), and ``resume_from`` (a DCP checkpoint directory, or a run
directory whose latest checkpoint to start from). Each case writes
``out/<name>/metrics.json`` (per-step loss and gradient norm, and the loss of the first
validation batch after training, from rank 0; with ``measure_build`` also ``build``, one
``{"rank", "pp_rank", "dp_rank", "peak_cpu_bytes"}`` per rank) and
``out/<name>/weights_pp<r>.safetensors`` (the full weights of pipeline rank r's part, from its
first data-parallel rank). The launch's world size must equal each case's product of degrees.
(``torchmhc train`` runs one such run with its metrics, evaluations and checkpoints:
``torchmhc.distributed.job``.)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchmhc.config import load_config
from torchmhc.data import TokenData, load_data
from torchmhc.distributed.config import ParallelConfig
from torchmhc.distributed.data import local_batch, local_rows
from torchmhc.distributed.job import build
from torchmhc.distributed.mesh import init_distributed
from torchmhc.distributed.parallel_model import ParallelModel
from torchmhc.distributed.step import evaluate_loss, train_step
from torchmhc.memory import NewStorages
from torchmhc.train import learning_rate

__all__ = ["run_case", "full_state_dict", "main"]


def full_state_dict(pm: ParallelModel) -> dict[str, torch.Tensor]:
    """This rank's part with every FSDP shard gathered (a collective over the data-parallel ranks)."""
    out = {}
    for key, value in pm.part.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu().clone()
    return out


def run_case(case: dict[str, Any], out_dir: Path, *, data: TokenData | None = None, device_type: str = "cpu") -> None:
    """Run one case of the runner's list (see the module docstring)."""
    from safetensors.torch import save_file

    cfg = load_config(None, case["overrides"])
    data = data if data is not None else load_data(cfg.data, progress=False)
    dtype = getattr(torch, case.get("dtype", "float32"))
    meter = NewStorages() if case.get("measure_build") else contextlib.nullcontext()
    with meter:
        pm, optimizer = build(
            cfg, ParallelConfig(**case["parallel"]), device_type=device_type, overlap=case.get("overlap", True), dtype=dtype
        )
    built = None
    if case.get("measure_build"):
        built = [None] * dist.get_world_size()
        mine = {"rank": dist.get_rank(), "pp_rank": pm.layout.pp_rank, "dp_rank": pm.layout.dp_rank, "peak_cpu_bytes": meter.peak}
        dist.all_gather_object(built, mine)
    start = 0
    if case.get("resume_from"):
        from torchmhc.distributed.checkpoint import latest_checkpoint, load_dcp_checkpoint

        path = Path(case["resume_from"])
        path = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        start = load_dcp_checkpoint(path, pm.part, optimizer)["step"]
    rows = []
    for step in range(start, case["steps"]):
        batch = local_batch(
            data, step, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
            dp_rank=pm.layout.dp_rank, dp_size=pm.layout.dp_size,
        )  # fmt: skip
        stats = train_step(
            pm, optimizer, batch, lr=learning_rate(step, cfg.train.steps, cfg.optim), grad_clip=cfg.optim.grad_clip,
            on_nonfinite=cfg.train.on_nonfinite, step=step,
        )  # fmt: skip
        rows.append({"step": step + 1, "loss": stats.loss, "grad_norm": stats.grad_norm})
        if case.get("save_at") == step + 1:
            from torchmhc.distributed.checkpoint import save_dcp_checkpoint

            save_dcp_checkpoint(Path(case["checkpoint_dir"]), pm.part, optimizer, {"step": step + 1})
    x, y = data.get_batch("val", 0, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=0)
    val_loss = evaluate_loss(pm, local_rows(x, pm.layout.dp_rank, pm.layout.dp_size),
                             local_rows(y, pm.layout.dp_rank, pm.layout.dp_size))  # fmt: skip
    case_dir = out_dir / case["name"]
    weights = full_state_dict(pm)
    if dist.get_rank() == 0:
        case_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"train": rows, "val_loss": val_loss, **({"build": built} if built else {})}
        (case_dir / "metrics.json").write_text(json.dumps(metrics))
    dist.barrier()
    if pm.layout.dp_rank == 0:
        save_file(weights, str(case_dir / f"weights_pp{pm.layout.pp_rank}.safetensors"))
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """``python -m torchmhc.distributed.runner CASES.json OUT_DIR [--device cuda]`` under torchrun."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m torchmhc.distributed.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("cases", type=Path, help="JSON list of cases")
    parser.add_argument("out_dir", type=Path, help="where each case writes its results")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="gloo on the CPU or NCCL on GPUs")
    args = parser.parse_args(argv)
    cases = json.loads(args.cases.read_text())
    init_distributed(args.device)
    data_cache: dict[str, TokenData] = {}
    for case in cases:
        cfg = load_config(None, case["overrides"])
        key = json.dumps([cfg.data.path, cfg.data.cache_dir, cfg.data.val_fraction])
        if key not in data_cache:
            data_cache[key] = load_data(cfg.data, progress=False)
        run_case(case, args.out_dir, data=data_cache[key], device_type=args.device)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
