"""Block recomputation (``torchmhc.recompute``): same values and gradients, fewer saved bytes."""

import os

import pytest
import torch
from torch import nn

import torchmhc
from torchmhc.kernels import use_kernels
from torchmhc.recompute import RecomputeStats, block_starts, optimal_block_length, run_sublayers

if not torch.cuda.is_available():  # the kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

C, N, T, L = 64, 4, 5, 6


def _sublayers(residual: str = "mhc", n: int = N):
    torch.manual_seed(0)
    out = []
    for i in range(L):
        hc = torchmhc.HyperConnection(C, n=n, residual=residual, layer_index=i)
        if residual != "residual":
            with torch.no_grad():  # non-trivial coefficients
                hc.fn.normal_(0, 0.05)
                hc.base.normal_()
                hc.scale.fill_(0.7)
        lin = nn.Linear(C, C)
        out.append((hc, lambda u, lin=lin: torch.tanh(lin(u))))
    return out


def _params(sublayers):
    return [p for hc, branch in sublayers for p in hc.parameters()] + [
        p for _, branch in sublayers for p in branch.__defaults__[0].parameters()
    ]


def _run(x, sublayers, **kwargs):
    x = x.detach().requires_grad_()
    if kwargs.pop("plain", False):
        out = x
        for hc, branch in sublayers:
            out = hc(out, branch)
    elif kwargs.pop("unchained", False):  # x's gradients summed by autograd, not in the kernels
        out = x
        for hc, branch in sublayers:
            layer_input, ctx = hc.mix_in(out, hc.coefficients(out))
            out = hc.post(ctx, branch(layer_input))
    else:
        out = run_sublayers(x, sublayers, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), [x, *_params(sublayers)])
    return out, grads


@pytest.mark.parametrize("residual, n", [("mhc", N), ("hc", N), ("residual", 1)])
def test_recompute_gives_identical_values_and_gradients(residual, n):
    sub = _sublayers(residual, n)
    x = torch.randn(T, n, C)
    out_a, grads_a = _run(x, sub, plain=True)
    stats = RecomputeStats()
    out_b, grads_b = _run(x, sub, block_length=4, stats=stats)
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    assert stats.dropped_bytes > 0


def test_dropped_bytes_match_the_formula():
    # x_l of every sub-layer but the block starts (n·C a token) and every H_pre·x_l (C a token)
    sub = _sublayers()
    stats = RecomputeStats()
    _run(torch.randn(T, N, C), sub, block_length=2, boundaries=[3], stats=stats)
    assert stats.block_starts == [0, 2, 3, 5]
    inner = L - len(stats.block_starts)
    assert stats.dropped_bytes == (inner * N * C + L * C) * T * 4


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter")
def test_recompute_with_kernels():
    sub = _sublayers()
    x = torch.randn(T, N, C)
    with use_kernels("triton"):
        out_a, grads_a = _run(x, sub, plain=True)
        stats = RecomputeStats()
        out_b, grads_b = _run(x, sub, block_length=3, stats=stats)
        out_c, grads_c = _run(x, sub, unchained=True)
    # recomputation, the chained sub-layers and the unchained ops: bit-identical in fp32
    for a, b, c in zip([out_a, *grads_a], [out_b, *grads_b], [out_c, *grads_c]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert stats.dropped_bytes == ((L - 2) * N * C + L * C) * T * 4


def test_block_length_and_starts():
    assert optimal_block_length(4, 60) == 6  # sqrt(4·60/6) = 6.3
    assert optimal_block_length(4, 1) == 1
    assert block_starts(10, 4) == [0, 4, 8]
    assert block_starts(10, 4, boundaries=[5]) == [0, 4, 5, 9]
    with pytest.raises(ValueError, match="block_length"):
        block_starts(10, 0)
    with pytest.raises(ValueError, match="boundaries"):
        block_starts(10, 3, boundaries=[10])
    with pytest.raises(ValueError, match="sublayers"):
        run_sublayers(torch.randn(2, 4, 8), [])
