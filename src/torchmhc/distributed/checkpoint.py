"""Checkpoints of laid-out runs with ``torch.distributed.checkpoint`` (DCP).

What a checkpoint holds: the model and AdamW state under the full model's parameter names (each
rank writes its own shards; DCP records where every piece of every tensor lives), each rank's
RNG state, and ``state.json`` (step, data position, tokens, the optimizer's hyperparameters, the
layout that wrote it). Loading reads whatever pieces this rank's shards need, so a checkpoint
written at one layout loads at any other (pp = 2 × dp_shard = 2 -> dp_shard = 4, or one
process): parameter names do not depend on the layout, and DCP reshards.

Layout on disk, next to ``torchmhc.train``'s single-file checkpoints::

    checkpoints/latest                 name of the newest complete checkpoint
    checkpoints/step_000300/           .metadata, __<rank>_0.distcp, state.json

Atomic: every rank writes into ``checkpoints/.step_<n>.tmp``; once DCP has finished (its
``.metadata`` is written last) rank 0 writes ``state.json``, renames the directory into place and
then replaces ``latest`` (``torchmhc.train.publish_checkpoint``, as for single-file
checkpoints: re-saving a step is safe too). A crash at any point leaves the previous checkpoint
the one ``latest`` names. All ranks must see one shared directory (one host, or a shared file
system).

No pickled code runs on load. DCP writes its ``.metadata`` file with ``pickle``, and loads it
with ``pickle.load``: a crafted file could run anything. :class:`SafeFileSystemReader` reads it
with an unpickler that only resolves the handful of DCP metadata classes, ``torch.Size``, dtypes
and paths (anything else raises :class:`CheckpointError`). Tensors are read with
``torch.load(weights_only=True)`` (DCP's own choice). DCP would load non-tensor values with
``torch.load(weights_only=False)``: nothing but tensors is ever saved here (the rest goes to
``state.json``), and the load planner refuses to read any other kind of item.

:func:`dcp_to_safetensors` and :func:`safetensors_to_dcp` convert to and from the one-process
checkpoint format of ``torchmhc.train`` (they call its ``save_checkpoint`` / ``load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchmhc.config import ModelConfig, OptimConfig
from torchmhc.train import (
    DCP_CHECKPOINT_FORMAT,
    CheckpointError,
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    publish_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)

__all__ = [
    "DCP_FORMAT",
    "SafeFileSystemReader",
    "save_dcp_checkpoint",
    "load_dcp_checkpoint",
    "dcp_to_safetensors",
    "safetensors_to_dcp",
    "latest_checkpoint",
]

#: ``state.json``'s ``format`` for DCP checkpoints (``torchmhc.train``'s own are format 1).
DCP_FORMAT = DCP_CHECKPOINT_FORMAT

# Optimizer entries are flattened to parameter names ("state.blocks.0.attn.wo.weight.exp_avg"),
# which do not depend on the layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Implementation choices of the optimizer that stay this process's (fused on CUDA, loop on CPU).
_OPTIM_IMPL = ("foreach", "fused", "capturable", "differentiable")


# ----------------------------------------------------------------------------------------------
# Reading without running pickled code
# ----------------------------------------------------------------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``.metadata`` file refers to (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        raise CheckpointError(
            f"the checkpoint's DCP metadata refers to {module}.{name}, which a DCP metadata file never "
            f"needs; refusing to unpickle it (it could run code)."
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, with the ``.metadata`` pickle read by a restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        # What FileSystemReader.read_metadata does after unpickling.
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses to load non-tensor items (DCP unpickles those with ``weights_only=False``)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(
            f"the checkpoint stores {read_item.dest_index.fqn!r} as a pickled object; torchmhc checkpoints "
            f"hold tensors only, refusing to unpickle it."
        )


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    rank = _rank()
    out = {f"cpu.{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        out[f"cuda.{rank}"] = torch.cuda.get_rng_state()
    return out


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer tensors under layout-independent names (DTensor shards or tensors).

    A pipelined tied embedding's LM-head copy (``ModelPart.tied_copy``) keeps its optimizer state
    under the embedding's name, as a one-process run's one tied matrix does: the two copies' states
    are equal, and any layout finds the state it asks for."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        flat = get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)
        optim = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        if _holds_tied_copy(model):
            for key in [k for k in optim if k.startswith(_TIED_COPY_STATE)]:
                optim.setdefault(_TIED_STATE + key.removeprefix(_TIED_COPY_STATE), optim.pop(key))
        state["optim"] = optim
    return state


#: Optimizer-state prefixes of a pipelined tied embedding's LM-head copy and of the embedding.
_TIED_COPY_STATE, _TIED_STATE = "state.lm_head.weight.", "state.tok_emb.weight."


def _holds_tied_copy(model: nn.Module) -> bool:
    """Whether ``model`` is a pipeline part holding a tied embedding's LM-head copy."""
    return getattr(model, "tied_copy", None) is not None


def save_dcp_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 1,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>/`` with DCP, atomically; call on every rank.

    Args:
        run_dir: the run's output directory (shared by all ranks).
        model: this rank's part (``ParallelModel.part``), or a whole model in one process.
        optimizer: its optimizer.
        state: JSON-serializable training state with ``"step"`` (optimizer steps done); the data
            position is the step (batches are a pure function of the seed and the step).
        keep: how many step directories to keep.

    Returns:
        The checkpoint directory.
    """
    return _save(run_dir, model, optimizer, state, keep=keep, collective=dist.is_initialized())


def _save(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int,
    collective: bool,
) -> Path:
    """:func:`save_dcp_checkpoint` by every rank of the job (``collective``) or by this process
    alone (a whole model, also on one rank of a job)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{state['step']:06d}"
    tmp = root / f".{name}.tmp"
    writes_state = not collective or _rank() == 0
    if writes_state:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that crashed
        tmp.mkdir()
    if collective:
        _barrier()
    tensors = {**_tensor_state(model, optimizer), "rng": _rng_state()}
    with _one_process_quiet():
        dcp.save(tensors, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not collective)
    if writes_state:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        meta = {
            "format": DCP_FORMAT,
            "data_position": state["step"],
            **state,
            "param_groups": groups,
            "world_size": dist.get_world_size() if collective else 1,
        }
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        publish_checkpoint(tmp, root / name, keep=keep)
    if collective:
        _barrier()
    return root / name


