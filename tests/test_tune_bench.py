"""benchmarks/tune.py's pure parts: the grid, its --grid narrowing, and that every swept option is
one its launcher takes (each kernel run once under Triton's interpreter on the CPU)."""

import os

import pytest
from benchmark_scripts import load_benchmark

tune = load_benchmark("tune")


def test_grid_narrows_the_named_options_only():
    full = tune.configs("transition_bwd")
    narrowed = tune.configs("transition_bwd", tune.parse_grid(["num_warps=16", "late_prefetch=true"], ["transition_bwd"]))
    assert len(narrowed) == len(full) // (3 * 2)
    assert all(c["num_warps"] == 16 and c["late_prefetch"] is True for c in narrowed)
    assert {c["block_t"] for c in narrowed} == set(tune.GRIDS["transition_bwd"]["block_t"])
    # an option another chosen kernel sweeps leaves this one's grid as it is
    assert tune.configs("pre_mix_dh", tune.parse_grid(["late_prefetch=false"], ["pre_mix_dh", "transition_bwd"])) == (
        tune.configs("pre_mix_dh")
    )


@pytest.mark.parametrize(
    "item, message",
    [
        ("num_warps", "KEY=V1,V2"),
        ("warps=8", "'warps' is not an option the chosen kernels sweep"),
        ("block_t=big", "must be integers or true/false"),
    ],
)
def test_grid_rejects_malformed_items(item, message):
    with pytest.raises(ValueError, match=message):
        tune.parse_grid([item], ["transition_bwd"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in Triton's interpreter")
@pytest.mark.parametrize("kernel", tune.KERNELS)
def test_every_swept_option_is_a_launcher_argument(kernel):
    run, nbytes = tune.make_case(kernel, 19, 256, 4, "fp32", device="cpu")
    assert nbytes > 0
    first = tune.configs(kernel)[0]
    last = tune.configs(kernel)[-1]
    for config in (first, last):  # a TypeError names an option the launcher does not take
        run(**config)
