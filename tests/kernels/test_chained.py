"""Gradient chaining of one mHC sub-layer (``torchmhc.kernels.mhc_pre``): the coefficients and the
pre-mix as one autograd node whose pass-through view of x feeds the post-res, so that x's three
gradients are summed inside the kernels' dx passes. Checked against the fp64 reference, bitwise
against the unchained kernels where the arithmetic is the same (fp32), and through the module."""

import pytest
import torch
from kernel_cases import DEVICE, check_fwd_bwd, mhc_params, streams
from torch.utils._python_dispatch import TorchDispatchMode

import torchmhc
from torchmhc import functional as ref
from torchmhc.kernels import mhc_coefficients, mhc_pre, post_res, pre_mix, use_kernels


def branch(u, w):
    """A branch F with a parameter: ``tanh(u @ w)`` in w's precision, ``[T, C] -> [T, C]`` in u.dtype."""
    return torch.tanh(u.to(w.dtype) @ w).to(u.dtype)


def chained(x, fn, scale, base, w):
    layer_input, x_for_post, (h_pre, h_post, h_res) = mhc_pre(x, fn, scale, base)
    return post_res(x_for_post, branch(layer_input, w), h_post, h_res)


def unchained(x, fn, scale, base, w):
    h_pre, h_post, h_res = mhc_coefficients(x, fn, scale, base)
    return post_res(x, branch(pre_mix(x, h_pre), w), h_post, h_res)


def reference(x, fn, scale, base, w):
    h_pre, h_post, h_res = ref.mhc_coefficients(x, fn, scale, base)
    return ref.post_res(x, branch(ref.pre_mix(x, h_pre), w), h_post, h_res)


# fp32 bitwise equality with the unchained ops holds where the arithmetic is the same: in the
# interpreter. On the GPU the compiler fuses the pre-mix's h·g + add into one FMA (one rounding fewer).
same_arithmetic = pytest.mark.skipif(DEVICE == "cuda", reason="the GPU fuses h·g + add into an FMA")


def _inputs(n, c, dtype, t=7):
    return [streams(t, n, c, dtype), *mhc_params(n, c), torch.randn(c, c, device=DEVICE) / c**0.5]


def _grads(fn_, inputs, *, seed=1):
    """Output and the gradients of every input that requires grad, for a fixed output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn_(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)]


def reference_fp64(x, *params):
    """:func:`reference` with the streams in fp64 too: exact sums of x's three gradients."""
    return reference(x.double(), *params)


# bf16 streams, relative error against fp64: x's gradient is rounded once in the kernels (the
# interpreter rounds fp32 -> bf16 toward zero, hence more than one rounding's 2e-3 here)
BF16_NORM_TOL = 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64)])
def test_chained_sublayer_matches_reference(n, c, dtype):
    # output and the gradients of x, fn, scale, base and the branch's weight
    with use_kernels("triton"):
        if dtype == torch.float32:
            check_fwd_bwd(chained, reference, _inputs(n, c, dtype))
        else:
            check_fwd_bwd(chained, reference_fp64, _inputs(n, c, dtype), norm_tol=BF16_NORM_TOL)


@same_arithmetic
@pytest.mark.parametrize("n, c", [(1, 64), (3, 64), (4, 128), (8, 64)])
def test_chained_equals_unchained_bitwise_in_fp32(n, c):
    # fp32 streams: the sums in the kernels are the ones autograd did, in the same order
    inputs = [t.requires_grad_() for t in _inputs(n, c, torch.float32)]
    with use_kernels("triton"):
        for a, b in zip(_grads(chained, inputs), _grads(unchained, inputs)):
            assert torch.equal(a, b)


def test_x_used_elsewhere_and_coefficients_used_directly():
    # x also feeds the loss directly, h_pre and h_res also have consumers outside the sub-layer
    def with_extra_uses(sublayer_pre, post):
        def run(x, fn, scale, base, w):
            layer_input, x_for_post, (h_pre, h_post, h_res) = sublayer_pre(x, fn, scale, base)
            return post(x_for_post, branch(layer_input, w), h_post, h_res), 1.5 * x, h_pre, h_res

        return run

    def ref_pre(x, fn, scale, base):
        coefficients = ref.mhc_coefficients(x, fn, scale, base)
        return ref.pre_mix(x, coefficients.h_pre), x, coefficients

    with use_kernels("triton"):
        check_fwd_bwd(with_extra_uses(mhc_pre, post_res), with_extra_uses(ref_pre, ref.post_res), _inputs(3, 64, torch.float32))


# which outputs of mhc_pre reach the loss: gradients that never arrive must not break the backward
USES = {
    "branch output unused": lambda y, xp, c: ref.post_res(xp, torch.ones_like(y), c.h_post, c.h_res),
    "coefficients only": lambda y, xp, c: (c.h_pre, c.h_post, c.h_res),
    "layer input only": lambda y, xp, c: y,
    "streams only": lambda y, xp, c: 2 * xp,
    "h_res only": lambda y, xp, c: c.h_res,
}


@pytest.mark.parametrize("use", USES)
def test_unused_outputs(use):
    x, *params = _inputs(2, 64, torch.float32)[:4]

    def run(pre):
        def f(x_, *params_):
            return USES[use](*pre(x_, *(params_ or params)))

        return f

    def ref_pre(x_, fn, scale, base):
        coefficients = ref.mhc_coefficients(x_, fn, scale, base)
        return ref.pre_mix(x_, coefficients.h_pre), x_, coefficients

    # only x reaches the loss through the streams: the parameters then get no gradient at all
    inputs = [x] if use == "streams only" else [x, *params]
    with use_kernels("triton"):
        check_fwd_bwd(run(mhc_pre), run(ref_pre), inputs)


