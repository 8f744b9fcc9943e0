"""``torchmhc.distributed`` in one process: configuration, stage split, stage modules, data slices,
checkpoint safety and conversion. The multi-process runs are in ``test_distributed_runs.py``."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import math
import os
import pickle
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchmhc.models.gpt as gpt_module
from torchmhc.config import ModelConfig, OptimConfig, config_to_dict, load_config
from torchmhc.distributed import ParallelConfig, local_rows
from torchmhc.distributed import checkpoint as ckpt
from torchmhc.distributed import pipeline
from torchmhc.distributed.pipeline import (
    ContiguousGrad,
    balance_stages,
    block_flops,
    head_flops,
    split_model,
    stage_block_ranges,
    stages_of_rank,
)
from torchmhc.models import GPT, build_model
from torchmhc.recompute import optimal_block_length
from torchmhc.train import (
    CheckpointError,
    build_optimizer,
    lm_loss,
    load_checkpoint,
    load_training_checkpoint,
    parallel_layout,
    save_checkpoint,
    token_cross_entropy,
    train,
    train_step,
)

SMALL = dict(vocab_size=64, dim=32, num_heads=2, max_seq_len=16, tie_embeddings=False)


# ----------------------------------------------------------------------------------------------
# ParallelConfig
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pp": 0}, r"parallel\.pp must be an integer >= 1, got 0"),
        ({"dp_replicate": True}, r"parallel\.dp_replicate must be an integer >= 1"),
        ({"dp_shard": -1}, r"parallel\.dp_shard must be an integer >= 0"),
        ({"pp_schedule": "pipedream"}, r"parallel\.pp_schedule must be one of gpipe, 1f1b, .*'pipedream'"),
        ({"pp_schedule": "dualpipev", "stages_per_rank": 3}, r"must be 2 \(or 0\) for the V-shaped schedule"),
        ({"pp_schedule": "1f1b", "stages_per_rank": 2}, r"must be 1 \(or 0\) for '1f1b'"),
        ({"pp_schedule": "interleaved-1f1b", "stages_per_rank": 1}, r"must be >= 2 \(or 0\) for 'interleaved-1f1b'"),
        ({"pp": 2, "stage_boundaries": (3, 2)}, r"strictly increasing block indices >= 1, got \[3, 2\]"),
        ({"pp": 2, "stage_boundaries": (0,)}, r"strictly increasing block indices >= 1"),
        ({"pp": 3, "stage_boundaries": (2,)}, r"each of the 2 stages after the first \(3 stages = pp 3 x 1"),
    ],
)
def test_parallel_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_parallel_config_resolve():
    resolved = ParallelConfig(pp=2).resolve(8, num_layers=4, batch_size=16)
    assert (resolved.dp_shard, resolved.dp, resolved.microbatches, resolved.num_stages) == (4, 4, 2, 2)
    v = ParallelConfig(pp=2, pp_schedule="dualpipev").resolve(2, num_layers=4)
    assert (v.local_stages, v.num_stages, v.microbatches) == (2, 4, 4)
    assert not ParallelConfig().resolve(1).pipelined and ParallelConfig(pp_schedule="zbv").pipelined
    with pytest.raises(ValueError, match=r"world size 6 must equal .* 2 x 1 x 2 = 4"):
        ParallelConfig(pp=2, dp_shard=2).resolve(6)
    with pytest.raises(ValueError, match=r"world size 5 is not divisible by parallel.pp x parallel.dp_replicate = 2 x 1"):
        ParallelConfig(pp=2).resolve(5)
    with pytest.raises(ValueError, match=r"data.batch_size = 6 must be divisible by .* 2 x 2 = 4"):
        ParallelConfig(pp=2, dp_shard=2, microbatches=2).resolve(4, batch_size=6)
    with pytest.raises(ValueError, match=r"model.num_layers = 3 is fewer than the 4 pipeline stages"):
        ParallelConfig(pp=2, pp_schedule="zbv").resolve(2, num_layers=3)
    with pytest.raises(ValueError, match=r"microbatches must be >= the number of stages \(4\) for dualpipev, got 2"):
        ParallelConfig(pp=2, pp_schedule="dualpipev", microbatches=2).resolve(2)


# ----------------------------------------------------------------------------------------------
# The [parallel] section of a run, and when a run is laid out over processes
# ----------------------------------------------------------------------------------------------


def test_the_parallel_section_in_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[parallel]\npp = 2\npp_schedule = "dualpipev"\nstage_boundaries = [1, 2, 3]\n')
    cfg = load_config(path, ["parallel.microbatches=8"])
    assert cfg.parallel == ParallelConfig(pp=2, pp_schedule="dualpipev", microbatches=8, stage_boundaries=(1, 2, 3))
    assert config_to_dict(cfg)["parallel"]["stage_boundaries"] == [1, 2, 3]
    assert load_config("tiny").parallel == ParallelConfig()
    with pytest.raises(ValueError, match=r"unknown key\(s\) parallel.tp; valid keys: dp_replicate, dp_shard"):
        load_config(None, ["parallel.tp=2"])
    with pytest.raises(ValueError, match=r"parallel.pp_schedule must be one of"):
        load_config(None, ["parallel.pp_schedule=zero"])


@pytest.mark.parametrize(
    "world, overrides, layout",
    [
        ("1", [], None),  # today's path: nothing laid out
        (None, [], None),
        ("2", [], {"dp_shard": 2, "pp": 1}),  # torchrun alone is enough: FSDP over the ranks
        ("1", ["parallel.dp_shard=1"], {"dp_shard": 1, "pp": 1}),
        ("4", ["parallel.pp=2", "model.tie_embeddings=false"], {"dp_shard": 2, "pp": 2, "microbatches": 2}),
    ],
)
def test_parallel_layout(monkeypatch, world, overrides, layout):
    _world_size(monkeypatch, world)
    resolved = parallel_layout(load_config(None, ["model.num_layers=2", "data.batch_size=4", *overrides]))
    if layout is None:
        assert resolved is None
    else:
        assert {key: getattr(resolved, key) for key in layout} == layout


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["parallel.pp=2", "parallel.dp_shard=2"], r"world size 2 must equal .* = 2 x 1 x 2 = 4"),
        (["parallel.pp=2", "model.num_layers=1", "model.tie_embeddings=false"], r"model.num_layers = 1 is fewer than the 2 pipeline stages"),
        (["data.batch_size=3"], r"data.batch_size = 3 must be divisible by the data-parallel ranks x microbatches = 2 x 1"),
        (["train.compile=true", "train.compile_mode=reduce-overhead"], r"'reduce-overhead' replays CUDA graphs"),
    ],
)  # fmt: skip
def test_parallel_layout_refuses_what_does_not_fit(monkeypatch, overrides, match):
    _world_size(monkeypatch, "2")
    with pytest.raises(ValueError, match=match):
        parallel_layout(load_config(None, ["model.num_layers=2", "data.batch_size=4", *overrides]))


def _world_size(monkeypatch, world: str | None) -> None:
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)


def test_compare_and_eval_hooks_refuse_a_layout(monkeypatch, capsys, tmp_path):
    from torchmhc.cli import main

    assert main(["compare", "--set", "parallel.dp_shard=1", "--set", f"compare.report_dir='{tmp_path}'"]) == 2
    assert "torchmhc compare trains its variants in one process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["parallel.pp=2", "model.num_layers=2", "model.tie_embeddings=false", f"train.out_dir='{tmp_path}'"])
    with pytest.raises(ValueError, match="eval_hook needs the whole model"):
        train(cfg, eval_hook=lambda model: {})
    assert not any(tmp_path.iterdir()), "refused before anything was written"


def test_one_process_resumes_a_dcp_checkpoint_with_its_own_optimizer_settings(tmp_path):
    """As from its own checkpoints: the weights, moments and step counts are the checkpoint's, the
    hyperparameters the new optimizer's (``torchmhc.train.load_training_checkpoint``)."""
    cfg, model, optimizer = _trained()
    path = ckpt.save_dcp_checkpoint(tmp_path, model, optimizer, {"step": 1})
    restored = build_model(cfg)
    settings = OptimConfig(weight_decay=0.05, betas=(0.8, 0.9), eps=1e-7)
    restored_opt = build_optimizer(restored, settings)
    assert load_training_checkpoint(path, restored, restored_opt)["step"] == 1
    for group in restored_opt.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(restored_opt.state[p]["exp_avg"], m) for p, m in zip(restored.parameters(), moments))