def _read_state(path: Path) -> dict[str, Any]:
    meta = read_checkpoint_state(path, (), formats=(1, DCP_FORMAT))  # a format 1 one gets the message below
    if meta["format"] != DCP_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {meta['format']!r}, not a DCP checkpoint ({DCP_FORMAT!r}); "
            f"torchmhc.train.load_checkpoint reads format 1, or convert it with safetensors_to_dcp."
        )
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: DCP's .metadata is missing.")
    return meta


def load_dcp_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    hyperparameters: Literal["checkpoint", "optimizer"] = "checkpoint",
) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) at this run's layout; restore this
    rank's RNG state if the checkpoint has one for it. Call on every rank.

    Args:
        hyperparameters: where the optimizer's settings (lr, betas, eps, weight decay) come from,
            as in ``torchmhc.train.load_checkpoint``: the checkpoint's, or those ``optimizer`` was
            built with. Its moments and step counts are the checkpoint's either way.

    Returns:
        The saved training state (``step``, ``data_position``, ...).

    Raises:
        CheckpointError: missing or corrupt files, unsafe contents, or tensors that do not fit.
    """
    path = Path(path)
    meta = _read_state(path)
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    if optimizer is not None and hyperparameters == "checkpoint":
        # Hyperparameters from the checkpoint, implementation from this process (as train.py).
        if len(meta["param_groups"]) != len(optimizer.param_groups):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has {len(meta['param_groups'])} optimizer parameter groups, "
                f"this optimizer {len(optimizer.param_groups)}."
            )
        for group, stored in zip(optimizer.param_groups, meta["param_groups"]):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k not in _OPTIM_IMPL})
    tensors = _tensor_state(model, optimizer)
    rng = {k: v for k, v in _rng_state().items() if f"rng.{k}" in saved}
    if rng:
        tensors["rng"] = rng
    try:
        with _one_process_quiet():
            dcp.load(tensors, storage_reader=reader, planner=_TensorsOnlyLoadPlanner(), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except CheckpointException as exc:  # raised on some rank during the load: ours, or a mismatch
        ours = [f.exception for f in exc.failures.values() if isinstance(getattr(f, "exception", None), CheckpointError)]
        if ours:
            raise ours[0] from None
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {exc}") from exc
    except (RuntimeError, ValueError, KeyError) as exc:  # missing keys, shape mismatches
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {exc}") from exc
    set_model_state_dict(model, tensors["model"])
    if optimizer is not None:
        flat = get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)
        loaded = tensors["optim"]
        for key in flat:
            if key in loaded:
                flat[key] = loaded[key]
        if _holds_tied_copy(model):  # the copy's state is the embedding's, in tensors of its own
            for key in [k for k in flat if k.startswith(_TIED_COPY_STATE)]:
                flat[key] = loaded[_TIED_STATE + key.removeprefix(_TIED_COPY_STATE)].clone()
        set_optimizer_state_dict(model, optimizer, flat, options=_OPTIM_OPTIONS)
    for key, value in rng.items():
        device, _ = key.split(".")
        if device == "cpu":
            torch.set_rng_state(value)
        else:
            torch.cuda.set_rng_state(value)
    return {k: v for k, v in meta.items() if k not in ("format", "param_groups", "world_size")}


# ----------------------------------------------------------------------------------------------
# Conversion to and from torchmhc.train's single-file format (one process)
# ----------------------------------------------------------------------------------------------


def _one_process_model(model_cfg: ModelConfig, optim_cfg: OptimConfig):
    from torchmhc.models import build_model

    model = build_model(model_cfg)
    return model, build_optimizer(model, optim_cfg)


def dcp_to_safetensors(dcp_path: Path, run_dir: Path, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> Path:
    """Write DCP checkpoint ``dcp_path`` as a ``torchmhc.train`` checkpoint under ``run_dir``.

    Runs in one process without a process group; the RNG state saved is that of rank 0.
    Returns the new checkpoint directory (``torchmhc.train.load_checkpoint`` reads it).
    """
    if dist.is_initialized():
        raise CheckpointError("dcp_to_safetensors runs in one process, outside a process group.")
    model, optimizer = _one_process_model(model_cfg, optim_cfg)
    state = load_dcp_checkpoint(dcp_path, model, optimizer)  # restores rank 0's RNG state
    return save_checkpoint(run_dir, model, optimizer, state)


def safetensors_to_dcp(path: Path, run_dir: Path, model_cfg: ModelConfig, optim_cfg: OptimConfig) -> Path:
    """Write ``torchmhc.train`` checkpoint ``path`` as a DCP checkpoint under ``run_dir``; any
    layout then resumes from it with :func:`load_dcp_checkpoint`. Runs in this process alone
    (also on one rank of a job: the others wait for it); the RNG state saved is rank 0's."""
    model, optimizer = _one_process_model(model_cfg, optim_cfg)
    state = load_checkpoint(path, model, optimizer)  # restores its RNG state
    return _save(run_dir, model, optimizer, state, keep=1, collective=False)
