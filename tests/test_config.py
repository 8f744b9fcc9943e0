"""Config dataclasses, TOML presets and command-line overrides."""

import pytest

from torchmhc.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
)


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.model.effective_num_streams == 4
    assert cfg.model.effective_ffn_hidden % 32 == 0


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_required_presets_exist():
    assert {"tiny", "small", "stress"} <= set(list_presets())
    assert any(name.startswith("gpu-") for name in list_presets())


def test_overrides_are_parsed_as_toml_values():
    cfg = load_config("tiny", ["train.steps=7", "model.residual=hc", "optim.betas=[0.8, 0.9]",
                               "optim.lr=1", "model.tie_embeddings=false", "name=x"])
    assert cfg.train.steps == 7
    assert cfg.model.residual == "hc"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is False
    assert cfg.name == "x"


def test_residual_uses_one_stream():
    assert load_config(None, ["model.residual=residual"]).model.effective_num_streams == 1


def test_round_trip_through_dict():
    cfg = load_config("tiny", ["model.arch=moe", "compare.variants=['mhc', 'hc']"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_toml_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\ndim = 64\nnum_heads = 2\n[train]\nsteps = 3\nwarmup = 1\n')
    with pytest.raises(ValueError, match="train.warmup"):
        load_config(path)
    path.write_text('[model]\ndim = 64\nnum_heads = 2\n[train]\nsteps = 3\n[optim]\nwarmup_steps = 1\n')
    cfg = load_config(path)
    assert (cfg.name, cfg.model.dim, cfg.train.steps) == ("mine", 64, 3)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.residual=bogus", "model.residual"),
        ("model.num_heads=3", "divisible by model.num_heads"),
        ("model.dim=0", "model.dim"),
        ("model.hc_init=zeros", "model.hc_init"),
        ("model.arch=rnn", "model.arch"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.seq_len=4096", "data.seq_len"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.step_milestones=[0.9, 0.5]", "optim.step_milestones"),
        ("train.steps=0", "train.steps"),
        ("train.device=tpu", "train.device"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("compare.variants=['mhc', 'mhc']", "repeat"),
        ("compare.variants=['gru']", "compare.variants"),
        ("model.colour=1", "model.colour"),
        ("bogus.key=1", "bogus.key"),
        ("steps=3", "top-level"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", [override])


@pytest.mark.parametrize("override", ["model.dim='wide'", "train.steps=2.5", "model.tie_embeddings=1",
                                      "optim.betas=0.9"])
def test_wrong_types_raise_type_error(override):
    with pytest.raises(TypeError, match=override.split("=")[0]):
        load_config("tiny", [override])


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("no-such-preset")


def test_compile_is_off_on_cpu_presets_and_on_for_the_gpu_benchmarks():
    assert RunConfig().train.compile is False
    for preset in ("tiny", "small", "stress"):
        assert load_config(preset).train.compile is False, preset
    for preset in ("gpu-moe-3b", "gpu-dense-1b"):
        assert load_config(preset).train.compile is True, preset
    assert load_config("tiny", ["train.compile=true"]).train.compile is True
    with pytest.raises(TypeError, match="train.compile must be bool"):
        load_config("tiny", ["train.compile=1"])
    # the GPU benchmarks replay compiled blocks as CUDA graphs; an unknown mode is refused by name
    for preset in ("gpu-moe-3b", "gpu-dense-1b"):
        assert load_config(preset).train.compile_mode == "reduce-overhead", preset
    assert RunConfig().train.compile_mode == "default"
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        load_config("tiny", ["train.compile_mode=fast"])
