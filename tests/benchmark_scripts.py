"""The scripts of ``benchmarks/`` imported as modules, for the tests of their pure parts."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``name``, once. It is registered in ``sys.modules``
    (dataclasses look their module up there) and its directory goes on ``sys.path`` (scripts import
    each other, e.g. pipeline_model imports block_times)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(DIR) not in sys.path:
        sys.path.insert(0, str(DIR))
    spec = importlib.util.spec_from_file_location(name, DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
