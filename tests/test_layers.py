"""HyperConnection, StreamHead and expand_streams as a model uses them."""

import math

import pytest
import torch
from torch import nn

import torchmhc as mhc
from torchmhc import kernels
from torchmhc.layers import INITS
from torchmhc.residuals import residual_kinds


class Branch(nn.Module):
    """A small nonlinear sub-layer with its own pre-norm, like attention or an FFN."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):
        return torch.tanh(self.proj(self.norm(h)))


@pytest.mark.parametrize("residual", residual_kinds())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kind_runs_forward_and_backward(residual, dtype):
    hc = mhc.HyperConnection(16, 3, residual)
    branch = Branch(16).to(dtype)
    x = torch.randn(2, 5, hc.num_streams, 16, dtype=dtype, requires_grad=True)
    y = hc(x, branch)
    assert y.shape == x.shape and y.dtype == dtype
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for p in hc.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()


def test_split_form_equals_forward():
    hc = mhc.HyperConnection(8, 4)
    branch = Branch(8)
    x = torch.randn(3, 4, 8)
    layer_input, ctx = hc.pre(x)
    assert layer_input.shape == (3, 8)
    torch.testing.assert_close(hc.post(ctx, branch(layer_input)), hc(x, branch), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_kind_is_exactly_x_plus_f_of_x(dtype):
    hc = mhc.HyperConnection(16, residual="residual")
    assert hc.num_streams == 1 and len(list(hc.parameters())) == 0
    branch = Branch(16).to(dtype)
    h = torch.randn(4, 7, 16, dtype=dtype)
    out = hc(mhc.expand_streams(h, 1), branch)
    assert torch.equal(out[..., 0, :], h + branch(h))


def test_mhc_identity_start_is_close_to_a_residual_block():
    torch.manual_seed(1)
    branch = Branch(32)
    h = torch.randn(64, 32)
    expected = h + branch(h)
    hc = mhc.HyperConnection(32, 4, "mhc", init="identity")
    out = hc(mhc.expand_streams(h, 4), branch)
    for stream in range(4):
        error = (out[:, stream] - expected).norm() / expected.norm()
        assert error < 0.02, (stream, error)
    coefficients = hc.coefficients(mhc.expand_streams(h, 4))
    torch.testing.assert_close(coefficients.h_res, torch.eye(4).expand(64, 4, 4), atol=0.02, rtol=0)

@pytest.mark.parametrize("layer_index", [0, 1, 2, 5, 7])
def test_hc_start_matches_the_hc_paper(layer_index):
    n = 4
    hc = mhc.HyperConnection(8, n, "hc", layer_index=layer_index)
    x = torch.randn(6, n, 8)
    h_pre, h_post, h_res = hc.coefficients(x)
    expected_pre = torch.zeros(n)
    expected_pre[layer_index % n] = 1.0
    assert torch.equal(h_pre, expected_pre.expand(6, n))  # θ = 0: the dynamic part is exactly 0
    assert torch.equal(h_post, torch.ones(6, n))
    assert torch.equal(h_res, torch.eye(n).expand(6, n, n))
    branch = Branch(8)
    out = hc(x, branch)
    torch.testing.assert_close(out, x + branch(x[:, layer_index % n]).unsqueeze(1))


def test_onehot_start_reads_one_stream():
    hc = mhc.HyperConnection(8, 4, "mhc", init="onehot", layer_index=6)
    h_pre = hc.coefficients(torch.randn(10, 4, 8)).h_pre
    assert (h_pre.argmax(-1) == 2).all() and (h_pre[:, 2] > 0.98).all()


def test_different_streams_diverge_from_one_embedding():
    """Random fn breaks the symmetry of streams copied from one embedding (zero fn would not)."""
    hc = mhc.HyperConnection(16, 4, "mhc")
    out = hc(mhc.expand_streams(torch.randn(8, 16), 4), Branch(16))
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-4


def test_v4_parameter_layout():
    hc = mhc.HyperConnection(10, 4, "mhc")
    assert hc.fn.shape == (24, 40) and hc.base.shape == (24,) and hc.scale.shape == (3,)
    assert torch.equal(hc.scale.data, torch.full((3,), 0.01))
    lite = mhc.HyperConnection(10, 3, "mhc-lite")
    assert lite.fn.shape == (2 * 3 + 6, 30)
    classic = mhc.HyperConnection(10, 4, "hc")
    assert classic.fn.shape == (6, 10) and classic.base.shape == (24,)


def test_constructor_errors():
    with pytest.raises(ValueError, match="residual must be one of"):
        mhc.HyperConnection(8, 4, "mhcc")
    with pytest.raises(ValueError, match="init must be one of"):
        mhc.HyperConnection(8, 4, init="zeros")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        mhc.HyperConnection(8, 0)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        mhc.HyperConnection(8.0, 4)


def test_forward_errors_name_expected_shape():
    hc = mhc.HyperConnection(8, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., n=4, C=8\].*got \[2, 3, 8\]"):
        hc(torch.randn(2, 3, 8), Branch(8))
    with pytest.raises(ValueError, match=r"C=8"):
        hc(torch.randn(2, 4, 9), Branch(9))
    with pytest.raises(TypeError, match="floating dtype"):
        hc(torch.ones(2, 4, 8, dtype=torch.int32), Branch(8))


def test_coefficient_hook_sees_every_call_and_can_be_removed():
    hc = mhc.HyperConnection(8, 4)
    seen = []
    handle = hc.register_coefficient_hook(lambda module, x, c: seen.append((module, x.shape, c.h_res.shape)))
    hc(torch.randn(3, 4, 8), Branch(8))
    assert seen == [(hc, torch.Size([3, 4, 8]), torch.Size([3, 4, 4]))]
    handle.remove()
    hc(torch.randn(3, 4, 8), Branch(8))
    assert len(seen) == 1


@pytest.mark.parametrize("residual", residual_kinds())
def test_pre_with_coefficients_is_pre_without_hooks(residual):
    # the mHC path runs the coefficients and the pre-mix as one op (kernels.mhc_pre); same values
    hc = mhc.HyperConnection(8, 2, residual)
    x = torch.randn(3, hc.num_streams, 8)
    seen = []
    hc.register_coefficient_hook(lambda module, x_, c: seen.append(c))
    layer_input, ctx = hc.pre(x)
    layer_input2, ctx2, coefficients = hc.pre_with_coefficients(x)
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], coefficients))
    assert torch.equal(layer_input, layer_input2) and torch.equal(ctx.x, x) and torch.equal(ctx2.x, x)
    if residual != "residual":
        expected = hc.mix_in(x, hc.coefficients(x))
        assert torch.equal(layer_input, expected[0])
        assert torch.equal(ctx.h_post, expected[1].h_post) and torch.equal(ctx.h_res, expected[1].h_res)


def _two_connections(residual, n=3, dim=8):
    """Two consecutive sub-layers' connections with non-trivial (and different) coefficients."""
    hcs = [mhc.HyperConnection(dim, n, residual, layer_index=i) for i in range(2)]
    if residual != "residual":
        with torch.no_grad():
            for hc in hcs:
                hc.fn.normal_(0, 0.1)
                hc.base.normal_()
                hc.scale.fill_(0.5)
    return hcs


