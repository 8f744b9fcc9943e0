"""benchmarks/registers.py: the backward's stream kernels compiled offline for sm_90a (no GPU needed)."""

import json
import os
import subprocess
import sys

from benchmark_scripts import DIR


def _offline_stats(expression: str) -> dict[str, list[int]]:
    """``expression`` (a dict of ``registers`` calls) evaluated in a fresh process without Triton's
    interpreter, which the CPU test run switches on and under which Triton does not compile."""
    code = f"import json, sys\nsys.path.insert(0, sys.argv[1])\nimport registers\nprint(json.dumps({expression}))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, str(DIR)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_offline_compile_at_the_default_tiles_spills_nothing_and_the_chained_pass_needs_more_registers():
    # the launcher's defaults for bf16, n = 4 (64 tokens, 128 columns, 4 warps, 3 stages); its
    # docstring says neither pass spills
    stats = _offline_stats(
        '{name: registers.compile_stats(4, 256, "bf16", summed, 64, 128, 4, 3) for name, summed in registers.PASSES.items()}'
    )
    for regs, spilled in stats.values():
        assert 0 < regs <= 255 and spilled == 0
    # the chained pass loads and sums two more gradients: it cannot need fewer registers
    assert stats["chained"][0] > stats["plain"][0]


def test_offline_compile_of_the_transition_pass_at_its_default_tiles_spills_nothing():
    # transition_bwd_streams' defaults for 16-bit streams (32 tokens, 32 channels of every stream,
    # 4 warps, 2 stages, the late prefetch), which its docstring says fit without spilling, although
    # the loads of the next tile are held in registers too; all n streams' tiles at once: n = 4
    # needs more registers than n = 2
    stats = _offline_stats('{n: registers.transition_stats(n, 256, "bf16", 32, 32, 4, 2) for n in (2, 4)}')
    for regs, spilled in stats.values():
        assert 0 < regs <= 255 and spilled == 0
    assert stats["4"][0] > stats["2"][0]


def test_the_late_prefetch_needs_fewer_registers_and_fits_sixteen_warps():
    # issued after the products, the next tile's loads do not share registers with the products'
    # operands: fewer registers at the defaults, and 32 x 32 tiles at 16 warps (a 128-register
    # ceiling) compile without spilling, as transition_bwd_streams' docstring says
    stats = _offline_stats(
        '{f"{w}-{late}": registers.transition_stats(4, 256, "bf16", 32, 32, w, 2, late)'
        " for w, late in ((8, False), (8, True), (16, True), (4, False))}"
    )
    assert stats["8-True"][0] < stats["8-False"][0]
    assert stats["4-False"][1] > 0  # at the default 4 warps the early prefetch spills
    registers, spilled = stats["16-True"]
    assert registers <= 128 and spilled == 0


def test_the_token_loop_operations_are_counted_from_the_ir():
    # one reduction over the channels per partial sum (dh_post: n, dh_res: n²); the two products
    # for d (dm @ fn, split into 3 bf16 products) and dfn (2); the dx pass reduces nothing
    ops = _offline_stats(
        '{"transition": (k := registers.transition_kernel(4, 256, "bf16", 32, 32, 4, 2)).loop_ops,'
        ' "dx": registers.dx_kernel(4, 256, "bf16", ("add", "mix"), 64, 128, 4, 3).loop_ops,'
        ' "sass": k.loop_sass}'
    )
    # the machine code's loop is the token loop: its fused multiply-adds are the stream mixes, 13.5
    # a stream value (Nsight Compute, H100, at 8 warps), and a thread of 4 warps holds 4·32·32 / 128
    # of a tile's values
    assert 12 <= ops["sass"]["FFMA"] / (4 * 32 * 32 / 128) <= 16
    assert ops["transition"]["reductions"] == 4 + 4 * 4 and ops["dx"]["reductions"] == 0
    assert ops["transition"]["products"] == ops["dx"]["products"] == 5
    # the transition pass stores df, n dx tiles and its n + n² sums a token in one store a tile
    # (then dfn, after the loop); the stream tiles are split and joined around the products only:
    # the few layout changes its docstring counts
    assert ops["transition"]["stores"] == 1 + 4 + 1 + 1
    assert 0 < ops["dx"]["layout changes"] <= ops["transition"]["layout changes"] <= 7


def test_offline_compile_of_the_normalized_forward_in_both_forms_spills_nothing():
    # post_res_coefficients_pre_mix_norm_fwd at its launcher's defaults: the in-place rescale and
    # whole_rows (a row of all C channels in registers, C = 2048: two tokens a step) both fit
    stats = _offline_stats(
        '{rows: (lambda k: [k.registers, k.spilled])(registers.forward_kernel(4, 2048, rows)) for rows in (False, True)}'
    )
    for regs, spilled in stats.values():
        assert 0 < regs <= 255 and spilled == 0
