"""Gradient chaining of one mHC sub-layer (``torchmhc.kernels.mhc_pre``): the coefficients and the
pre-mix as one autograd node whose pass-through view of x feeds the post-res, so that x's three
gradients are summed inside the kernels' dx passes. Checked against the fp64 reference, bitwise
against the unchained kernels where the arithmetic is the same (fp32), and through the module.
The same across sub-layers (``torchmhc.kernels.mhc_post_pre``): sub-layer l's post-res fused with
l+1's coefficients and pre-mix, x_{l+1} handed on, against the composed reference."""

import functools
import math

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, Launches, RecordOps, branch, check_fwd_bwd, made_by, mhc_params, streams, sublayers

import torchmhc
from torchmhc import functional as ref
from torchmhc.kernels import mhc_coefficients, mhc_post_pre, mhc_pre, post_res, pre_mix, use_kernels


chained, unchained, reference = sublayers(mhc_pre, mhc_coefficients, ref.mhc_coefficients)


# fp32 bitwise equality with the unchained ops holds where the arithmetic is the same: in the
# interpreter. On the GPU the compiler fuses the pre-mix's h·g + add into one FMA (one rounding fewer).
same_arithmetic = pytest.mark.skipif(DEVICE == "cuda", reason="the GPU fuses h·g + add into an FMA")


def _inputs(n, c, dtype, t=7):
    return [streams(t, n, c, dtype), *mhc_params(n, c), torch.randn(c, c, device=DEVICE) / c**0.5]


