"""The CPU path (``torchmhc.kernels.cpu``) against the fp64 reference, forward and backward, and where
the dispatch chooses it."""

import copy

import pytest
import torch
from kernel_cases import check_fwd_bwd

import torchmhc
from torchmhc import functional as ref
from torchmhc.kernels import cpu, hc_coefficients, hc_pre, head_mix, mhc_coefficients, mhc_pre
from torchmhc.kernels import post_res, pre_mix, use_kernels
from torchmhc.layers import HyperConnectionContext
from torchmhc.manifolds import Permutation, Sinkhorn

# fp32 coefficient math against an fp64 reference (docs/math.md §10's floor)
TOL = dict(fp32_tol=dict(rtol=1e-5, atol=2e-5), grad_tol=dict(rtol=1e-5, atol=2e-5))
# (leading dims, n, C): odd sizes, one stream, one channel, a token count past a vector width
SHAPES = [((7,), 3, 5), ((2, 3), 4, 16), ((1,), 1, 3), ((5,), 2, 1), ((33,), 5, 7)]


def _params(n: int, c: int, rows: int, cols: int, scale_size: int = 3) -> tuple[torch.Tensor, ...]:
    fn = torch.randn(rows, cols) / cols**0.5
    return fn, torch.rand(scale_size) + 0.5, torch.randn(rows)


@pytest.fixture
def cpu_ran(monkeypatch) -> list[str]:
    """Names of the ``cpu`` functions the dispatch called, in order."""
    ran = []
    for name in cpu.__all__:
        if name != "supported":
            original = getattr(cpu, name)
            monkeypatch.setattr(cpu, name, lambda *a, _f=original, _n=name: ran.append(_n) or _f(*a))
    return ran


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_matches_reference(n, iters):
    logits = 3 * torch.randn(37, n, n)
    check_fwd_bwd(lambda t: cpu.sinkhorn(t, iters, 1e-6), lambda t: ref.sinkhorn_knopp(t, iters, 1e-6), [logits], **TOL)


@pytest.mark.parametrize(("t", "n"), [(2053, 4), (1200, 8)])  # 2 and 3 chunks of < 32768 values
def test_chunked_sinkhorn_matches_reference(t, n):
    logits = 3 * torch.randn(t, n, n)
    check_fwd_bwd(lambda l: cpu.sinkhorn(l, 20, 1e-6), lambda l: ref.sinkhorn_knopp(l, 20, 1e-6), [logits], **TOL)


def test_sinkhorn_keeps_only_the_logits_for_backward():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        cpu.sinkhorn(torch.randn(9, 4, 4, requires_grad=True), 20, 1e-6)
    assert saved == [torch.Size([4, 4, 9])]  # the logits, tokens last: not the 2·t_max intermediates


@pytest.mark.parametrize(("lead", "n", "c"), SHAPES)
def test_mhc_coefficients_and_pre_match_reference(cpu_ran, lead, n, c):
    x = torch.randn(*lead, n, c)
    fn, scale, base = _params(n, c, n * n + 2 * n, n * c)

    def reference(x_, fn_, scale_, base_):
        coefficients = ref.mhc_coefficients(x_, fn_, scale_, base_)
        return *coefficients, ref.pre_mix(x_, coefficients.h_pre), x_

    check_fwd_bwd(lambda *a: mhc_coefficients(*a), lambda *a: reference(*a)[:3], [x, fn, scale, base], **TOL)
    # the chained form: layer input and the pass-through of x, whose gradient joins x's
    check_fwd_bwd(lambda *a: _chained(mhc_pre(*a)), reference, [x, fn, scale, base], **TOL)
    assert cpu_ran == ["mhc_coefficients", "sinkhorn", "mhc_pre", "sinkhorn"]


def _chained(pre_output):
    """``(h_pre, h_post, h_res, layer_input, x_for_post)`` of a chained pre."""
    y, x_for_post, coefficients = pre_output
    return *coefficients, y, x_for_post


@pytest.mark.parametrize(("lead", "n", "c"), SHAPES)
def test_hc_coefficients_and_pre_match_reference(cpu_ran, lead, n, c):
    x = torch.randn(*lead, n, c)
    fn, scale, base = _params(n, c, n + 2, c)
    base = torch.randn(n * n + 2 * n)

    def reference(x_, fn_, scale_, base_):
        coefficients = ref.hc_coefficients(x_, fn_, scale_, base_)
        return *coefficients, ref.pre_mix(x_, coefficients.h_pre), x_

    check_fwd_bwd(lambda *a: hc_coefficients(*a), lambda *a: reference(*a)[:3], [x, fn, scale, base], **TOL)
    check_fwd_bwd(lambda *a: _chained(hc_pre(*a)), reference, [x, fn, scale, base], **TOL)
    assert cpu_ran == ["hc_coefficients", "hc_pre"]


