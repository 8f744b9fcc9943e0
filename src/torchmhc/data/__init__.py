"""Corpora, tokenizers, cached token files and deterministic batches.

- :mod:`torchmhc.data.corpora`: where text comes from (``data.corpus``): the Python standard library
  (the default, on every machine), the installed packages' source, the Linux kernel source tarball,
  local files through Hugging Face ``datasets``, or a path; split into training and validation by file.
- :mod:`torchmhc.data.bpe`: the byte-level BPE tokenizer (``data.tokenizer = "bpe"``), trained
  locally on the corpus; bytes (vocabulary 256) are the default.
- :mod:`torchmhc.data.tokens`: the cache of prepared token files and :class:`TokenData`, whose
  batches are a pure function of ``(seed, step)``.

:func:`load_data` does all three for a run's ``[data]`` section.
"""

from torchmhc.data.corpora import find_linux_source, site_packages_files, stdlib_files
from torchmhc.data.tokens import TokenData, bits_per_byte, default_cache_dir, load_data

__all__ = [
    "TokenData",
    "load_data",
    "default_cache_dir",
    "bits_per_byte",
    "stdlib_files",
    "site_packages_files",
    "find_linux_source",
]
