"""The larger corpora (site-packages, linux-source, local files through datasets) and the BPE
tokenizer, on small generated corpora: splits by file without overlap, what is left out, the cache
keys, BPE determinism and round trips."""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest

from torchmhc.config import DataConfig, load_config
from torchmhc.data import corpora, find_linux_source, load_data, site_packages_files
from torchmhc.data.corpora import open_source, split_of
from torchmhc.data.tokens import read_documents


def _documents(data) -> dict[str, list[bytes]]:
    """The documents of each split of a byte-level TokenData."""
    return {s: bytes(getattr(data, s)).split(b"\x00") for s in ("train", "val")}


def _text(i: int) -> bytes:
    return (f"/* file {i} */\n" + "".join(f"int f{i}_{j}(void) {{ return {i * j}; }}\n" for j in range(i % 7 + 3))).encode()


def _assert_split_by_file(docs: dict[str, list[bytes]], expected: dict[str, bytes], val_fraction: float) -> None:
    """Each expected file (relative path -> text) is one whole document of the split its path hashes to."""
    for rel, text in expected.items():
        split = split_of(rel, val_fraction)
        other = "train" if split == "val" else "val"
        assert text in docs[split], rel
        assert text not in docs[other], rel
    assert sorted(d for s in docs.values() for d in s) == sorted(expected.values())  # nothing else got in


# ----------------------------------------------------------------------------------------------
# linux-source
# ----------------------------------------------------------------------------------------------


def _add(archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = (len(data) if kind == tarfile.REGTYPE else 0), kind, link, 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_kernel_tarball(path, top="linux-source-6.1"):
    """A .tar.xz laid out as Debian's linux-source package's: one top folder, text files, and the
    things the corpus leaves out. Returns {relative path: text} of the files it must take."""
    expected = {}
    with tarfile.open(path, "w:xz") as archive:
        _add(archive, f"{top}/", b"", tarfile.DIRTYPE)
        for i in range(40):
            rel = f"{['kernel', 'drivers/net', 'arch/x86/include'][i % 3]}/f{i:02d}.{'ch'[i % 2]}"
            expected[rel] = _text(i)
            _add(archive, f"{top}/{rel}", expected[rel])
        _add(archive, f"{top}/kernel/copy_of_f00.c", expected["kernel/f00.c"])  # an exact duplicate: dropped
        _add(archive, f"{top}/firmware/blob.bin", b"\x7fELF\x00\x01" * 100)  # binary
        _add(archive, f"{top}/.gitignore", b"*.o\n")  # hidden
        _add(archive, f"{top}/scripts/.hidden/x.sh", b"echo\n")
        _add(archive, f"{top}/drivers/gpu/huge_regs.h", b"#define R 1\n" * 300)  # over max_file_kb = 2
        _add(archive, f"{top}/link.c", b"", tarfile.SYMTYPE, "kernel/f00.c")
    return expected


def test_linux_source_tarball_is_read_as_a_stream_split_by_file(tmp_path):
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    expected = make_kernel_tarball(tarball)
    cfg = DataConfig(corpus="linux-source", path=str(tarball), cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                     max_file_kb=2, seq_len=8)
    data = load_data(cfg, progress=False)
    _assert_split_by_file(_documents(data), expected, 0.2)
    meta = json.loads(next((tmp_path / "cache").glob("bytes-*/meta.json")).read_text())
    assert meta["duplicates_dropped"] == 1 and "Linux kernel source" in data.source
    assert not list(tmp_path.glob("linux-source-6.1/*"))  # nothing extracted

    # a folder holding the tarball names the same corpus; without the size limit the big header is in
    assert find_linux_source(str(tmp_path)) == tarball
    unlimited = load_data(DataConfig(corpus="linux-source", path=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                                     val_fraction=0.2, seq_len=8), progress=False)
    assert any(b"#define R 1" in d for s in _documents(unlimited).values() for d in s)


def test_linux_source_is_found_where_the_package_puts_it_and_named_when_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "LINUX_SOURCE_DIRS", (tmp_path,))
    with pytest.raises(ValueError, match=r"apt install linux-source.*data.path"):
        find_linux_source()
    with pytest.raises(ValueError, match="apt install linux-source"):
        load_data(DataConfig(corpus="linux-source", cache_dir=str(tmp_path / "cache")), progress=False)
    (tmp_path / "linux-source-6.9.tar.xz").write_bytes(b"")  # Debian's layout
    (tmp_path / "linux-source-6.10").mkdir()  # Ubuntu's: a folder per version
    (tmp_path / "linux-source-6.10" / "linux-source-6.10.tar.bz2").write_bytes(b"")
    assert find_linux_source() == tmp_path / "linux-source-6.10" / "linux-source-6.10.tar.bz2"  # the newest
    with pytest.raises(ValueError, match="neither a kernel source tarball"):
        find_linux_source(str(tmp_path / "linux-source-6.10" / "missing"))


