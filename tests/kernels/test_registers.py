"""benchmarks/registers.py: the dx + dfn kernel compiled offline for sm_90a (no GPU needed)."""

import json
import os
import subprocess
import sys

from benchmark_scripts import DIR

# Triton compiles only outside its interpreter, which the CPU test run switches on.
COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import registers
print(json.dumps({name: registers.compile_stats(4, 256, "bf16", summed, 64, 128, 4, 3)
                  for name, summed in registers.PASSES.items()}))
"""


def test_offline_compile_at_the_default_tiles_spills_nothing_and_the_chained_pass_needs_more_registers():
    # the launcher's defaults for bf16, n = 4 (64 tokens, 128 columns, 4 warps, 3 stages); its
    # docstring says neither pass spills
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE, str(DIR)], env=env, capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    for regs, spilled in stats.values():
        assert 0 < regs <= 255 and spilled == 0
    # the chained pass loads and sums two more gradients: it cannot need fewer registers
    assert stats["chained"][0] > stats["plain"][0]


TRANSITION = """
import json, sys
sys.path.insert(0, sys.argv[1])
import registers
print(json.dumps({n: registers.transition_stats(n, 256, "bf16", 32, 32, 8, 2) for n in (2, 4)}))
"""


def test_offline_compile_of_the_transition_pass_at_its_default_tiles_spills_nothing():
    # transition_bwd_streams' defaults (32 tokens, 32 channels of every stream, 8 warps, 2 stages),
    # which its docstring says fit without spilling; all n streams' tiles at once: n = 4 needs more
    # registers than n = 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", TRANSITION, str(DIR)], env=env, capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    for regs, spilled in stats.values():
        assert 0 < regs <= 255 and spilled == 0
    assert stats["4"][0] > stats["2"][0]
