"""Corpora: where the text comes from, and which split each document belongs to.

Every corpus is a :class:`Source`: a label for people, a fingerprint that changes whenever its text
may have changed (it names the token cache entry, ``torchmhc.data.tokens``), and its documents in a
fixed order, each already assigned to the training or the validation split.

The split is by file, never inside one: a file goes to validation when a CRC-32 of its path
relative to the corpus root falls in the first ``val_fraction`` of the hash range. It therefore
does not depend on the machine, on the order files are found in, or on which other files exist:
two machines with the same files make the same split, and a package added to one of them adds its
files to one side or the other without moving anyone else's.

=================  ============================================================================
``data.corpus``    text
=================  ============================================================================
``""`` (default)   ``data.path`` (a text file or a directory of text files), or the ``stdlib``
``stdlib``         the ``*.py`` files of the running interpreter's standard library
``site-packages``  the ``*.py`` files of every installed package (the interpreter's site dirs)
``linux-source``   the Linux kernel source tarball of Debian's and Ubuntu's ``linux-source``
                   package (or the tarball ``data.path`` names), read as a stream: text files only
``datasets``       local text, JSON lines or Parquet files (``data.path``), read with Hugging
                   Face ``datasets``; one record is one document
=================  ============================================================================

The three larger corpora drop exact duplicates (the first copy in corpus order stays): vendored
copies of one file under two packages would otherwise sit in both splits. The standard library
and ``data.path`` keep every file, as they always have, so that their token streams (and the
runs measured on them) stay the same; the standard library holds 1.6 kB of duplicates.
"""

import hashlib
import importlib.util
import os
import re
import site
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torchmhc.config import DataConfig

__all__ = [
    "Source",
    "open_source",
    "split_of",
    "stdlib_files",
    "site_packages_roots",
    "site_packages_files",
    "find_linux_source",
    "LINUX_SOURCE_DIRS",
]

#: Bump when the documents a corpus yields change for the same files and settings.
_SOURCE_VERSION = 2
#: Bytes read to tell a binary file: a NUL byte marks one; text never has one.
_SNIFF = 8192
#: Where ``linux-source`` packages put their tarball (Debian: /usr/src/linux-source-6.1.tar.xz;
#: Ubuntu: /usr/src/linux-source-5.15.0/linux-source-5.15.0.tar.bz2).
LINUX_SOURCE_DIRS = (Path("/usr/src"),)
#: Suffix of a file -> the ``datasets`` builder that reads it.
_DATASET_SUFFIXES = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                     ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """A corpus, ready to be read.

    Attributes:
        label: what the corpus is, for messages and reports.
        where: the path to name in error messages.
        fingerprint: changes whenever the documents may have changed (files, sizes, settings).
        documents: yields ``(split, text)`` pairs, split ``"train"`` or ``"val"``, in a fixed order.
        dedup: drop documents whose bytes equal an earlier document's.
        cut_when_unsplit: a corpus too small to split by file (a single text file) is split by
            bytes instead: the first ``1 - val_fraction`` of its bytes train.
    """

    label: str
    where: str
    fingerprint: str
    documents: Callable[[], Iterator[tuple[str, bytes]]]
    dedup: bool = False
    cut_when_unsplit: bool = False