# ----------------------------------------------------------------------------------------------
# Where to cut
# ----------------------------------------------------------------------------------------------


def _rank_loads(sizes, ranks, extra):
    loads = {}
    for s, (size, rank) in enumerate(zip(sizes, ranks)):
        loads[rank] = loads.get(rank, 0.0) + size + (extra if s == len(sizes) - 1 else 0.0)
    return loads


@pytest.mark.parametrize("seed", range(6))
def test_balance_stages_minimizes_the_busiest_rank(seed):
    rng = random.Random(seed)
    ranks = rng.randint(1, 3)
    v_shape = seed % 2 == 1
    stage_rank = [*range(ranks), *reversed(range(ranks))] if v_shape else list(range(ranks)) * rng.randint(1, 2)
    num_blocks = rng.randint(len(stage_rank), 9)
    extra = rng.uniform(0, 3)
    starts = balance_stages(num_blocks, stage_rank, last_extra=extra)
    assert starts[0] == 0 and len(starts) == len(stage_rank) and starts == sorted(set(starts))
    sizes = [b - a for a, b in zip(starts, [*starts[1:], num_blocks])]
    best = min(
        max(_rank_loads(cut_sizes, stage_rank, extra).values())
        for cuts in itertools.combinations(range(1, num_blocks), len(stage_rank) - 1)
        for cut_sizes in [[b - a for a, b in zip([0, *cuts], [*cuts, num_blocks])]]
    )
    assert max(_rank_loads(sizes, stage_rank, extra).values()) == pytest.approx(best)


