"""The GPT and MoE models: shapes, causality, hyper-connection wiring, grouped expert products."""

import dataclasses

import pytest
import torch

from torchmhc.config import ModelConfig
from torchmhc.kernels import use_kernels
from torchmhc.kernels._common import interpreting
from torchmhc.layers import HyperConnection, StreamHead
from torchmhc.models import GPT, MoE, build_model, grouped_matmul

SMALL = dict(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=16, num_experts=4, top_k=2)


def _model(residual="mhc", arch="gpt", **kw):
    return build_model(ModelConfig(residual=residual, arch=arch, **{**SMALL, **kw}))


@pytest.mark.parametrize("arch", ["gpt", "moe"])
@pytest.mark.parametrize("residual", ["residual", "hc", "mhc", "mhc-lite"])
def test_forward_backward_shapes(arch, residual):
    model = _model(residual, arch)
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 64) and logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    hcs = model.hyper_connections()
    assert [hc.layer_index for hc in hcs] == [0, 1, 2, 3]
    expected_streams = 1 if residual == "residual" else 4
    assert all(hc.num_streams == expected_streams for hc in hcs)
    assert (model.stream_head is None) == (residual == "residual")
    if residual != "residual":  # every hyper-connection parameter takes part in the loss
        for p in (p for hc in hcs for p in hc.parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("arch", ["gpt", "moe"])
def test_causal(arch):
    model = _model("mhc", arch).eval()
    idx = torch.randint(0, 64, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_variants_share_the_weights_outside_the_connections():
    models = {}
    for residual in ("residual", "hc", "mhc"):
        torch.manual_seed(3)
        models[residual] = _model(residual)
    ref = {k: v for k, v in models["residual"].state_dict().items() if "_hc." not in k}
    for model in models.values():
        state = model.state_dict()
        for key, value in ref.items():
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("arch", ["gpt", "moe"])
def test_place_block_sees_each_block_once_built_and_changes_no_weight(arch):
    """``place_block`` gets each block right after its draws: dropping some (to the meta device)
    leaves every other weight that of a plain build from the same seed, bit for bit."""
    torch.manual_seed(3)
    plain = _model(arch=arch, num_layers=3, tie_embeddings=False).state_dict()
    plain_next_draw = torch.randn(8)
    seen = []

    def place_block(index, block):
        seen.append((index, next(block.parameters()).device.type))
        return block.to("meta") if index != 1 else block

    torch.manual_seed(3)
    model = GPT(ModelConfig(arch=arch, **{**SMALL, "num_layers": 3, "tie_embeddings": False}), place_block=place_block)
    assert seen == [(0, "cpu"), (1, "cpu"), (2, "cpu")]
    for key, value in model.state_dict().items():
        if key.startswith(("blocks.0.", "blocks.2.")):
            assert value.is_meta, key
        else:
            assert torch.equal(value, plain[key]), key
    assert torch.equal(torch.randn(8), plain_next_draw), "the random state after the build is the same too"


def test_tied_and_untied_head():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_hc_init_is_passed_to_every_hyper_connection():
    model = _model(hc_init="onehot")
    assert all(hc.init == "onehot" for hc in model.hyper_connections())
    assert isinstance(model.stream_head, StreamHead)
    assert all(isinstance(hc, HyperConnection) for hc in model.hyper_connections())


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model({"dim": 32})


def _grouped_reference(x, weight, counts):
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[start : start + c] @ weight[e])
        start += c
    return torch.cat(out)


def test_grouped_matmul_matches_per_group_products():
    counts = torch.tensor([3, 0, 5, 1])  # an empty group on purpose
    x = torch.randn(9, 6, requires_grad=True)
    w = torch.randn(4, 6, 7, requires_grad=True)
    out = grouped_matmul(x, w, counts)
    ref = _grouped_reference(x, w, counts)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_moe_matches_a_per_token_reference():
    moe = MoE(8, num_experts=4, num_shared_experts=1, top_k=2, hidden=16, bias_rate=0.01)
    x = torch.randn(2, 5, 8)
    out = moe(x)
    scores = torch.sigmoid(moe.router(x.reshape(-1, 8)))
    ref = moe.shared(x.reshape(-1, 8))
    for t in range(10):
        chosen = torch.topk(scores[t] + moe.router_bias, 2).indices
        gates = scores[t, chosen] / scores[t, chosen].sum()
        for e, g in zip(chosen.tolist(), gates):
            gate, up = (x.reshape(-1, 8)[t] @ moe.w_gate_up[e]).chunk(2)
            ref[t] = ref[t] + g * (torch.nn.functional.silu(gate) * up) @ moe.w_down[e]
    torch.testing.assert_close(out, ref.reshape(2, 5, 8))


def test_moe_bias_balancing_moves_toward_even_load():
    moe = MoE(8, num_experts=4, num_shared_experts=0, top_k=1, hidden=16, bias_rate=0.1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 wins for inputs with a positive first channel
    x = torch.randn(64, 8).abs()
    moe(x)
    load = moe.expert_load.clone()
    assert load[0] == 64
    moe.update_router_bias()
    assert moe.router_bias[0] < 0 and (moe.router_bias[1:] > 0).all()
    assert moe.expert_load.sum() == 0
    moe.eval()
    moe(x)
    assert moe.expert_load.sum() == 0  # evaluation does not count toward balancing
    assert "router_bias" in moe.state_dict() and "expert_load" not in moe.state_dict()


def test_gpt_update_router_bias_reaches_every_moe_layer():
    model = _model(arch="moe", router_bias_rate=0.5)
    model(torch.randint(0, 64, (2, 16)))
    model.update_router_bias()
    biases = [m.router_bias for m in model.modules() if isinstance(m, MoE)]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)
    assert isinstance(model, GPT)


@pytest.mark.parametrize("arch", ["gpt", "moe"])
@pytest.mark.parametrize("residual", ["residual", "mhc"])
def test_recompute_gives_the_same_logits_and_gradients(arch, residual, monkeypatch):
    import torchmhc.models.gpt as gpt
    from torchmhc.recompute import run_sublayers

    calls = []
    monkeypatch.setattr(gpt, "run_sublayers", lambda *a, **k: calls.append(k) or run_sublayers(*a, **k))
    torch.manual_seed(0)
    plain = _model(residual, arch, num_layers=3)
    torch.manual_seed(0)
    recomputed = _model(residual, arch, num_layers=3, recompute=True, recompute_block_length=2)
    recomputed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    outputs = []
    for model in (plain, recomputed):
        logits = model(idx)
        logits.logsumexp(-1).mean().backward()
        outputs.append((logits, {name: p.grad for name, p in model.named_parameters()}))
    assert calls == [{"block_length": 2}]  # only the recompute model took that path
    assert torch.equal(outputs[0][0], outputs[1][0])
    for name, grad in outputs[0][1].items():
        assert torch.equal(grad, outputs[1][1][name]), name


def test_recompute_block_length_is_validated():
    with pytest.raises(ValueError, match="model.recompute_block_length must be >= 0"):
        ModelConfig(recompute_block_length=-1)


def test_moe_router_update_without_load_keeps_the_bias():
    # update_router_bias has no `if load.sum() > 0` (a host sync): sign(mean - load) is 0 then
    moe = MoE(8, num_experts=4, num_shared_experts=0, top_k=1, hidden=16, bias_rate=0.1)
    moe.router_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    moe.update_router_bias()
    assert torch.equal(moe.router_bias, torch.tensor([0.5, -0.5, 0.0, 1.0]))


def test_moe_counts_every_assignment_once():
    moe = MoE(8, num_experts=4, num_shared_experts=1, top_k=2, hidden=16, bias_rate=0.01)
    moe(torch.randn(3, 5, 8))
    assert moe.expert_load.sum() == 3 * 5 * 2


@pytest.mark.parametrize("residual", ["residual", "mhc"])
def test_streams_are_in_the_autocast_dtype(residual):
    # docs/math.md §1: the streams live in the activation dtype (bf16 under autocast), for every variant
    model = _model(residual)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 16)))
    model(torch.randint(0, 64, (2, 16)))
    assert seen == [torch.bfloat16, torch.float32]