def test_a_broken_tarball_is_named(tmp_path):
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match=r"cannot read the kernel source tarball"):
        load_data(DataConfig(corpus="linux-source", path=str(tarball), cache_dir=str(tmp_path / "cache")), progress=False)
    assert not list((tmp_path / "cache").glob("bytes-*"))  # no entry left behind


_INSTALLED = [t for d in corpora.LINUX_SOURCE_DIRS for t in d.glob("linux-source-*.tar*")]


@pytest.mark.skipif(not _INSTALLED, reason="the linux-source package is not installed")
def test_the_installed_kernel_tarball_yields_its_first_text_files():
    source = open_source(DataConfig(corpus="linux-source"), cache=None)
    first = list(itertools.islice(source.documents(), 20))
    assert len(first) == 20 and all(split in ("train", "val") and b"\x00" not in text for split, text in first)


# ----------------------------------------------------------------------------------------------
# site-packages
# ----------------------------------------------------------------------------------------------


def _write(path, text: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)


def make_site_packages(tmp_path):
    """Two site directories; returns (roots, {relative path: text} of the files the corpus takes)."""
    first, second = tmp_path / "site-a", tmp_path / "site-b"
    expected = {}
    for i in range(30):
        rel = f"pkg{i % 4}/{'sub/' if i % 3 else ''}mod{i:02d}.py"
        expected[rel] = b"# " + rel.encode() + b"\n" + _text(i)
        _write(first / rel, expected[rel])
    _write(second / "pkg0/mod00.py", b"shadowed: the first root's file is imported")
    expected["other/api.py"] = b"def api():\n    return 1\n"
    _write(second / "other/api.py", expected["other/api.py"])
    _write(second / "vendored/_vendor/mod01.py", expected["pkg1/sub/mod01.py"])  # duplicate content: dropped
    for rel in ["pkg0/__pycache__/mod00.cpython-311.py", "pkg0-1.0.dist-info/RECORD.py", "torchmhc/data.py",
                "__editable___torchmhc_finder.py", ".hidden/x.py"]:
        _write(first / rel, b"left out\n")
    _write(first / "pkg0/notes.txt", b"not python\n")
    return [first, second], expected


def test_site_packages_files_are_sorted_and_leave_out_metadata_caches_and_this_library(tmp_path):
    roots, expected = make_site_packages(tmp_path)
    files = site_packages_files(roots)
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels)
    assert set(rels) == set(expected) | {"vendored/_vendor/mod01.py"}
    assert dict(files)["pkg0/mod00.py"] == roots[0] / "pkg0/mod00.py"


def test_site_packages_corpus_splits_by_relative_path_and_drops_duplicates(tmp_path, monkeypatch):
    roots, expected = make_site_packages(tmp_path)
    monkeypatch.setattr(corpora, "site_packages_roots", lambda: roots)
    data = load_data(DataConfig(corpus="site-packages", cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                                seq_len=8), progress=False)
    _assert_split_by_file(_documents(data), expected, 0.2)  # the vendored copy is not in either split


def test_the_interpreters_site_packages_hold_the_installed_packages():
    rels = {rel for rel, _ in site_packages_files()}
    assert "numpy/__init__.py" in rels and "torch/__init__.py" in rels
    assert not any(r.startswith("torchmhc/") or "__pycache__" in r or ".dist-info/" in r for r in rels)


# ----------------------------------------------------------------------------------------------
# Local files through Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def test_datasets_jsonl_and_parquet_files_split_by_file(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    expected: dict[str, list[bytes]] = {}
    for i in range(12):
        records = [f"record {j} of shard {i}: " + "lorem ipsum " * (j + 1) for j in range(3)]
        expected[f"shard{i:02d}.jsonl"] = [r.encode() for r in records]
        rows = [{"body": r, "id": j} for j, r in enumerate(records)] + [{"body": None, "id": 9}]
        (folder / f"shard{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(corpus="datasets", path=str(folder), text_field="body", cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.25, seq_len=8)
    docs = _documents(load_data(cfg, progress=False))
    for name, records in expected.items():
        split = split_of(name, 0.25)
        assert all(r in docs[split] for r in records) and not any(r in docs[{"train": "val", "val": "train"}[split]]
                                                                   for r in records)
    assert sorted(d for s in docs.values() for d in s) == sorted(r for rs in expected.values() for r in rs)

    with pytest.raises(ValueError, match=r"data.text_field 'text' is not a column.*\['body', 'id'\]"):
        load_data(DataConfig(corpus="datasets", path=str(folder), cache_dir=str(tmp_path / "cache2")), progress=False)

    # One Parquet file: too few files for a split by file, so records are split, each whole
    table = pa.table({"text": [f"parquet document {i} " * 5 for i in range(40)]})
    pq.write_table(table, tmp_path / "one.parquet")
    docs = _documents(load_data(DataConfig(corpus="datasets", path=str(tmp_path / "one.parquet"),
                                           cache_dir=str(tmp_path / "cache"), val_fraction=0.25, seq_len=8),
                                progress=False))
    assert docs["val"] and sorted(docs["train"] + docs["val"]) == sorted(t.encode() for t in table["text"].to_pylist())


def test_datasets_corpus_names_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"cannot tell the format.*data.format"):
        load_data(DataConfig(corpus="datasets", path=str(tmp_path / "a.csv"), cache_dir=str(tmp_path / "c")),
                  progress=False)
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(corpus="datasets")
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"torchmhc\[datasets\]"):
        load_data(DataConfig(corpus="datasets", path=str(tmp_path)), progress=False)


