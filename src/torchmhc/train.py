"""Training loop: ``train`` -> ``train_step``, evaluation, metrics and atomic checkpoints.

What a run writes under its ``out_dir``::

    config.json                 the resolved RunConfig
    metrics.jsonl               one JSON object per logged step ({"kind": "train", ...}) and per
                                evaluation ({"kind": "eval", ...})
    summary.json                final numbers (written when the run ends)
    checkpoints/latest          name of the newest complete checkpoint directory
    checkpoints/step_000300/    model.safetensors, optimizer.safetensors, state.json

A checkpoint directory is written under a temporary name and renamed into place, and
``latest`` is replaced atomically afterwards, so that a save killed at any instant leaves
``latest`` naming a complete checkpoint (:func:`save_checkpoint`); ``state.json`` records a
SHA-256 of each file, checked on load, and the run's config, checked on resume. A checkpoint
never holds a NaN or an Inf.
Training batches are a pure function of ``(seed, step)`` (``torchmhc.data``) and the learning
rate a pure function of the step, so on the CPU a resumed run is bit-identical to one that never
stopped (with the same number of threads: reductions split differently give other roundings).

Under ``torchrun`` (or with a ``[parallel]`` section) the same loop runs a model laid out over
the job's processes (``torchmhc.distributed.job``): rank 0 writes the files above, and the
checkpoints are DCP directories (``state.json``, ``.metadata`` and each rank's shards). Either
kind of checkpoint resumes at any layout, one process included.
"""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from torchmhc.config import CUDA_GRAPH_MODES, OptimConfig, RunConfig, config_to_dict
from torchmhc.data import TokenData, bits_per_byte, load_data
from torchmhc.distributed.config import ParallelConfig
from torchmhc.layers import HyperConnection, StreamHead
from torchmhc.models import GPT, Block, build_model

if TYPE_CHECKING:
    from torchmhc.distributed.job import ParallelJob

__all__ = [
    "NonFiniteLossError",
    "CheckpointError",
    "RunResult",
    "TimeBudget",
    "train",
    "laid_out",
    "parallel_layout",
    "LocalJob",
    "train_step",
    "step_unless_nonfinite",
    "check_skippable",
    "evaluate",
    "learning_rate",
    "build_optimizer",
    "apply_compile",
    "compile_in_place",
    "lm_loss",
    "token_cross_entropy",
    "save_checkpoint",
    "publish_checkpoint",
    "read_checkpoint_state",
    "load_checkpoint",
    "load_training_checkpoint",
    "checkpoint_format",
    "latest_checkpoint",
    "nonfinite_tensors",
    "nonfinite_names",
    "DCP_CHECKPOINT_FORMAT",
]

_CHECKPOINT_FORMAT = 1
#: ``state.json``'s ``format`` in the checkpoints of runs laid out over processes: directories
#: written by ``torch.distributed.checkpoint`` (``torchmhc.distributed.checkpoint``).
DCP_CHECKPOINT_FORMAT = "dcp-1"
#: The files of a checkpoint directory that state.json records a SHA-256 of (besides itself).
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf and ``train.on_nonfinite = "stop"``."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the model."""


# ----------------------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule
# ----------------------------------------------------------------------------------------------