def test_stage_ranges_count_the_head_and_follow_explicit_boundaries():
    # A head as costly as ~3 blocks: its stage gets fewer blocks; in a V it shares rank 0 with the first.
    cfg = ModelConfig(**{**SMALL, "vocab_size": 2048}, num_layers=8)
    assert 2.5 < head_flops(cfg) / block_flops(cfg, 16) < 3.5
    assert [len(r) for r in stage_block_ranges(cfg, ParallelConfig(pp=2), 16)] == [6, 2]
    v = stage_block_ranges(cfg, ParallelConfig(pp=2, pp_schedule="dualpipev"), 16)
    assert [len(r) for r in v] == [1, 3, 3, 1]  # rank 0: stages 0 and 3 (with the head); rank 1: 1 and 2
    explicit = stage_block_ranges(cfg, ParallelConfig(pp=2, stage_boundaries=(3,)), 16)
    assert explicit == [range(0, 3), range(3, 8)]
    with pytest.raises(ValueError, match=r"block indices < model.num_layers = 8"):
        stage_block_ranges(cfg, ParallelConfig(pp=2, stage_boundaries=(8,)), 16)


def test_stages_of_rank_loop_and_v():
    assert [stages_of_rank(r, ParallelConfig(pp=4)) for r in range(4)] == [[0], [1], [2], [3]]
    loop = ParallelConfig(pp=2, pp_schedule="interleaved-1f1b", stages_per_rank=3)
    assert [stages_of_rank(r, loop) for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    v = ParallelConfig(pp=3, pp_schedule="dualpipev")
    assert [stages_of_rank(r, v) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]


def test_local_rows_partition_the_global_batch():
    batch = torch.arange(24).view(6, 4)
    assert torch.equal(torch.cat([local_rows(batch, r, 3) for r in range(3)]), batch)
    with pytest.raises(ValueError, match="6 rows, not divisible by the 4"):
        local_rows(batch, 0, 4)


# ----------------------------------------------------------------------------------------------
# Stage modules
# ----------------------------------------------------------------------------------------------


def _all_stages(model, parallel):
    """Every stage of ``model`` for ``parallel``, in stage order (as all ranks together hold them)."""
    stages = {}
    for rank in range(parallel.pp):
        _, modules, indices = split_model(model, parallel, rank, seq_len=16)
        stages.update(zip(indices, modules))
    return [stages[i] for i in range(parallel.num_stages)]


@pytest.mark.parametrize(
    "arch, parallel",
    [
        ("gpt", ParallelConfig(pp=4)),
        ("moe", ParallelConfig(pp=2, pp_schedule="interleaved-1f1b")),
        ("gpt", ParallelConfig(pp=2, pp_schedule="dualpipev")),
    ],
)
def test_stages_compose_to_the_model(arch, parallel):
    """Chained stages give the model's logits and gradients; names and blocks are the model's."""
    cfg = ModelConfig(**SMALL, arch=arch, num_layers=5, num_experts=4)
    model = build_model(cfg)
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    lm_loss(reference, idx, targets).backward()

    stages = _all_stages(model, parallel)
    assert sorted(int(k) for s in stages for k in s.blocks) == list(range(5))
    x = idx
    for stage in stages:
        x = stage(x)
        assert x.is_contiguous()
    token_cross_entropy(x, targets).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_model_part_uses_the_model_names():
    cfg = ModelConfig(**SMALL, num_layers=4)
    model = build_model(cfg)
    part, _, indices = split_model(model, ParallelConfig(pp=2, pp_schedule="zbv"), 0, seq_len=16)
    assert indices == [0, 3]
    names = set(part.state_dict())
    assert names <= set(model.state_dict())
    assert {"tok_emb.weight", "lm_head.weight", "blocks.0.attn_hc.fn", "blocks.3.ffn.w_down.weight"} <= names
    assert not any(n.startswith(("blocks.1.", "blocks.2.")) for n in names)


def test_tied_embeddings_pipeline_as_two_copies_with_one_summed_gradient():
    # the last stage's LM head gets its own copy of the embedding matrix; after a backward the two
    # gradients are summed into both (here both V stages on one rank: no process group), which is
    # the one-process tied matrix's gradient
    from torchmhc.distributed.pipeline import sync_tied_gradients

    model = build_model(ModelConfig(**{**SMALL, "tie_embeddings": True}, num_layers=2)).double()
    parallel = ParallelConfig(pp_schedule="dualpipev", microbatches=2).resolve(1, num_layers=2, batch_size=4)
    part, stages, indices = split_model(model, parallel, 0, seq_len=16)
    assert indices == [0, 1] and part.tied_copy is stages[1].lm_head.weight
    assert part.tied_copy is not part.tok_emb.weight and torch.equal(part.tied_copy, part.tok_emb.weight)
    x = torch.randint(0, SMALL["vocab_size"], (2, 8))
    loss = token_cross_entropy(stages[1](stages[0](x)), x)
    loss.backward()
    expected = torch.autograd.grad(token_cross_entropy(model(x), x), model.tok_emb.weight)[0]
    sync_tied_gradients(part, None)
    torch.testing.assert_close(part.tok_emb.weight.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(part.tied_copy.grad, part.tok_emb.weight.grad)
    assert part.tied_copy.grad.data_ptr() != part.tok_emb.weight.grad.data_ptr()


def test_stage_edges_are_contiguous(monkeypatch):
    """A middle stage sends a contiguous output forward and a contiguous gradient back, even when
    its blocks hand out transposed layouts: the receive buffers are contiguous. (The zero-bubble
    schedules take input gradients from ``torch.autograd.grad``, which keeps such layouts.)"""

    def transposing_blocks(blocks, x, cfg):  # x -> x, through a product in transposed layout
        return (x.transpose(-1, -2) @ torch.eye(x.shape[-2])).transpose(-1, -2)

    shape = (2, 16, 4, 32)
    y = torch.randn(shape, requires_grad=True)
    out = transposing_blocks(None, y, None)
    (grad,) = torch.autograd.grad(out, y, torch.randn(shape))
    assert not out.is_contiguous() and not grad.is_contiguous()  # what the edges would carry

    monkeypatch.setattr(pipeline, "run_blocks", transposing_blocks)
    stages = _all_stages(build_model(ModelConfig(**SMALL, num_layers=3)), ParallelConfig(pp=3))
    x = torch.randn(shape, requires_grad=True)
    out = stages[1](x)
    (grad,) = torch.autograd.grad(out, x, torch.randn(shape))
    assert out.is_contiguous() and grad.is_contiguous()


def test_contiguous_grad_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    y = ContiguousGrad.apply(x)
    assert torch.equal(y, x)
    y.backward(torch.ones(4, 3).t())
    assert torch.equal(x.grad, torch.ones(3, 4)) and x.grad.is_contiguous()


def test_recomputation_blocks_stay_inside_stages(monkeypatch):
    """With recomputation each stage replays only its own sub-layers, with its own L_r*, and the
    gradients are the model's."""
    calls = []
    original = gpt_module.run_sublayers

    def recording(x, sublayers, **kwargs):
        calls.append((len(sublayers), kwargs.get("block_length")))
        return original(x, sublayers, **kwargs)

    monkeypatch.setattr(gpt_module, "run_sublayers", recording)
    cfg = ModelConfig(**SMALL, num_layers=6, recompute=True)
    model, reference = build_model(cfg), build_model(ModelConfig(**SMALL, num_layers=6))
    reference.load_state_dict(model.state_dict())
    parallel = ParallelConfig(pp=2, stage_boundaries=(4,))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    x = idx
    for stage in _all_stages(model, parallel):
        x = stage(x)
    token_cross_entropy(x, targets).backward()
    assert calls == [(8, None), (4, None)]  # sub-layers of each stage; None = L_r* of those
    assert optimal_block_length(4, 8) != optimal_block_length(4, 12)  # per stage, not per model
    lm_loss(reference, idx, targets).backward()
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Checkpoints (one process, no process group)
# ----------------------------------------------------------------------------------------------


def _trained(cfg=None):
    cfg = cfg or ModelConfig(**SMALL, num_layers=2, arch="moe", num_experts=4)
    model = build_model(cfg)
    optimizer = build_optimizer(model, OptimConfig())
    lm_loss(model, torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    optimizer.step()
    model.update_router_bias()
    return cfg, model, optimizer


def _same(model_a, opt_a, model_b, opt_b):
    for (ka, a), (kb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), i


def test_dcp_checkpoint_round_trip_and_rng(tmp_path):
    cfg, model, optimizer = _trained()
    torch.manual_seed(123)
    path = ckpt.save_dcp_checkpoint(tmp_path, model, optimizer, {"step": 7, "tokens": 99})
    expected = torch.rand(3)
    assert path == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000007"
    restored = build_model(cfg)
    restored_opt = build_optimizer(restored, OptimConfig())
    state = ckpt.load_dcp_checkpoint(ckpt.latest_checkpoint(tmp_path), restored, restored_opt)
    assert state["step"] == 7 and state["tokens"] == 99 and state["data_position"] == 7
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where the save left it
    _same(model, optimizer, restored, restored_opt)


def test_conversion_to_and_from_the_single_file_format(tmp_path):
    cfg, model, optimizer = _trained()
    single = save_checkpoint(tmp_path / "a", model, optimizer, {"step": 3, "tokens": 12})
    as_dcp = ckpt.safetensors_to_dcp(single, tmp_path / "b", cfg, OptimConfig())
    back = ckpt.dcp_to_safetensors(as_dcp, tmp_path / "c", cfg, OptimConfig())
    restored = build_model(cfg)
    restored_opt = build_optimizer(restored, OptimConfig())
    assert load_checkpoint(back, restored, restored_opt)["step"] == 3
    _same(model, optimizer, restored, restored_opt)
    with pytest.raises(CheckpointError, match=r"format 1, not a DCP checkpoint"):
        ckpt.load_dcp_checkpoint(single, restored)


def test_a_crash_mid_save_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    cfg, model, optimizer = _trained()
    ckpt.save_dcp_checkpoint(tmp_path, model, optimizer, {"step": 1})
    original = dcp.save

    def crashing_save(state, *, storage_writer, **kwargs):
        original(state, storage_writer=storage_writer, **kwargs)  # every file written ...
        raise KeyboardInterrupt  # ... and the process dies before the rename

    monkeypatch.setattr(dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_dcp_checkpoint(tmp_path, model, optimizer, {"step": 2})
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    assert ckpt.load_dcp_checkpoint(ckpt.latest_checkpoint(tmp_path), build_model(cfg))["step"] == 1


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_loading_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, model, optimizer = _trained()
    path = ckpt.save_dcp_checkpoint(tmp_path, model, optimizer, {"step": 1})
    metadata = path / ".metadata"
    genuine = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match=r"refers to posix.system|refers to os.system"):
        ckpt.load_dcp_checkpoint(path, build_model(cfg))
    assert not (tmp_path / "exploited").exists()

    # A checkpoint whose tensor was stored as a pickled object: DCP would torch.load it unsafely.
    metadata.write_bytes(genuine)
    sneaky = tmp_path / "sneaky"
    dcp.save({"model": {**model.state_dict(), "tok_emb.weight": _Exploit()}}, checkpoint_id=sneaky, no_dist=True)
    (sneaky / "state.json").write_text(json.dumps({"format": ckpt.DCP_FORMAT, "step": 1, "param_groups": []}))
    with pytest.raises(CheckpointError, match=r"'model.tok_emb.weight' as a pickled object"):
        ckpt.load_dcp_checkpoint(sneaky, build_model(cfg))
    assert not (tmp_path / "exploited").exists()


def test_lazy_names_resolve_to_their_objects_after_every_submodule_is_imported():
    # a submodule named like one of the package's lazy names would shadow it once imported
    # (`torchmhc.distributed.parallelize` did: benchmarks/e2e.py got the module, not the function)
    import importlib
    import pkgutil

    import torchmhc.distributed as dist_pkg

    for info in pkgutil.iter_modules(dist_pkg.__path__):
        importlib.import_module(f"torchmhc.distributed.{info.name}")
    for name in dist_pkg.__all__:
        assert not inspect.ismodule(getattr(dist_pkg, name)), name


def test_one_data_parallel_rank_keeps_the_model_as_on_one_device(monkeypatch):
    # one process has nothing to shard: no FSDP units (FSDP2 over one rank cost 27% of a step on
    # gpu-dense-1b), fp32 parameters; and its compiled blocks may replay CUDA graphs
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from torchmhc.distributed import build_mesh, init_distributed, parallelize
    from torchmhc.distributed import train_step as parallel_train_step
    from torchmhc.distributed.mesh import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = load_config(None, ["model.num_layers=2", "data.batch_size=4", "parallel.dp_shard=1"])
    assert parallel_layout(load_config(None, ["model.num_layers=2", "parallel.dp_shard=1", "train.compile=true",
                                              "train.compile_mode=reduce-overhead"])) is not None  # fmt: skip
    device = init_distributed("cpu")
    try:
        pm = parallelize(cfg.model, ParallelConfig(), build_mesh(ParallelConfig(), "cpu"), seed=3, device=device,
                         batch_size=4, seq_len=cfg.data.seq_len)  # fmt: skip
        model = pm.part
        assert isinstance(model, GPT) and not any(isinstance(m, FSDPModule) for m in model.modules())
        assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
        # the weights of a one-process build from the same seed, and it trains as on one device:
        # the same step gives the same loss and weights
        torch.manual_seed(3)
        twin = build_model(cfg.model)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
        batch = tuple(torch.randint(0, cfg.model.vocab_size, (4, 16)) for _ in range(2))
        stats = parallel_train_step(pm, build_optimizer(model, cfg.optim), batch, lr=1e-3, grad_clip=1.0,
                                    on_nonfinite="stop", step=0)  # fmt: skip
        ref = train_step(twin, build_optimizer(twin, cfg.optim), batch, lr=1e-3, grad_clip=1.0, on_nonfinite="stop",
                         autocast=contextlib.nullcontext(), step=0)  # fmt: skip
        assert stats.loss == pytest.approx(ref.loss, rel=1e-6)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("residual", ["residual", "mhc"])
def test_fsdp_mixed_precision_casts_the_matrices_and_keeps_norms_and_connections_whole_in_fp32(monkeypatch, residual):
    # one device runs the norms and connections with fp32 parameters under bf16 autocast: FSDP's
    # param_dtype must leave them so (they are kept whole, out of the units), and cast the rest
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchmhc.distributed.fsdp import shard_block, shard_root
    from torchmhc.distributed.mesh import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        cfg = load_config(None, ["model.num_layers=1", "model.dim=64", "model.num_heads=2", f"model.residual={residual}"])
        model = build_model(cfg.model)
        mesh = init_device_mesh("cpu", (1,))
        shard_block(model.blocks[0], mesh, param_dtype=torch.bfloat16, reshard_after_forward=True, recompute=False)
        kept = shard_root(model, mesh, param_dtype=torch.bfloat16)
        block = model.blocks[0]
        norms = [block.attn_norm.weight, block.ffn_norm.weight, model.norm.weight]
        connections = [*block.attn_hc.parameters(), *block.ffn_hc.parameters(),
                       *(model.stream_head.parameters() if model.stream_head is not None else ())]  # fmt: skip
        assert {id(p) for p in kept} == {id(p) for p in norms + connections}
        assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in kept)  # whole, not sharded
        seen = {}

        def record(name):
            def hook(module, args):  # the dtype of the module's parameters as its forward sees them
                seen.setdefault(name, next(module.parameters()).dtype)

            return hook

        # (with mHC the FFN's norm runs inside the fused transition, which reads its weight: its
        # module's forward is not called, and the weight is one of the whole fp32 ones above)
        for name in ("attn_norm", "attn"):
            getattr(block, name).register_forward_pre_hook(record(name))
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens).float().sum().backward()
        assert seen["attn_norm"] == torch.float32
        assert seen["attn"] == torch.bfloat16  # mixed precision is on: the matrices are cast
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in norms)
    finally:
        dist.destroy_process_group()


def test_a_fused_optimizer_leaves_out_a_non_finite_step_on_sharded_parameters(monkeypatch):
    # The GPUs' fused AdamW takes the non-finite flag on the device (no host sync before it is
    # queued); FSDP2's parameters are DTensors, the flag a plain tensor: the step must still be left out.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torchmhc.distributed.mesh import free_port
    from torchmhc.train import step_unless_nonfinite

    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 5)
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
        kept = []
        for poison in (0.0, math.nan, 0.0):
            before = [p.full_tensor().clone() for p in layer.parameters()]
            loss = layer(torch.randn(3, 8)).square().mean() + poison
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(layer.parameters()), 1.0)
            values = step_unless_nonfinite(optimizer, loss, norm.full_tensor(), kept.append)
            changed = [not torch.equal(p.full_tensor(), b) for p, b in zip(layer.parameters(), before)]
            assert changed == [math.isfinite(poison)] * 2 and math.isfinite(values[0]) == math.isfinite(poison)
            assert all(p.grad is None for p in layer.parameters())
        assert [float(k) for k in kept] == [1.0, 0.0, 1.0]
        assert [float(s["step"]) for s in optimizer.state.values()] == [2.0, 2.0]  # the left-out step not counted
    finally:
        dist.destroy_process_group()
