"""Byte-level BPE tokens (``data.tokenizer = "bpe"``), trained locally with Hugging Face ``tokenizers``.

The tokenizer is GPT-2's kind: text is split by the byte-level pre-tokenizer's regular expression
(words, numbers, punctuation, runs of spaces), each piece is written as its UTF-8 bytes, and
``data.bpe_vocab_size - 257`` merges are learned on top of the 256 bytes and the document separator
``<|endoftext|>`` (id 0, as the 0 byte separates documents in the byte-level files). Every byte
string has a tokenization, so no text is unknown. Documents are decoded as UTF-8 with invalid
bytes replaced (U+FFFD) before tokenizing.

It learns from a deterministic sample of the training split, never from validation text: every
k-th training document, k = ⌊training bytes / ``bpe_sample_mb``⌋, up to ``bpe_sample_mb`` MB.
The trainer itself is deterministic (tested: the same sample gives the same tokenizer, byte for
byte), so the tokenizer is a function of the corpus and the settings. It is cached in its own
entry, ``bpe-<key>/tokenizer.json``, beside the entry's token files; the key hashes the byte-level
entry (which hashes the corpus), the vocabulary size, the sample size and the ``tokenizers``
version, so a change to any of them prepares a new entry and nothing stale is reused.
"""

import hashlib
import importlib.util
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from torchmhc.config import DataConfig
from torchmhc.data.tokens import SPLITS, cached_meta, read_documents, write_entry

__all__ = ["SEPARATOR_TOKEN", "require_tokenizers", "train_tokenizer", "sample_documents", "encode_file", "prepare"]

_BPE_FORMAT = 1  # bump when the tokenizer's definition or the entry's layout changes
#: The document separator, id 0.
SEPARATOR_TOKEN = "<|endoftext|>"
#: Text handed to the tokenizer at once: large enough for its threads, small enough for memory.
_ENCODE_BATCH_BYTES = 16 << 20


def require_tokenizers() -> None:
    """ImportError naming the fix when Hugging Face ``tokenizers`` is not installed."""
    if importlib.util.find_spec("tokenizers") is None:
        raise ImportError(
            "data.tokenizer = 'bpe' trains a byte-level BPE with Hugging Face tokenizers, which is not installed: "
            "pip install 'torchmhc[bpe]'"
        )


def _text(document: bytes) -> str:
    return document.decode("utf-8", errors="replace")


def sample_documents(train_file: Path, *, train_bytes: int, sample_bytes: int) -> Iterator[str]:
    """Every k-th document of the byte-level training file, k = max(1, ⌊train_bytes / sample_bytes⌋),
    until ``sample_bytes`` bytes are taken (the last document may pass the mark)."""
    stride = max(1, train_bytes // max(1, sample_bytes))
    taken = 0
    for i, document in enumerate(read_documents(train_file)):
        if taken >= sample_bytes:
            return
        if i % stride == 0:
            taken += len(document)
            yield _text(document)


def train_tokenizer(documents: Iterator[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens learned from
    ``documents``; id 0 is :data:`SEPARATOR_TOKEN`. Fewer tokens when the text offers fewer merges
    seen at least twice."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SEPARATOR_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    assert tokenizer.token_to_id(SEPARATOR_TOKEN) == 0, "the trainer puts special tokens first"
    return tokenizer


def _batches(documents: Iterator[bytes]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(_text(document))
        size += len(document)
        if size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_file(tokenizer, src: Path, dst: Path, dtype: np.dtype) -> int:
    """Tokenize the documents of byte-level file ``src`` into ``dst`` (``dtype`` ids, the separator
    id 0 between documents); returns the number of tokens written."""
    separator = np.zeros(1, dtype=dtype)
    written = 0
    with open(dst, "wb") as out:
        for batch in _batches(read_documents(src)):
            pieces = []
            for encoding in tokenizer.encode_batch_fast(batch):  # parallel over the batch
                if written or pieces:
                    pieces.append(separator)
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
            block = np.concatenate(pieces)
            out.write(block.tobytes())
            written += len(block)
    return written


def _entry_name(byte_entry: Path, cfg: DataConfig) -> str:
    import tokenizers

    key = f"{_BPE_FORMAT}|{byte_entry.name}|{cfg.bpe_vocab_size}|{cfg.bpe_sample_mb}|{tokenizers.__version__}"
    return "bpe-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare(byte_entry: Path, byte_meta: dict, cfg: DataConfig, *, where: str, progress: bool) -> tuple[Path, dict]:
    """The BPE entry of byte-level cache entry ``byte_entry``: made once (tokenizer trained, both
    splits tokenized), then reused. Returns the entry and its meta."""
    require_tokenizers()
    entry = byte_entry.parent / _entry_name(byte_entry, cfg)
    meta = cached_meta(entry)
    if meta is not None:
        return entry, meta
    sample_bytes = int(cfg.bpe_sample_mb * 2**20)
    dtype = np.dtype(np.uint16 if cfg.bpe_vocab_size <= 2**16 else np.uint32)

    def fill(tmp: Path) -> dict:
        if progress:
            print(f"torchmhc: training a byte-level BPE of {cfg.bpe_vocab_size} tokens on up to "
                  f"{cfg.bpe_sample_mb:g} MB of the training split (once) into {entry}", flush=True)
        started = time.perf_counter()
        sample = sample_documents(byte_entry / "train.bin", train_bytes=byte_meta["train_tokens"],
                                  sample_bytes=sample_bytes)
        tokenizer = train_tokenizer(sample, cfg.bpe_vocab_size)
        trained = time.perf_counter()
        tokenizer.save(str(tmp / "tokenizer.json"))
        if progress:
            print(f"torchmhc: tokenizing {(byte_meta['train_tokens'] + byte_meta['val_tokens']) / 1e6:,.0f} MB "
                  f"with it (trained in {trained - started:.0f} s)", flush=True)
        tokens = {s: encode_file(tokenizer, byte_entry / f"{s}.bin", tmp / f"{s}.bin", dtype) for s in SPLITS}
        vocab = tokenizer.get_vocab_size()
        return {
            "format": _BPE_FORMAT,
            "dtype": dtype.name,
            "vocab_size": vocab,
            # bits per byte are per byte of the byte-level text (separators counted as one byte each)
            "bytes_per_token": byte_meta["val_tokens"] / tokens["val"] if tokens["val"] else math.nan,
            "source": f"{byte_meta['source']}, byte-level BPE of {vocab} tokens",
            "tokenizer": "tokenizer.json",
            "train_tokens": tokens["train"],
            "val_tokens": tokens["val"],
            "train_files": byte_meta["train_files"],
            "val_files": byte_meta["val_files"],
            "train_bytes": byte_meta["train_tokens"],
            "val_bytes": byte_meta["val_tokens"],
            "bpe_sample_mb": cfg.bpe_sample_mb,
            "bpe_train_s": trained - started,
            "encode_s": time.perf_counter() - trained,
        }

    return entry, write_entry(entry, fill, where=where)
