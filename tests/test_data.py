"""Corpus preparation, the token cache and deterministic batches, on small temporary corpora."""

import json

import numpy as np
import pytest
import torch

from torchmhc.config import DataConfig
from torchmhc.data import bits_per_byte, load_data, stdlib_files


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(40):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "the quick brown fox\n" * (i + 3))
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02" * 50)  # binary: skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("not part of the corpus")
    return root


def _cfg(tmp_path, path, **kw):
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.2, seq_len=8, batch_size=4, **kw)


def test_text_directory_is_split_by_file_and_cached(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus)
    data = load_data(cfg, progress=False)
    assert data.vocab_size == 256 and data.bytes_per_token == 1.0
    assert data.train.dtype == np.uint8
    train, val = bytes(data.train), bytes(data.val)
    docs = [p.read_bytes() for p in sorted(corpus.rglob("doc*.txt"))]
    # Every document is wholly in one split; both splits are used; nothing else got in.
    in_train = [d in train for d in docs]
    in_val = [d in val for d in docs]
    assert all(a != b for a, b in zip(in_train, in_val))
    assert any(in_train) and any(in_val)
    assert len(train) + len(val) == sum(len(d) for d in docs) + len(docs) - 2  # one separator between docs
    assert b"PNG" not in train + val and b"secret" not in train + val

    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    stamp = (entries[0] / "train.bin").stat().st_mtime_ns
    again = load_data(cfg, progress=False)  # second load: from the cache, not re-tokenized
    assert (entries[0] / "train.bin").stat().st_mtime_ns == stamp
    assert bytes(again.val) == val

    (corpus / "doc00.txt").write_text("changed\n")  # a changed corpus gets a new cache entry
    load_data(cfg, progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_single_text_file_is_split_by_bytes(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("abcdefghij" * 100)
    data = load_data(_cfg(tmp_path, path), progress=False)
    assert len(data.train) == 800 and len(data.val) == 200


def test_batches_are_deterministic_and_shifted(tmp_path, corpus):
    data = load_data(_cfg(tmp_path, corpus), progress=False)
    x, y = data.get_batch("train", 5, batch_size=4, seq_len=8, seed=1)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch("train", 5, batch_size=4, seq_len=8, seed=1)
    assert torch.equal(x, x2)
    x3, _ = data.get_batch("train", 6, batch_size=4, seq_len=8, seed=1)
    x4, _ = data.get_batch("train", 5, batch_size=4, seq_len=8, seed=2)
    assert not torch.equal(x, x3) and not torch.equal(x, x4)
    v1, _ = data.get_batch("val", 0, batch_size=4, seq_len=8, seed=1)
    v2, _ = data.get_batch("val", 0, batch_size=4, seq_len=8, seed=99)
    assert torch.equal(v1, v2)  # validation windows do not depend on the seed
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", 0, batch_size=1, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.get_batch("val", 0, batch_size=1, seq_len=10**7, seed=0)


@pytest.mark.parametrize("suffix, dtype", [(".npy", np.uint16), (".bin", np.uint32), (".u16", np.uint16)])
def test_pretokenized_files(tmp_path, suffix, dtype):
    tokens = (np.arange(1000) * 37 % 5000).astype(dtype)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    data = load_data(_cfg(tmp_path, path, token_dtype="uint32"), progress=False)
    assert data.vocab_size == int(tokens.max()) + 1
    assert data.bytes_per_token is None
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
    assert len(data.val) == 200


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(_cfg(tmp_path, tmp_path / "missing"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_data(_cfg(tmp_path, tmp_path / "empty"), progress=False)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="token_dtype"):
        load_data(_cfg(tmp_path, tmp_path / "odd.bin"), progress=False)


def test_stdlib_corpus_files_are_the_standard_library():
    root, files = stdlib_files()
    assert len(files) > 100
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any("site-packages" in r for r in rel)
    assert "os.py" in rel


def test_bits_per_byte():
    assert bits_per_byte(np.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(np.log(4), 2.0) == pytest.approx(1.0)
    assert np.isnan(bits_per_byte(1.0, None))


def test_an_incomplete_cache_entry_is_rebuilt(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus)
    first = load_data(cfg, progress=False)
    train, val = bytes(first.train), bytes(first.val)
    (entry,) = (tmp_path / "cache").iterdir()
    del first
    (entry / "train.bin").unlink()  # deleted by hand, or a disk cleaner
    again = load_data(cfg, progress=False)
    assert bytes(again.train) == train and bytes(again.val) == val
    del again
    with open(entry / "val.bin", "r+b") as f:  # cut short
        f.truncate(10)
    (entry / "meta.json").write_text("{")  # and a corrupt meta.json
    again = load_data(cfg, progress=False)
    assert bytes(again.train) == train and bytes(again.val) == val


@pytest.mark.parametrize("content", [b"", b"x"])
def test_a_text_file_too_small_to_split_names_the_path_and_leaves_no_cache_entry(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data.path '{path}'.*{len(content)} byte"):
        load_data(_cfg(tmp_path, path), progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_splits_shorter_than_a_window_are_named_at_load_time(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a" * 30)  # 24 train bytes, 6 validation bytes: fewer than seq_len + 1 = 9
    with pytest.raises(ValueError, match=rf"data.path '{path}'.*validation split has 6 tokens.*data.seq_len = 8"):
        load_data(_cfg(tmp_path, path), progress=False)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_an_empty_token_file_names_the_path(tmp_path, suffix):
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros(0, dtype=np.uint16))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"data.path '{path}'.* 0 tokens"):
        load_data(_cfg(tmp_path, path), progress=False)


def test_an_unwritable_cache_dir_is_named(tmp_path, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should go")
    cfg = DataConfig(path=str(corpus), cache_dir=str(blocker / "cache"), val_fraction=0.2, seq_len=8)
    with pytest.raises(ValueError, match=rf"data.cache_dir '{blocker / 'cache'}'.*cannot be written"):
        load_data(cfg, progress=False)
