"""Typed run configuration: dataclasses, TOML presets and ``key=value`` overrides.

A run is described by one :class:`RunConfig` made of four small sections (``model``, ``data``,
``optim``, ``train``) plus ``compare`` for ``torchmhc compare`` and ``parallel`` for a run laid
out over several processes (``torchmhc.distributed.config.ParallelConfig``). Each section validates itself in
``__post_init__`` and raises ``ValueError`` with a sentence naming the field, so a typo in a TOML
file or on the command line fails before any work starts.

TOML layout (every key optional; missing keys take the defaults below)::

    name = "tiny"
    description = "..."
    [model]   arch, dim, num_layers, num_heads, residual, num_streams, ...
    [data]    path, seq_len, batch_size, ...
    [optim]   lr, warmup_steps, schedule, grad_clip, ...
    [train]   steps, seed, eval_interval, out_dir, ...
    [compare] variants, report_dir
    [parallel] dp_shard, dp_replicate, pp, pp_schedule, microbatches, ...

Presets are TOML files shipped inside the package (``torchmhc/presets/<name>.toml``): a name
such as ``"tiny"`` is always a preset, anything else (a :class:`~pathlib.Path`, or a string with a
path separator or a suffix) is a config file; see :func:`load_config`.
"""

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchmhc.distributed.config import ParallelConfig
from torchmhc.layers import INITS
from torchmhc.residuals import get_residual, residual_kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (the 'train' extra installs it)
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "CompareConfig",
    "RunConfig",
    "find_preset",
    "list_presets",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]



#: ``model.arch`` values.
ARCHS = ("gpt", "moe", "hf-llama")


