"""Corpora, byte-level tokens, cached token files and deterministic batches.

The default corpus is the Python standard library source of the running interpreter: real text
that every machine with Python already has, so ``torchmhc compare`` works offline. Files are
taken in sorted order and split into train/validation *by file* (a file is wholly in one split),
decided by a hash of its relative path so the split does not shift when a Python release adds or
removes files. Tokens are bytes (vocabulary 256), files are separated by a 0 byte.

Prepared corpora are cached as raw token files next to a ``meta.json`` and read back through
``numpy.memmap``, so preparation happens once per corpus and training never holds the corpus in
memory. An entry whose token files are missing or do not have the sizes ``meta.json`` records
(deleted by hand, a disk cleaner) is prepared again. Batches are a pure function of ``(seed, step)``: a resumed run, or another residual
variant, sees exactly the same tokens at the same step.
"""

import hashlib
import json
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torchmhc.config import DataConfig

__all__ = ["TokenData", "load_data", "default_cache_dir", "stdlib_files", "bits_per_byte"]

_FORMAT_VERSION = 1  # bump when the cached layout or the tokenization changes
_SEPARATOR = b"\x00"  # between documents; never occurs in source text
_TOKEN_SUFFIXES = {".npy": None, ".bin": None, ".u16": np.uint16, ".u32": np.uint32}


def default_cache_dir() -> Path:
    """``$TORCHMHC_CACHE`` if set, else ``~/.cache/torchmhc``."""
    return Path(os.environ.get("TORCHMHC_CACHE") or Path.home() / ".cache" / "torchmhc")


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library root and its ``*.py`` files, sorted by relative path.

    Third-party packages (``site-packages``) are excluded: they differ between environments.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(path: Path, pattern: str) -> tuple[Path, list[Path]]:
    """A text file, or the non-binary files of a directory matching ``pattern`` (sorted)."""
    if path.is_file():
        return path.parent, [path]
    files = []
    for p in sorted(path.glob(pattern), key=lambda p: p.relative_to(path).as_posix()):
        rel = p.relative_to(path).parts
        if not p.is_file() or any(part.startswith(".") for part in rel):
            continue
        with open(p, "rb") as f:
            if b"\x00" in f.read(8192):  # a NUL byte marks a binary file; text never has one
                continue
        files.append(p)
    return path, files


def _is_val(relative_path: str, val_fraction: float) -> bool:
    # crc32 of the path: stable across runs, machines and Python versions.
    return zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_text(root: Path, files: list[Path], val_fraction: float, label: str) -> dict[str, list[bytes]]:
    """The documents of each split (``"train"``, ``"val"``); ValueError if a split would be empty."""
    splits: dict[str, list[bytes]] = {"train": [], "val": []}
    for p in files:
        rel = p.relative_to(root).as_posix()
        splits["val" if _is_val(rel, val_fraction) else "train"].append(p.read_bytes())
    if not splits["val"] or not splits["train"]:
        # Too few files for a by-file split (e.g. a single text file): split the bytes instead.
        blob = _SEPARATOR.join(splits["train"] + splits["val"])
        cut = int(len(blob) * (1 - val_fraction))
        splits = {"train": [blob[:cut]], "val": [blob[cut:]]}
        if not (0 < cut < len(blob)):
            raise ValueError(
                f"data.path {label!r} holds {len(blob)} byte(s) of text: too little for a training and a "
                f"validation split."
            )
    return splits


def _write_cache_entry(splits: dict[str, list[bytes]], out: Path, source: str) -> dict:
    """Write ``out/train.bin``, ``out/val.bin`` (uint8 bytes) and, last, ``out/meta.json``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT_VERSION, "dtype": "uint8", "vocab_size": 256, "bytes_per_token": 1.0, "source": source}
    for split, docs in splits.items():
        blob = _SEPARATOR.join(docs)
        _atomic_write(out / f"{split}.bin", blob)
        meta[f"{split}_tokens"] = len(blob)
        meta[f"{split}_files"] = len(docs)
    # meta.json is written last: with token files of the sizes it records, the entry is complete.
    _atomic_write(out / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def _cached_meta(entry: Path) -> dict | None:
    """``meta.json`` of a complete cache entry, or None (no entry, or a token file missing or cut short)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        return meta if all((entry / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] for s in ("train", "val")) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fingerprint(root: Path, files: list[Path], cfg: DataConfig) -> str:
    """Hash of the file list (paths, sizes, mtimes) and the split: names the cache entry."""
    h = hashlib.sha256(f"{_FORMAT_VERSION}|{cfg.val_fraction}|{root}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenData:
    """Memory-mapped train/validation token arrays and a deterministic batch sampler.

    Attributes:
        train, val: 1-D token arrays (``numpy.memmap`` or ``ndarray``), dtype uint8/16/32.
        vocab_size: one more than the largest token id the data may contain.
        bytes_per_token: average bytes one token stands for (1.0 for byte-level tokens), or
            None when unknown (pre-tokenized files): then bits per byte cannot be reported.
        source: human-readable description of the corpus.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    bytes_per_token: float | None
    source: str

    def get_batch(
        self, split: str, index: int, *, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` of ``split``: inputs and next-token targets.

        Train batches are random windows drawn from a generator seeded by ``(seed, index)``, so
        batch ``index`` is the same in every run with the same seed. Validation batches are
        fixed, evenly spaced windows (the same for every run on the same data).

        Returns:
            x, y: int64 ``[batch_size, seq_len]``; ``y`` is ``x`` shifted by one token.
        """
        tokens = {"train": self.train, "val": self.val}.get(split)
        if tokens is None:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        span = len(tokens) - seq_len - 1
        if span < 0:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}."
            )
        if split == "train":
            g = np.random.default_rng([seed, index])
            starts = g.integers(0, span + 1, size=batch_size)
        else:
            # Evenly spaced windows over the whole validation split, batch after batch.
            slots = np.arange(index * batch_size, (index + 1) * batch_size)
            starts = (slots * 7919 * seq_len) % (span + 1)  # 7919 (prime) spreads the windows
        windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(windows)
        return t[:, :-1], t[:, 1:]


