"""DeepSeek-V4 weights in torchmhc modules give V4's numbers.

The V4 reference below is written from docs/math.md §4–§7 in V4's own conventions (comb orientation,
fp32 mixes, the ``hc_pre`` / ``hc_post`` / ``hc_head`` split); it does not call torchmhc.
"""

import pytest
import torch

import torchmhc as mhc
from torchmhc.interop import export_deepseek_v4_state, load_deepseek_v4_state

N, C, BLOCKS, EPS = 4, 16, 2, 1e-6


def v4_mixes(x, fn):
    flat = x.flatten(-2).float()
    return (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + EPS)


def v4_hc_pre(x, fn, scale, base, iters=20):
    mixes = v4_mixes(x, fn)
    pre = torch.sigmoid(mixes[..., :N] * scale[0] + base[:N]) + EPS
    post = 2 * torch.sigmoid(mixes[..., N : 2 * N] * scale[1] + base[N : 2 * N])
    comb = (mixes[..., 2 * N :] * scale[2] + base[2 * N :]).unflatten(-1, (N, N))
    comb = torch.softmax(comb, -1) + EPS
    comb = comb / (comb.sum(-2, keepdim=True) + EPS)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + EPS)
        comb = comb / (comb.sum(-2, keepdim=True) + EPS)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return y.to(x.dtype), post, comb


def v4_hc_post(f_out, residual, post, comb):
    # out[k] = post[k]·F + Σ_j comb[j, k]·residual[j]
    y = post.unsqueeze(-1) * f_out.float().unsqueeze(-2) + (comb.unsqueeze(-1) * residual.float().unsqueeze(-2)).sum(-3)
    return y.to(residual.dtype)


def v4_hc_head(x, fn, scale, base):
    weights = torch.sigmoid(v4_mixes(x, fn) * scale + base) + EPS
    return (weights.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)


def random_v4_state():
    state = {}
    for i in range(BLOCKS):
        for kind in ("attn", "ffn"):
            state[f"layers.{i}.hc_{kind}_fn"] = torch.randn(N * N + 2 * N, N * C) * 0.1
            state[f"layers.{i}.hc_{kind}_base"] = torch.randn(N * N + 2 * N)
            state[f"layers.{i}.hc_{kind}_scale"] = torch.rand(3) + 0.5
    state["hc_head_fn"] = torch.randn(N, N * C) * 0.1
    state["hc_head_base"] = torch.randn(N)
    state["hc_head_scale"] = torch.rand(1)
    state["layers.0.attn.wq.weight"] = torch.randn(3, 3)  # unrelated keys are ignored
    return state


def build_modules():
    attn = [mhc.HyperConnection(C, N, "mhc", layer_index=2 * i) for i in range(BLOCKS)]
    ffn = [mhc.HyperConnection(C, N, "mhc", layer_index=2 * i + 1) for i in range(BLOCKS)]
    return attn, ffn, mhc.StreamHead(C, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_v4_weights_reproduce_v4_forward(dtype):
    state = random_v4_state()
    attn, ffn, head = build_modules()
    load_deepseek_v4_state(state, attn=attn, ffn=ffn, head=head)
    sublayer = torch.nn.Linear(C, C).to(dtype)

    x_ours = x_v4 = mhc.expand_streams(torch.randn(3, 5, C).to(dtype), N)
    for i in range(BLOCKS):
        for kind, module in (("attn", attn[i]), ("ffn", ffn[i])):
            x_ours = module(x_ours, sublayer)
            keys = [f"layers.{i}.hc_{kind}_{p}" for p in ("fn", "scale", "base")]
            y, post, comb = v4_hc_pre(x_v4, *(state[k] for k in keys))
            x_v4 = v4_hc_post(sublayer(y), x_v4, post, comb)
    torch.testing.assert_close(x_ours, x_v4, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)
    out_ours = head(x_ours)
    out_v4 = v4_hc_head(x_ours, state["hc_head_fn"], state["hc_head_scale"], state["hc_head_base"])
    torch.testing.assert_close(out_ours, out_v4)


def test_export_round_trips_and_uses_v4_names():
    state = random_v4_state()
    attn, ffn, head = build_modules()
    load_deepseek_v4_state(state, attn=attn, ffn=ffn, head=head, prefix="")
    exported = export_deepseek_v4_state(attn=attn, ffn=ffn, head=head, prefix="mtp.0.")
    assert len(exported) == BLOCKS * 6 + 3
    for key, value in exported.items():
        assert torch.equal(value, state[key.removeprefix("mtp.0.")])


def test_missing_and_mismatched_tensors_are_clear_errors():
    attn, ffn, head = build_modules()
    state = random_v4_state()
    del state["layers.1.hc_ffn_scale"]
    with pytest.raises(KeyError, match="layers.1.hc_ffn_scale"):
        load_deepseek_v4_state(state, attn=attn, ffn=ffn, head=head)
    state = random_v4_state()
    state["layers.0.hc_attn_fn"] = torch.randn(24, 60)
    with pytest.raises(ValueError, match=r"layers.0.hc_attn_fn has shape \[24, 60\], the module expects \[24, 64\]"):
        load_deepseek_v4_state(state, attn=attn, ffn=ffn, head=head)
    with pytest.raises(ValueError, match="residual='mhc'"):
        load_deepseek_v4_state(random_v4_state(), attn=[mhc.HyperConnection(C, N, "hc")] * 2, ffn=ffn)
