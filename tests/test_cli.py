"""The ``torchmhc`` command line: entry points, version, presets from an installed package, and
user errors as one line (``torchmhc: error: ...``, exit status 2)."""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import cli_overrides, tiny_config

import torchmhc
from torchmhc.cli import main
from torchmhc.config import PRESET_DIR, list_presets

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

SRC = Path(torchmhc.__file__).resolve().parent


def _run(*args: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_python_dash_m_and_version(tmp_path):
    out = _run("-m", "torchmhc", "--version", cwd=tmp_path, pythonpath=SRC.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"torchmhc {torchmhc.__version__}"
    # the version is pyproject's, read from the installed package's metadata
    assert torchmhc.__version__ == importlib.metadata.version("torchmhc")
    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    assert torchmhc.__version__ == pyproject["project"]["version"]


def test_presets_ship_inside_the_package(tmp_path):
    # an installed package has no checkout around it: copy it alone and load every preset from there
    site = tmp_path / "site"
    shutil.copytree(SRC, site / "torchmhc", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from torchmhc.config import list_presets, load_config; print([load_config(p).name for p in list_presets()])"
    out = _run("-c", code, cwd=tmp_path, pythonpath=site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(list_presets()) and {"tiny", "stress", "small"} <= set(list_presets())
    # and the wheel takes them: pyproject's package data covers every preset file
    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["torchmhc"]
    shipped = {p for pattern in patterns for p in SRC.glob(pattern)}
    assert PRESET_DIR.parent == SRC and set(PRESET_DIR.glob("*.toml")) <= shipped


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.device=cudafoo"], "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'cudafoo'"),
    (["train", "--set", "optim.lr=inf"], "optim.lr must be a finite number > 0, got inf"),
    (["train", "--config", "no-such-file.cfg"], "config file 'no-such-file.cfg' does not exist"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--time-budget", "0"], "the time budget must be a finite number of seconds > 0, got 0.0"),
    (["train", "--set", "data.corpus=wikipedia"], "data.corpus must be '' (data.path, or the standard library) or one of"),
])
def test_config_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchmhc: error: ") and message in err and err.count("\n") == 1, err


def test_config_file_that_is_not_toml(tmp_path, capsys):
    path = tmp_path / "file.cfg"
    path.write_text("[train]\nsteps: 3\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {str(path)!r} is not valid TOML" in err and "unknown preset" not in err


def test_bench_without_triton_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchmhc: error: ") and "pip install 'torchmhc[triton]'" in err and err.count("\n") == 1


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchmhc: error: ") and err.count("\n") == 1, err
    return err


def test_run_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["train", "--quiet", *cli_overrides(tiny_config(tmp_path))]
    err = _one_line_error([*args, "--set", f"train.out_dir='{blocker}/runs'"], capsys)
    assert f"train.out_dir '{blocker}/runs' cannot be written" in err
    err = _one_line_error([*args, "--set", f"data.cache_dir='{blocker}/cache'"], capsys)
    assert f"data.cache_dir '{blocker}/cache' cannot be written" in err

    assert main(args) == 0
    state = tmp_path / "runs" / "t" / "checkpoints" / "step_000002" / "state.json"
    meta = json.loads(state.read_text())
    del meta["tokens"]
    state.write_text(json.dumps(meta))
    err = _one_line_error([*args, "--set", "train.steps=3", "--resume"], capsys)
    assert f"{str(state)!r} is incomplete: it has no 'tokens'" in err
