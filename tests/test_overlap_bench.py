"""benchmarks/overlap.py's SM carveout: set for the GEMMs it wraps, cleared after, even on error."""

import pytest
import torch
from benchmark_scripts import load_benchmark

overlap = load_benchmark("overlap")


def test_carved_sets_the_carveout_only_while_its_function_runs() -> None:
    seen = []
    overlap.carved(lambda: seen.append(torch._C._get_sm_carveout_experimental()), 16)()
    assert seen == [16]
    assert torch._C._get_sm_carveout_experimental() is None

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        overlap.carved(fail, 8)()
    assert torch._C._get_sm_carveout_experimental() is None
