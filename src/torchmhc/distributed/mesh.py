"""Process group and DeviceMesh set-up for a job launched by ``torchrun`` (or any launcher that
sets the same environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``).

The mesh has three named dimensions, outermost first: ``("pp", "dp_replicate", "dp_shard")``.
Pipeline neighbours are the furthest apart in rank order and the FSDP group the closest, so on
several hosts the all-gathers and reduce-scatters stay inside a host where they can.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchmhc.distributed.config import ParallelConfig

__all__ = ["MESH_DIMS", "Layout", "init_distributed", "build_mesh", "rank_layout"]

#: Names of the mesh dimensions, outermost first.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard")


def init_distributed(device_type: str | None = None) -> torch.device:
    """Join the job's default process group (once) and return this process's device.

    ``device_type`` "cuda" uses NCCL and ``cuda:LOCAL_RANK``; "cpu" uses gloo; None picks cuda
    when available. Without ``WORLD_SIZE`` in the environment, a one-process group is made on a
    local port, so the same code runs without a launcher.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}.")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device_type == "cuda" else None)
    return device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(cfg: ParallelConfig, device_type: str) -> DeviceMesh:
    """The job's ``(pp, dp_replicate, dp_shard)`` DeviceMesh on "cpu" (gloo) or "cuda" (NCCL).

    ``cfg`` must be resolved (:meth:`ParallelConfig.resolve`) against the world size of the
    default process group, which must already be initialized (:func:`init_distributed`).
    """
    if not dist.is_initialized():
        raise ValueError("build_mesh needs an initialized default process group; call init_distributed() first.")
    resolved = cfg.resolve(dist.get_world_size())
    shape = (resolved.pp, resolved.dp_replicate, resolved.dp_shard)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the mesh."""

    pp_rank: int
    pp_size: int
    dp_rank: int  # over both data-parallel dimensions: dp_replicate_rank * dp_shard + dp_shard_rank
    dp_size: int


def rank_layout(mesh: DeviceMesh) -> Layout:
    """This process's pipeline and data-parallel coordinates in ``mesh``."""
    pp, dpr, dps = (mesh.get_local_rank(name) for name in MESH_DIMS)
    return Layout(
        pp_rank=pp,
        pp_size=mesh.size(0),
        dp_rank=dpr * mesh.size(2) + dps,
        dp_size=mesh.size(1) * mesh.size(2),
    )