def _is_residual(name: str) -> bool:
    try:
        get_residual(name)
    except ValueError:
        return False
    return True


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """Shape of the language model (``torchmhc.models``).

    ``residual`` picks the connection around every sub-layer; with ``residual="residual"`` the
    model always uses one stream, whatever ``num_streams`` says (``effective_num_streams``).
    """

    # "gpt" (dense SwiGLU FFN), "moe" (DeepSeek-V3-style experts) or "hf-llama": a transformers Llama
    # of this shape (the 'hf' extra), upcycled to hyper-connections from a function-preserving start
    # (torchmhc.interop.hf; hc_init, recompute, fuse_transitions and fuse_branch_norm do not apply to it)
    arch: str = "gpt"
    vocab_size: int = 256  # byte-level tokens by default
    dim: int = 128  # C: hidden size of one stream
    num_layers: int = 4  # transformer blocks; 2 sub-layers (attention, FFN) each
    num_heads: int = 4
    ffn_hidden: int = 0  # SwiGLU hidden size; 0 picks 8/3 * dim rounded up to a multiple of 32
    max_seq_len: int = 1024  # length of the RoPE table
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    residual: str = "mhc"
    num_streams: int = 4  # n
    hc_init: str = ""  # "" = the library default of HyperConnection; else uniform/identity/onehot
    # Block recomputation of the mHC operations (torchmhc.recompute, docs/math.md §9): keep the streams at
    # each block start and every branch output, replay the rest in backward.
    recompute: bool = False
    recompute_block_length: int = 0  # sub-layers per block; 0 = L_r* = sqrt(n·L / (n + 2))
    # Every sub-layer's post-res and the next one's coefficients + pre-mix as one op over the
    # streams, inside blocks and across them (HyperConnection.post_pre: one read of the streams
    # instead of two where the kernels run; mHC only, same values; not with recompute, which runs
    # the sub-layers one by one). On by default: fusing each block's inner transition took mHC's
    # overhead on an H100 from +19.0% to +17.7% (gpu-dense-1b) and +8.2% to +7.7% (gpu-moe-3b)
    # with CUDA graphs (benchmarks/results/h100.md); across blocks too: not measured yet
    fuse_transitions: bool = True
    # With fuse_transitions, each fused transition also applies the next branch's RMSNorm to the
    # layer input it makes, and its backward forms the norm's backward (HyperConnection.post_pre's
    # norm): the norm then moves no bytes of its own (run after the transition it reads and writes
    # C a token forward, 3·C backward). Same values up to rounding.
    fuse_branch_norm: bool = True
    # Mixture of experts (arch = "moe" only)
    num_experts: int = 8  # routed experts
    num_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 0  # hidden size of one expert; 0 picks ffn_hidden // top_k
    router_bias_rate: float = 1e-3  # u of the auxiliary-loss-free balancing update

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}.")
        try:
            get_residual(self.residual)
        except ValueError as exc:
            raise ValueError(f"model.{exc}.") from None
        _check(
            self.hc_init in ("",) + INITS,
            f"model.hc_init must be '' (library default) or one of {', '.join(INITS)}; "
            f"got {self.hc_init!r}.",
        )
        if self.arch == "hf-llama":
            _check(
                self.hc_init == "",
                f"model.hc_init must be '' for model.arch = 'hf-llama' (its hyper-connections start where the "
                f"Llama's function is unchanged); got {self.hc_init!r}.",
            )
            _check(not self.recompute, "model.recompute is not supported for model.arch = 'hf-llama'.")
        _check(
            self.recompute_block_length >= 0,
            f"model.recompute_block_length must be >= 0 (0 = the optimal length), got {self.recompute_block_length}.",
        )
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "num_streams"):
            _check(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}.")
        _check(
            self.dim % self.num_heads == 0,
            f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads}).",
        )
        _check(
            (self.dim // self.num_heads) % 2 == 0,
            f"model.dim / model.num_heads must be even for rotary embeddings; got "
            f"{self.dim // self.num_heads}.",
        )
        _check(self.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}.")
        _check(
            math.isfinite(self.rope_theta) and self.rope_theta > 0,
            f"model.rope_theta must be a finite number > 0, got {self.rope_theta}.",
        )
        if self.arch == "moe":
            _check(self.num_experts >= 1, f"model.num_experts must be >= 1, got {self.num_experts}.")
            _check(
                1 <= self.top_k <= self.num_experts,
                f"model.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}.",
            )
            _check(
                self.num_shared_experts >= 0,
                f"model.num_shared_experts must be >= 0, got {self.num_shared_experts}.",
            )
            _check(self.expert_hidden >= 0, f"model.expert_hidden must be >= 0, got {self.expert_hidden}.")
            _check(
                math.isfinite(self.router_bias_rate) and self.router_bias_rate >= 0,
                f"model.router_bias_rate must be a finite number >= 0, got {self.router_bias_rate}.",
            )

    @property
    def effective_num_streams(self) -> int:
        """Streams the model actually carries: 1 for the plain residual, else ``num_streams``."""
        return get_residual(self.residual).num_streams_fixed or self.num_streams

    @property
    def effective_ffn_hidden(self) -> int:
        """SwiGLU hidden size: ``ffn_hidden`` or 8/3 * dim rounded up to a multiple of 32."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-(8 * self.dim // 3) // 32) * 32

    @property
    def effective_expert_hidden(self) -> int:
        """Hidden size of one routed expert (keeps active FFN width near the dense model's)."""
        return self.expert_hidden or max(32, self.effective_ffn_hidden // self.top_k)


#: Corpora named by ``data.corpus`` (``torchmhc.data.corpora``); "" is ``data.path`` if set, else the stdlib.
CORPORA = ("stdlib", "site-packages", "linux-source", "datasets")
#: Tokenizers named by ``data.tokenizer``.
TOKENIZERS = ("bytes", "bpe")
#: Formats of the ``datasets`` corpus (Hugging Face ``datasets`` builders); "" picks one by file suffix.
DATASET_FORMATS = ("text", "json", "parquet")
#: Suffixes of pre-tokenized token files (``data.path``).
TOKEN_FILE_SUFFIXES = (".npy", ".bin", ".u16", ".u32")


@dataclass
class DataConfig:
    """Where tokens come from and how batches are cut.

    ``corpus`` names the text (``torchmhc.data.corpora``): ``""`` reads ``path`` if set, else the
    Python standard library of the running interpreter; ``"stdlib"``; ``"site-packages"`` (the
    installed packages' Python source); ``"linux-source"`` (the kernel tarball of the
    ``linux-source`` package, or the tarball ``path`` names); ``"datasets"`` (local text, JSON
    lines or Parquet files at ``path``, read with Hugging Face ``datasets``). With ``corpus = ""``,
    ``path`` is a text file, a directory of text files, a ``.npy`` token array, or a raw token file
    (``.bin``/``.u16``/``.u32``; ``token_dtype`` says how to read ``.bin``).

    ``tokenizer`` is ``"bytes"`` (vocabulary 256) or ``"bpe"``: a byte-level BPE of
    ``bpe_vocab_size`` tokens trained on ``bpe_sample_mb`` MB of the training split
    (``torchmhc.data.bpe``); the model then needs ``model.vocab_size >= bpe_vocab_size``.
    """

    corpus: str = ""
    path: str = ""
    cache_dir: str = ""  # "" -> $TORCHMHC_CACHE or ~/.cache/torchmhc
    glob: str = "**/*"  # files taken from a directory path (binary files are skipped)
    max_file_kb: int = 0  # leave out files larger than this (generated tables); 0 = no limit
    text_field: str = "text"  # corpus "datasets": the column or JSON key holding each record's text
    format: str = ""  # corpus "datasets": "text", "json" or "parquet"; "" = by file suffix
    val_fraction: float = 0.05  # share of files (text) or of tokens (token files) held out
    token_dtype: str = "uint16"  # how to read a raw .bin token file
    tokenizer: str = "bytes"  # "bytes" or "bpe"
    bpe_vocab_size: int = 32768
    bpe_sample_mb: float = 64.0  # MB of the training split the BPE merges are learned from
    seq_len: int = 128
    batch_size: int = 16

    def __post_init__(self) -> None:
        _check(
            self.corpus in ("",) + CORPORA,
            f"data.corpus must be '' (data.path, or the standard library) or one of {', '.join(CORPORA)}; "
            f"got {self.corpus!r}.",
        )
        _check(
            not (self.path and self.corpus in ("stdlib", "site-packages")),
            f"data.corpus {self.corpus!r} reads no data.path (got {self.path!r}); leave data.path empty, "
            f"or set data.corpus = '' to read the path.",
        )
        _check(
            bool(self.path) or self.corpus != "datasets",
            "data.corpus 'datasets' reads local files: set data.path to a file or a directory of them.",
        )
        _check(
            self.format in ("",) + DATASET_FORMATS,
            f"data.format must be '' (by file suffix) or one of {', '.join(DATASET_FORMATS)}; got {self.format!r}.",
        )
        _check(bool(self.text_field), "data.text_field must name a column (e.g. 'text'), got ''.")
        _check(self.max_file_kb >= 0, f"data.max_file_kb must be >= 0 (0 = no limit), got {self.max_file_kb}.")
        _check(
            0.0 < self.val_fraction < 1.0,
            f"data.val_fraction must be in (0, 1), got {self.val_fraction}.",
        )
        _check(
            self.token_dtype in ("uint8", "uint16", "uint32"),
            f"data.token_dtype must be uint8, uint16 or uint32; got {self.token_dtype!r}.",
        )
        _check(
            self.tokenizer in TOKENIZERS,
            f"data.tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}.",
        )
        _check(
            not (self.tokenizer == "bpe" and not self.corpus and Path(self.path).suffix in TOKEN_FILE_SUFFIXES),
            f"data.path {self.path!r} holds tokens already; data.tokenizer = 'bpe' tokenizes text. "
            f"Set data.tokenizer = 'bytes' (the file's tokens are read as they are).",
        )
        # 256 byte tokens and the document separator come first: fewer leaves no room for a merge
        _check(
            258 <= self.bpe_vocab_size <= 2**32,
            f"data.bpe_vocab_size must be in [258, 2**32] (256 bytes, the separator, and merges), "
            f"got {self.bpe_vocab_size}.",
        )
        _check(
            math.isfinite(self.bpe_sample_mb) and self.bpe_sample_mb > 0,
            f"data.bpe_sample_mb must be a finite number > 0, got {self.bpe_sample_mb}.",
        )
        _check(self.seq_len >= 1, f"data.seq_len must be >= 1, got {self.seq_len}.")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}.")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (the mHC paper's recipe by default: step decay)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: str = "step"  # "step" (paper), "cosine" or "constant" after warm-up
    # step schedule: multiply by step_gamma at each milestone (fractions of the run)
    step_milestones: tuple[float, ...] = (0.8, 0.9)
    step_gamma: float = 0.316
    min_lr_ratio: float = 0.1  # floor of the cosine schedule, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the norm is still logged)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.step_milestones = tuple(self.step_milestones)
        # every number here must be finite: an infinite lr passes "> 0" and turns the weights into NaN
        _check(math.isfinite(self.lr) and self.lr > 0, f"optim.lr must be a finite number > 0, got {self.lr}.")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}.",
        )
        _check(math.isfinite(self.eps) and self.eps > 0, f"optim.eps must be a finite number > 0, got {self.eps}.")
        _check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}.",
        )
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        _check(
            self.schedule in ("step", "cosine", "constant"),
            f"optim.schedule must be 'step', 'cosine' or 'constant'; got {self.schedule!r}.",
        )
        _check(
            all(0.0 < m < 1.0 for m in self.step_milestones)
            and list(self.step_milestones) == sorted(self.step_milestones),
            f"optim.step_milestones must be increasing fractions in (0, 1), got {self.step_milestones}.",
        )
        _check(0 < self.step_gamma <= 1, f"optim.step_gamma must be in (0, 1], got {self.step_gamma}.")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        _check(
            math.isfinite(self.grad_clip) and self.grad_clip >= 0,
            f"optim.grad_clip must be a finite number >= 0 (0 turns clipping off), got {self.grad_clip}.",
        )


