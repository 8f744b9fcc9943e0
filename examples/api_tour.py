"""The public API in one page: run `python examples/api_tour.py` (CPU, seconds)."""

import torch
from torch import nn

import torchmhc as mhc
from torchmhc import analysis

torch.manual_seed(0)
B, T, n, C = 2, 16, 4, 64

# Functional core: coefficients of every token, then the two mixes.
x = torch.randn(B, T, n, C, dtype=torch.bfloat16)  # streams [B, T, n, C]
fn = torch.randn(n * n + 2 * n, n * C) / (n * C) ** 0.5  # DeepSeek-V4 layout, fp32
scale, base = torch.full((3,), 0.01), torch.zeros(n * n + 2 * n)
h_pre, h_post, h_res = mhc.mhc_coefficients(x, fn, scale, base)  # [B,T,n], [B,T,n], [B,T,n,n] fp32
layer_input = mhc.pre_mix(x, h_pre)  # [B, T, C] bf16
f_out = torch.tanh(layer_input)  # any sub-layer F
x_next = mhc.post_res(x, f_out, h_post, h_res)  # [B, T, n, C] bf16
print("rows of H_res sum to", h_res.sum(-1).min().item(), "..", h_res.sum(-1).max().item())


# Modules: a two-block stack with attention-like and FFN-like branches.
class Block(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.attn, self.ffn = nn.Linear(C, C), nn.Sequential(nn.RMSNorm(C), nn.Linear(C, C), nn.GELU())
        self.hc_attn = mhc.HyperConnection(C, n, "mhc", layer_index=2 * index)
        self.hc_ffn = mhc.HyperConnection(C, n, "mhc", layer_index=2 * index + 1)

    def forward(self, x):
        x = self.hc_attn(x, self.attn)  # wraps the branch
        layer_input, ctx = self.hc_ffn.pre(x)  # or the split form
        return self.hc_ffn.post(ctx, self.ffn(layer_input))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(i) for i in range(2))
        self.head = mhc.StreamHead(C, n)

    def forward(self, h):  # [B, T, C]
        x = mhc.expand_streams(h, n)  # [B, T, n, C]
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # [B, T, C]


model = Model()
h = torch.randn(B, T, C)
print("output", tuple(model(h).shape))

# Stability: collect every H_res for a batch and measure gains (paper Fig. 3).
profile = analysis.gain_profile(analysis.collect_h_res(model, h))
print("single-layer forward gain", profile.single_forward.tolist())
print("largest composite gain", profile.max_composite())
