"""The training loop: schedule, exact resume, checkpoints, non-finite losses, metrics."""

import json
import math

import pytest
import torch
from train_helpers import tiny_config

import torchmhc.train as train_module
from torchmhc.config import OptimConfig
from torchmhc.models import build_model
from torchmhc.train import (
    CheckpointError,
    NonFiniteLossError,
    build_optimizer,
    latest_checkpoint,
    learning_rate,
    load_checkpoint,
    train,
)


def test_learning_rate_schedules():
    step = OptimConfig(lr=1.0, warmup_steps=10, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert learning_rate(0, 100, step) == pytest.approx(0.1)
    assert learning_rate(9, 100, step) == pytest.approx(1.0)
    assert learning_rate(49, 100, step) == pytest.approx(1.0)
    assert learning_rate(50, 100, step) == pytest.approx(0.1)
    assert learning_rate(99, 100, step) == pytest.approx(0.01)
    cos = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(0, 100, cos) == pytest.approx(1.0)
    assert learning_rate(100, 100, cos) == pytest.approx(0.1)
    values = [learning_rate(s, 100, cos) for s in range(100)]
    assert values == sorted(values, reverse=True)


def test_hyper_connections_and_norms_are_not_decayed(tmp_path):
    cfg = tiny_config(tmp_path, "model.residual=hc")
    model = build_model(cfg.model)
    decay, no_decay = build_optimizer(model, cfg.optim).param_groups
    hc_params = {id(p) for hc in model.hyper_connections() for p in hc.parameters()}
    assert hc_params and not hc_params & {id(p) for p in decay["params"]}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt", "moe"])
def test_resume_is_bit_identical(tmp_path, arch):
    common = [f"model.arch={arch}", "train.steps=4", "train.eval_interval=0", "optim.grad_clip=0.5"]
    straight = train(tiny_config(tmp_path / "a", *common), progress=False)

    cfg = tiny_config(tmp_path / "b", *common, "train.checkpoint_interval=2")
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(cfg, steps=2)
    resumed = train(cfg, resume=True, progress=False)

    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert straight.summary["val_loss"] == resumed.summary["val_loss"]
    rows = [json.loads(line) for line in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # no duplicates


def _interrupt_after(cfg, *, steps):
    """Run ``cfg`` and stop it like Ctrl-C right after optimizer step ``steps``."""
    original = train_module.train_step
    calls = {"n": 0}

    def step_then_maybe_stop(*args, **kwargs):
        if calls["n"] == steps:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    train_module.train_step = step_then_maybe_stop
    try:
        train(cfg, progress=False)
    finally:
        train_module.train_step = original


def test_checkpoint_round_trip_and_retention(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=3", "train.checkpoint_interval=1", "train.keep_checkpoints=2")
    result = train(cfg, progress=False)
    ckpt = latest_checkpoint(cfg.out_dir)
    assert ckpt.name == "step_000003"
    assert sorted(p.name for p in (cfg.out_dir / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    model = build_model(cfg.model)
    state = load_checkpoint(ckpt, model)
    assert state["step"] == 3 and state["tokens"] == 3 * 2 * 16
    for key, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_missing_and_corrupt_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_checkpoint(tmp_path / "nowhere", build_model(cfg.model))

    train(cfg, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(cfg, resume=True, progress=False)
    ckpt = latest_checkpoint(cfg.out_dir)
    weights = ckpt / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt: model.safetensors"):
        train(tiny_config(tmp_path, "train.steps=3"), resume=True, progress=False)
    weights.unlink()
    with pytest.raises(CheckpointError, match="incomplete: model.safetensors is missing"):
        load_checkpoint(ckpt, build_model(cfg.model))
    (ckpt / "state.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt, build_model(cfg.model))


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    cfg = tiny_config(tmp_path)
    train(cfg, progress=False)
    other = build_model(tiny_config(tmp_path, "model.residual=hc").model)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(latest_checkpoint(cfg.out_dir), other)


def _poison_loss_at(monkeypatch, bad_call):
    """Make the ``bad_call``-th training loss (0-based) NaN."""
    original = train_module.lm_loss
    calls = {"n": 0}

    def loss(model, x, y):
        value = original(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] - 1 == bad_call:
                return value * math.nan
        return value

    monkeypatch.setattr(train_module, "lm_loss", loss)


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.steps=4")
    _poison_loss_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match="step 2") as info:
        train(cfg, progress=False)
    ckpt = info.value.checkpoint
    assert ckpt == latest_checkpoint(cfg.out_dir) and ckpt.name == "step_000002"
    model = build_model(cfg.model)
    load_checkpoint(ckpt, model)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    summary = json.loads((cfg.out_dir / "summary.json").read_text())
    assert summary["stopped"] and summary["steps"] == 2


def test_nonfinite_loss_can_skip_the_step(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.steps=3", "train.on_nonfinite=skip")
    _poison_loss_at(monkeypatch, 1)
    result = train(cfg, progress=False)
    assert [r["skipped"] for r in result.history] == [False, True, False]
    assert result.summary["skipped_steps"] == 1
    assert math.isfinite(result.summary["val_loss"])
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())


def test_metrics_and_summary_files(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=3", "train.eval_interval=2")
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(train_rows[0])
    summary = json.loads((cfg.out_dir / "summary.json").read_text())
    assert summary["val_loss"] == rows[-1]["val_loss"] == result.summary["val_loss"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["peak_memory_bytes"] > 0 and summary["stopped"] is None
    assert json.loads((cfg.out_dir / "config.json").read_text())["train"]["steps"] == 3


@pytest.mark.parametrize("recompute", [False, True])
def test_apply_compile_gives_the_eager_losses_and_keeps_parameter_names(tmp_path, recompute):
    from torchmhc.train import apply_compile, autocast_context, train_step

    cfg = tiny_config(tmp_path, "model.residual=mhc", f"model.recompute={str(recompute).lower()}", "model.num_layers=2")
    batch = (torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16)))
    losses, names = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        optimizer = build_optimizer(model, cfg.optim)
        if compiled:
            apply_compile(model, backend="aot_eager")
        names.append(list(model.state_dict()))
        losses.append([
            train_step(model, optimizer, batch, lr=1e-3, grad_clip=1.0, on_nonfinite="stop",
                       autocast=autocast_context(torch.device("cpu"), "fp32"), step=i).loss
            for i in range(2)
        ])
    assert names[0] == names[1]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1][1] < losses[1][0]  # the compiled model trains


def test_a_checkpoint_keeps_the_loading_optimizers_implementation(tmp_path):
    # a GPU run saves fused=True in its param groups; loaded on the CPU the plain loop must stay
    from torchmhc.train import save_checkpoint

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model)
    saving = build_optimizer(model, cfg.optim)
    for group in saving.param_groups:
        group["foreach"], group["lr"] = True, 0.123
    ckpt = save_checkpoint(tmp_path / "run", model, saving, {"step": 1})
    loading = build_optimizer(model, cfg.optim)
    load_checkpoint(ckpt, model, loading)
    assert all(g["foreach"] is False and g["lr"] == 0.123 for g in loading.param_groups)


# -- resume: what may change, what may not ------------------------------------------------------


def test_a_failed_resume_leaves_the_run_untouched(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2")
    train(cfg, progress=False)
    before = {f: (cfg.out_dir / f).read_bytes() for f in ("config.json", "metrics.jsonl", "summary.json")}
    changed = tiny_config(tmp_path, "train.steps=4", "model.dim=64")
    with pytest.raises(CheckpointError, match=r"model.dim: 32 in the checkpoint, 64 now"):
        train(changed, resume=True, progress=False)
    assert {f: (cfg.out_dir / f).read_bytes() for f in before} == before
    train(tiny_config(tmp_path, "train.steps=3"), resume=True, progress=False)  # the run still resumes


def test_resume_may_change_how_the_model_is_run_but_not_what_it_is(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2", "model.residual=mhc"), progress=False)
    result = train(tiny_config(tmp_path, "train.steps=3", "model.recompute=true"), resume=True, progress=False)
    assert result.summary["steps"] == 3
    with pytest.raises(CheckpointError, match=r"model.residual: 'mhc' in the checkpoint, 'unconstrained' now"):
        # same parameter shapes, another constraint: loading would succeed and mean something else
        train(tiny_config(tmp_path, "train.steps=4", "model.residual=unconstrained"), resume=True, progress=False)


def test_resume_applies_the_new_optimizer_settings(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2"), progress=False)
    new = ["train.steps=3", "optim.weight_decay=0.05", "optim.betas=[0.8, 0.9]", "optim.eps=1e-7"]
    cfg = tiny_config(tmp_path, *new)
    train(cfg, resume=True, progress=False)
    groups = json.loads((latest_checkpoint(cfg.out_dir) / "state.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["betas"] == [0.8, 0.9] and g["eps"] == 1e-7 for g in groups)
    recorded = json.loads((cfg.out_dir / "config.json").read_text())["optim"]
    assert (recorded["weight_decay"], recorded["betas"], recorded["eps"]) == (0.05, [0.8, 0.9], 1e-7)


def test_a_cut_short_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2")
    train(cfg, progress=False)
    metrics = cfg.out_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match=rf"{metrics}.*line 6"):
        train(tiny_config(tmp_path, "train.steps=3"), resume=True, progress=False)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


def test_a_corrupt_metrics_line_is_an_error_naming_file_and_line(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2")
    train(cfg, progress=False)
    metrics = cfg.out_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    metrics.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{metrics}, line 2"):
        train(tiny_config(tmp_path, "train.steps=3"), resume=True, progress=False)


def test_an_unwritable_out_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path, f"train.out_dir='{blocker}/runs'")
    with pytest.raises(ValueError, match=rf"train.out_dir '{blocker}/runs' cannot be written"):
        train(cfg, progress=False)


# -- checkpoint files ---------------------------------------------------------------------------


def _saved_run(tmp_path):
    cfg = tiny_config(tmp_path)
    train(cfg, progress=False)
    return cfg, latest_checkpoint(cfg.out_dir)


def _edit_state(ckpt, edit):
    meta = json.loads((ckpt / "state.json").read_text())
    edit(meta)
    (ckpt / "state.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("files", [{}, {"model.safetensors"}, {"optimizer.safetensors"}])
def test_every_weight_file_must_have_a_hash(tmp_path, files):
    cfg, ckpt = _saved_run(tmp_path)
    _edit_state(ckpt, lambda meta: meta.update(files={k: v for k, v in meta["files"].items() if k in files}))
    weights = ckpt / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF  # corrupt the weights too: without a hash they would load
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"state.json records no SHA-256 for (model|optimizer).safetensors"):
        load_checkpoint(ckpt, build_model(cfg.model))


@pytest.mark.parametrize("key", ["format", "files", "param_groups", "step"])
def test_a_state_json_missing_a_key_names_it(tmp_path, key):
    cfg, ckpt = _saved_run(tmp_path)
    _edit_state(ckpt, lambda meta: meta.pop(key))
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'state.json'}.*{key!r}"):
        load_checkpoint(ckpt, build_model(cfg.model))


@pytest.mark.parametrize("key", ["tokens", "train_time_s", "skipped_steps"])
def test_resume_names_a_missing_training_state_key(tmp_path, key):
    cfg, ckpt = _saved_run(tmp_path)
    _edit_state(ckpt, lambda meta: meta.pop(key))
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'state.json'}.*{key!r}"):
        train(tiny_config(tmp_path, "train.steps=3"), resume=True, progress=False)


class _Crash(BaseException):
    """A kill: nothing after it runs (BaseException, so no ``except Exception`` catches it)."""


def _crash_at(monkeypatch, call: int) -> dict:
    """Make the ``call``-th file-system rename, link or tree removal (0-based) raise _Crash."""
    import os
    import shutil

    count = {"n": 0}
    for module, name in ((os, "replace"), (os, "rename"), (os, "link"), (shutil, "rmtree")):
        original = getattr(module, name)

        def wrapped(*args, _original=original, **kwargs):
            count["n"] += 1
            if count["n"] - 1 == call:
                raise _Crash
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)
    return count


@pytest.mark.parametrize("latest_names_the_step", [True, False])
def test_resaving_a_step_leaves_a_loadable_latest_checkpoint_at_every_instant(tmp_path, monkeypatch, latest_names_the_step):
    from torchmhc.train import save_checkpoint

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    run = tmp_path / "run"
    old = _weights(model)
    save_checkpoint(run, model, optimizer, {"step": 1}, keep=3)
    if not latest_names_the_step:
        save_checkpoint(run, model, optimizer, {"step": 2}, keep=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    new = _weights(model)
    call = 0
    while True:
        with monkeypatch.context() as patch:
            count = _crash_at(patch, call)
            try:
                save_checkpoint(run, model, optimizer, {"step": 1}, keep=3)
                crashed = False
            except _Crash:
                crashed = True
        loaded = build_model(cfg.model)
        load_checkpoint(latest_checkpoint(run), loaded)  # must never fail
        got = _weights(loaded)
        assert all(torch.equal(got[k], old[k]) for k in got) or all(torch.equal(got[k], new[k]) for k in got)
        step_1 = build_model(cfg.model)
        if crashed:
            # what is left is cleaned up by the next save, which succeeds
            save_checkpoint(run, model, optimizer, {"step": 1}, keep=3)
        load_checkpoint(run / "checkpoints" / "step_000001", step_1)
        assert all(torch.equal(v, new[k]) for k, v in _weights(step_1).items())
        assert latest_checkpoint(run).name == "step_000001"
        assert not list((run / "checkpoints").glob(".step_*")), "temporary directories left behind"
        if not crashed:
            break
        call += 1
    assert call == count["n"] >= 3  # every rename, link and removal of the re-save was a crash point


def test_orphaned_temporary_directories_are_removed_by_the_next_save(tmp_path):
    from torchmhc.train import save_checkpoint

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    root = tmp_path / "run" / "checkpoints"
    for name in (".step_000005.tmp12345", ".step_000003.tmpabc", ".step_000001.prev99"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path / "run", model, optimizer, {"step": 4})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004"]


# -- non-finite weights are never a "good" checkpoint -------------------------------------------


def _poison_weights_at(monkeypatch, bad_call):
    """Make the ``bad_call``-th optimizer step (0-based) leave NaN in the weights (as an infinite lr would)."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] - 1 == bad_call:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_save_checkpoint_refuses_non_finite_tensors(tmp_path):
    from torchmhc.train import save_checkpoint

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    with torch.no_grad():
        model.blocks[0].attn.wqkv.weight[0, 0] = math.inf
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.wqkv.weight"):
        save_checkpoint(tmp_path / "run", model, optimizer, {"step": 1})
    assert latest_checkpoint(tmp_path / "run") is None


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_weights_that_turn_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, on_nonfinite):
    cfg = tiny_config(tmp_path, "train.steps=5", "train.checkpoint_interval=2", f"train.on_nonfinite={on_nonfinite}")
    _poison_weights_at(monkeypatch, 2)  # the third step's update makes the weights NaN
    with pytest.raises(NonFiniteLossError, match="step 3") as info:
        train(cfg, progress=False)
    ckpt = info.value.checkpoint
    assert ckpt == latest_checkpoint(cfg.out_dir) and ckpt.name == "step_000002"
    assert f"Last good checkpoint: {ckpt}" in str(info.value)
    model = build_model(cfg.model)
    load_checkpoint(ckpt, model)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_weights_non_finite_after_the_last_step_are_not_saved(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.steps=2", "train.on_nonfinite=skip")
    _poison_weights_at(monkeypatch, 1)
    with pytest.raises(NonFiniteLossError, match="not finite") as info:
        train(cfg, progress=False)
    assert info.value.checkpoint is None and latest_checkpoint(cfg.out_dir) is None
    assert "No checkpoint of finite weights" in str(info.value)


def _moe_step_setup(tmp_path, fused):
    from torchmhc.train import autocast_context

    cfg = tiny_config(tmp_path, "model.arch=moe", "model.residual=mhc", "model.router_bias_rate=0.1")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    # The fused AdamW also runs on the CPU: its step is the one the GPUs take.
    plain = {} if fused else {"foreach": False}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, **plain)
    batches = [(torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))) for _ in range(3)]
    kw = dict(lr=1e-2, grad_clip=1.0, on_nonfinite="skip", autocast=autocast_context(torch.device("cpu"), "fp32"))
    return model, optimizer, batches, kw


def _state(model, optimizer):
    tensors = {name: t.clone() for name, t in model.state_dict().items()}
    for i, entry in enumerate(optimizer.state.values()):
        tensors.update({f"opt{i}.{k}": v.clone() for k, v in entry.items()})
    return tensors


@pytest.mark.parametrize("fused", [False, True])
def test_a_left_out_step_changes_no_weight_no_optimizer_state_and_no_router_bias(tmp_path, monkeypatch, fused):
    from torchmhc.models.moe import MoE
    from torchmhc.train import train_step

    model, optimizer, batches, kw = _moe_step_setup(tmp_path, fused)
    train_step(model, optimizer, batches[0], step=0, **kw)
    before = _state(model, optimizer)
    assert any(m.router_bias.abs().sum() > 0 for m in model.modules() if isinstance(m, MoE))
    _poison_loss_at(monkeypatch, 0)
    stats = train_step(model, optimizer, batches[1], step=1, **kw)
    monkeypatch.undo()
    assert stats.skipped and math.isnan(stats.loss)
    after = _state(model, optimizer)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(p.grad is None for p in model.parameters())
    assert all(m.expert_load.sum() == 0 for m in model.modules() if isinstance(m, MoE))  # loads discarded
    # The next step is the one a run without the left-out step takes (the step count included).
    train_step(model, optimizer, batches[2], step=2, **kw)
    reference, ref_optimizer, _, _ = _moe_step_setup(tmp_path, fused)
    for i in (0, 2):
        train_step(reference, ref_optimizer, batches[i], step=i, **kw)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("fused", [False, True])
def test_a_fused_optimizer_is_queued_before_the_host_waits_for_the_loss(tmp_path, monkeypatch, fused):
    from torchmhc.train import train_step

    model, optimizer, batches, kw = _moe_step_setup(tmp_path, fused)
    events = []
    step, tolist = optimizer.step, torch.Tensor.tolist
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: events.append("step") or step(*a, **k))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: events.append("read") or tolist(t))
    train_step(model, optimizer, batches[0], step=0, **kw)
    # fused: the device decides whether the step applies, the host reads after queueing it
    assert events == (["step", "read"] if fused else ["read", "step"])
