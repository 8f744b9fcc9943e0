"""The top-level functions dispatch like ``torchmhc.kernels``: the fused kernels where they apply
(here: Triton's CPU interpreter under ``use_kernels("triton")``), the reference otherwise."""

import importlib

import pytest
import torch

import torchmhc as mhc
from torchmhc import functional as ref
from torchmhc import kernels

LAUNCHERS = {
    "pre_mix": ("pre_mix_op", "pre_mix_fwd"),
    "post_res": ("post_res_op", "post_res_fwd"),
    "mhc_coefficients": ("coefficients_op", "coefficients_fwd"),
    "hc_coefficients": ("hc_coefficients_op", "hc_coefficients_fwd"),
}


def test_top_level_names_are_the_dispatching_functions():
    assert mhc.mhc_coefficients is kernels.mhc_coefficients
    assert mhc.pre_mix is kernels.pre_mix
    assert mhc.post_res is kernels.post_res
    assert mhc.hc_coefficients is kernels.hc_coefficients


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
@pytest.mark.parametrize("mode, launches", [("triton", 1), ("reference", 0)])
def test_top_level_functions_launch_the_kernels_where_they_apply(monkeypatch, name, mode, launches):
    if not kernels.triton_available():
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module(f"torchmhc.kernels.{LAUNCHERS[name][0]}")
    launcher = getattr(module, LAUNCHERS[name][1])
    calls = []
    monkeypatch.setattr(module, LAUNCHERS[name][1], lambda *a, **k: calls.append(1) or launcher(*a, **k))
    n, c, t = 4, 64, 5
    x = torch.randn(t, n, c)
    fn, scale, base = torch.randn(n * n + 2 * n, n * c) / 16, torch.rand(3) + 0.5, torch.randn(n * n + 2 * n)
    h_pre, h_post, h_res = ref.mhc_coefficients(x, fn, scale, base)
    args = {
        "pre_mix": (x, h_pre),
        "post_res": (x, torch.randn(t, c), h_post, h_res),
        "mhc_coefficients": (x, fn, scale, base),
        "hc_coefficients": (x, torch.randn(n + 2, c) / 8, scale, base),
    }[name]
    with kernels.use_kernels(mode):
        out = getattr(mhc, name)(*args)
    assert len(calls) == launches
    torch.testing.assert_close(out, getattr(ref, name)(*args), rtol=1e-5, atol=2e-5)
