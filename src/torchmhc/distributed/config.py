"""The ``[parallel]`` section of a run: how a training job is laid out over processes.

A job runs on ``world_size = pp × dp_replicate × dp_shard`` processes (one per GPU, launched by
``torchrun``). Along ``pp`` the model is cut into pipeline stages; along the two data-parallel
axes every process sees its own rows of the global batch: ``dp_shard`` ranks shard parameters,
gradients and optimizer state (FSDP2), ``dp_replicate`` groups of them hold replicas (HSDP).

TOML::

    [parallel]
    dp_shard = 0            # 0: whatever the world size leaves after pp and dp_replicate
    dp_replicate = 1
    pp = 2
    pp_schedule = "1f1b"    # gpipe, 1f1b, interleaved-1f1b, zbv, dualpipev
    microbatches = 0        # 0: the smallest number the schedule accepts
    stages_per_rank = 0     # 0: 1 for gpipe/1f1b, 2 for the others
    stage_boundaries = []   # first block of every stage but the first; [] = balanced
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ParallelConfig", "PP_SCHEDULES", "MULTI_STAGE_SCHEDULES", "V_SCHEDULES"]

#: Accepted ``pp_schedule`` names.
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv", "dualpipev")
#: Schedules that run several stages on each pipeline rank.
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b", "zbv", "dualpipev")
#: Schedules that place stages in a V: rank r holds stages r and 2·pp - 1 - r.
V_SCHEDULES = ("zbv", "dualpipev")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ParallelConfig:
    """Degrees of parallelism and the pipeline schedule (see the module docstring).

    The checks that need the world size, the model or the batch are in :meth:`resolve`.
    """

    dp_shard: int = 0
    dp_replicate: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 0
    stages_per_rank: int = 0
    stage_boundaries: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.stage_boundaries = tuple(self.stage_boundaries)
        for name in ("dp_shard", "microbatches", "stages_per_rank"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"parallel.{name} must be an integer >= 0 (0 = automatic), got {value!r}.",
            )
        for name in ("dp_replicate", "pp"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"parallel.{name} must be an integer >= 1, got {value!r}.",
            )
        _check(
            self.pp_schedule in PP_SCHEDULES,
            f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}; got {self.pp_schedule!r}.",
        )
        if self.pp_schedule in V_SCHEDULES:
            _check(
                self.stages_per_rank in (0, 2),
                f"parallel.stages_per_rank must be 2 (or 0) for the V-shaped schedule {self.pp_schedule!r}, "
                f"got {self.stages_per_rank}.",
            )
        elif self.pp_schedule in ("gpipe", "1f1b"):
            _check(
                self.stages_per_rank in (0, 1),
                f"parallel.stages_per_rank must be 1 (or 0) for {self.pp_schedule!r}, which runs one stage "
                f"per rank; got {self.stages_per_rank}. Use interleaved-1f1b for several.",
            )
        else:  # interleaved-1f1b
            _check(
                self.stages_per_rank != 1,
                "parallel.stages_per_rank must be >= 2 (or 0) for 'interleaved-1f1b'; use '1f1b' for one stage per rank.",
            )
        _check(
            all(isinstance(b, int) and not isinstance(b, bool) for b in self.stage_boundaries)
            and list(self.stage_boundaries) == sorted(set(self.stage_boundaries))
            and all(b >= 1 for b in self.stage_boundaries),
            f"parallel.stage_boundaries must be strictly increasing block indices >= 1, got {list(self.stage_boundaries)}.",
        )
        expected = self.num_stages - 1
        _check(
            not self.stage_boundaries or len(self.stage_boundaries) == expected,
            f"parallel.stage_boundaries must name the first block of each of the {expected} stages after the "
            f"first ({self.num_stages} stages = pp {self.pp} x {self.local_stages} per rank), "
            f"got {len(self.stage_boundaries)}: {list(self.stage_boundaries)}.",
        )

    @property
    def local_stages(self) -> int:
        """Pipeline stages each pipeline rank holds."""
        if self.stages_per_rank:
            return self.stages_per_rank
        return 1 if self.pp_schedule in ("gpipe", "1f1b") else 2

    @property
    def num_stages(self) -> int:
        """Pipeline stages in all: ``pp × local_stages`` (1 without pipelining)."""
        return self.pp * self.local_stages if self.pp > 1 or self.pp_schedule in MULTI_STAGE_SCHEDULES else 1

    @property
    def pipelined(self) -> bool:
        """Whether the model runs as pipeline stages under a schedule (also at pp = 1 with a
        multi-stage schedule: then one rank runs all stages, which tests the schedule alone)."""
        return self.num_stages > 1

    def resolve(self, world_size: int, *, num_layers: int | None = None, batch_size: int | None = None) -> ParallelConfig:
        """A copy with the automatic values filled in, checked against the job.

        Args:
            world_size: processes in the job (``WORLD_SIZE`` under torchrun).
            num_layers: transformer blocks of the model (each stage needs at least one).
            batch_size: the global batch (``data.batch_size``), split over the data-parallel ranks
                and then into microbatches.

        Raises:
            ValueError: the degrees do not multiply to the world size, or the model or batch
                cannot be split as asked.
        """
        _check(isinstance(world_size, int) and world_size >= 1, f"world_size must be an integer >= 1, got {world_size!r}.")
        others = self.pp * self.dp_replicate
        dp_shard = self.dp_shard
        if dp_shard == 0:
            _check(
                world_size % others == 0,
                f"the world size {world_size} is not divisible by parallel.pp x parallel.dp_replicate = "
                f"{self.pp} x {self.dp_replicate} = {others}; launch a multiple of {others} processes.",
            )
            dp_shard = world_size // others
        _check(
            others * dp_shard == world_size,
            f"the world size {world_size} must equal parallel.pp x parallel.dp_replicate x parallel.dp_shard = "
            f"{self.pp} x {self.dp_replicate} x {dp_shard} = {others * dp_shard}; change the degrees or the "
            f"number of processes (torchrun --nproc-per-node).",
        )
        dp = self.dp_replicate * dp_shard
        microbatches = self.microbatches
        if microbatches == 0:
            # The fewest that keep every stage busy: DualPipeV needs one per stage at least.
            microbatches = self.num_stages if self.pp_schedule == "dualpipev" else max(self.pp, 1)
        if self.pp_schedule == "dualpipev":
            _check(
                microbatches >= self.num_stages,
                f"parallel.microbatches must be >= the number of stages ({self.num_stages}) for dualpipev, got {microbatches}.",
            )
        if self.pp_schedule == "interleaved-1f1b" and self.pp > 1:
            _check(
                microbatches % self.pp == 0,
                f"parallel.microbatches must be a multiple of parallel.pp = {self.pp} for interleaved-1f1b, got {microbatches}.",
            )
        if num_layers is not None:
            _check(
                num_layers >= self.num_stages,
                f"model.num_layers = {num_layers} is fewer than the {self.num_stages} pipeline stages "
                f"(pp {self.pp} x {self.local_stages} per rank); each stage needs at least one block.",
            )
            _check(
                not self.stage_boundaries or self.stage_boundaries[-1] < num_layers,
                f"parallel.stage_boundaries must be block indices < model.num_layers = {num_layers}, "
                f"got {list(self.stage_boundaries)}.",
            )
        if batch_size is not None:
            _check(
                batch_size % (dp * microbatches) == 0,
                f"data.batch_size = {batch_size} must be divisible by the data-parallel ranks x microbatches = "
                f"{dp} x {microbatches} = {dp * microbatches}, so every microbatch has the same rows.",
            )
        return ParallelConfig(
            dp_shard=dp_shard,
            dp_replicate=self.dp_replicate,
            pp=self.pp,
            pp_schedule=self.pp_schedule,
            microbatches=microbatches,
            stages_per_rank=self.local_stages,
            stage_boundaries=self.stage_boundaries,
        )

    @property
    def dp(self) -> int:
        """Data-parallel ranks in all (``dp_replicate × dp_shard``; call on a resolved config)."""
        if self.dp_shard == 0:
            raise ValueError("dp is unknown before resolve(world_size) fills in parallel.dp_shard = 0.")
        return self.dp_replicate * self.dp_shard
