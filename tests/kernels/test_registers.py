"""benchmarks/registers.py: the dx + dfn kernel compiled offline for sm_90a (no GPU needed)."""

from benchmark_scripts import load_benchmark


def test_offline_compile_reports_registers_and_the_chained_pass_needs_more():
    registers = load_benchmark("registers")
    plain = registers.compile_stats(4, 256, "bf16", registers.PASSES["plain"], 32, 128, 4, 3)
    chained = registers.compile_stats(4, 256, "bf16", registers.PASSES["chained"], 32, 128, 4, 3)
    for regs, spilled in (plain, chained):
        assert 0 < regs <= 255 and spilled >= 0
    # the chained pass loads and sums two more gradients: it cannot need fewer registers
    assert chained[0] > plain[0]
