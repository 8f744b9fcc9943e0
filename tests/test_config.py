"""Config dataclasses, TOML presets and command-line overrides."""

import re

import pytest

from torchmhc.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    find_preset,
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


def test_compile_is_off_on_cpu_presets_and_on_for_the_gpu_presets():
    assert RunConfig().train.compile is False
    for preset in ("tiny", "small", "stress"):
        assert load_config(preset).train.compile is False, preset
    for preset in ("gpu-moe-3b", "gpu-dense-1b", "gpu-small", "gpu-moe", "gpu-stress"):
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


@pytest.mark.parametrize("override", [
    "optim.lr=inf", "optim.lr=nan", "optim.eps=inf", "optim.weight_decay=inf", "optim.grad_clip=inf",
    "optim.betas=[0.9, nan]", "optim.step_gamma=nan", "optim.min_lr_ratio=nan",
    "model.rope_theta=inf",
])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ValueError, match=rf"^{re.escape(override.split('=')[0])} must be "):
        load_config("tiny", [override])
    with pytest.raises(ValueError, match=r"^model.router_bias_rate must be a finite number"):
        load_config("tiny", ["model.arch=moe", "model.router_bias_rate=inf"])


@pytest.mark.parametrize("device", ["cudafoo", "cuda:x", "cuda:-1", "tpu", "cpu0", ""])
def test_malformed_devices_are_refused_at_config_time(device):
    with pytest.raises(ValueError, match=rf"train.device must be .*got {re.escape(repr(device))}"):
        load_config("tiny", [f"train.device='{device}'"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "cpu:0"])
def test_well_formed_devices_are_accepted(device):
    assert load_config("tiny", [f"train.device='{device}'"]).train.device == device


def test_a_config_path_is_never_taken_for_a_preset(tmp_path):
    cfg = tmp_path / "file.cfg"
    with pytest.raises(ValueError, match=r"config file .*file.cfg' does not exist"):
        load_config(cfg)
    with pytest.raises(ValueError, match=r"config file .*file.cfg' does not exist"):
        load_config(str(cfg))
    cfg.write_text("[model\n")
    with pytest.raises(ValueError, match=r"config file .*file.cfg' is not valid TOML"):
        load_config(cfg)
    cfg.write_text("[model]\ndim = 64\nnum_heads = 2\n")
    assert load_config(cfg).model.dim == 64  # any suffix: the content is TOML
    with pytest.raises(ValueError, match=r"config file .* is a directory"):
        load_config(tmp_path)


def test_a_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config file .*latin1.toml' is not UTF-8"):
        load_config(path)


def test_unknown_preset_lists_each_searched_place_once():
    with pytest.raises(ValueError, match="unknown preset 'nope'") as info:
        load_config("nope")
    message = str(info.value)
    assert "tiny" in message
    places = [str(find_preset("tiny").parent)]
    assert all(message.count(p) == 1 for p in places), message


@pytest.mark.parametrize("override, field, value", [
    ("name=2024", "name", "2024"),
    ("name=1_000", "name", "1_000"),
    ("name=true", "name", "true"),
    ("description=3.5", "description", "3.5"),
    ("description=2024-01-01", "description", "2024-01-01"),
    ("name='2024'", "name", "2024"),
    ('name="x y"', "name", "x y"),
])
def test_set_takes_a_bare_number_for_a_text_field_as_typed(override, field, value):
    assert getattr(load_config("tiny", [override]), field) == value


def test_set_coerces_only_text_fields():
    assert load_config("tiny", ["data.path=2024"]).data.path == "2024"
    with pytest.raises(TypeError, match="model.dim must be int"):
        load_config("tiny", ["model.dim=wide"])
    with pytest.raises(TypeError, match="name must be a string"):
        load_config("tiny", ["name=[1, 2]"])