@pytest.mark.parametrize(("lead", "n", "c"), SHAPES)
def test_mixes_and_head_match_reference(cpu_ran, lead, n, c):
    x, f_out = torch.randn(*lead, n, c), torch.randn(*lead, c)
    h_pre, h_post, h_res = torch.randn(*lead, n), torch.randn(*lead, n), torch.rand(*lead, n, n)
    fn, scale, base = _params(n, c, n, n * c, scale_size=1)
    check_fwd_bwd(pre_mix, ref.pre_mix, [x, h_pre], **TOL)
    check_fwd_bwd(post_res, ref.post_res, [x, f_out, h_post, h_res], **TOL)
    # a transposed h_res, as HC's coefficients make it
    check_fwd_bwd(
        lambda x_, f_, p_, r_: post_res(x_, f_, p_, r_.mT), lambda x_, f_, p_, r_: ref.post_res(x_, f_, p_, r_.mT),
        [x, f_out, h_post, h_res], **TOL,
    )  # fmt: skip
    check_fwd_bwd(head_mix, ref.head_mix, [x, fn, scale, base], **TOL)
    assert cpu_ran == ["pre_mix", "post_res", "post_res", "head_mix"]


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_sub_layer_gradients_match_reference_whichever_outputs_are_used(residual):
    n, c = 3, 6
    hc = torchmhc.HyperConnection(c, n, residual, layer_index=1)
    with torch.no_grad():  # non-trivial coefficients
        hc.fn.normal_(0, 0.3)
        hc.base.normal_()
        hc.scale.fill_(0.7)
    hc64 = copy.deepcopy(hc).double()
    x = torch.randn(4, 5, n, c)
    weight = torch.randn(c, c, dtype=torch.float64)
    uses = {
        "all": lambda m, y, x_pass, co: (x_pass.sum(-2) * y).sum() + co.h_res.square().sum() + co.h_post.sum(),
        "layer input": lambda m, y, x_pass, co: y.square().sum(),
        "x_for_post": lambda m, y, x_pass, co: x_pass.square().sum(),
        "h_res": lambda m, y, x_pass, co: co.h_res.square().sum(),
        "sub-layer": lambda m, y, x_pass, co: m.post(
            HyperConnectionContext(x_pass, co.h_post, co.h_res), torch.tanh(y @ weight.to(y.dtype))
        ).square().sum(),
    }
    for name, loss in uses.items():
        grads = []
        for mode, module, x_ in (("auto", hc, x), ("reference", hc64, x.double())):
            leaves = [x_.detach().requires_grad_(), *module.parameters()]
            with use_kernels(mode):
                y, ctx, coefficients = module.pre_with_coefficients(leaves[0])
                value = loss(module, y, ctx.x, coefficients)
            grads.append(torch.autograd.grad(value, leaves, allow_unused=True))
        for a, e in zip(*grads):
            assert (a is None) == (e is None), name
            if a is not None:
                torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_parameter_gradients_without_a_gradient_of_x(residual):
    hc = torchmhc.HyperConnection(5, 3, residual, layer_index=1)
    hc64 = copy.deepcopy(hc).double()
    x = torch.randn(7, 3, 5)
    grads = []
    for mode, module, x_ in (("auto", hc, x), ("reference", hc64, x.double())):
        with use_kernels(mode):
            loss = module(x_, torch.tanh).square().sum() + module.coefficients(x_).h_res.square().sum()
        grads.append(torch.autograd.grad(loss, list(module.parameters())))
    for a, e in zip(*grads):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=2e-5)


def test_auto_mode_takes_the_cpu_path_only_for_fp32_v4_sinkhorn(cpu_ran):
    n, c = 4, 8
    x = torch.randn(3, n, c)
    fn, scale, base = _params(n, c, n * n + 2 * n, n * c)

    def path(**kwargs) -> str:
        cpu_ran.clear()
        mhc_coefficients(kwargs.pop("x", x), fn, scale, base, **kwargs)
        return "cpu" if cpu_ran else "reference"

    assert path() == "cpu"
    assert path(manifold=Sinkhorn(iters=3)) == "cpu"
    assert path(eps=0.0) == "reference"  # the log domain
    assert path(manifold=Sinkhorn(eps=1e-3)) == "reference"  # its eps differs from eps
    assert path(manifold=Sinkhorn(convention="paper")) == "reference"
    assert path(x=x.double()) == "reference"
    assert path(x=x.bfloat16()) == "reference"
    with use_kernels("reference"):
        assert path() == "reference"
    lite = Permutation()
    fn_lite, _, base_lite = _params(n, c, 2 * n + lite.num_logits(n), n * c)
    cpu_ran.clear()
    mhc_coefficients(x, fn_lite, scale, base_lite, manifold=lite)
    assert not cpu_ran


def test_invalid_arguments_get_the_reference_errors():
    n, c = 4, 8
    x = torch.randn(3, n, c)
    fn, scale, base = _params(n, c, n * n + 2 * n, n * c)
    with pytest.raises(ValueError, match="fn must have shape"):
        mhc_coefficients(x, fn[:-1], scale, base)
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        mhc_coefficients(x, fn, scale, base, iters=0)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        mhc_coefficients(x, fn, scale, base, eps=float("inf"))
    with pytest.raises(ValueError, match="h_pre"):
        pre_mix(x, torch.rand(3, n + 1))
    with pytest.raises(ValueError, match="h_res"):
        post_res(x, torch.randn(3, c), torch.rand(3, n), torch.rand(3, n, n + 1))
    with pytest.raises(ValueError, match="fn must have shape"):
        hc_coefficients(x, torch.randn(n + 1, c), scale, torch.randn(n * n + 2 * n))


def test_tiny_model_trains_like_the_reference():
    from torchmhc.config import ModelConfig
    from torchmhc.models import build_model

    cfg = ModelConfig(residual="mhc", num_streams=4, dim=32, num_layers=2, num_heads=2, max_seq_len=16, vocab_size=64)
    tokens = torch.randint(0, 64, (3, 16))
    losses, grads = {}, {}
    for mode in ("auto", "reference"):
        torch.manual_seed(0)
        model = build_model(cfg)
        with use_kernels(mode):
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
            loss.backward()
        losses[mode] = loss.item()
        grads[mode] = [p.grad for p in model.parameters()]
    assert losses["auto"] == pytest.approx(losses["reference"], rel=1e-6)
    for a, e in zip(*grads.values()):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