# ----------------------------------------------------------------------------------------------
# BPE
# ----------------------------------------------------------------------------------------------


def _bpe_cfg(tmp_path, path, **kw):
    kw = {"bpe_vocab_size": 300, "bpe_sample_mb": 1.0, "val_fraction": 0.2, "seq_len": 8, **kw}
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), tokenizer="bpe", **kw)


@pytest.fixture
def code_corpus(tmp_path):
    root = tmp_path / "code"
    for i in range(30):
        _write(root / f"m{i:02d}.py", b"# caf\xc3\xa9 \xe2\x9c\x93\n" + _text(i) * 3)  # UTF-8 beyond ASCII too
    _write(root / "latin1.txt", b"na\xefve bytes\n")  # not UTF-8: replaced when tokenized
    return root


def test_bpe_tokens_decode_to_the_documents_and_are_cached_by_settings(tmp_path, code_corpus):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    data = load_data(_bpe_cfg(tmp_path, code_corpus), progress=False)
    (entry,) = (tmp_path / "cache").glob("bpe-*")
    meta = json.loads((entry / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    assert data.vocab_size == tokenizer.get_vocab_size() == 300 and data.train.dtype == np.uint16
    byte_docs = _documents(load_data(DataConfig(path=str(code_corpus), cache_dir=str(tmp_path / "cache"),
                                                val_fraction=0.2, seq_len=8), progress=False))
    for split in ("train", "val"):
        tokens = np.asarray(getattr(data, split))
        cuts = np.flatnonzero(tokens == 0)  # the separator, id 0, between documents
        pieces = np.split(tokens, cuts)
        decoded = [tokenizer.decode(p[p != 0].tolist()) for p in pieces]
        assert decoded == [d.decode("utf-8", errors="replace") for d in byte_docs[split]]
    assert len(data.train) < meta["train_bytes"] / 2  # merges learned: fewer tokens than bytes
    assert data.bytes_per_token == pytest.approx(meta["val_bytes"] / meta["val_tokens"])

    stamp = (entry / "train.bin").stat().st_mtime_ns
    load_data(_bpe_cfg(tmp_path, code_corpus), progress=False)  # the same settings: reused
    assert (entry / "train.bin").stat().st_mtime_ns == stamp
    load_data(_bpe_cfg(tmp_path, code_corpus, bpe_vocab_size=290), progress=False)  # another vocabulary: new entry
    assert len(list((tmp_path / "cache").glob("bpe-*"))) == 2


def test_bpe_training_is_deterministic_and_sees_only_training_text(tmp_path, code_corpus):
    pytest.importorskip("tokenizers")
    from torchmhc.data.bpe import sample_documents, train_tokenizer

    load_data(DataConfig(path=str(code_corpus), cache_dir=str(tmp_path / "cache"), val_fraction=0.2, seq_len=8),
              progress=False)
    (entry,) = (tmp_path / "cache").glob("bytes-*")
    train_docs = [d.decode("utf-8", errors="replace") for d in read_documents(entry / "train.bin")]
    size = (entry / "train.bin").stat().st_size
    for target in (size // 3, size // 4, 10):
        sample = list(sample_documents(entry / "train.bin", train_bytes=size, sample_bytes=target))
        every_kth = train_docs[:: size // target]
        assert sample == every_kth[: len(sample)]  # every k-th training document, from the first
        assert sum(len(s.encode()) for s in sample[:-1]) < target  # stops once the sample is big enough
        assert len(sample) == len(every_kth) or sum(len(s.encode()) for s in sample) >= target
    first, second = (train_tokenizer(iter(train_docs), 350).to_str() for _ in range(2))
    assert first == second


def test_bpe_settings_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"model.vocab_size \(256\) is smaller than data.bpe_vocab_size \(32768\)"):
        load_config(None, ["data.tokenizer=bpe"])
    assert load_config(None, ["data.tokenizer=bpe", "model.vocab_size=32768"]).model.vocab_size == 32768
    with pytest.raises(ValueError, match="holds tokens already"):
        DataConfig(path="tokens.u16", tokenizer="bpe")
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        DataConfig(tokenizer="bpe", bpe_vocab_size=257)
    with pytest.raises(ValueError, match="reads no data.path"):
        DataConfig(corpus="site-packages", path="x")
    from torchmhc.data import bpe

    monkeypatch.setattr(bpe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"torchmhc\[bpe\]"):
        load_data(_bpe_cfg(tmp_path, tmp_path), progress=False)