def _device_type(name: str) -> str | None:
    """The type of a device string as torch parses it (``"cuda:1"`` -> ``"cuda"``), None if malformed."""
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError):
        return None


#: torch.compile modes accepted for ``train.compile_mode``.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Those of them that replay compiled graphs as CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    """The training loop: length, seed, device, logging, checkpoints."""

    steps: int = 300
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # autocast dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # torch.compile the model, block by block (torchmhc.train.apply_compile); every residual
    # variant alike. Off by default: on the CPU compiling costs more than it saves.
    compile: bool = False
    # torch.compile's mode for those blocks: "default", "reduce-overhead" (CUDA graphs: one launch
    # replays a block's kernels, removing their host cost), "max-autotune-no-cudagraphs"
    compile_mode: str = "default"
    eval_interval: int = 100  # steps between validation passes (and at the end); 0 = end only
    eval_batches: int = 8
    log_interval: int = 1  # steps between metric lines
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 1  # how many step_* checkpoints to keep
    out_dir: str = "runs/{name}"  # {name} is replaced by the run name
    on_nonfinite: str = "stop"  # "stop" (clear error, last good checkpoint kept) or "skip" the step

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}.")
        _check(
            self.device == "auto" or _device_type(self.device) in ("cpu", "cuda"),
            f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}.",
        )
        _check(
            self.dtype in ("auto", "bf16", "fp32"),
            f"train.dtype must be 'auto', 'bf16' or 'fp32'; got {self.dtype!r}.",
        )
        for name in ("num_threads", "eval_interval", "checkpoint_interval"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("eval_batches", "log_interval", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}.")
        _check(
            self.compile_mode in COMPILE_MODES,
            f"train.compile_mode must be one of {COMPILE_MODES}; got {self.compile_mode!r}.",
        )
        _check(
            self.on_nonfinite in ("stop", "skip"),
            f"train.on_nonfinite must be 'stop' or 'skip'; got {self.on_nonfinite!r}.",
        )


@dataclass
class CompareConfig:
    """``torchmhc compare``: which residual variants to train, and where the report goes."""

    variants: tuple[str, ...] = ("residual", "hc", "mhc")
    report_dir: str = "report"

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        _check(len(self.variants) >= 1, "compare.variants must name at least one variant.")
        bad = [v for v in self.variants if not _is_residual(v)]
        _check(not bad, f"compare.variants has unknown entries {bad}; choose from {', '.join(residual_kinds())}.")
        _check(
            len(set(self.variants)) == len(self.variants),
            f"compare.variants must not repeat a variant, got {list(self.variants)}.",
        )


@dataclass
class RunConfig:
    """Everything one ``torchmhc train`` or ``torchmhc compare`` invocation needs."""

    name: str = "run"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"name must be non-empty without '/', got {self.name!r}.")
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len}).",
        )
        _check(
            self.data.tokenizer != "bpe" or self.model.vocab_size >= self.data.bpe_vocab_size,
            f"model.vocab_size ({self.model.vocab_size}) is smaller than data.bpe_vocab_size "
            f"({self.data.bpe_vocab_size}): the model needs an embedding for every token; set "
            f"model.vocab_size = {self.data.bpe_vocab_size}.",
        )
        _check(
            not (self.model.arch == "hf-llama" and self.train.compile),
            "train.compile is not supported for model.arch = 'hf-llama'.",
        )

    @property
    def out_dir(self) -> Path:
        """Directory of this run's metrics and checkpoints."""
        return Path(self.train.out_dir.format(name=self.name))

    def replace(self, **sections: Any) -> "RunConfig":
        """A validated copy with whole sections or top-level fields replaced."""
        return dataclasses.replace(self, **sections)


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "compare": CompareConfig,
    "parallel": ParallelConfig,
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML value to the field's annotated type, or raise TypeError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key} must be a list, got {type(value).__name__} ({value!r}).")
        args = typing.get_args(annotation)
        item_type = args[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        # bool is a subclass of int: reject True for an int field and 1 for a bool field.
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise TypeError(
                f"{key} must be {annotation.__name__}, got {type(value).__name__} ({value!r})."
            )
        return value
    raise AssertionError(f"unsupported annotation {annotation!r} for {key}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}; "
            f"valid keys: {', '.join(sorted(hints))}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from a nested dict (the TOML layout)."""
    if not isinstance(data, dict):
        raise TypeError(f"config must be a table (dict), got {type(data).__name__}.")
    top = {k: v for k, v in data.items() if k not in _SECTIONS}
    unknown = sorted(set(top) - {"name", "description"})
    if unknown:
        raise ValueError(
            f"unknown top-level key(s) {unknown}; expected name, description or sections "
            f"{', '.join(_SECTIONS)}."
        )
    sections = {}
    for section, cls in _SECTIONS.items():
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise TypeError(f"[{section}] must be a table, got {type(values).__name__}.")
        sections[section] = _build_section(cls, values, section)
    for key in ("name", "description"):
        if key in top and not isinstance(top[key], str):
            raise TypeError(f"{key} must be a string, got {type(top[key]).__name__}.")
    return RunConfig(**top, **sections)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The nested-dict (TOML/JSON) form of ``config``; tuples become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    out: dict[str, Any] = {"name": config.name, "description": config.description}
    for section in _SECTIONS:
        obj = getattr(config, section)
        out[section] = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return out


#: How ``--set`` reads a value; shown in the command line's help.
OVERRIDE_RULE = (
    "the value is read as TOML; a bare word is text (model.residual=hc), and so is a bare number, "
    "date or true/false given to a text field (name=2024)"
)


def _field_type(path: list[str]) -> Any:
    """The annotated type of the config field at ``path`` (``["name"]``, ``["model", "dim"]``), or None."""
    if path in (["name"], ["description"]):
        return str
    if len(path) == 2 and path[0] in _SECTIONS:
        return typing.get_type_hints(_SECTIONS[path[0]]).get(path[1])
    return None


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.dim=256"`` -> (["model", "dim"], 256); see :data:`OVERRIDE_RULE`."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.steps=100).")
    key, raw = item.split("=", 1)
    path, raw = key.strip().split("."), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return path, raw  # bare words such as hc or cosine
    if _field_type(path) is str and not isinstance(value, (str, list, dict)):
        return path, raw  # name=2024: the text as typed, not the number TOML reads
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested config dict (returns a new dict)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        path, value = _parse_override(item)
        if len(path) == 1:
            out[path[0]] = value
        elif len(path) == 2 and path[0] in _SECTIONS:
            out.setdefault(path[0], {})[path[1]] = value
        else:
            raise ValueError(
                f"override key {'.'.join(path)!r} must be 'name', 'description' or "
                f"'<section>.<key>' with section in {', '.join(_SECTIONS)}."
            )
    return out


#: Where the presets live: inside the package, so that they ship with a wheel.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def find_preset(name: str) -> Path:
    """Path of the packaged preset ``name`` (``torchmhc/presets/<name>.toml``)."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {name!r}; presets: {', '.join(list_presets()) or 'none found'} (in {PRESET_DIR}). "
            f"A config file of your own is given by its path (--config my.toml)."
        )
    return path


def _is_path(source: str | Path) -> bool:
    """A Path, or a string with a path separator or a suffix, names a file; a bare word a preset."""
    if isinstance(source, Path):
        return True
    return "/" in source or "\\" in source or Path(source).suffix != ""


def _read_toml(path: Path) -> dict[str, Any]:
    """The table in the TOML file ``path``; ValueError naming the file when it cannot be read."""
    where = f"config file {str(path)!r}"
    if not path.exists():
        raise ValueError(f"{where} does not exist.")
    if path.is_dir():
        raise ValueError(f"{where} is a directory; give the path of a TOML file.")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text (TOML files must be): {exc}.") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from exc


def load_config(
    source: str | Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Load a run config.

    Args:
        source: a preset name (``"tiny"``, see :func:`list_presets`); a config file: a
            :class:`~pathlib.Path`, or a string with a path separator or a suffix
            (``"my.toml"``, ``"./exp/a"``), read as TOML whatever its suffix; or None for the
            defaults. The run's name defaults to the preset's or the file's stem.
        overrides: ``section.key=value`` strings applied on top (see :data:`OVERRIDE_RULE`).
    """
    data: dict[str, Any] = {}
    if source is not None:
        path = Path(source).expanduser() if _is_path(source) else find_preset(source)
        data = _read_toml(path)
        data.setdefault("name", path.stem)
    return config_from_dict(apply_overrides(data, overrides or []))
