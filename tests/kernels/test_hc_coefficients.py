"""HC coefficient kernels (``torchmhc.kernels.hc_coefficients_op``) against
``torchmhc.functional.hc_coefficients``, the chained HC sub-layer (``torchmhc.kernels.hc_pre``) and
the module path (``HyperConnection(residual="hc")``)."""

import copy

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, Launches, RecordOps, check_fwd_bwd, hc_params, made_by, streams, sublayers

import torchmhc
from torchmhc import functional as ref
from torchmhc.kernels import hc_coefficients, hc_pre, use_kernels

# odd token counts leave partial tiles; n = 1, 3 pad the stream axis, n = 8 fills the 16 columns most
CASES = [(1, 64, 7), (2, 192, 19), (3, 64, 19), (4, 192, 7), (8, 64, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, t", CASES)
def test_hc_coefficients_match_reference(n, c, t, dtype):
    # outputs and the gradients of x, fn, scale and base against the fp64 reference (bf16 streams:
    # the reference reads the same bf16 values, and x's gradient is compared in bf16)
    with use_kernels("triton"):
        check_fwd_bwd(hc_coefficients, ref.hc_coefficients, [streams(t, n, c, dtype), *hc_params(n, c)])


def test_hc_coefficients_fp16_streams_and_leading_dims():
    x = streams(10, 3, 64, torch.float16).view(2, 5, 3, 64)
    with use_kernels("triton"):
        check_fwd_bwd(hc_coefficients, ref.hc_coefficients, [x, *hc_params(3, 64)])


def test_hc_coefficients_rms_eps():
    # small streams, large epsilon: the epsilon changes every normalization visibly
    x = 0.1 * streams(7, 4, 64, torch.float32)

    def kernel(*args):
        return hc_coefficients(*args, rms_eps=0.05)

    def reference(*args):
        return ref.hc_coefficients(*args, rms_eps=0.05)

    with use_kernels("triton"):
        check_fwd_bwd(kernel, reference, [x, *hc_params(4, 64)])


@pytest.mark.parametrize("fn_scale", [0.0, 1e-3, 40.0])
def test_hc_coefficients_at_the_ends_of_tanh(fn_scale):
    # θ = 0 is HC's start (tanh = 0, its gradient still reaches θ); tiny projections take the
    # kernels' series for tanh; huge ones saturate it (no NaN/Inf, gradients through 1 − tanh² → 0)
    x = streams(7, 4, 64, torch.float32)
    fn, scale, base = hc_params(4, 64)
    with use_kernels("triton"):
        check_fwd_bwd(hc_coefficients, ref.hc_coefficients, [x, fn * fn_scale, scale, base])


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU's products keep ~16 bits of fn, not fp32's 24")
def test_hc_coefficients_tiny_dynamic_part_as_accurate_as_fp32():
    # base = 0: the coefficients are s·tanh(m) ~ 1e-3, as accurate as the fp32 reference's (measured
    # up to 1.8x its error; tanh as (1 − e^(−2|m|))/(1 + e^(−2|m|)) alone, without the kernels'
    # series near 0, was 30-60x)
    x = streams(19, 4, 64, torch.float32)
    fn, scale, base = hc_params(4, 64)
    args = (x, 1e-3 * fn, scale, torch.zeros_like(base))
    with use_kernels("triton"):
        out = hc_coefficients(*args)
    fp32 = ref.hc_coefficients(*args)
    exact = ref.hc_coefficients(*(t.double() for t in args))
    for a, b, e in zip(out, fp32, exact):
        assert (a.double() - e).abs().max() <= 3 * (b.double() - e).abs().max()


def test_hc_coefficients_are_deterministic():
    x = streams(19, 4, 64, torch.float32).requires_grad_()
    params = [p.requires_grad_() for p in hc_params(4, 64)]
    runs = []
    with use_kernels("triton"):
        for _ in range(2):
            out = hc_coefficients(x, *params)
            loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
            runs.append([*out, *torch.autograd.grad(loss, [x, *params])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_hc_coefficients_op_schema_fake_and_autograd():
    from torchmhc.kernels.hc_coefficients_op import hc_coefficients_op

    x = streams(5, 3, 64, torch.float32).requires_grad_()
    params = [p.requires_grad_() for p in hc_params(3, 64)]
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(hc_coefficients_op, (x, *params, 1e-6), test_utils=checks)


def test_hc_dispatch_takes_the_reference_for_what_the_kernels_do_not_handle(monkeypatch):
    from torchmhc.kernels import dispatch

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran")

    x = streams(3, 4, 64, torch.float32)
    params = hc_params(4, 64)
    with use_kernels("triton"):
        hc_coefficients(x, *params)  # the kernels run: the reference is not needed
        with pytest.raises(ValueError, match=r"fn must have shape \[6, 64\]"):
            hc_coefficients(x, params[0][:, :32], *params[1:])  # malformed: the reference's error
        monkeypatch.setattr(dispatch.ref, "hc_coefficients", boom)
        hc_coefficients(x, *params)
        for other in (x[..., :48], x.double()):  # C not a multiple of 64, fp64 streams
            params_ = hc_params(4, other.shape[-1])
            with pytest.raises(AssertionError, match="reference ran"):
                hc_coefficients(other, *params_)
    with use_kernels("reference"), pytest.raises(AssertionError, match="reference ran"):
        hc_coefficients(x, *params)


def test_torch_compile_traces_the_hc_ops():
    with use_kernels("triton"):
        compiled = torch.compile(hc_coefficients, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, ref.hc_coefficients, [streams(7, 2, 64, torch.float32), *hc_params(2, 64)])
        compiled = torch.compile(chained, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, reference, _sublayer_inputs(2, torch.float32))


# -- the chained sub-layer: coefficients + pre-mix as one node, x's gradients summed in one pass --


chained, unchained, reference = sublayers(hc_pre, hc_coefficients, ref.hc_coefficients)


def reference_fp64(x, *params):
    """:func:`reference` with the streams in fp64 too: exact sums of x's three gradients."""
    return reference(x.double(), *params)


def _sublayer_inputs(n, dtype, t=7, c=64):
    return [streams(t, n, c, dtype), *hc_params(n, c), torch.randn(c, c, device=DEVICE) / c**0.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_chained_hc_sublayer_matches_reference(n, dtype):
    # output and the gradients of x, fn, scale, base and the branch's weight; bf16 against fp64
    # with the chained mHC sub-layer's bound (x's gradient rounded once, toward zero in the interpreter)
    with use_kernels("triton"):
        if dtype == torch.float32:
            check_fwd_bwd(chained, reference, _sublayer_inputs(n, dtype))
        else:
            check_fwd_bwd(chained, reference_fp64, _sublayer_inputs(n, dtype), norm_tol=2e-2)


@pytest.mark.parametrize("sublayer, adds", [(chained, 0), (unchained, 2)])
def test_chained_hc_backward_sums_x_gradients_in_the_kernel(sublayer, adds):
    x, *params = _sublayer_inputs(4, torch.float32)
    x.requires_grad_()
    with use_kernels("triton"):
        out = sublayer(x, *params)
        with RecordOps() as ops, Launches() as launches:
            torch.autograd.grad(out, x, torch.ones_like(out))
    assert ops.stream_adds(x.shape) == adds
    assert launches.calls("hc_coefficients_bwd") == 1
    if sublayer is chained:  # dh_pre alone from the pre-mix, then one dx pass sums all of x's gradients
        assert launches.calls("pre_mix_dh") == 1 and launches.calls("pre_mix_bwd") == 0


def test_chained_hc_unused_outputs():
    # only the coefficients reach the loss, or only the pass-through: absent gradients must not break
    x, fn, scale, base, _ = _sublayer_inputs(3, torch.float32)

    def ref_pre(x_, *params):
        coefficients = ref.hc_coefficients(x_, *params)
        return ref.pre_mix(x_, coefficients.h_pre), x_, coefficients

    def uses(pre, pick):
        return lambda x_, *params: pick(*pre(x_, *(params or (fn, scale, base))))

    with use_kernels("triton"):
        coefficients_only = lambda y, xp, c: tuple(c)  # noqa: E731
        check_fwd_bwd(uses(hc_pre, coefficients_only), uses(ref_pre, coefficients_only), [x, fn, scale, base])
        streams_only = lambda y, xp, c: 2 * xp  # noqa: E731
        check_fwd_bwd(uses(hc_pre, streams_only), uses(ref_pre, streams_only), [x])


# -- the module ------------------------------------------------------------------------------------


def test_hyper_connection_hc_runs_the_chained_kernels_and_matches_the_reference():
    torch.manual_seed(0)
    hc = torchmhc.HyperConnection(64, n=4, residual="hc", layer_index=1).to(DEVICE)
    with torch.no_grad():  # away from the start (θ = 0): non-trivial dynamic coefficients
        hc.fn.normal_(0, 0.2)
        hc.base.normal_()
        hc.scale.fill_(0.7)
    lin = torch.nn.Linear(64, 64).to(DEVICE)
    x = streams(10, 4, 64, torch.float32).view(2, 5, 4, 64)

    def run(mode, hc_, lin_, x_):
        x_ = x_.detach().requires_grad_()
        with use_kernels(mode), Launches() as ops:
            layer_input, ctx = hc_.pre(x_)
            out = hc_.post(ctx, torch.tanh(lin_(layer_input)))
            grads = torch.autograd.grad(out.square().sum(), [x_, *hc_.parameters(), *lin_.parameters()])
            coefficients = hc_.coefficients(x_)
        return ctx, ops, [out, *coefficients, *grads]

    ctx, ops, results = run("triton", hc, lin, x)
    assert made_by(ctx.x, "ChainedPre")  # post() reads the pass-through view
    assert ops.calls("hc_coefficients_fwd") == 2  # pre() and coefficients()
    assert ops.calls("hc_coefficients_bwd") == 1
    # the same module in fp64 through the reference
    _, ref_ops, expected = run("reference", copy.deepcopy(hc).double(), copy.deepcopy(lin).double(), x.double())
    assert ref_ops.calls("hc_coefficients_fwd") == 0
    # relative error of each tensor as a whole: the loss's gradients reach ~1e3, where an fp32
    # computation, the reference's included, is 1e-4 off elementwise (measured ~2e-7 as a whole
    # on CPU for the kernels and for the fp32 reference alike)
    for i, (a, b) in enumerate(zip(results, expected)):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < FP32_TOL["rtol"], f"output, coefficient or gradient {i}: relative error {err:.1e}"


@pytest.mark.gpu
@pytest.mark.parametrize("t, n, c", [(16384, 4, 4096), (8192, 4, 1280), (1000, 8, 1280), (555, 3, 320)])
def test_gpu_chained_hc_sublayer(t, n, c):
    # bf16 streams at real shapes: against fp64, and x's gradient at least as accurate as unchained
    # (on the CPU the interpreter rounds to bf16 toward zero, and the chained path is not: mHC's too)
    inputs = [t_.requires_grad_() for t_ in _sublayer_inputs(n, torch.bfloat16, t, c)]
    with use_kernels("triton"):
        check_fwd_bwd(chained, reference_fp64, inputs, norm_tol=1e-2)
        g = torch.randn(t, n, c, device=DEVICE).to(torch.bfloat16)
        dx_chained, dx_unchained = (torch.autograd.grad(f(*inputs), inputs[0], g)[0] for f in (chained, unchained))
    exact_inputs = [inputs[0].detach().double().requires_grad_(), *(p.detach().double() for p in inputs[1:])]
    dx_exact = torch.autograd.grad(reference(*exact_inputs), exact_inputs[0], g.double())[0]

    def err(dx):
        return ((dx.double() - dx_exact).norm() / dx_exact.norm()).item()

    assert err(dx_chained) <= err(dx_unchained) * 1.01