def _grads(fn_, inputs, *, seed=1):
    """Output(s) and the gradients of every input that requires grad, for fixed output gradients."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn_(*leaves)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    generator = torch.Generator().manual_seed(seed)
    g = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in outs]
    return [*outs, *torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], g)]


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
    return made_by(t, "ChainedPre")


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


@pytest.mark.parametrize("sublayer, adds", [(chained, 0), (unchained, 2)])
def test_backward_has_no_separate_stream_additions(sublayer, adds):
    # the goal itself: autograd sums x's three gradients with two additions, the chained path with none
    x, *params = _inputs(4, 64, torch.float32)
    x.requires_grad_()
    with use_kernels("triton"):
        out = sublayer(x, *params)
        with RecordOps() as ops, Launches() as launches:
            torch.autograd.grad(out, x, torch.ones_like(out))
    assert ops.stream_adds(x.shape) == adds
    if sublayer is chained:  # nor a pre-mix dx pass: dh_pre alone, then the coefficient dx pass sums it all
        assert launches.calls("pre_mix_dh") == 1 and launches.calls("pre_mix_bwd") == 0
        assert launches.calls("coefficients_bwd") == 1


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


def test_compiled_graphs_hold_the_custom_ops():
    # eager calls the launchers (no custom-op dispatch, see _Launches); a compiled graph must hold
    # the custom ops as opaque nodes, forward and backward, or torch.compile would trace into Triton
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return make_boxed_func(gm)

    x, *params = _inputs(2, 64, torch.float32)
    with use_kernels("triton"):
        compiled = torch.compile(chained, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
        out = compiled(x.requires_grad_(), *params)
        out.backward(torch.ones_like(out))
    forward, backward = graphs
    assert {"torchmhc.mhc_coefficients.default", "torchmhc.pre_mix.default", "torchmhc.post_res.default"} <= forward
    assert {"torchmhc.pre_mix_dh.default", "torchmhc.mhc_coefficients_backward.default"} <= backward
    assert "torchmhc.post_res_backward.default" in backward


# -- across sub-layers: post-res of sub-layer l fused with the coefficients and pre-mix of l+1 ----


def _post_pre_inputs(n, dtype, lead, c=64):
    """Sub-layer l's streams ``[*lead, n, c]``, branch output and coefficients; sub-layer l+1's
    parameters; a branch weight."""
    x = streams(math.prod(lead), n, c, dtype).view(*lead, n, c)
    f_out = torch.randn(*lead, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(*lead, n, device=DEVICE), torch.rand(*lead, n, n, device=DEVICE) / n
    return [x, f_out, h_post, h_res, *mhc_params(n, c), torch.randn(c, c, device=DEVICE) / c**0.5]


def ref_post_pre(x, f_out, h_post, h_res, fn, scale, base):
    """The composition that :func:`mhc_post_pre` stands for, in the reference ops."""
    x_next = ref.post_res(x, f_out, h_post, h_res)
    coefficients = ref.mhc_coefficients(x_next, fn, scale, base)
    return ref.pre_mix(x_next, coefficients.h_pre), x_next, coefficients


def two_sublayers(post_pre, post, *, use_x_next=False):
    """Sub-layer l's end and all of sub-layer l+1, so that every output of ``post_pre`` reaches the
    result: the layer input through the branch, the pass-through, h_post and h_res through the
    post-res, h_pre directly too (and x_next a second time, as an observer's differentiable use, with
    ``use_x_next``)."""

    def run(x, f_out, h_post, h_res, fn, scale, base, w):
        layer_input, x_next, (h_pre2, h_post2, h_res2) = post_pre(x, f_out, h_post, h_res, fn, scale, base)
        outs = (post(x_next, branch(layer_input, w), h_post2, h_res2), h_pre2)
        return (*outs, 0.5 * x_next) if use_x_next else outs

    return run


def unfused_post_pre(x, f_out, h_post, h_res, fn, scale, base):
    """The same composition through the unfused kernels: :func:`post_res`, then :func:`mhc_pre`."""
    return mhc_pre(post_res(x, f_out, h_post, h_res), fn, scale, base)


fused_two = two_sublayers(mhc_post_pre, post_res)
unfused_two = two_sublayers(unfused_post_pre, post_res)
reference_two = two_sublayers(ref_post_pre, ref.post_res)


def reference_two_fp64(x, f_out, *params):
    """:func:`reference_two` with the streams and the branch output in fp64 too."""
    return reference_two(x.double(), f_out.double(), *params)


# bf16 against fp64, two sub-layers: the streams, the branch outputs and x's gradients are rounded
# to bf16 several times, and the parameter gradients are sums over 5 tokens that cancel; measured
# up to 2.5e-2 for the fused and the unfused kernels alike (n = 1, the fewest terms)
BF16_TWO_SUBLAYER_NORM_TOL = 5e-2
# bf16 fused against unfused kernels: same forward roundings (x_{l+1} is bit-identical), the
# gradient of x_{l+1} rounded once instead of at each op; measured up to 1.3e-2 (n = 1)
BF16_FUSED_UNFUSED_NORM_TOL = 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, lead", [(1, (5,)), (2, (1, 5)), (3, (5,)), (4, (1, 5))])
def test_post_pre_matches_reference(n, lead, dtype):
    # outputs and the gradients of x, f_out, h_post, h_res, fn, scale, base and the branch's weight
    inputs = _post_pre_inputs(n, dtype, lead)
    with use_kernels("triton"):
        if dtype == torch.float32:
            check_fwd_bwd(fused_two, reference_two, inputs)
            return
        check_fwd_bwd(fused_two, reference_two_fp64, inputs, norm_tol=BF16_TWO_SUBLAYER_NORM_TOL)
        inputs = [t.requires_grad_() for t in inputs]
        fused, unfused = _grads(fused_two, inputs), _grads(unfused_two, inputs)
    for i, (a, b) in enumerate(zip(fused, unfused)):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < BF16_FUSED_UNFUSED_NORM_TOL, f"output or gradient {i}: relative error {err:.2e}"


def test_post_pre_x_next_used_by_an_observer():
    # x_next used by an observer as well as by the post-res: autograd sums the two gradients first
    inputs = _post_pre_inputs(3, torch.float32, (5,))
    with use_kernels("triton"):
        check_fwd_bwd(
            two_sublayers(mhc_post_pre, post_res, use_x_next=True),
            two_sublayers(ref_post_pre, ref.post_res, use_x_next=True),
            inputs,
        )


@pytest.mark.parametrize("use", USES)
def test_post_pre_unused_outputs(use):
    # gradients that never reach the pre-mix node or the fused op must not break their backward
    x, f_out, h_post, h_res, *params = _post_pre_inputs(2, torch.float32, (5,))[:7]

    def run(post_pre):
        def f(x_, f_out_, h_post_, h_res_, *params_):
            layer_input, x_next, coefficients = post_pre(x_, f_out_, h_post_, h_res_, *(params_ or params))
            return USES[use](layer_input, x_next, coefficients)

        return f

    # only the streams reach the loss: sub-layer l+1's parameters then get no gradient at all
    inputs = [x, f_out, h_post, h_res, *([] if use == "streams only" else params)]
    with use_kernels("triton"):
        check_fwd_bwd(run(mhc_post_pre), run(ref_post_pre), inputs)


@pytest.mark.parametrize("one_pass", [True, False])
def test_post_pre_runs_the_fused_op_and_chains_the_gradients(one_pass):
    inputs = [t.requires_grad_() for t in _post_pre_inputs(4, torch.float32, (5,))]
    x = inputs[0]
    with use_kernels("triton"):
        with Launches() as forward:
            layer_input, x_next, coefficients = mhc_post_pre(*inputs[:7], one_pass_backward=one_pass)
        out = post_res(x_next, branch(layer_input, inputs[7]), coefficients.h_post, coefficients.h_res)
        with RecordOps() as backward, Launches() as backward_launches:
            torch.autograd.grad([out, coefficients.h_pre], x, [torch.ones_like(out), torch.ones_like(coefficients.h_pre)])
    # one pass for post-res + coefficients + pre-mix, not the unfused ops (a silent fallback fails here)
    assert forward.calls("post_res_coefficients_pre_mix_fwd") == 1
    assert forward.calls("post_res_coefficients_fwd") == forward.calls("pre_mix_fwd") == 0
    assert forward.calls("post_res_fwd") == forward.calls("coefficients_fwd") == 0
    assert all(made_by(t, "ChainedPostPre") for t in (layer_input, x_next, *coefficients))
    # backward: dh_pre alone from the pre-mix (no pre-mix dx pass, no sums by autograd); then either
    # one pass that forms x_{l+1}'s gradient and runs the post-res backward of l from it, or the
    # coefficient backward's dx pass, which sums x_{l+1}'s three gradients, then the post-res
    # backward of l (the other post-res backward is sub-layer l+1's own)
    assert backward_launches.calls("pre_mix_dh") == 1 and backward_launches.calls("pre_mix_bwd") == 0
    assert backward_launches.calls("transition_bwd_streams") == int(one_pass)
    assert backward_launches.calls("coefficients_bwd") == int(not one_pass)
    assert backward_launches.calls("post_res_bwd") == 2 - int(one_pass)
    assert backward.stream_adds(x.shape) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_pre_separate_pre_mix_gives_the_same_bits(dtype):
    # fused_pre_mix=False: the fused pass without its pre-mix, then the pre-mix kernel; same
    # outputs and gradients, bit for bit (same kernels' arithmetic, same backward)
    inputs = [t.requires_grad_() for t in _post_pre_inputs(3, dtype, (7,), c=192)]
    separate = two_sublayers(functools.partial(mhc_post_pre, fused_pre_mix=False), post_res)
    with use_kernels("triton"):
        with Launches() as launches:
            expected = _grads(separate, inputs)
        assert launches.calls("post_res_coefficients_fwd") == launches.calls("pre_mix_fwd") == 1
        assert launches.calls("post_res_coefficients_pre_mix_fwd") == 0
        for a, b in zip(_grads(fused_two, inputs), expected):
            assert torch.equal(a, b)


def test_torch_compile_traces_post_pre():
    with use_kernels("triton"):
        compiled = torch.compile(fused_two, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, reference_two, _post_pre_inputs(2, torch.float32, (5,)))


def test_hyper_connection_post_pre_uses_the_fused_op():
    first, f, params = _module(3)
    second, g, params2 = _module(3)
    with torch.no_grad():  # two different connections
        second.fn.normal_(0, 0.05)
        second.base.normal_()
    x = streams(5, 3, 64, torch.float32).requires_grad_()
    seen = []
    second.register_coefficient_hook(lambda module, x_, c: seen.append((module, x_, c)))
    with use_kernels("triton"):
        with Launches() as forward:
            layer_input, ctx = first.pre(x)
            u, ctx2 = first.post_pre(ctx, f(layer_input), second)
        out = second.post(ctx2, g(u))
        grads = torch.autograd.grad(out.square().sum(), [x, *params, *params2])
        layer_input, ctx = first.pre(x)
        x_next = first.post(ctx, f(layer_input))
        u_expected, ctx_expected = second.pre(x_next)
        expected = second.post(ctx_expected, g(u_expected))
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *params, *params2])
    assert forward.calls("post_res_coefficients_pre_mix_fwd") == 1
    assert [s[0] for s in seen] == [second, second]  # once for post_pre, once for the composition
    torch.testing.assert_close(seen[0][1], x_next, **FP32_TOL)
    for a, b in zip(seen[0][2], seen[1][2]):
        torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(out, expected, **FP32_TOL)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("t, n, c", [(4096, 4, 1024), (1000, 8, 1280), (777, 2, 4096), (555, 3, 320)])
def test_gpu_post_pre(t, n, c, one_pass):
    # bf16 streams at real shapes: every output and gradient as close to fp64 as the unfused kernels'
    # (the parameter gradients are sums over T tokens that cancel: the fused path's dscale was 1.5e-2
    # off fp64 at T = 4096 on an H100, so a fixed bound would not do; the unfused path is the yardstick)
    inputs = [t_.requires_grad_() for t_ in _post_pre_inputs(n, torch.bfloat16, (t,), c)]
    post_pre = functools.partial(mhc_post_pre, one_pass_backward=one_pass)
    with use_kernels("triton"):
        fused, unfused = _grads(two_sublayers(post_pre, post_res), inputs), _grads(unfused_two, inputs)
    exact = _grads(reference_two_fp64, inputs)

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for i, (a, b, e) in enumerate(zip(fused, unfused, exact)):
        assert torch.isfinite(a).all(), f"output or gradient {i}: non-finite values"
        assert err(a, e) <= max(1e-2, 1.25 * err(b, e)), f"output or gradient {i}: {err(a, e):.2e} vs unfused {err(b, e):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("t, n, c", [(4096, 4, 1024), (1000, 8, 1280), (777, 2, 4096), (555, 3, 320)])
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


@pytest.mark.parametrize("op_name", ["post_res", "pre_mix", "mhc_coefficients"])
def test_a_traced_backward_of_a_registered_op_holds_the_backward_ops(op_name):
    # AOT autograd traces a registered op's autograd kernel on fake tensors, outside dynamo (and, in
    # torch 2.11, outside torch.compiler.is_compiling()): the backward must call the registered ops,
    # never the launchers, which would read the fake tensors' data
    from torch.fx.experimental.proxy_tensor import make_fx

    import torchmhc.kernels.coefficients_op  # noqa: F401  (the modules register their ops)
    import torchmhc.kernels.post_res_op  # noqa: F401
    import torchmhc.kernels.pre_mix_op  # noqa: F401

    x, fn, scale, base, _ = _inputs(4, 64, torch.float32)
    h_pre, h_post, h_res = ref.mhc_coefficients(x, fn, scale, base)
    f_out = torch.randn(x.shape[0], 64, device=DEVICE)
    op = getattr(torch.ops.torchmhc, op_name).default
    args, backward_op = {
        "post_res": ((x, f_out, h_post, h_res), "torchmhc.post_res_backward.default"),
        "pre_mix": ((x, h_pre), "torchmhc.pre_mix_backward.default"),
        "mhc_coefficients": ((x, fn, scale, base, 20, 1e-6, 1e-6, 2.0), "torchmhc.mhc_coefficients_backward.default"),
    }[op_name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def forward_backward(*inputs):
        it = iter(inputs)
        out = op(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])
        out = out[:3] if isinstance(out, (tuple, list)) else [out]
        return torch.autograd.grad([o.sum() for o in out], inputs, allow_unused=True)

    with use_kernels("triton"):
        graph = make_fx(forward_backward, tracing_mode="fake")(*[t.detach().requires_grad_() for t in tensors])
    assert backward_op in {str(node.target) for node in graph.graph.nodes}