@same_arithmetic
@pytest.mark.parametrize("trainable", ["x only", "parameters only"])
def test_partial_requires_grad(trainable):
    x, fn, scale, base, w = _inputs(4, 64, torch.float32)
    x.requires_grad_(trainable == "x only")
    for p in (fn, scale, base):
        p.requires_grad_(trainable == "parameters only")
    w.requires_grad_()
    with use_kernels("triton"):
        for a, b in zip(_grads(chained, [x, fn, scale, base, w]), _grads(unchained, [x, fn, scale, base, w])):
            assert torch.equal(a, b)


def test_no_grad_gives_the_same_values():
    inputs = _inputs(4, 64, torch.bfloat16)
    with use_kernels("triton"), torch.no_grad():
        out = chained(*inputs)
        expected = unchained(*inputs)
    assert out.grad_fn is None and torch.equal(out, expected)


def _made_by_chained_pre(t):
    """True when ``t`` is (a view of) an output of the chained coefficients + pre-mix node."""
    node = t.grad_fn
    while node is not None and type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return node is not None and "ChainedPre" in type(node).__name__


def test_pass_through_is_a_view_only_where_kernels_run():
    x, fn, scale, base, _ = _inputs(3, 64, torch.float32)
    x = x.view(1, 7, 3, 64).requires_grad_()
    with use_kernels("triton"):
        layer_input, x_for_post, coefficients = mhc_pre(x, fn, scale, base)
    assert x_for_post is not x and x_for_post.shape == x.shape
    assert x_for_post.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert _made_by_chained_pre(x_for_post)
    assert layer_input.shape == (1, 7, 64) and coefficients.h_res.shape == (1, 7, 3, 3)
    with use_kernels("reference"):
        assert mhc_pre(x, fn, scale, base)[1] is x


class _CountStreamAdds(TorchDispatchMode):
    """Counts elementwise additions whose result has the shape of the streams."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("sublayer, adds", [(chained, 0), (unchained, 2)])
def test_backward_has_no_separate_stream_additions(sublayer, adds):
    # the goal itself: autograd sums x's three gradients with two additions, the chained path with none
    x, *params = _inputs(4, 64, torch.float32)
    x.requires_grad_()
    with use_kernels("triton"):
        out = sublayer(x, *params)
        with _CountStreamAdds(x.shape) as counter:
            torch.autograd.grad(out, x, torch.ones_like(out))
    assert counter.count == adds


def _module(n=4, c=64):
    torch.manual_seed(0)
    hc = torchmhc.HyperConnection(c, n=n).to(DEVICE)
    with torch.no_grad():  # non-trivial coefficients
        hc.fn.normal_(0, 0.05)
        hc.base.normal_()
        hc.scale.fill_(0.7)
    lin = torch.nn.Linear(c, c).to(DEVICE)
    return hc, lambda u: torch.tanh(lin(u)), [*hc.parameters(), *lin.parameters()]


@same_arithmetic
def test_hyper_connection_uses_the_chained_path_bitwise_equal_to_unchained():
    hc, f, params = _module()
    x = streams(7, 4, 64, torch.float32).requires_grad_()
    seen = []
    hc.register_coefficient_hook(lambda module, x_, c: seen.append(c))
    with use_kernels("triton"):
        layer_input, ctx = hc.pre(x)
        assert _made_by_chained_pre(ctx.x)  # post() reads the pass-through view
        out = hc.post(ctx, f(layer_input))
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
        coefficients = hc.coefficients(x)
        expected = hc.post(hc.mix_in(x, coefficients)[1], f(pre_mix(x, coefficients.h_pre)))
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *params])
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], coefficients))
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):
        assert torch.equal(a, b)


def test_torch_compile_traces_the_chained_path():
    with use_kernels("triton"):
        compiled = torch.compile(chained, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, reference, _inputs(2, 64, torch.float32))
        hc, f, params = _module(2)
        x = streams(5, 2, 64, torch.float32).requires_grad_()
        eager = _grads(lambda x_: hc(x_, f), [x])
        module_compiled = torch.compile(lambda x_: hc(x_, f), backend="aot_eager", fullgraph=True)
        for a, b in zip(_grads(module_compiled, [x]), eager):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("t, n, c", [(4096, 4, 1024), (1000, 8, 1280), (777, 2, 4096)])
def test_gpu_chained_sublayer(t, n, c):
    # bf16 streams at real shapes: against fp64, and x's gradient at least as accurate as unchained
    inputs = [t_.requires_grad_() for t_ in _inputs(n, c, torch.bfloat16, t)]
    with use_kernels("triton"):
        check_fwd_bwd(chained, reference_fp64, inputs, norm_tol=1e-2)
        dx_chained, dx_unchained = _grads(chained, inputs)[1], _grads(unchained, inputs)[1]
    dx_exact = _grads(reference_fp64, [inputs[0], *(p.detach().double().requires_grad_() for p in inputs[1:])])[1]

    def err(dx):
        return ((dx.double() - dx_exact.double()).norm() / dx_exact.double().norm()).item()

    assert err(dx_chained) <= err(dx_unchained) * 1.01