def test_models_built_on_another_default_device_put_everything_there():
    with torch.device("meta"):
        model = _model("mhc", "moe")
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}


@pytest.mark.parametrize("residual, mode", [("mhc", "triton"), ("mhc", "reference"), ("hc", "reference"), ("residual", "reference")])
def test_fused_transitions_give_the_same_losses_and_gradients(residual, mode, monkeypatch):
    # model.fuse_transitions runs HyperConnection.post_pre at every transition, inside each block
    # and across blocks: same function (with the kernels, under Triton's interpreter: the fused
    # post-res + coefficients op)
    if mode == "triton" and not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    import torchmhc.layers

    fused_calls = []
    fused_op = torchmhc.layers.kernels.mhc_post_pre
    monkeypatch.setattr(torchmhc.layers.kernels, "mhc_post_pre", lambda *a, **k: fused_calls.append(1) or fused_op(*a, **k))
    cfg = ModelConfig(residual=residual, dim=64, num_layers=2, num_heads=2, max_seq_len=16, fuse_transitions=False)
    torch.manual_seed(0)
    plain = build_model(cfg)
    fused = build_model(dataclasses.replace(cfg, fuse_transitions=True))
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    losses, grads, calls = [], [], []
    with use_kernels(mode):
        for model in (plain, fused):
            fused_calls.clear()
            loss = model(idx).square().mean()
            calls.append(len(fused_calls))
            losses.append(loss)
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert calls == [0, 3 if residual == "mhc" else 0]  # 2 blocks: 4 sub-layers, 3 transitions, mHC only
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_transitions_run_every_connection_inside_a_block(monkeypatch):
    # torch.compile compiles blocks: a connection op run between blocks (the chain's first pre, say)
    # would run eager, its launches from Python leaving the GPU idle
    import torchmhc.layers

    inside, calls = [], []
    for name in ("pre", "post", "post_pre"):
        op = getattr(torchmhc.layers.HyperConnection, name)
        monkeypatch.setattr(torchmhc.layers.HyperConnection, name,
                            lambda self, *a, op=op, name=name, **k: calls.append((name, bool(inside))) or op(self, *a, **k))  # fmt: skip
    cfg = ModelConfig(residual="mhc", dim=64, num_layers=3, num_heads=2, max_seq_len=16, fuse_transitions=True)
    model = build_model(cfg)
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: inside.append(1) or None)
        block.register_forward_hook(lambda *_: inside.pop() and None)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    # 3 blocks: one pre, 5 fused transitions, one post
    assert sorted(calls) == sorted([("pre", True), *[("post_pre", True)] * 5, ("post", True)]), calls


def test_attention_rotates_q_and_k_as_two_separate_rope_calls_would():
    # q and k are rotated in one pass over the fused projection: the values of rotating each head
    from torchmhc.models.gpt import Attention, apply_rope

    cfg = ModelConfig(dim=64, num_heads=4, max_seq_len=16)
    attn = Attention(cfg, out_std=0.02)
    x = torch.randn(2, 11, 64)
    q, k, v = attn.wqkv(x).split(64, dim=-1)
    q, k, v = (t.view(2, 11, 4, 16).transpose(1, 2) for t in (q, k, v))  # [B, h, T, d]
    cos, sin = attn.cos[:11], attn.sin[:11]
    y = torch.nn.functional.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
    expected = attn.wo(y.transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)
