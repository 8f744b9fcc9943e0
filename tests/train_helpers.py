"""A tiny corpus and run config shared by the training and compare tests (fast on 2 CPU cores)."""

import json
from pathlib import Path

from torchmhc.config import config_to_dict, load_config


def make_corpus(root: Path) -> Path:
    """A few kilobytes of varied text in 12 files."""
    root.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(12):
        lines = [" ".join(words[(i + j) % 12 : (i + j) % 12 + 4]) + f" {i * j}" for j in range(40)]
        (root / f"file{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_config(tmp_path: Path, *overrides: str):
    """A 2-step run on ``make_corpus`` with a 1-block model; extra ``key=value`` overrides win."""
    corpus = make_corpus(tmp_path / "corpus")
    base = [
        "name=t",
        f"data.path='{corpus}'",
        f"data.cache_dir='{tmp_path / 'cache'}'",
        "data.val_fraction=0.25",
        "data.seq_len=16",
        "data.batch_size=2",
        "model.dim=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "optim.warmup_steps=1",
        "train.steps=2",
        "train.eval_interval=1",
        "train.eval_batches=1",
        "train.num_threads=1",
        f"train.out_dir='{tmp_path / 'runs' / '{name}'}'",
        f"compare.report_dir='{tmp_path / 'report'}'",
    ]
    return load_config(None, base + list(overrides))


def cli_overrides(cfg) -> list[str]:
    """``cfg`` as ``--set`` arguments for the command line."""
    args = ["--set", f"name={cfg.name}"]
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args
