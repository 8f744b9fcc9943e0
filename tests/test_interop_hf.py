"""Hyper-connections in transformers causal LMs (torchmhc.interop.hf), and DeepSeek-V4 parity with
transformers' own modules. Tiny models built from configs with random weights: nothing is downloaded."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when transformers is imported: never reach for the Hub
transformers = pytest.importorskip("transformers")

import torchmhc as mhc  # noqa: E402
from torchmhc.interop import export_deepseek_v4_state, load_deepseek_v4_state  # noqa: E402
from torchmhc.interop.hf import (  # noqa: E402
    CONFIG_KEY,
    add_hyper_connections,
    from_pretrained,
    hyper_connection_parameters,
)
from torchmhc.residuals import residual_kinds  # noqa: E402

VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0),
}


def build(family: str, **config) -> torch.nn.Module:
    cfg = CONFIGS[family]()
    for key, value in config.items():
        setattr(cfg, key, value)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def converted_copy(model, *args, **kwargs):
    """``model`` unchanged and a converted deep copy (the config is copied with it)."""
    return add_hyper_connections(copy.deepcopy(model), *args, **kwargs)


def batch(rows: int = 3, length: int = 9):
    """Token ids [rows, length] and an attention mask with left padding in the first two rows."""
    ids = torch.randint(3, VOCAB, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids, mask


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def decode_with_cache(model, ids, mask, prefix: int) -> torch.Tensor:
    """Logits [B, T, V] of a prefill of ``prefix`` tokens then one token at a time through the KV cache."""
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, 1)


# -- function preservation --------------------------------------------------------------------


@pytest.mark.parametrize("family", list(CONFIGS))
def test_conversion_preserves_logits_with_padding_and_kv_cache(family):
    model = build(family)
    converted = converted_copy(model, 4, "mhc")
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits  # [B, T, V]
        got = converted(ids, attention_mask=mask).logits
        assert relative_error(got[real], expected[real]) <= 1e-5
        assert relative_error(converted(ids).logits, model(ids).logits) <= 1e-5  # no mask
    cached = decode_with_cache(converted, ids, mask, prefix=4)
    assert relative_error(cached[real], expected[real]) <= 1e-5
    layers = converted.model.layers if family != "gpt2" else converted.transformer.h
    assert all(type(layer).__name__.startswith("HyperConnected") for layer in layers)


@pytest.mark.parametrize("residual", residual_kinds())
@pytest.mark.parametrize("n", [1, 3, 4])
def test_every_residual_kind_and_stream_count_starts_where_the_model_was(residual, n):
    if residual == "mhc-lite" and n > 5:
        pytest.skip("mHC-lite needs n <= 5")
    model = build("llama")
    converted = converted_copy(model, n, residual)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = converted(ids, attention_mask=mask).logits
    assert relative_error(got[mask.bool()], expected[mask.bool()]) <= 1e-5


def test_in_float64_the_start_is_exact_up_to_sinkhorns_eps():
    model = build("llama").double()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        exact = converted_copy(model, 4, "mhc", eps=0.0)(ids, attention_mask=mask).logits
        v4 = converted_copy(model, 4, "mhc")(ids, attention_mask=mask).logits
    real = mask.bool()
    assert exact.dtype == torch.float64
    assert relative_error(exact[real], expected[real]) <= 1e-12
    # DeepSeek's eps = 1e-6: each Sinkhorn row sums to ρ = 1 - O(eps); H_post = ρ^(l+1) makes the
    # streams a uniform scale of the original state, which the norms divide out but for their own
    # epsilon (measured 1.2e-7 here)
    assert 1e-12 < relative_error(v4[real], expected[real]) <= 5e-7


def test_a_deep_model_starts_where_it_was_with_deepseeks_eps():
    # 32 layers (64 sub-layers) in fp32: without the ρ^(l+1) post weights the logits would drift
    # by ~2e-5 (each sub-layer keeps ρ·h of the carried state), with them they are within 2e-6
    model = build("llama", num_hidden_layers=32)
    ids, mask = batch()
    real = mask.bool()
    converted = converted_copy(model, 4, "mhc")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[real]
        assert relative_error(converted(ids, attention_mask=mask).logits[real], expected) <= 2e-6
        for _, p in hyper_connection_parameters(converted):  # H_post = 1 instead: the drift is back
            if p.shape == (4 * 4 + 2 * 4,):
                p[4:8] = 0.0
        assert relative_error(converted(ids, attention_mask=mask).logits[real], expected) > 5e-6


def test_generate_gives_the_same_tokens_before_training():
    for family in CONFIGS:
        model = build(family)
        converted = converted_copy(model, 4, "mhc")
        ids, mask = batch()
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = model.generate(ids, **kwargs)
        got = converted.generate(ids, **kwargs)
        assert got.shape == (3, 15) and torch.equal(got, expected), family


def test_bf16_model_converts_and_keeps_fp32_coefficients():
    model = build("qwen2").to(torch.bfloat16)
    converted = converted_copy(model, 4, "mhc")
    assert {p.dtype for _, p in hyper_connection_parameters(converted)} == {torch.float32}
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits.float()
        got = converted(ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1.6e-2, atol=1e-2)


def test_outputs_pass_through_hidden_states_and_attentions():
    model = build("llama", _attn_implementation="eager")
    converted = converted_copy(model, 4, "mhc")
    ids, _ = batch()
    with torch.no_grad():
        out = converted(ids, output_hidden_states=True, output_attentions=True)
        ref = model(ids, output_hidden_states=True, output_attentions=True)
    # the embedding, the flattened streams [B, T, n*C] between layers, the final normed state
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, 9, 32), (3, 9, 128), (3, 9, 32)]
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # layer 0 reads the same input; layer 1 too at the start


# -- training -----------------------------------------------------------------------------------


def test_training_changes_the_loss_and_only_the_new_parameters_with_freeze_base():
    model = add_hyper_connections(build("mistral"), 4, "mhc", freeze_base=True).train()
    new = dict(hyper_connection_parameters(model))
    assert len(new) == 2 * 2 * 3 + 3  # fn, base, scale of 2 connections per layer, and the head
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(new)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch(4, 12)
    losses = []
    for _ in range(4):
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(new)


def stream_spread_after_one_step(symmetric: bool) -> float:
    """Largest difference between streams after layer 0 (relative), after one AdamW step."""
    model = add_hyper_connections(build("llama"), 4, "mhc").train()
    if symmetric:  # every sub-layer reads every stream alike: nothing tells the streams apart
        with torch.no_grad():
            for layer in model.model.layers:
                for hc in (layer.hc_attn, layer.hc_ffn):
                    hc.base[:4] = torch.logit(torch.tensor(0.25 - hc.eps, dtype=torch.float64))
    ids, mask = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        streams = model(ids, output_hidden_states=True).hidden_states[1].unflatten(-1, (4, 32))  # [B, T, n, C]
    return float((streams - streams[..., :1, :]).abs().max() / streams.abs().max())


def test_gradients_reach_the_new_parameters_and_the_streams_become_different():
    model = add_hyper_connections(build("llama"), 4, "mhc").train()
    ids, mask = batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for name, p in hyper_connection_parameters(model):
        if name.endswith(".scale"):  # ∂L/∂α = ∂L/∂h̃ · m, and m = fn·x̂ = 0 at the start
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    # the streams start as copies; the asymmetric start makes them differ after one step, where a
    # start with the same parameters for every stream would keep them copies (to rounding)
    assert stream_spread_after_one_step(symmetric=False) > 1e-3
    assert stream_spread_after_one_step(symmetric=True) < 1e-5


def test_gradient_checkpointing_recomputes_the_layers_with_the_same_gradients():
    model = add_hyper_connections(build("qwen3"), 4, "mhc").train()
    ids, mask = batch()
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        calls.clear()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert len(calls) == 1
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert len(calls) == 2  # forward, and the replay in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# -- save and reload ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_reload_gives_identical_logits(family, tmp_path):
    model = add_hyper_connections(build(family, tie_word_embeddings=family == "gpt2"), 3, "mhc", alpha_init=0.05)
    with torch.no_grad():  # weights a conversion would not give
        for _, p in hyper_connection_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert saved == {"format": 1, "n": 3, "residual": "mhc", "options": {"alpha_init": 0.05}}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # safetensors only

    reloaded = from_pretrained(tmp_path, freeze_base=True).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {n for n, _ in hyper_connection_parameters(reloaded)}


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    from torchmhc.interop.hf import save_pretrained

    model = add_hyper_connections(build("llama"), 2, "mhc")
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        for _, p in hyper_connection_parameters(model):
            p.add_(1.0)

    def dies_midway(self, directory, **kwargs):  # writes part of a save, then the process "dies"
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(type(model), "save_pretrained", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the partial save is gone
    with torch.no_grad():  # and the last complete one loads
        assert torch.equal(from_pretrained(tmp_path / "ckpt")(ids, attention_mask=mask).logits, before)
    save_pretrained(model, tmp_path / "ckpt")  # a complete save replaces it
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "ckpt")(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask).logits)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_reload_refuses_what_it_cannot_rebuild_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    plain = build("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not saved from a model converted"):
        from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a save_pretrained directory"):
        from_pretrained(tmp_path / "nowhere")

    add_hyper_connections(plain, 4, "mhc").save_pretrained(tmp_path / "cut")
    weights = load_file(tmp_path / "cut" / "model.safetensors")
    del weights["model.layers.1.hc_head.base"]
    save_file(weights, tmp_path / "cut" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hc_head\.base"):
        from_pretrained(tmp_path / "cut")


def test_conversion_errors_name_the_problem():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        add_hyper_connections(torch.nn.Linear(2, 2))
    opt = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gpt2.*'opt'"):
        add_hyper_connections(opt)
    model = build("llama")
    with pytest.raises(TypeError, match="unknown option.*'init'"):
        add_hyper_connections(model, init="uniform")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        add_hyper_connections(model, n=0)
    with pytest.raises(ValueError, match="residual must be one of"):
        add_hyper_connections(model, residual="nope")
    assert getattr(model.config, CONFIG_KEY, None) is None  # nothing was changed by the failures
    add_hyper_connections(model)
    with pytest.raises(ValueError, match="already has hyper-connections"):
        add_hyper_connections(model)
    cross = build("gpt2", add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention"):
        add_hyper_connections(cross)


# -- DeepSeek-V4: our modules with the weights of transformers' DeepseekV4 ---------------------


def tiny_v4():
    cfg = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4,
        sliding_window=8, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
        max_position_embeddings=64, num_nextn_predict_layers=0,
    )  # fmt: skip
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():  # hyper-connection weights far from V4's init, so that every term matters
        for name, p in model.named_parameters():
            if "attn_hc" in name or "ffn_hc" in name or "hc_head" in name:
                p.copy_(torch.randn_like(p) * (0.5 if name.endswith("fn") else 1.0))
    return model


def test_deepseek_v4_weights_in_our_modules_match_transformers_modules():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    model = tiny_v4()
    cfg = model.config
    n, c = cfg.hc_mult, cfg.hidden_size
    options = dict(iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps)
    attn = [mhc.HyperConnection(c, n, "mhc", layer_index=2 * i, **options) for i in range(cfg.num_hidden_layers)]
    ffn = [mhc.HyperConnection(c, n, "mhc", layer_index=2 * i + 1, **options) for i in range(cfg.num_hidden_layers)]
    head = mhc.StreamHead(c, n, eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps)
    state = model.state_dict()
    load_deepseek_v4_state(state, attn=attn, ffn=ffn, head=head, prefix="model.", names="transformers")
    exported = export_deepseek_v4_state(attn=attn, ffn=ffn, head=head, prefix="model.", names="transformers")
    assert exported.keys() == {k for k in state if "_hc." in k or "hc_head." in k}
    assert all(torch.equal(exported[k], state[k]) for k in exported)

    x = torch.randn(2, 5, n, c) * 3  # [B, T, n, C]
    f_out = torch.randn(2, 5, c)
    for i, layer in enumerate(model.model.layers):
        for theirs, ours in ((layer.attn_hc, attn[i]), (layer.ffn_hc, ffn[i])):
            assert isinstance(theirs, DeepseekV4HyperConnection)
            post, comb, collapsed = theirs(x)
            layer_input, ctx = ours.pre(x)
            torch.testing.assert_close(layer_input, collapsed, rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(ctx.h_post, post, rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(ctx.h_res, comb.transpose(-1, -2), rtol=1e-5, atol=2e-5)  # comb[j, k] = H_res[k, j]
            # the update DeepseekV4DecoderLayer applies after its branch
            expected = post.unsqueeze(-1) * f_out.unsqueeze(-2) + comb.transpose(-1, -2) @ x
            torch.testing.assert_close(ours.post(ctx, f_out), expected, rtol=1e-5, atol=2e-5)
    assert isinstance(model.model.hc_head, DeepseekV4HyperHead)
    torch.testing.assert_close(head(x), model.model.hc_head(x), rtol=1e-5, atol=2e-5)


def test_deepseek_v4_model_with_our_modules_in_place_of_its_own_gives_its_logits():
    model = tiny_v4()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits

    class Ours(torch.nn.Module):
        """Our HyperConnection behind the interface of DeepseekV4HyperConnection: (post, comb, collapsed)."""

        def __init__(self, hc):
            super().__init__()
            self.hc = hc

        def forward(self, x):
            layer_input, ctx = self.hc.pre(x)
            return ctx.h_post, ctx.h_res.transpose(-1, -2), layer_input

    n, c = cfg.hc_mult, cfg.hidden_size
    attn = [mhc.HyperConnection(c, n, "mhc") for _ in model.model.layers]
    ffn = [mhc.HyperConnection(c, n, "mhc") for _ in model.model.layers]
    head = mhc.StreamHead(c, n)
    load_deepseek_v4_state(model.state_dict(), attn=attn, ffn=ffn, head=head, prefix="model.", names="transformers")
    for layer, a, f in zip(model.model.layers, attn, ffn):
        layer.attn_hc, layer.ffn_hc = Ours(a), Ours(f)
    model.model.hc_head = head
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## mHC for Hugging Face models") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    build("llama").save_pretrained(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace("path/to/llama", str(tmp_path / "llama")), scope)
    assert type(scope["model"].model.layers[0]).__name__ == "HyperConnectedLlamaDecoderLayer"
    assert (tmp_path / "llama-mhc" / "model.safetensors").is_file()


# -- torchmhc compare with a converted Llama as its subject ------------------------------------


def test_compare_preset_hf_llama_trains_residual_and_upcycled_mhc(tmp_path):
    from train_helpers import tiny_config

    from torchmhc.config import load_config
    from torchmhc.models import HFLlama, build_model
    from torchmhc.report import run_compare

    preset = load_config("hf-llama")
    assert preset.model.arch == "hf-llama" and preset.compare.variants == ("residual", "mhc")
    small = tiny_config(tmp_path, "model.arch=hf-llama", "compare.variants=['residual', 'mhc']")
    index = run_compare(small, progress=False)
    data = json.loads((index.parent / "data.json").read_text())
    assert data["variants"]["residual"]["analysis"] is None
    analysis = data["variants"]["mhc"]["analysis"]
    assert len(analysis["single_forward"]) == 2 and analysis["max_composite_gain"] < 2
    # same Llama, same start: the upcycled model's first validation loss is the plain one's
    first = [data["variants"][v]["evals"][0] for v in ("residual", "mhc")]
    assert first[0]["step"] == first[1]["step"] == 0
    assert first[1]["val_loss"] == pytest.approx(first[0]["val_loss"], rel=1e-5)
    assert all(data["variants"][v]["summary"]["steps"] == 2 for v in ("residual", "mhc"))
    assert "<h1>Residual vs mHC — preset" in index.read_text()  # the title names the two variants compared

    torch.manual_seed(0)
    plain = build_model(small.model.__class__(**{**vars(small.model), "residual": "residual"}))
    torch.manual_seed(0)
    upcycled = build_model(small.model)
    assert isinstance(upcycled, HFLlama) and upcycled.num_streams == 4 and plain.num_streams == 1
    assert len(upcycled.hyper_connections()) == 2 and not plain.hyper_connections()
    base = {k: v for k, v in upcycled.state_dict().items() if ".hc_" not in k}
    assert base.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in base.items())  # the same Llama weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hc_init=uniform"], "model.hc_init must be ''"),
        (["model.recompute=true"], "model.recompute is not supported"),
        (["train.compile=true"], "train.compile is not supported"),
    ],
)
def test_hf_llama_config_refuses_what_does_not_apply(overrides, message):
    from torchmhc.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config("hf-llama", overrides)


def test_hf_llama_is_not_laid_out_over_processes():
    from torchmhc.config import load_config
    from torchmhc.train import parallel_layout

    with pytest.raises(ValueError, match="trains in one process"):
        parallel_layout(load_config("hf-llama", ["parallel.dp_shard=2"]))