def require(module: str, extra: str) -> None:
    """Fail before any work starts when an optional dependency is missing (ImportError naming the fix)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this needs the optional package {module!r}: pip install 'torchmhc[{extra}]'")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; other names are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'.")
    return device


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The forward's autocast dtype for ``train.dtype``: bf16 for "bf16", and for "auto" on CUDA;
    None (plain fp32) otherwise."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``dtype`` "auto" or "bf16"); plain fp32 otherwise."""
    compute_dtype = autocast_dtype(device, dtype)
    if compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    Not decayed: norms and other 1-D parameters, and every parameter of the hyper-connections
    and the stream head: their static parts are the mixing matrices themselves (HC's H_res starts
    at I), and decaying them toward 0 would change the connection being compared, not regularize.
    """
    no_decay_modules = [m for m in model.modules() if isinstance(m, (HyperConnection, StreamHead))]
    no_decay = {id(p) for m in no_decay_modules for p in m.parameters()}
    decay, other = [], []
    for p in model.parameters():  # deduplicated: a tied head appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    if all(p.is_cuda for group in groups for p in group["params"]):
        # One fused kernel per step instead of ~10 elementwise passes per parameter tensor.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    # CPU: the plain per-parameter loop keeps runs bit-reproducible across resumes.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def apply_compile(model: GPT, *, backend: str = "inductor", mode: str = "default") -> None:
    """``torch.compile`` the model in place, one transformer block at a time (as torchtitan does).

    Every block has the same code, so one compiled graph serves all of them and compile time is
    that of one block. The hyper-connections' fused kernels are ``torch.library`` custom ops with
    fake implementations, so they sit in the graph as opaque nodes. With ``model.recompute`` the
    blocks are not called as a whole (``torchmhc.recompute.run_sublayers`` runs connections and
    branches itself): the branches (pre-norm + attention, pre-norm + FFN) are compiled instead and
    the connections run eager. The stream head is compiled on its own (its reference math would
    otherwise keep two fp32 copies of the bf16 streams for the backward); embedding, LM head and
    loss stay eager. Parameter names (state dicts, checkpoints) do not change. ``mode`` is
    torch.compile's (``train.compile_mode``); "reduce-overhead" replays each compiled graph as a
    CUDA graph.
    """
    for module in [*model.blocks, *([model.stream_head] if model.stream_head is not None else [])]:
        compile_in_place(module, recompute=model.cfg.recompute, backend=backend, mode=mode)


def compile_in_place(module: nn.Module, *, recompute: bool, backend: str = "inductor", mode: str = "default") -> None:
    """``torch.compile`` one block or the stream head in place, as :func:`apply_compile` does:
    a block under block recomputation (``recompute``) compiles its two branches instead."""
    kwargs = dict(backend=backend, mode=None if mode == "default" else mode)
    if recompute and isinstance(module, Block):
        module.compile_branches(**kwargs)
    else:
        module.compile(**kwargs)


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    "step" is the mHC paper's recipe: constant, multiplied by ``step_gamma`` at each milestone
    (fractions of ``total_steps``); "cosine" decays to ``min_lr_ratio * lr``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        passed = sum(step >= m * total_steps for m in cfg.step_milestones)
        return cfg.lr * cfg.step_gamma**passed
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------------------------
# One step, evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float  # global norm before clipping
    lr: float
    skipped: bool  # non-finite loss/gradients and on_nonfinite = "skip"


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 scalar) of logits ``[B, T, V]`` against ids ``[B, T]``
    int64: the training loss (a pipeline's last stage applies it too)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 scalar) of ``model`` on inputs/targets ``[B, T]``."""
    return token_cross_entropy(model(x), y)  # logits [B, T, V]


def train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    grad_clip: float,
    on_nonfinite: str,
    autocast: contextlib.AbstractContextManager,
    step: int,
) -> StepStats:
    """Forward, backward, non-finite guard, clip, AdamW step, MoE router-bias update.

    Args:
        batch: inputs and targets, int64 ``[B, T]`` each, on the model's device.
        grad_clip: max global gradient norm; 0 = no clipping (the norm is still measured).
        on_nonfinite: "stop" raises :class:`NonFiniteLossError` after a step that left the weights
            untouched (:func:`step_unless_nonfinite`); "skip" reports such a step as
            ``skipped=True``, unless the weights themselves are no longer finite: then it raises too.
    """
    x, y = batch
    for group in optimizer.param_groups:
        group["lr"] = lr
    if x.is_cuda:  # a new iteration for CUDA-graphed blocks (train.compile_mode = "reduce-overhead"):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
    with autocast:
        loss = lm_loss(model, x, y)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)
    loss_value, grad_norm = step_unless_nonfinite(optimizer, loss, grad_norm_t, model.update_router_bias)
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if skipped:
        check_skippable(step, loss_value, grad_norm, nonfinite_tensors(model, optimizer), on_nonfinite)
    return StepStats(loss_value, grad_norm, lr, skipped=skipped)


def step_unless_nonfinite(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    update_router_bias: Callable[[torch.Tensor | float], None],
) -> tuple[float, float]:
    """The optimizer step and the MoE balancing step, both left out when the loss or the gradient
    norm (0-dim tensors on the device) is NaN/Inf; zeroes the gradients; returns both numbers.

    This holds the step's one wait for the device. A fused AdamW decides on the device: it takes
    the flag that mixed-precision loss scaling gives it (``found_inf``: at 1 its kernel leaves the
    weights, the moments and the step count as they were), and the host reads the two numbers only
    after the step's kernels are queued, so the GPU does not sit idle while the host waits and then
    launches the optimizer. Other optimizers (the CPU's per-parameter loop, which takes no flag)
    read the numbers first and step only when both are finite. Either way a left-out step changes
    no weight, no optimizer state and no router bias (its expert loads are discarded).

    Args:
        update_router_bias: ``GPT.update_router_bias`` or the like, called with 1 to apply the
            balancing step or 0 to discard the counted loads (a 0-dim tensor on the device, or a
            float).
    """
    numbers = torch.stack([loss.detach().float(), grad_norm.float()])  # on the device: no wait yet
    fused = bool(optimizer.defaults.get("fused"))
    if fused:
        nonfinite = (~torch.isfinite(numbers).all()).float()
        optimizer.found_inf = nonfinite  # read by the fused step, as when a loss scaler drives it
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        update_router_bias(1.0 - nonfinite)
    loss_value, norm = numbers.tolist()  # the wait (fused: with the optimizer's kernels queued)
    if not fused:
        finite = math.isfinite(loss_value) and math.isfinite(norm)
        if finite:
            optimizer.step()
        update_router_bias(1.0 if finite else 0.0)
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm


def check_skippable(step: int, loss: float, grad_norm: float, nonfinite: list[str], on_nonfinite: str) -> None:
    """After a step with a non-finite loss or gradient norm, whose gradients were dropped: raise
    :class:`NonFiniteLossError` unless the step may be skipped (``on_nonfinite = "skip"`` and the
    weights and optimizer state, whose non-finite tensors ``nonfinite`` names, are finite)."""
    signal = f"non-finite training signal at step {step}: loss={loss}, grad_norm={grad_norm}."
    if nonfinite:  # skipping cannot help: every later step would start from the same weights
        raise NonFiniteLossError(
            f"{signal} The weights or the optimizer state are not finite ({_some(nonfinite)}): an earlier "
            f"update made them so. Lower optim.lr or enable optim.grad_clip.",
            step=step,
        )
    if on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"{signal} The weights were not updated by this step. Lower optim.lr, enable optim.grad_clip, "
            f"or set train.on_nonfinite=skip to skip such steps.",
            step=step,
        )


@torch.no_grad()
def evaluate(
    model: GPT,
    data: TokenData,
    *,
    num_batches: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> float:
    """Mean validation cross-entropy (nats/token) over the first ``num_batches`` fixed val batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    # eager: CUDA-graphed compiled blocks (train.compile_mode = "reduce-overhead") would replay one
    # inference graph per block and overwrite the previous block's output while it is still in use
    with torch.compiler.set_stance("force_eager"):
        for i in range(num_batches):
            x, y = data.get_batch("val", i, batch_size=batch_size, seq_len=seq_len, seed=0)
            with autocast:
                total += float(lm_loss(model, x.to(device), y.to(device)))
    model.train(was_training)
    return total / num_batches


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: Path, dst: Path) -> None:
    """Atomic rename, made durable: the directory entry is flushed too (where the OS allows)."""
    os.replace(src, dst)
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on some systems
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _point_latest(root: Path, name: str) -> None:
    _fsync_write(root / ".latest.tmp", name)
    _rename(root / ".latest.tmp", root / "latest")


def _link_copy(src: Path, dst: Path) -> None:
    """A second directory ``dst`` holding ``src``'s files: hard links (no data copied), else copies."""
    dst.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:  # a file system without hard links
            shutil.copy2(f, dst / f.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint of a run directory, or None if it has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def nonfinite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's floating tensors (parameters, buffers) and of the optimizer's state
    tensors that hold a NaN or an Inf; empty when all are finite (one wait for the device)."""
    named = list(model.state_dict().items())
    if optimizer is not None:
        named += [
            (f"optimizer state {index}.{key}", value)
            for index, entry in enumerate(optimizer.state_dict()["state"].values())
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
        ]
    return nonfinite_names(named)


def nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating tensors of ``(name, tensor)`` pairs that hold a NaN or an Inf."""
    named = [(name, t) for name, t in named if t.is_floating_point()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:  # AdamW keeps its step counts on the CPU, the rest where the weights are
        by_device.setdefault(t.device, []).append((name, t))
    bad = []
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        bad += [name for (name, _), ok in zip(group, finite) if not ok]
    return bad


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *, keep: int = 1
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>/`` and point ``latest`` at it, safe against a kill at
    any instant: ``latest`` always names a complete checkpoint.

    The files are written into a temporary directory that is renamed into place when complete;
    only then does ``latest`` name it. Re-saving a step that exists (a new run in the same
    directory, or a stop re-saving the step an interval checkpoint just wrote): while ``latest``
    names the old directory, a second name for it (hard links) becomes ``latest`` until the new
    directory has replaced the old one. Temporary directories (``.step_*``) that an interrupted
    save left behind are deleted at the end of the next save.

    Args:
        state: JSON-serializable training state; must contain ``"step"`` (optimizer steps done).
        keep: how many step directories to keep (older ones are deleted after the new one is live).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: a tensor of the model or of the optimizer state is NaN or Inf (nothing
            is written: a checkpoint always holds finite numbers).
    """
    from safetensors.torch import save_file, save_model

    bad = nonfinite_tensors(model, optimizer)
    if bad:
        raise CheckpointError(f"refusing to save a checkpoint of non-finite tensors: {_some(bad)}.")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))

    save_model(model, str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, entry in opt_state["state"].items()
        for key, value in entry.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    files = {f: _sha256(tmp / f) for f in CHECKPOINT_FILES}
    meta = {
        "format": _CHECKPOINT_FORMAT,
        **state,
        "param_groups": opt_state["param_groups"],
        "files": files,
    }
    _fsync_write(tmp / "state.json", json.dumps(meta, indent=2))

    return publish_checkpoint(tmp, root / name, keep=keep)


def publish_checkpoint(tmp: Path, final: Path, *, keep: int) -> Path:
    """Rename the complete checkpoint directory ``tmp`` (``checkpoints/.step_<n>.tmp...``) to
    ``final`` (``checkpoints/step_<n>``) and point ``latest`` at it, so that ``latest`` names a
    complete checkpoint at every instant (see :func:`save_checkpoint`); then delete leftovers and
    all but the newest ``keep`` step directories. Returns ``final``."""
    root, name = final.parent, final.name
    if final.exists():
        if latest_checkpoint(root.parent) == final:
            backup = tmp.with_name(tmp.name.replace(".tmp", ".prev", 1))
            _link_copy(final, backup)
            _point_latest(root, backup.name)
        _rename(final, tmp.with_name(tmp.name.replace(".tmp", ".old", 1)))  # deleted below
    _rename(tmp, final)
    _point_latest(root, name)

    # Everything else named .step_* is a leftover: of this save, or of one that was interrupted.
    for p in root.glob(".step_*"):
        shutil.rmtree(p, ignore_errors=True)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _some(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a list of names short enough for one error line."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_checkpoint_state(path: Path, keys: tuple[str, ...], formats: tuple[int | str, ...] = (_CHECKPOINT_FORMAT,)) -> dict[str, Any]:
    """``path/state.json``, checked to be a checkpoint of one of ``formats`` holding ``keys``."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r} (state.json is missing).")
    try:
        meta = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: state.json is not valid JSON ({exc}).") from exc
    missing = [k for k in ("format", *keys) if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{str(state_file)!r} is incomplete: it has no {', '.join(map(repr, missing))}.")
    if meta["format"] not in formats:
        expected = " or ".join(map(repr, formats))
        raise CheckpointError(f"checkpoint {str(path)!r} has format {meta['format']!r}, expected {expected}.")
    return meta


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    hyperparameters: Literal["checkpoint", "optimizer"] = "checkpoint",
) -> dict[str, Any]:
    """Load a checkpoint directory into ``model`` (and ``optimizer``), restore the RNG state.

    Args:
        hyperparameters: where the optimizer's param-group settings (lr, betas, eps, weight
            decay, ...) come from: ``"checkpoint"`` restores the saved ones, ``"optimizer"`` keeps
            those ``optimizer`` was built with (a resumed run with new settings). Either way the
            per-parameter state (moments, step counts) is the checkpoint's, and the implementation
            (fused on CUDA, the plain loop on the CPU) stays ``optimizer``'s.

    Returns:
        The saved training state (``step``, ``tokens``, ...).

    Raises:
        CheckpointError: missing files or keys, a checksum mismatch, or tensors that do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    path = Path(path)
    meta = read_checkpoint_state(path, ("files", "param_groups", "step"))
    files = meta["files"]
    unrecorded = [name for name in CHECKPOINT_FILES if not isinstance(files, dict) or name not in files]
    if unrecorded:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: state.json records no SHA-256 for {' and '.join(unrecorded)}, "
            f"so the checkpoint cannot be verified."
        )
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {name} is missing.")
        if _sha256(path / name) != files[name]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {name} does not match its SHA-256 in state.json.")

    device = next(model.parameters()).device
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    except (RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {exc}") from exc
    tensors = load_file(str(path / "optimizer.safetensors"))
    if "rng.cpu" not in tensors:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: optimizer.safetensors has no 'rng.cpu'.")
    if optimizer is not None:
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        current = optimizer.state_dict()["param_groups"]
        groups = meta["param_groups"]
        if hyperparameters == "optimizer":
            groups = current
        elif len(groups) == len(current):
            # The implementation stays this optimizer's, so that a checkpoint moves between devices.
            impl = ("foreach", "fused", "capturable")
            groups = [{**g, **{k: cur[k] for k in impl if k in cur}} for g, cur in zip(groups, current)]
        try:
            optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state does not fit this model: {exc}") from exc
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k: v for k, v in meta.items() if k not in ("format", "files", "param_groups")}


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


class _SavedActivationMeter:
    """Bytes of tensors autograd saves for backward during one forward (distinct storages).

    On the CPU PyTorch has no allocator statistics; weights + gradients + AdamW state + these
    saved activations estimate the peak of a training step.
    """

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def context(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _state_bytes(model: nn.Module) -> int:
    # fp32 weights, gradients and AdamW's two moments: 4 copies of every parameter.
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Outcome of :func:`train`.

    ``summary`` holds the final numbers: ``steps``, ``train_loss`` (mean of the last 10 logged
    steps), ``val_loss``, ``val_bpb``, ``tokens_per_s``, ``peak_memory_bytes``,
    ``peak_memory_kind`` ("cuda" measured / "estimate" on CPU), ``stopped`` (None or the reason).
    In a run laid out over processes ``model`` is this rank's part (``ParallelModel.part``), the
    peak memory this rank's, and only rank 0 reads the earlier rows of a resumed run's history.
    """

    config: RunConfig
    out_dir: Path
    model: GPT
    data: TokenData
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    paused: bool = False  # stopped early by train()'s ``pause`` (resume to continue); no final evaluation


class TimeBudget:
    """When runs must stop: ``seconds`` from now (a monotonic clock), leaving room for one more step.

    :meth:`pause` gives :func:`train` a ``pause`` callable for one run: it says True when the
    longest step seen in that run (the time between two calls, evaluations and checkpoints
    included) would end past the deadline. Several runs may share one budget, one after another.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"the time budget must be a finite number of seconds > 0, got {seconds}.")
        self.clock = clock
        self.deadline = clock() + seconds

    def remaining(self) -> float:
        """Seconds left (negative once past the deadline)."""
        return self.deadline - self.clock()

    def pause(self) -> Callable[[int], bool]:
        """A ``pause(step)`` callable for one run under this budget."""
        last: float | None = None
        longest = 0.0

        def pause(step: int) -> bool:
            nonlocal last, longest
            now = self.clock()
            if last is not None:
                longest = max(longest, now - last)
            last = now
            return now + longest >= self.deadline

        return pause


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` up to ``up_to_step``.

    A last line that a crash cut short (no newline, not JSON) is dropped with a warning; any other
    line that is not a metrics row is a ValueError naming the file and the line.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row["step"], int) and row["kind"] in ("train", "eval")):
                raise ValueError("no 'step' and 'kind'")
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # the last line, without its newline: an interrupted write
                warnings.warn(f"{path}: dropped line {number}, cut short by an interrupted write: {line[:60]!r}", stacklevel=2)
                continue
            raise ValueError(
                f"{path}, line {number}: not a metrics row ({exc}): {line[:60]!r}. Delete the line to resume, "
                f"or train afresh without --resume."
            ) from exc
        rows.append(row)
    return [r for r in rows if r["step"] <= up_to_step]


#: Model settings that change how a model is computed, not what it is: a resume may change them.
_RUNTIME_MODEL_SETTINGS = ("recompute", "recompute_block_length")


def _resume_state(cfg: RunConfig, ckpt: Path) -> dict[str, Any]:
    """The training state of checkpoint ``ckpt`` if ``cfg`` may resume from it, else CheckpointError."""
    state = read_checkpoint_state(ckpt, ("step", "tokens", "train_time_s", "skipped_steps"),
                        formats=(_CHECKPOINT_FORMAT, DCP_CHECKPOINT_FORMAT))
    saved = state.get("config", {}).get("model")  # checkpoints from before configs were recorded: none
    if saved is not None:
        now = config_to_dict(cfg)["model"]
        changed = [
            f"model.{key}: {saved.get(key)!r} in the checkpoint, {value!r} now"
            for key, value in now.items()
            if key not in _RUNTIME_MODEL_SETTINGS and saved.get(key) != value
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume from {str(ckpt)!r}: it holds another model ({'; '.join(changed)}). "
                f"Resume with the run's model settings, or train afresh into another train.out_dir."
            )
    if state["step"] >= cfg.train.steps:
        raise ValueError(
            f"the checkpoint {str(ckpt)!r} is at step {state['step']}, and train.steps is {cfg.train.steps}: "
            f"nothing to resume; raise train.steps to train further."
        )
    return state


def _changed_settings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``section.key old -> new`` for every setting that differs between two config dicts."""
    changes = []
    for section, values in after.items():
        if isinstance(values, dict) and section in before:  # a section newer than the checkpoint: not a change
            old = before[section]
            changes += [f"{section}.{k} {old.get(k)!r} -> {v!r}" for k, v in values.items() if old.get(k) != v]
    return changes


def _writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and parents) and check a file can be made in it; ValueError naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be written ({exc.strerror or exc}); choose another directory.") from exc
    return path


def laid_out(cfg: RunConfig) -> bool:
    """Whether the run is laid out over processes: launched with a world size above 1
    (``WORLD_SIZE``, set by ``torchrun``) or with a ``[parallel]`` section that is not the default."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel != ParallelConfig()


def parallel_layout(cfg: RunConfig) -> ParallelConfig | None:
    """The resolved ``[parallel]`` layout if the run is laid out over processes (:func:`laid_out`),
    else None: then it runs in this process on one device, exactly as without the section.

    Raises:
        ValueError: the degrees do not fit the world size, the model or the batch, or the run asks
            for something the distributed path does not do (see ``torchmhc.distributed``).
    """
    if not laid_out(cfg):
        return None
    if cfg.model.arch == "hf-llama":
        raise ValueError("model.arch = 'hf-llama' trains in one process; a run laid out over processes needs 'gpt' or 'moe'.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = cfg.parallel.resolve(world_size, num_layers=cfg.model.num_layers, batch_size=cfg.data.batch_size)
    if cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES and (layout.pipelined or world_size > 1):
        # one process without pipelining runs the model as on one device: its graphs replay
        raise ValueError(
            f"train.compile_mode = {cfg.train.compile_mode!r} replays CUDA graphs, which a run laid out over "
            f"several processes or pipeline stages does not support (its communication and FSDP's parameter "
            f"gathers run between the graphs); use 'default' or 'max-autotune-no-cudagraphs'."
        )
    return layout


def check_vocabulary(data: TokenData, cfg: RunConfig) -> None:
    """ValueError if the corpus has token ids the model has no embedding for."""
    if data.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the corpus has token ids up to {data.vocab_size - 1} but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {data.vocab_size}."
        )


def checkpoint_format(path: Path) -> int | str:
    """The ``format`` of checkpoint directory ``path``: 1 (this module's) or
    :data:`DCP_CHECKPOINT_FORMAT`; CheckpointError for anything else."""
    return read_checkpoint_state(Path(path), (), formats=(_CHECKPOINT_FORMAT, DCP_CHECKPOINT_FORMAT))["format"]


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Resume ``model`` and ``optimizer`` in one process from checkpoint ``path`` of either format
    (this module's, or a DCP checkpoint of a run laid out over processes): the optimizer's
    settings stay its own, its moments and step counts are the checkpoint's. Returns the state."""
    if checkpoint_format(path) == DCP_CHECKPOINT_FORMAT:
        from torchmhc.distributed.checkpoint import load_dcp_checkpoint

        return load_dcp_checkpoint(path, model, optimizer, hyperparameters="optimizer")
    return load_checkpoint(path, model, optimizer, hyperparameters="optimizer")


class LocalJob:
    """A run in this process on one device: the model and optimizer, and what the loop of
    :func:`train` does with them (step, evaluate, check, save, load).

    ``torchmhc.distributed.job.ParallelJob`` is the same for a run laid out over processes.
    """

    #: Whether this process writes the run directory and shows progress.
    is_main = True

    def __init__(self, cfg: RunConfig, device: torch.device, *, data: TokenData | None, progress: bool) -> None:
        self.cfg, self.device = cfg, device
        self.autocast = autocast_context(device, cfg.train.dtype)
        self.data = data if data is not None else load_data(cfg.data, progress=progress)
        check_vocabulary(self.data, cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).to(device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if cfg.train.compile:
            apply_compile(self.model, mode=cfg.train.compile_mode)
        self.num_params, self.num_streams = self.model.num_params(), self.model.num_streams

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step``: inputs and targets, int64 ``[B, T]`` each, on the CPU."""
        tc, dc = self.cfg.train, self.cfg.data
        return self.data.get_batch("train", step, batch_size=dc.batch_size, seq_len=dc.seq_len, seed=tc.seed)

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> StepStats:
        """Optimizer step ``step`` (0-based) on ``batch`` (from :meth:`batch`)."""
        tc = self.cfg.train
        x, y = batch
        return train_step(
            self.model, self.optimizer, (x.to(self.device), y.to(self.device)),
            lr=learning_rate(step, tc.steps, self.cfg.optim), grad_clip=self.cfg.optim.grad_clip,
            on_nonfinite=tc.on_nonfinite, autocast=self.autocast, step=step,
        )  # fmt: skip

    def evaluate(self) -> float:
        """Mean validation loss over the first ``train.eval_batches`` validation batches."""
        dc = self.cfg.data
        return evaluate(
            self.model, self.data, num_batches=self.cfg.train.eval_batches, batch_size=dc.batch_size,
            seq_len=dc.seq_len, device=self.device, autocast=self.autocast,
        )  # fmt: skip

    def nonfinite(self) -> list[str]:
        """Names of the weights and optimizer state tensors that are not finite."""
        return nonfinite_tensors(self.model, self.optimizer)

    def save(self, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.cfg.out_dir, self.model, self.optimizer, state, keep=self.cfg.train.keep_checkpoints)

    def load(self, path: Path) -> dict[str, Any]:
        return load_training_checkpoint(path, self.model, self.optimizer)

    def peak_memory(self, meter: _SavedActivationMeter) -> tuple[int, str]:
        """(bytes, "cuda") measured, or (bytes, "estimate") on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda"
        return _state_bytes(self.model) + meter.nbytes, "estimate"

    def close(self) -> None:
        """Release what the job holds beyond its objects (nothing in one process)."""


def train(
    cfg: RunConfig,
    *,
    resume: bool | str | Path = False,
    progress: bool = True,
    desc: str | None = None,
    data: TokenData | None = None,
    eval_hook: Callable[[GPT], dict[str, Any]] | None = None,
    pause: Callable[[int], bool] | None = None,
) -> RunResult:
    """Train one model as ``cfg`` says; write metrics, checkpoints and a summary to ``cfg.out_dir``.

    Under ``torchrun`` (world size above 1) or with a ``[parallel]`` section the run is laid out
    over the job's processes (``torchmhc.distributed``; see :func:`parallel_layout`): every
    process calls this, rank 0 writes the run directory, checkpoints are DCP directories.
    Otherwise it runs in this process on one device.

    Args:
        resume: False starts fresh (an existing ``metrics.jsonl`` is overwritten); True continues
            from ``cfg.out_dir``'s latest checkpoint; a path continues from that checkpoint dir.
            Checkpoints of either kind (one process, or laid out over processes) resume at any
            layout. The model settings must be the checkpoint's (``model.recompute`` may change);
            every other setting is ``cfg``'s, optimizer settings included (``config.json``
            records them). Nothing in the run directory changes unless the checkpoint loads.
        progress: show a tqdm bar (loss, tokens/s, ETA) on stderr.
        desc: label of the progress bar (defaults to the run name).
        data: an already opened corpus (``torchmhc compare`` shares one between variants).
        eval_hook: called with the model (in eval mode, no grad) at every evaluation; the
            JSON-serializable dict it returns is merged into that evaluation's metrics row. Not
            with pipeline parallelism (no process holds the whole model).
        pause: called before each step with its index; True stops the run there, after a
            checkpoint of the steps done so far, and returns a result with ``paused`` set and no
            final evaluation (:class:`TimeBudget` makes one from a deadline). ``resume=True``
            continues it: the run is the same as one that never paused. Not with a run laid out
            over processes.

    Raises:
        NonFiniteLossError: with ``train.on_nonfinite = "stop"``, or whenever the weights
            themselves stop being finite; names the newest checkpoint of finite weights, written
            first when the weights are still finite (None if there is none).
        CheckpointError: ``resume`` asked for a checkpoint that is missing, corrupt, or of another model.
        ValueError: ``train.out_dir`` cannot be written, a corpus problem (``torchmhc.data``), or a
            ``[parallel]`` layout that does not fit the job (:func:`parallel_layout`).
        ImportError: safetensors or tqdm (the ``train`` extra) is not installed.
    """
    require("safetensors", "train")
    require("tqdm", "train")
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    layout = parallel_layout(cfg)
    if layout is not None and layout.pipelined and eval_hook is not None:
        raise ValueError("eval_hook needs the whole model, which no process holds with pipeline parallelism (parallel.pp).")
    if layout is not None and pause is not None:
        raise ValueError("pausing a run (a time budget) is not supported for a run laid out over processes.")
    out_dir = cfg.out_dir
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {str(out_dir / 'checkpoints')!r}.")
        _resume_state(cfg, ckpt)
    _writable_dir(out_dir, "train.out_dir")

    if layout is None:
        job = LocalJob(cfg, device, data=data, progress=progress)
    else:
        from torchmhc.distributed.job import ParallelJob

        job = ParallelJob(cfg, device.type, data=data, progress=progress)
    try:
        return _run(job, cfg, ckpt, progress=progress and job.is_main, desc=desc, eval_hook=eval_hook, pause=pause)
    finally:
        job.close()


def _run(
    job: "LocalJob | ParallelJob",
    cfg: RunConfig,
    ckpt: Path | None,
    *,
    progress: bool,
    desc: str | None,
    eval_hook: Callable[[GPT], dict[str, Any]] | None,
    pause: Callable[[int], bool] | None = None,
) -> RunResult:
    """The loop of :func:`train` over ``job`` (a :class:`LocalJob` or a ``ParallelJob``)."""
    tc, dc = cfg.train, cfg.data
    out_dir, device, data = cfg.out_dir, job.device, job.data
    start_step, tokens_seen, train_time, skipped = 0, 0, 0.0, 0
    metrics_path = out_dir / "metrics.jsonl"
    last_good: Path | None = None  # newest checkpoint of finite weights that this run can stand on
    if ckpt is not None:
        state = job.load(ckpt)
        start_step, tokens_seen, train_time = state["step"], state["tokens"], state["train_time_s"]
        skipped = state["skipped_steps"]
        last_good = ckpt
        changes = _changed_settings(state.get("config", {}), config_to_dict(cfg))
        if progress and changes:
            print(f"{desc or cfg.name}: resuming at step {start_step} with changed settings: {'; '.join(changes)}")
    rows = _read_metrics(metrics_path, start_step) if ckpt is not None and job.is_main else []
    # The run directory changes only now, when the checkpoint has loaded.
    if job.is_main:
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = _SavedActivationMeter()
    tokens_per_step = dc.batch_size * dc.seq_len

    def checkpoint(step: int) -> Path:
        nonlocal last_good
        bad = job.nonfinite()
        if bad:
            raise NonFiniteLossError(
                f"the weights or the optimizer state are not finite after step {step} ({_some(bad)}); "
                f"lower optim.lr or enable optim.grad_clip.",
                step=step,
            )
        # Batches are a pure function of (seed, step): the step is the data position. The config
        # is recorded so that a resume can tell whether it is given the same model.
        state = {"step": step, "tokens": tokens_seen, "train_time_s": train_time, "skipped_steps": skipped,
                 "data_position": step, "config": config_to_dict(cfg)}
        last_good = job.save(state)
        return last_good

    def log(row: dict[str, Any]) -> None:
        if job.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(step: int) -> dict[str, Any]:
        val_loss = job.evaluate()
        row = {"kind": "eval", "step": step, "val_loss": val_loss,
               "val_bpb": bits_per_byte(val_loss, data.bytes_per_token)}
        if eval_hook is not None:
            job.model.eval()
            with torch.no_grad():
                row.update(eval_hook(job.model))
            job.model.train()
        evals.append(row)
        log(row)
        return row

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=start_step, desc=desc or cfg.name, disable=not progress,
               unit="step", dynamic_ncols=True, leave=True)
    stopped = None
    paused_at: int | None = None
    if start_step == 0 and tc.eval_interval:
        run_eval(0)  # the starting point of the validation and gain curves
    try:
        for step in range(start_step, tc.steps):
            if pause is not None and pause(step):
                paused_at = step
                break
            batch = job.batch(step)
            t0 = time.perf_counter()
            # Measure saved activations on the first step of this process only (it is not free).
            with meter.context() if step == start_step else contextlib.nullcontext():
                stats = job.step(step, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_seen += tokens_per_step
            skipped += stats.skipped
            done = step + 1
            if done % tc.log_interval == 0 or done == tc.steps:
                row = {"kind": "train", "step": done, "loss": stats.loss, "grad_norm": stats.grad_norm,
                       "lr": stats.lr, "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                       "skipped": stats.skipped}
                history.append(row)
                log(row)
            bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tokens_seen / train_time:,.0f}", refresh=False)
            bar.update(1)
            if tc.eval_interval and done % tc.eval_interval == 0 and done < tc.steps:
                row = run_eval(done)
                if progress:
                    bar.write(f"{desc or cfg.name}: step {done} val_loss {row['val_loss']:.4f} bpb {row['val_bpb']:.3f}")
            if tc.checkpoint_interval and done % tc.checkpoint_interval == 0 and done < tc.steps:
                checkpoint(done)
        bar.close()
        if paused_at is None:
            final_eval = run_eval(tc.steps)
            checkpoint(tc.steps)
        elif paused_at > start_step:
            checkpoint(paused_at)
    except NonFiniteLossError as exc:
        # A stopped step did not touch the weights: if they are finite, they are the last good state.
        if not job.nonfinite():
            checkpoint(exc.step)
        exc.checkpoint = last_good
        where = f" Last good checkpoint: {last_good}" if last_good else " No checkpoint of finite weights exists for this run."
        exc.args = (exc.args[0] + where,)
        stopped = str(exc)
        raise
    finally:
        bar.close()
        if stopped is not None and job.is_main:
            _write_summary(out_dir, _summary(cfg, job, history, evals, tokens_seen, train_time, meter, skipped, stopped))

    summary = _summary(cfg, job, history, evals, tokens_seen, train_time, meter, skipped, None)
    if paused_at is not None:
        if progress:
            print(f"{desc or cfg.name}: paused at step {paused_at} of {tc.steps}; resume to continue -> {out_dir}")
        return RunResult(cfg, out_dir, job.model, data, history, evals, summary, paused=True)
    if job.is_main:
        _write_summary(out_dir, summary)
    if progress:
        print(f"{desc or cfg.name}: val_loss {final_eval['val_loss']:.4f}, bpb {final_eval['val_bpb']:.3f}, "
              f"{summary['tokens_per_s']:,.0f} tokens/s -> {out_dir}")
    return RunResult(cfg, out_dir, job.model, data, history, evals, summary)


def _summary(
    cfg: RunConfig,
    job: "LocalJob | ParallelJob",
    history: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    tokens_seen: int,
    train_time: float,
    meter: _SavedActivationMeter,
    skipped: int,
    stopped: str | None,
) -> dict[str, Any]:
    """Final numbers of a run (see :class:`RunResult`)."""
    last = [r["loss"] for r in history[-10:] if math.isfinite(r["loss"])]
    peak, kind = job.peak_memory(meter)
    val = evals[-1] if evals else {}
    return {
        "name": cfg.name,
        "residual": cfg.model.residual,
        "num_streams": job.num_streams,
        "num_params": job.num_params,
        "steps": history[-1]["step"] if history else 0,
        "tokens": tokens_seen,
        "train_loss": sum(last) / len(last) if last else math.nan,
        "val_loss": val.get("val_loss", math.nan),
        "val_bpb": val.get("val_bpb", math.nan),
        "tokens_per_s": tokens_seen / train_time if train_time else math.nan,
        "train_time_s": train_time,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "skipped_steps": skipped,
        "stopped": stopped,
        "corpus": job.data.source,
    }


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
