"""Token files: the cache of prepared corpora, and deterministic batches.

A corpus (``torchmhc.data.corpora``) is prepared once: its documents are written as byte-level
tokens (vocabulary 256, documents separated by a 0 byte) to ``train.bin`` and ``val.bin`` in a
cache entry named by the corpus's fingerprint, next to a ``meta.json`` written last. With
``data.tokenizer = "bpe"`` a second entry, named by the first and the tokenizer's settings, holds
the BPE tokenizer trained on it and the same documents as BPE tokens (``torchmhc.data.bpe``).
Entries are written under a temporary name and renamed into place; one whose token files are
missing or do not have the sizes ``meta.json`` records (deleted by hand, a disk cleaner) is
prepared again. Training reads the token files through ``numpy.memmap``, so it never holds the
corpus in memory.

Batches are a pure function of ``(seed, step)``: a resumed run, or another residual variant,
sees exactly the same tokens at the same step.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torchmhc.config import TOKEN_FILE_SUFFIXES, DataConfig
from torchmhc.data.corpora import Source, open_source

__all__ = ["TokenData", "load_data", "default_cache_dir", "bits_per_byte", "read_documents", "SPLITS"]

_FORMAT_VERSION = 1  # bump when the cached layout or the tokenization changes
_SEPARATOR = b"\x00"  # between documents; never occurs in text (binary files are left out)
_TOKEN_DTYPES = {".npy": None, ".bin": None, ".u16": np.uint16, ".u32": np.uint32}
#: The two splits, as the token files of a cache entry name them.
SPLITS = ("train", "val")


def default_cache_dir() -> Path:
    """``$TORCHMHC_CACHE`` if set, else ``~/.cache/torchmhc``."""
    return Path(os.environ.get("TORCHMHC_CACHE") or Path.home() / ".cache" / "torchmhc")


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def read_documents(path: Path, *, block_bytes: int = 1 << 26) -> Iterator[bytes]:
    """The documents of a byte-level token file (``train.bin``), in order, read in blocks."""
    rest = b""
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            parts = (rest + chunk).split(_SEPARATOR)
            rest = parts.pop()
            yield from parts
    yield rest


def _cut(blob: bytes, val_fraction: float, where: str) -> dict[str, bytes]:
    """A corpus too small to split by file, split by bytes: the first ``1 - val_fraction`` trains."""
    cut = int(len(blob) * (1 - val_fraction))
    if not (0 < cut < len(blob)):
        raise ValueError(
            f"data.path {where!r} holds {len(blob)} byte(s) of text: too little for a training and a validation split."
        )
    return {"train": blob[:cut], "val": blob[cut:]}


def _write_byte_entry(source: Source, tmp: Path, val_fraction: float) -> dict:
    """Stream ``source``'s documents into ``tmp/train.bin`` and ``tmp/val.bin`` (uint8); returns the meta."""
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    seen: set[bytes] = set()
    duplicates = 0
    try:
        for split, data in source.documents():
            if source.dedup:
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            if counts[split]:
                files[split].write(_SEPARATOR)
            files[split].write(data)
            counts[split] += 1
    finally:
        for f in files.values():
            _fsync_close(f)
    meta = {"format": _FORMAT_VERSION, "dtype": "uint8", "vocab_size": 256, "bytes_per_token": 1.0,
            "source": source.label, "duplicates_dropped": duplicates}
    if not all(counts.values()):
        # Every document landed in one split (a single text file, or a handful of files).
        if not source.cut_when_unsplit:
            raise ValueError(
                f"{source.label}: its {sum(counts.values())} document(s) all fell in one split; a by-file split "
                f"needs more files, or another data.val_fraction ({val_fraction})."
            )
        blob = b"".join((tmp / f"{s}.bin").read_bytes() for s in SPLITS)
        for split, part in _cut(blob, val_fraction, source.where).items():
            (tmp / f"{split}.bin").write_bytes(part)
        counts = {"train": 1, "val": 1}
    for split in SPLITS:
        meta[f"{split}_tokens"] = (tmp / f"{split}.bin").stat().st_size
        meta[f"{split}_files"] = counts[split]
    return meta