def split_of(relative_path: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for the file at ``relative_path`` (posix), by a CRC-32 of the path:
    stable across runs, machines and Python versions."""
    return "val" if zlib.crc32(relative_path.encode()) % 10_000 < val_fraction * 10_000 else "train"


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head[:_SNIFF]


def _limit(cfg: DataConfig) -> int:
    """Largest file size taken, in bytes (``data.max_file_kb``; 0 = no limit)."""
    return cfg.max_file_kb * 1024 or -1


def _fits(size: int, limit: int) -> bool:
    return limit < 0 or size <= limit


def _settings(cfg: DataConfig, kind: str) -> str:
    """The settings that change a corpus's documents, as text for its fingerprint."""
    return f"{_SOURCE_VERSION}|{kind}|{cfg.val_fraction}|{cfg.max_file_kb}"


def _files_fingerprint(settings: str, files: list[tuple[str, Path]]) -> str:
    """Hash of the settings and each file's relative path, size and modification time."""
    h = hashlib.sha256(settings.encode())
    for rel, p in files:
        st = p.stat()
        h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read_files(files: list[tuple[str, Path]], val_fraction: float) -> Callable[[], Iterator[tuple[str, bytes]]]:
    """Documents of ``(relative path, path)`` files: each file's bytes, binary files left out."""

    def documents() -> Iterator[tuple[str, bytes]]:
        for rel, p in files:
            data = p.read_bytes()
            if not _is_binary(data):
                yield split_of(rel, val_fraction), data

    return documents


# ----------------------------------------------------------------------------------------------
# The standard library and data.path
# ----------------------------------------------------------------------------------------------


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
            if _is_binary(f.read(_SNIFF)):
                continue
        files.append(p)
    return path, files


def _file_source(
    cfg: DataConfig, kind: str, label: str, root: Path, paths: list[Path], *, where: str = "", **flags: bool
) -> Source:
    limit = _limit(cfg)
    files = [(p.relative_to(root).as_posix(), p) for p in paths if _fits(p.stat().st_size, limit)]
    if not files:
        limit_note = f" of at most data.max_file_kb = {cfg.max_file_kb} kB" if cfg.max_file_kb else ""
        raise ValueError(f"no text files{limit_note} found for {label} (data.path {cfg.path!r}, glob {cfg.glob!r}).")
    settings = f"{_settings(cfg, kind)}|{root}"
    documents = _read_files(files, cfg.val_fraction)
    return Source(label, where or str(root), _files_fingerprint(settings, files), documents, **flags)


# ----------------------------------------------------------------------------------------------
# site-packages
# ----------------------------------------------------------------------------------------------


def site_packages_roots() -> list[Path]:
    """The running interpreter's site directories that exist, in import order, without repeats:
    its ``purelib`` and ``platlib``, ``site.getsitepackages()``, and the user site if enabled."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    roots: list[Path] = []
    for c in candidates:
        p = Path(c).resolve()  # lib64 is often a link to lib
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _skip_dir(name: str) -> bool:
    # Package metadata (RECORD files of hashes, licenses), byte code, hidden folders.
    return name == "__pycache__" or name.startswith(".") or name.endswith((".dist-info", ".egg-info"))


def site_packages_files(roots: list[Path] | None = None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every ``*.py`` file under the site directories, sorted by
    relative path; where two roots hold the same relative path, the first root's file (the one
    Python imports).

    Left out: byte code, ``*.dist-info`` / ``*.egg-info`` metadata, hidden folders, this library
    itself (``torchmhc/``: it changes with every commit), and the finders of editable installs
    (``__editable__*.py``: they hold paths of this machine).
    """
    found: dict[str, Path] = {}
    for root in site_packages_roots() if roots is None else roots:
        for folder, dirs, names in os.walk(root):
            rel_dir = Path(folder).relative_to(root)
            dirs[:] = [d for d in dirs if not _skip_dir(d) and not (rel_dir == Path(".") and d == "torchmhc")]
            for name in names:
                if name.endswith(".py") and not name.startswith("__editable__"):
                    rel = (rel_dir / name).as_posix()
                    p = Path(folder) / name
                    if rel not in found and p.is_file():
                        found[rel] = p
    return sorted(found.items())


def _site_packages_source(cfg: DataConfig) -> Source:
    roots = site_packages_roots()
    limit = _limit(cfg)
    files = [(rel, p) for rel, p in site_packages_files(roots) if _fits(p.stat().st_size, limit)]
    if not files:
        raise ValueError(f"no Python files found in the site directories {[str(r) for r in roots]}.")
    label = f"installed Python packages ({', '.join(map(str, roots))})"
    settings = f"{_settings(cfg, 'site-packages')}|{','.join(map(str, roots))}"
    return Source(label, str(roots[0]), _files_fingerprint(settings, files), _read_files(files, cfg.val_fraction),
                  dedup=True)


# ----------------------------------------------------------------------------------------------
# linux-source
# ----------------------------------------------------------------------------------------------


def _version_key(path: Path) -> list:
    """Sort key of a file name by the numbers in it: linux-source-6.10 after linux-source-6.9."""
    return [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", path.name)]


def _tarballs(folder: Path, pattern: str) -> list[Path]:
    return [p for p in folder.glob(pattern) if p.is_file() and ".tar" in p.name]


def find_linux_source(path: str = "") -> Path:
    """The kernel source tarball: ``path`` (a tarball, or a folder holding ``linux*.tar.*``), else
    the newest one a ``linux-source`` package installed under :data:`LINUX_SOURCE_DIRS`.

    Raises:
        ValueError: no tarball found, saying how to install one or point at one.
    """
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        found = _tarballs(p, "linux*.tar*") if p.is_dir() else []
        if not found:
            raise ValueError(
                f"data.path {path!r} is neither a kernel source tarball nor a folder holding one (linux*.tar.xz, "
                f".tar.gz or .tar.bz2)."
            )
        return max(found, key=_version_key)
    found = [t for d in LINUX_SOURCE_DIRS for pattern in ("linux-source-*.tar*", "linux-source-*/linux-source-*.tar*")
             for t in _tarballs(d, pattern)]
    if not found:
        raise ValueError(
            f"the linux-source corpus reads the kernel source tarball that the linux-source package installs in "
            f"{', '.join(map(str, LINUX_SOURCE_DIRS))}, and there is none. Install it (Debian, Ubuntu: "
            f"`sudo apt install linux-source`, about 140 MB), or set data.path to a kernel source tarball "
            f"(linux-*.tar.xz from kernel.org works too)."
        )
    return max(found, key=_version_key)


def _linux_source(cfg: DataConfig) -> Source:
    tarball = find_linux_source(cfg.path).resolve()
    limit, val_fraction = _limit(cfg), cfg.val_fraction

    def documents() -> Iterator[tuple[str, bytes]]:
        # A stream ("r|*"): one pass through the compressed archive, nothing extracted to disk.
        try:
            with tarfile.open(tarball, "r|*") as archive:
                for member in archive:
                    # Paths relative to the top folder (linux-source-6.1/), so that the split of a
                    # file does not change with the kernel version.
                    parts = PurePosixPath(member.name).parts[1:]
                    if not member.isfile() or not parts or any(p.startswith(".") for p in parts):
                        continue
                    if not _fits(member.size, limit):
                        continue
                    data = archive.extractfile(member).read()
                    if not _is_binary(data):
                        yield split_of("/".join(parts), val_fraction), data
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"cannot read the kernel source tarball {str(tarball)!r}: {exc}") from exc

    st = tarball.stat()
    h = hashlib.sha256(f"{_settings(cfg, 'linux-source')}|{tarball}|{st.st_size}|{st.st_mtime_ns}".encode())
    return Source(f"Linux kernel source ({tarball})", str(tarball), h.hexdigest()[:16], documents, dedup=True)


# ----------------------------------------------------------------------------------------------
# Local files through Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def _dataset_files(cfg: DataConfig) -> tuple[Path, list[Path], str]:
    """Root, files (sorted) and the ``datasets`` builder of the ``datasets`` corpus."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ValueError(f"data.path {cfg.path!r} does not exist.")
    root = path.parent if path.is_file() else path
    candidates = [path] if path.is_file() else sorted(path.glob(cfg.glob), key=lambda p: p.relative_to(path).as_posix())
    limit = _limit(cfg)
    files = [p for p in candidates if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
             and _fits(p.stat().st_size, limit)]
    if not cfg.format:
        files = [p for p in files if p.suffix in _DATASET_SUFFIXES] if path.is_dir() else files
    if not files:
        raise ValueError(f"no data files found for data.path {cfg.path!r} (glob {cfg.glob!r}).")
    if cfg.format:
        return root, files, cfg.format
    builders = {_DATASET_SUFFIXES.get(p.suffix) for p in files}
    if None in builders or len(builders) > 1:
        kinds = sorted({p.suffix or "(no suffix)" for p in files})
        raise ValueError(
            f"data.path {cfg.path!r}: cannot tell the format from the files' suffixes {kinds}; set data.format to one "
            f"of text, json, parquet (and data.glob to pick the files of that format)."
        )
    return root, files, builders.pop()


def _records(table, text_field: str, where: str) -> Iterator[bytes]:
    """The UTF-8 text of each record of a ``datasets.Dataset`` (empty and null records left out)."""
    if text_field not in table.column_names:
        raise ValueError(f"data.text_field {text_field!r} is not a column of {where}; its columns: {table.column_names}.")
    for batch in table.iter(batch_size=1024):
        for value in batch[text_field]:
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"data.text_field {text_field!r} of {where} holds {type(value).__name__} values, not text."
                )
            yield value.encode("utf-8")


def _datasets_source(cfg: DataConfig, cache: Path) -> Source:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            "data.corpus 'datasets' reads local files with Hugging Face datasets, which is not installed: "
            "pip install 'torchmhc[datasets]'"
        )
    root, files, builder = _dataset_files(cfg)
    rel = {p: p.relative_to(root).as_posix() for p in files}
    by_split = {s: [str(p) for p in files if split_of(rel[p], cfg.val_fraction) == s] for s in ("train", "val")}
    text_field, val_fraction = cfg.text_field, cfg.val_fraction
    # "text" files are one document each (not one per line)
    options = {"sample_by": "document"} if builder == "text" else {}

    def documents() -> Iterator[tuple[str, bytes]]:
        import datasets

        def load(data_files: dict[str, list[str]]):
            return datasets.load_dataset(builder, data_files=data_files, cache_dir=str(cache / "datasets"), **options)

        where = f"data.path {cfg.path!r}"
        if by_split["train"] and by_split["val"]:
            loaded = load({"train": by_split["train"], "validation": by_split["val"]})
            for split, name in (("train", "train"), ("val", "validation")):
                for text in _records(loaded[name], text_field, where):
                    yield split, text
        else:
            # Too few files to split by file: split by record (a record is a whole document), by a
            # hash of its index.
            loaded = load({"train": [str(p) for p in files]})
            for i, text in enumerate(_records(loaded["train"], text_field, where)):
                yield split_of(f"record {i}", val_fraction), text

    settings = f"{_settings(cfg, 'datasets')}|{builder}|{text_field}|{root}"
    fingerprint = _files_fingerprint(settings, [(rel[p], p) for p in files])
    return Source(f"{len(files)} {builder} file(s) at {cfg.path} (Hugging Face datasets)", cfg.path, fingerprint,
                  documents, dedup=True)


# ----------------------------------------------------------------------------------------------


def open_source(cfg: DataConfig, cache: Path) -> Source:
    """The corpus that ``cfg`` names (``data.corpus``, ``data.path``), not yet read.

    Args:
        cache: the token cache directory (``datasets`` keeps its Arrow files under it).

    Raises:
        ValueError: a corpus that is absent or empty, saying how to get it.
        ImportError: the ``datasets`` corpus without Hugging Face ``datasets`` installed.
    """
    corpus = cfg.corpus or ("" if cfg.path else "stdlib")
    if corpus == "stdlib":
        root, files = stdlib_files()
        label = f"Python {sysconfig.get_python_version()} standard library ({root})"
        return _file_source(cfg, "stdlib", label, root, files)
    if corpus == "site-packages":
        return _site_packages_source(cfg)
    if corpus == "linux-source":
        return _linux_source(cfg)
    if corpus == "datasets":
        return _datasets_source(cfg, cache)
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ValueError(f"data.path {cfg.path!r} does not exist.")
    root, files = _text_files(path, cfg.glob)
    return _file_source(cfg, "path", str(path), root, files, where=str(path), cut_when_unsplit=True)