@pytest.mark.parametrize("residual", ["residual", "hc", "mhc", "mhc-lite"])
def test_post_pre_equals_post_then_next_pre(residual, monkeypatch):
    first, second = _two_connections(residual)
    branch_a, branch_b = Branch(8), Branch(8)
    fused_calls = []
    mhc_post_pre = kernels.mhc_post_pre
    monkeypatch.setattr(kernels, "mhc_post_pre", lambda *a, **k: fused_calls.append(1) or mhc_post_pre(*a, **k))
    params = [*first.parameters(), *second.parameters(), *branch_a.parameters(), *branch_b.parameters()]
    x = torch.randn(2, 5, first.num_streams, 8)

    def run(together):
        x_ = x.clone().requires_grad_()
        layer_input, ctx = first.pre(x_)
        if together:
            u, ctx2 = first.post_pre(ctx, branch_a(layer_input), second)
        else:
            u, ctx2 = second.pre(first.post(ctx, branch_a(layer_input)))
        out = second.post(ctx2, branch_b(u))
        return [out, *torch.autograd.grad(out.square().sum(), [x_, *params])]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
    # mHC connections (any manifold) go through the fused op's dispatch; the others compose
    assert len(fused_calls) == (residual in ("mhc", "mhc-lite"))


@pytest.mark.parametrize("residual", ["residual", "hc", "mhc"])
def test_post_pre_calls_the_next_connections_hooks_once(residual):
    first, second = _two_connections(residual)
    seen = {first: [], second: []}
    for hc in (first, second):
        hc.register_coefficient_hook(lambda module, x_, c: seen[module].append((x_, c)))
    x = torch.randn(4, first.num_streams, 8)
    layer_input, ctx = first.pre(x)
    f_out = torch.randn(4, 8)
    layer_input2, ctx2 = first.post_pre(ctx, f_out, second)
    assert len(seen[first]) == 1 and len(seen[second]) == 1
    x_next, coefficients = seen[second][0]
    assert torch.equal(x_next, first.post(ctx, f_out))  # the streams entering the next sub-layer
    expected_input, _, expected = second.pre_with_coefficients(x_next)
    assert all(torch.equal(a, b) for a, b in zip(coefficients, expected))
    assert torch.equal(layer_input2, expected_input)


