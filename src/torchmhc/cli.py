"""``torchmhc`` command line: ``compare``, ``train`` and ``bench``.

    torchmhc compare                          # tiny preset on the CPU: residual vs HC vs mHC
    torchmhc compare --preset stress          # HC's gain blow-up vs mHC
    torchmhc train --preset tiny --set model.residual=hc --set train.steps=100
    torchmhc train --config my.toml --resume  # continue from the run's latest checkpoint
    torchrun --nproc-per-node 4 -m torchmhc train --preset gpu-moe-3b --set parallel.pp=2
                                              # one run on 4 GPUs (torchmhc.distributed)
    torchmhc bench                            # kernel benchmarks (torchmhc.bench)
    python -m torchmhc ...                    # the same command line
"""

import argparse
import importlib.util
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from torchmhc import __version__
from torchmhc.config import OVERRIDE_RULE, CompareConfig, RunConfig, list_presets, load_config
from torchmhc.report import run_compare
from torchmhc.train import CheckpointError, NonFiniteLossError, TimeBudget, laid_out, parallel_layout, train

__all__ = ["main"]

#: Seconds a process other than rank 0 waits before failing with an error rank 0 reports.
_REPORT_GRACE_S = 3.0


def _add_config_args(parser: argparse.ArgumentParser, default_preset: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None,
                        help=f"a preset shipped with torchmhc (default: {default_preset}); one of: "
                             f"{', '.join(list_presets()) or 'none found'}")
    source.add_argument("--config", type=Path, default=None, help="path to a TOML config file of your own")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set train.steps=100 (repeatable); {OVERRIDE_RULE}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class _UsageError(ValueError):
    """A mistake in the command line or the config, found before any work starts: the same on
    every process of a job, so only rank 0 reports it."""


def _load(args: argparse.Namespace, default_preset: str) -> RunConfig:
    source = args.config if args.config is not None else (args.preset or default_preset)
    try:
        return load_config(source, args.overrides)
    except (TypeError, ValueError) as exc:  # a wrongly typed or invalid value in the file or an override
        raise _UsageError(str(exc)) from exc


def _compare(args: argparse.Namespace) -> int:
    cfg = _load(args, "tiny")
    if laid_out(cfg):
        raise _UsageError(
            "torchmhc compare trains its variants in one process; for a run over several processes train "
            "each variant with torchrun ... -m torchmhc train --set model.residual=<variant>."
        )
    compare = cfg.compare
    if args.variants:
        compare = CompareConfig(tuple(v.strip() for v in args.variants.split(",")), compare.report_dir)
    if args.out:
        compare = CompareConfig(compare.variants, str(args.out))
    index = run_compare(replace(cfg, compare=compare), progress=not args.quiet, command=_command(args.argv))
    print(f"report: {index}")
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args, "tiny")
    try:
        parallel_layout(cfg)  # the [parallel] degrees against the world size, before any work
    except ValueError as exc:
        raise _UsageError(str(exc)) from exc
    resume = args.resume_from if args.resume_from is not None else args.resume
    pause = TimeBudget(args.time_budget).pause() if args.time_budget is not None else None
    result = train(cfg, resume=resume, progress=not args.quiet, pause=pause)
    if _rank() == 0:
        print(f"run: {result.out_dir}" + (" (paused: the same command with --resume continues it)" if result.paused else ""))
    return 0


def _rank() -> int:
    """This process's rank in a job launched by torchrun (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def _bench(bench_args: list[str]) -> int:
    if importlib.util.find_spec("triton") is None:
        print("torchmhc: error: torchmhc bench runs the Triton kernels, and Triton is not installed: "
              "pip install 'torchmhc[triton]' (the benchmarks also need a CUDA GPU).", file=sys.stderr)
        return 2
    from torchmhc import bench

    try:
        bench.main(bench_args)
    except SystemExit as exc:  # argparse's --help and usage errors, a missing GPU
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code or 0
    return 0


def _command(argv: list[str]) -> str:
    """The command line as a user would type it again (shown in the report)."""
    return "torchmhc " + " ".join(shlex.quote(a) for a in argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchmhc", description="Manifold-Constrained Hyper-Connections for PyTorch.")
    parser.add_argument("--version", action="version", version=f"torchmhc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="train residual / HC / mHC side by side and write a report")
    _add_config_args(p, "tiny")
    p.add_argument("--variants", default=None, help="comma-separated variants (default from the preset: residual,hc,mhc)")
    p.add_argument("--out", type=Path, default=None, help="report directory (default from the preset: report)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("train", help="train one model")
    _add_config_args(p, "tiny")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT_DIR",
                   help="continue from this checkpoint directory")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop before a step that would end more than SECONDS from now, with a checkpoint "
                        "(leave a margin for it); --resume continues the run as if it had not stopped")
    p.set_defaults(func=_train)

    # Listed for --help only: main() hands every argument after "bench" to the script untouched.
    sub.add_parser("bench", help="run the kernel benchmarks (torchmhc.bench; `torchmhc bench --help` lists its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchmhc`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, ImportError, CheckpointError, NonFiniteLossError) as exc:
        # User mistakes and a diverged run: a sentence, not a traceback. In a job of several
        # processes, errors that are the same on every rank are told once, by rank 0.
        rank = _rank()
        if rank == 0:
            print(f"torchmhc: error: {exc}", file=sys.stderr)
        else:
            if not isinstance(exc, (_UsageError, NonFiniteLossError)):
                print(f"torchmhc: error: [rank {rank}] {exc}", file=sys.stderr)
            # torchrun stops every process as soon as one has failed: give rank 0 the time to
            # finish its report (and the summary of a stopped run) before this one fails.
            time.sleep(_REPORT_GRACE_S)
        return 2
    except KeyboardInterrupt:
        print("torchmhc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