def cached_meta(entry: Path) -> dict | None:
    """``meta.json`` of a complete cache entry, or None (no entry, or a token file missing or cut short)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        size = np.dtype(meta["dtype"]).itemsize
        complete = all((entry / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * size for s in SPLITS)
        return meta if complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(entry: Path, fill: Callable[[Path], dict], *, where: str) -> dict:
    """Make the cache entry ``entry``: ``fill(tmp)`` writes its files into a temporary folder beside it
    and returns the meta, written last as ``meta.json``; the folder is then renamed to ``entry``.

    An entry that a concurrent process completed first is kept (the same corpus gives the same
    files). Raises ValueError naming ``where`` when the cache cannot be written.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp", dir=entry.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep the entry from other users of a shared cache
    except OSError as exc:
        raise ValueError(
            f"{where} cannot be written ({exc.strerror or exc}: {exc.filename or entry}); "
            f"set data.cache_dir or $TORCHMHC_CACHE to a writable directory."
        ) from exc
    try:
        meta = fill(tmp)
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        if entry.exists() and cached_meta(entry) is None:
            shutil.rmtree(entry)  # incomplete: replaced
        try:
            os.replace(tmp, entry)
        except OSError:
            if cached_meta(entry) is None:  # not a concurrent process's complete entry
                raise
        return cached_meta(entry) or meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    dtype = _TOKEN_DTYPES[path.suffix] or np.dtype(cfg.token_dtype)
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(
            f"data.path {str(path)!r}: size {path.stat().st_size} bytes is not a multiple of "
            f"{np.dtype(dtype).itemsize} ({np.dtype(dtype).name}); set data.token_dtype correctly."
        )
    return np.memmap(path, dtype=dtype, mode="r")


def load_data(cfg: DataConfig, *, progress: bool = True) -> TokenData:
    """Prepare (once, cached) and open the corpus that ``cfg`` names.

    Args:
        cfg: data section of the run config (``corpus``, ``path``, ``tokenizer``, ``cache_dir``, ...).
        progress: print a line while a corpus is prepared for the first time.

    Raises:
        ValueError: naming the corpus or path: one that is missing or empty (saying how to get
            it), a split shorter than one ``seq_len + 1`` window, or a cache directory that
            cannot be written.
        ImportError: an optional package the settings need (``tokenizers``, ``datasets``).
    """
    if cfg.tokenizer == "bpe":
        from torchmhc.data import bpe

        bpe.require_tokenizers()  # before the corpus is read
    path = Path(cfg.path).expanduser() if cfg.path else None
    if not cfg.corpus and path is not None:
        if not path.exists():
            raise ValueError(f"data.path {cfg.path!r} does not exist.")
        if path.is_file() and path.suffix in TOKEN_FILE_SUFFIXES:
            if path.stat().st_size == 0:  # numpy cannot map an empty file
                raise ValueError(f"data.path {str(path)!r} holds 0 tokens (an empty file).")
            tokens = _open_tokens(path, cfg)
            cut = int(len(tokens) * (1 - cfg.val_fraction))
            vocab = int(tokens.max()) + 1 if len(tokens) else 1
            return _checked(TokenData(tokens[:cut], tokens[cut:], vocab, None, f"tokens from {path}"), cfg, str(path))

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    where = f"data.cache_dir {cfg.cache_dir!r}" if cfg.cache_dir else f"the token cache {str(cache)!r}"
    source = open_source(cfg, cache)
    entry = cache / f"bytes-{source.fingerprint}"
    meta = cached_meta(entry)
    if meta is None:
        if progress:
            again = " again: the cached copy was incomplete" if entry.exists() else " (once)"
            print(f"torchmhc: reading {source.label} into {entry}{again}", flush=True)
        meta = write_entry(entry, lambda tmp: _write_byte_entry(source, tmp, cfg.val_fraction), where=where)
    if cfg.tokenizer == "bpe":
        entry, meta = bpe.prepare(entry, meta, cfg, where=where, progress=progress)
    dtype = np.dtype(meta["dtype"])
    # numpy cannot map an empty file: a split of empty documents is refused by _checked instead
    train, val = (np.memmap(entry / f"{s}.bin", dtype=dtype, mode="r") if meta[f"{s}_tokens"] else np.zeros(0, dtype)
                  for s in SPLITS)
    data = TokenData(train, val, meta["vocab_size"], meta["bytes_per_token"], meta["source"])
    return _checked(data, cfg, source.where)


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
