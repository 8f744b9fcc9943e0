"""benchmarks/e2e.py: the memory and traffic formulas, the variant syntax, the report, and the CPU
measurement of activation memory against the formula (the fused kernels under Triton's interpreter)."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from benchmark_scripts import load_benchmark
from torchmhc.config import load_config
from torchmhc.kernels import use_kernels
from torchmhc.models import build_model
from torchmhc.models.moe import MoE

e2e = load_benchmark("e2e")

INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter")


def test_coefficient_bytes_are_what_the_kernels_keep():
    pytest.importorskip("triton")
    from torchmhc.kernels.coefficients_op import empty_coefficient_outputs

    for n in range(1, 9):
        kept = empty_coefficient_outputs(torch.empty(1, n, 64))  # (h_pre, h_post, h_res, m_pp, m_res, 1/r)
        assert e2e.coefficient_bytes_kept(n) == sum(t.numel() * t.element_size() for t in kept), n
    assert e2e.coefficient_bytes_kept(4) == 4 * (4 + 4 + 16 + 16 + 16 + 1)


def test_connection_memory_counts_streams_layer_inputs_branch_outputs_and_coefficients():
    n, c, L, e = 4, 128, 8, 2
    cm = e2e.connection_memory(num_streams=n, dim=c, num_sublayers=L, elem_bytes=e)
    assert cm.num_blocks == 4  # L_r* = round(sqrt(4 * 8 / 6)) = 2
    coef = e2e.coefficient_bytes_kept(n)
    assert cm.kept == L * (n * c * e + c * e + c * e + coef) + n * c * e
    assert cm.kept_recompute == 4 * n * c * e + L * (c * e + coef) + n * c * e
    assert cm.saving == (L - 4) * n * c * e + L * c * e  # x_l off the block starts, every H_pre·x_l
    assert cm.residual == L * c * e
    # a branch norm inside the transition keeps its fp32 1/rms instead of the layer input
    normed = e2e.connection_memory(num_streams=n, dim=c, num_sublayers=L, elem_bytes=e, fused_norms=L - 1)
    assert cm.kept - normed.kept == (L - 1) * (c * e - 4)
    assert normed.kept_recompute == cm.kept_recompute
    one_block = e2e.connection_memory(num_streams=n, dim=c, num_sublayers=L, elem_bytes=e, block_length=L)
    assert one_block.num_blocks == 1 and one_block.saving > cm.saving


def test_traffic_follows_spec_and_kernel_counts():
    n, c, e = 4, 1280, 2
    plain = e2e.mhc_traffic_bytes(num_streams=n, dim=c, elem_bytes=e)
    small = (3 * n * n + 4 * n + 40) * 4
    # docs/math.md §9 forward: read (3n+1)C, write (n+1)C
    assert plain["forward"] - small == ((3 * n + 1) + (n + 1)) * c * e
    # chained backward: dh (nC + C), coefficient dx pass (3nC + C), post-res (3nC + 2C)
    assert plain["backward"] - small == (7 * n + 4) * c * e
    # the branch RMSNorm as a kernel of its own: read y, write z; backward read dz and y, write dy
    assert plain["norm"] == 5 * c * e
    assert plain["total"] == plain["forward"] + plain["backward"] + plain["norm"]
    # what mHC replaces: the residual add (read 2C, write C), and the z write and dz read of the
    # residual model's norm, fused with it
    assert plain["residual"] == 5 * c * e
    again = e2e.mhc_traffic_bytes(num_streams=n, dim=c, elem_bytes=e, recompute=True)
    assert again["total"] == plain["total"] + plain["forward"]
    # every transition fused: x_{l+1} read twice less forward (coefficients and pre-mix in the pass
    # that writes it: (2n + 2)C); the backward runs the same passes
    fused = e2e.mhc_traffic_bytes(num_streams=n, dim=c, elem_bytes=e, fused=1.0)
    assert plain["forward"] - fused["forward"] == 2 * n * c * e
    assert fused["forward"] - small == (2 * n + 2) * c * e
    assert fused["backward"] == plain["backward"]
    # ... unless its backward runs in one pass: (n + 1)C for the pre-mix dh, then (3n + 3)C, and the
    # fp32 partial sums of dh_post and dh_res per 32-channel block, written and read back
    one_pass = e2e.mhc_traffic_bytes(num_streams=n, dim=c, elem_bytes=e, fused=1.0, one_pass=1.0)
    assert one_pass["backward"] - small == (4 * n + 4) * c * e + 2 * (c // 32) * (n + n * n) * 4
    assert one_pass["forward"] == fused["forward"]
    # the norm inside the transition moves nothing of its own: 5C less, the passes unchanged
    norm = e2e.mhc_traffic_bytes(num_streams=n, dim=c, elem_bytes=e, fused=1.0, one_pass=1.0, norm=1.0)
    assert one_pass["total"] - norm["total"] == 5 * c * e and norm["norm"] == 0
    assert (norm["forward"], norm["backward"]) == (one_pass["forward"], one_pass["backward"])


def test_floor_of_a_preset():
    cfg = load_config("gpu-moe-3b")
    floor = e2e.mhc_floor(cfg, copy_tbps=3.0, elem_bytes=2)
    assert cfg.model.fuse_transitions  # the models fuse every transition: 2L - 1 of 2L sub-layers
    # and run their backward in one pass (n = 4)
    # and the branch norms inside them
    assert cfg.model.fuse_branch_norm
    per = e2e.mhc_traffic_bytes(num_streams=4, dim=1280, elem_bytes=2, fused=23 / 24, one_pass=23 / 24, norm=23 / 24)
    units = 24 * 2 * 4096  # sub-layers x tokens
    assert floor.bytes_per_step == per["total"] * units
    assert floor.net_bytes_per_step == (per["total"] - per["residual"]) * units
    assert floor.ms == pytest.approx(floor.net_bytes_per_step / 3e12 * 1e3)
    assert 4 < floor.ms < 15  # about 15 GB at 3 TB/s
    # a :twopass variant runs the transitions' backward in two passes
    two_pass = e2e.mhc_floor(cfg, copy_tbps=3.0, elem_bytes=2, one_pass=False)
    per = e2e.mhc_traffic_bytes(num_streams=4, dim=1280, elem_bytes=2, fused=23 / 24, norm=23 / 24)
    assert two_pass.bytes_per_step == per["total"] * units > floor.bytes_per_step
    # a :branchnorm variant leaves the norms in the branches
    apart = e2e.mhc_floor(e2e.Variant.parse("mhc:branchnorm").config(cfg), copy_tbps=3.0, elem_bytes=2)
    assert apart.bytes_per_step - floor.bytes_per_step == round(5 * 1280 * 2 * 23 / 24) * units


def test_variant_syntax():
    v = e2e.Variant.parse("mhc:recompute:reference")
    assert (v.residual, v.recompute, v.reference) == ("mhc", True, True)
    assert e2e.Variant.parse(" residual ").spec == "residual"
    with pytest.raises(ValueError, match="NAME\\[:recompute\\]"):
        e2e.Variant.parse("mhc:fast")
    cfg = v.config(load_config("tiny"))
    assert cfg.model.residual == "mhc" and cfg.model.recompute


def test_report_renders_gpu_results_and_failures():
    base = load_config("gpu-moe-3b")
    results = {
        "residual": e2e.Result("residual", 2.9e9, 1.1e10, 60.0, 150.0, 148.0, 54613.0, 20 * 2**30, 60 * 2**30),
        "mhc": e2e.Result("mhc", 2.9e9, 1.1e10, 70.0, 160.0, 158.0, 51200.0, 22 * 2**30, 62 * 2**30),
        "mhc:recompute": e2e.Result("mhc:recompute", 2.9e9, 1.1e10, 70.0, 165.0, 160.0, 49648.0, 21 * 2**30, 61 * 2**30),
        "hc": e2e.Result("hc", error="out of memory"),
    }
    args = SimpleNamespace(preset="gpu-moe-3b", steps=10, warmup=3)
    text = e2e.report(args, base, torch.device("cuda"), "H100", {"matmul_tflops": 740.0, "copy_tbps": 3.0}, results)
    assert "| mhc | 160.0 | 51,200 | +6.7% |" in text
    assert "| hc | out of memory |" in text
    assert "## Floor" in text and "| mhc:recompute |" in text.split("## Floor")[1]
    assert "Recomputation" in text


def _measure(spec, overrides=(), *, seq_len=8):
    base = load_config("tiny", ["model.dim=64", "model.num_layers=2", "model.num_heads=2", f"data.seq_len={seq_len}",
                                "data.batch_size=1", "train.num_threads=1", *overrides])
    return base, e2e.run_variant(e2e.Variant.parse(spec), base, torch.device("cpu"), steps=1, warmup=1)


def test_profile_report_splits_torchmhc_kernels_from_the_rest():
    import importlib
    import pkgutil

    import triton

    import torchmhc.kernels

    ours = [
        name
        for info in pkgutil.iter_modules(torchmhc.kernels.__path__)
        for name, obj in vars(importlib.import_module(f"torchmhc.kernels.{info.name}")).items()
        if isinstance(obj, triton.runtime.jit.KernelInterface) and name.endswith("_kernel")
    ]
    assert len(ours) >= 10 and all(e2e.is_torchmhc_kernel(name) for name in ours), ours
    others = ["triton_poi_fused_add_mul_0", "triton_red_fused__to_copy_sum_3", "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT",
              "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >"]  # fmt: skip
    assert not any(e2e.is_torchmhc_kernel(name) for name in others)

    kernels = [(others[2], 10, 5.0), ("_coef_bwd_x_kernel", 24, 1.5), (others[0], 50, 1.0), ("_post_res_fwd_kernel", 24, 0.75)]
    r = e2e.Result("mhc", 1e9, 1e10, 1.0, 10.0, 10.0, 1000.0, kernels=kernels, gpu_busy_ms=8.25)
    text = "\n".join(e2e._kernel_tables({"mhc": r}, top=3))
    assert "torchmhc's kernels 2.25 ms (48 launches), other kernels 6.00 ms, no kernel running 1.75 ms" in text
    assert "| 1 others | | 0.75 | 9.1% |" in text


def test_idle_gaps_are_put_down_to_the_kernels_on_either_side():
    # two steps; "b" overlaps "a" on another stream (no gap between them), "c" starts 3 µs after "b"
    # ends although "a" and "inner" (within "b") ended earlier; copies count as work
    spans = [("c", 20.0, 25.0), ("a", 0.0, 10.0), ("b", 5.0, 17.0), ("inner", 11.0, 12.0), ("copy", 25.0, 26.0), ("a", 125.0, 130.0),
             ("c", 131.0, 132.0), ("b", 30.0, 40.0), ("c", 44.0, 45.0)]  # fmt: skip
    gaps = e2e.idle_gaps(spans, steps=2)
    # c -> a: 80 µs; b -> c: 3 + 4 µs; copy -> b: 4; a -> c: 1 (per step: halved)
    assert gaps == [("c", "a", 0.5, 0.04), ("b", "c", 1.0, 0.0035), ("copy", "b", 0.5, 0.002), ("a", "c", 0.5, 0.0005)]
    assert e2e.idle_gaps([], steps=1) == []
    r = e2e.Result("mhc", 1e9, 1e10, 1.0, 10.0, 10.0, 1000.0, kernels=[("a", 1, 1.0)], gpu_busy_ms=1.0, gaps=gaps)
    text = "\n".join(e2e._kernel_tables({"mhc": r}, top=2))
    assert "0.05 ms a step" in text and "| `c` | `a` | 0 | 0.040 |" in text and "| `b` | `c` | 1 | 0.004 |" in text
    assert "`copy` | `b`" not in text  # past top


def test_kernel_profile_reads_the_gpu_work_of_the_profiled_steps():
    # on the CPU the trace holds no GPU work: no kernels, no gaps, but the steps ran under the profiler
    ran = []
    rows, busy, gaps = e2e.kernel_profile(lambda i: ran.append(torch.ones(8).sum()), 2, torch.device("cpu"))
    assert len(ran) == 2 and rows == [] and busy == 0 and gaps == []


def test_moe_routing_balance_is_measured_and_reported():
    moe = ["model.arch=moe", "model.num_experts=8", "model.num_shared_experts=1", "model.top_k=2",
           "model.expert_hidden=32"]  # fmt: skip
    base, routed = _measure("residual", moe, seq_len=16)
    _, dense = _measure("residual", seq_len=16)
    assert dense.expert_load is None
    # busiest expert over the mean: 1 when balanced, at most E / k (one expert in every top-k)
    assert 1.0 <= routed.expert_load <= 8 / 2
    args = SimpleNamespace(preset="tiny", steps=1, warmup=1)
    text = e2e.report(args, base, torch.device("cpu"), "cpu", {}, {"residual": routed})
    assert "expert load, busiest / mean" in text and f"| {routed.expert_load:.2f} |" in text
    # the balancing step still runs (it resets the loads) and is the model's own again afterwards
    model = build_model(base.model)
    layers = [m for m in model.modules() if isinstance(m, MoE)]

    def step() -> None:
        model(torch.randint(0, base.model.vocab_size, (2, 16)))
        assert all(m.expert_load.sum() == 2 * 16 * 2 for m in layers)  # k = 2 choices a token
        model.update_router_bias()

    assert e2e.expert_load_balance(model, step) >= 1.0
    assert all(m.expert_load.sum() == 0 and "update_router_bias" not in vars(m) for m in layers)


@INTERPRETER
def test_cpu_measurement_of_the_connections_memory_matches_the_formula():
    with use_kernels("triton"):
        # 16 tokens: the few fixed-size buffers of a step stay small next to the per-token bytes
        base, residual = _measure("residual", seq_len=16)
        _, mhc = _measure("mhc:branchnorm", seq_len=16)
        _, fused_norms = _measure("mhc", seq_len=16)
    assert residual.error is None and mhc.error is None and math.isfinite(mhc.ms_per_step)
    m, tokens = base.model, base.data.batch_size * base.data.seq_len
    cm = e2e.connection_memory(num_streams=m.num_streams, dim=m.dim, num_sublayers=2 * m.num_layers, elem_bytes=4)
    predicted = (cm.kept - cm.residual) * tokens
    assert mhc.activation_bytes - residual.activation_bytes == pytest.approx(predicted, rel=0.05)
    # with the branch norms inside the transitions, their layer inputs are not kept (nor what an
    # eager norm keeps besides: its normalized input before the weight, on this path)
    assert e2e.fused_norm_sublayers(m) == 2 * m.num_layers - 1
    normed = e2e.connection_memory(num_streams=m.num_streams, dim=m.dim, num_sublayers=2 * m.num_layers, elem_bytes=4,
                                   fused_norms=e2e.fused_norm_sublayers(m))
    assert mhc.activation_bytes - fused_norms.activation_bytes >= (cm.kept - normed.kept) * tokens


@INTERPRETER
def test_cpu_measurement_of_the_recompute_saving_matches_the_formula():
    with use_kernels("triton"):
        # the norms in the branches, as recomputation runs them
        base, plain = _measure("mhc:branchnorm")
        _, recomputed = _measure("mhc:recompute", ["model.recompute_block_length=2"])
    m = base.model
    cm = e2e.connection_memory(num_streams=m.num_streams, dim=m.dim, num_sublayers=2 * m.num_layers, elem_bytes=4,
                               block_length=2)
    predicted = cm.saving * base.data.batch_size * base.data.seq_len
    assert plain.activation_bytes - recomputed.activation_bytes == pytest.approx(predicted, rel=0.05)


def test_the_distributed_variants_build_the_single_device_model(monkeypatch):
    # mhc:distributed is what torchrun runs in one process: the same weights and activations as
    # mhc; mhc:fsdp shards it over the one rank all the same
    import torch.distributed as dist

    from torchmhc.distributed.mesh import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        results = {spec: _measure(spec)[1] for spec in ("mhc", "mhc:distributed", "mhc:fsdp")}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert all(r.error is None and math.isfinite(r.ms_per_step) for r in results.values()), results
    assert results["mhc:distributed"].num_params == results["mhc"].num_params
    assert results["mhc:distributed"].activation_bytes == results["mhc"].activation_bytes


def test_twopass_variant_sets_the_transition_backward_while_it_runs(monkeypatch):
    # the setting is read when a compiled block's backward is traced: during the variant's steps
    seen = []
    real_step = e2e.train_step

    def recording_step(*args, **kwargs):
        seen.append(os.environ.get("TORCHMHC_TRANSITION_BACKWARD"))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(e2e, "train_step", recording_step)
    monkeypatch.setenv("TORCHMHC_TRANSITION_BACKWARD", "one_pass")
    _, result = _measure("mhc:twopass")
    assert result.error is None and seen and set(seen) == {"two_pass"}
    assert os.environ["TORCHMHC_TRANSITION_BACKWARD"] == "one_pass"  # restored afterwards
    seen.clear()
    _measure("mhc")
    assert seen and set(seen) == {"one_pass"}
    monkeypatch.delenv("TORCHMHC_TRANSITION_BACKWARD")
    seen.clear()
    _measure("mhc:twopass")
    assert seen and set(seen) == {"two_pass"}
    assert "TORCHMHC_TRANSITION_BACKWARD" not in os.environ  # an unset variable stays unset
