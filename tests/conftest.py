import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword (a parametrize id)
            item.add_marker(skip)


def make_mhc_params(n: int, c: int, *, dtype=torch.float64, num_res: int | None = None, strength: float = 1.0):
    """Random mHC parameters in DeepSeek-V4 layout: fn [2n + K, nC], scale [3], base [2n + K]."""
    rows = 2 * n + (n * n if num_res is None else num_res)
    fn = torch.randn(rows, n * c, dtype=dtype) / (n * c) ** 0.5
    scale = (torch.rand(3, dtype=dtype) + 0.5) * strength
    base = torch.randn(rows, dtype=dtype)
    return fn, scale, base