def test_post_pre_rejects_a_mismatched_next_connection():
    hc = mhc.HyperConnection(8, 4)
    layer_input, ctx = hc.pre(torch.randn(3, 4, 8))
    f_out = torch.randn(3, 8)
    with pytest.raises(ValueError, match="next_hc must be a HyperConnection, got Linear"):
        hc.post_pre(ctx, f_out, nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"next_hc must have n=4, C=8 .*got n=2, C=8"):
        hc.post_pre(ctx, f_out, mhc.HyperConnection(8, 2))
    with pytest.raises(ValueError, match=r"got n=4, C=16"):
        hc.post_pre(ctx, f_out, mhc.HyperConnection(16, 4))
    with pytest.raises(ValueError, match=r"got n=1, C=8"):
        hc.post_pre(ctx, f_out, mhc.HyperConnection(8, residual="residual"))


def test_expand_streams_copies_without_scaling():
    h = torch.randn(2, 3, 8, requires_grad=True)
    x = mhc.expand_streams(h, 4)
    assert x.shape == (2, 3, 4, 8) and x.is_contiguous()
    assert all(torch.equal(x[..., i, :], h) for i in range(4))
    x.sum().backward()
    assert torch.equal(h.grad, torch.full_like(h, 4.0))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        mhc.expand_streams(h, 0)


def test_stream_head_starts_as_the_stream_mean():
    head = mhc.StreamHead(16, 4)
    x = torch.randn(5, 4, 16)
    y = head(x)
    assert y.shape == (5, 16)
    torch.testing.assert_close(y, x.mean(-2), atol=0.02, rtol=0.02)
    with pytest.raises(ValueError, match=r"n=4, C=16"):
        head(torch.randn(5, 3, 16))


@pytest.mark.parametrize("init", INITS)
def test_every_init_gives_finite_coefficients(init):
    for n in (1, 2, 4):
        hc = mhc.HyperConnection(8, n, "mhc", init=init)
        coefficients = hc.coefficients(torch.randn(3, n, 8))
        assert all(torch.isfinite(c).all() for c in coefficients)


@pytest.mark.parametrize("kwargs, match", [
    ({"layer_index": 1.5}, r"layer_index must be an integer >= 0, got 1.5"),
    ({"layer_index": -1}, r"layer_index must be an integer >= 0, got -1"),
    ({"layer_index": True}, r"layer_index must be an integer >= 0, got True"),
    ({"iters": 0}, r"iters must be an integer >= 1, got 0"),
    ({"iters": 2.0}, r"iters must be an integer >= 1, got 2.0"),
    ({"eps": None}, r"eps must be a finite number >= 0, got None"),
    ({"eps": math.inf}, r"eps must be a finite number >= 0, got inf"),
    ({"eps": -1e-3}, r"eps must be a finite number >= 0, got -0.001"),
    ({"rms_eps": -1e-6}, r"rms_eps must be a finite number > 0, got -1e-06"),
    ({"rms_eps": math.nan}, r"rms_eps must be a finite number > 0, got nan"),
    ({"post_scale": 0}, r"post_scale must be a finite number > 0, got 0"),
    ({"post_scale": math.inf}, r"post_scale must be a finite number > 0, got inf"),
    ({"alpha_init": math.nan}, r"alpha_init must be a finite number, got nan"),
    ({"alpha_init": -math.inf}, r"alpha_init must be a finite number, got -inf"),
])
@pytest.mark.parametrize("residual", ["mhc", "hc", "residual", "spectral"])
def test_constructor_checks_every_option_at_construction(residual, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mhc.HyperConnection(8, 4, residual, **kwargs)


def test_stream_head_constructor_checks_its_options():
    for kwargs, match in [({"eps": math.nan}, "eps must be a finite number >= 0"),
                          ({"rms_eps": 0.0}, "rms_eps must be a finite number > 0"),
                          ({"alpha_init": math.inf}, "alpha_init must be a finite number")]:
        with pytest.raises(ValueError, match=match):
            mhc.StreamHead(8, 4, **kwargs)


@pytest.mark.parametrize("residual", residual_kinds())
def test_post_checks_the_branch_output_shape_for_every_kind(residual):
    hc = mhc.HyperConnection(8, 4, residual)
    x = torch.randn(2, 3, hc.num_streams, 8)
    _, ctx = hc.pre(x)
    for bad in (torch.randn(2, 1, 8), torch.randn(8), torch.randn(2, 3, 1), torch.randn(2, 3, 16)):
        with pytest.raises(ValueError, match=r"f_out must have shape \[2, 3, 8\]"):
            hc.post(ctx, bad)
    with pytest.raises(TypeError, match="f_out must have a floating dtype"):
        hc.post(ctx, torch.ones(2, 3, 8, dtype=torch.int64))