def _open_tokens(path: Path, cfg: DataConfig) -> np.ndarray:
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype not in (np.uint8, np.uint16, np.uint32):
            raise ValueError(
                f"data.path {str(path)!r}: a .npy token file must be 1-D uint8/uint16/uint32, "
                f"got shape {arr.shape} dtype {arr.dtype}."
            )
        return arr
    dtype = _TOKEN_SUFFIXES[path.suffix] or np.dtype(cfg.token_dtype)
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(
            f"data.path {str(path)!r}: size {path.stat().st_size} bytes is not a multiple of "
            f"{np.dtype(dtype).itemsize} ({np.dtype(dtype).name}); set data.token_dtype correctly."
        )
    return np.memmap(path, dtype=dtype, mode="r")


def load_data(cfg: DataConfig, *, progress: bool = True) -> TokenData:
    """Prepare (once, cached) and open the corpus that ``cfg`` names.

    Args:
        cfg: data section of the run config (``path``, ``cache_dir``, ``val_fraction``, ...).
        progress: print a line while a corpus is tokenized for the first time.

    Raises:
        ValueError: naming the path: a missing or empty corpus, a split shorter than one
            ``seq_len + 1`` window, or a cache directory that cannot be written.
    """
    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is not None and not path.exists():
        raise ValueError(f"data.path {cfg.path!r} does not exist.")

    if path is not None and path.is_file() and path.suffix in _TOKEN_SUFFIXES:
        if path.stat().st_size == 0:  # numpy cannot map an empty file
            raise ValueError(f"data.path {str(path)!r} holds 0 tokens (an empty file).")
        tokens = _open_tokens(path, cfg)
        cut = int(len(tokens) * (1 - cfg.val_fraction))
        vocab = int(tokens.max()) + 1 if len(tokens) else 1
        return _checked(TokenData(tokens[:cut], tokens[cut:], vocab, None, f"tokens from {path}"), cfg, str(path))

    if path is None:
        root, files = stdlib_files()
        label = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root, files = _text_files(path, cfg.glob)
        label = str(path)
    if not files:
        raise ValueError(f"no text files found for data.path {cfg.path!r} (glob {cfg.glob!r}).")

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    entry = cache / f"bytes-{_fingerprint(root, files, cfg)}"
    meta = _cached_meta(entry)
    if meta is None:
        splits = _split_text(root, files, cfg.val_fraction, str(path or root))
        if progress:
            again = " again: the cached copy was incomplete" if entry.exists() else " (once)"
            print(f"torchmhc: tokenizing {len(files)} files of {label} into {entry}{again}")
        try:
            meta = _write_cache_entry(splits, entry, label)
        except OSError as exc:
            where = f"data.cache_dir {cfg.cache_dir!r}" if cfg.cache_dir else f"the token cache {str(cache)!r}"
            raise ValueError(
                f"{where} cannot be written ({exc.strerror or exc}: {exc.filename or entry}); "
                f"set data.cache_dir or $TORCHMHC_CACHE to a writable directory."
            ) from exc
    train = np.memmap(entry / "train.bin", dtype=np.uint8, mode="r")
    val = np.memmap(entry / "val.bin", dtype=np.uint8, mode="r")
    data = TokenData(train, val, meta["vocab_size"], meta["bytes_per_token"], meta["source"])
    return _checked(data, cfg, str(path or root))


def _checked(data: TokenData, cfg: DataConfig, where: str) -> TokenData:
    """``data``, if each split holds at least one window of ``seq_len + 1`` tokens; else ValueError."""
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise ValueError(
                f"data.path {where!r}: the {split} split has {len(tokens)} tokens, and data.seq_len = "
                f"{cfg.seq_len} needs at least {cfg.seq_len + 1}; use more data, a smaller data.seq_len or "
                f"another data.val_fraction ({cfg.val_fraction})."
            )
    return data


def bits_per_byte(loss_nats: float, bytes_per_token: float | None) -> float:
    """Cross-entropy in nats per token -> bits per byte (NaN when bytes per token is unknown)."""
    if bytes_per_token is None:
        return math.nan
    return loss_nats / math.log(2) / bytes_per_token
