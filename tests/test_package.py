"""Packaging promises: importing torchmhc pulls in no optional extra (beyond what torch loads)."""

import subprocess
import sys

OPTIONAL = ("triton", "matplotlib", "safetensors", "tqdm", "transformers")


def test_import_loads_no_optional_dependency():
    code = (
        "import sys, torch; before = set(sys.modules); "
        "import torchmhc, torchmhc.analysis, torchmhc.interop, torchmhc.interop.hf, torchmhc.models; "
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"optional modules imported by `import torchmhc`: {out.strip()}"
