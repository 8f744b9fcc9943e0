"""The branch's RMSNorm inside the fused transition (``mhc_post_pre(..., norm_weight=)``): the layer
input comes out as ``rms_norm(y, (C,), weight, eps)`` of the pre-mix y, and the transition's
backward forms the norm's backward (``transition_backward_op.norm_dh`` and the stream pass). Checked
against the fp64 composition of the reference ops and ``torch.nn.functional.rms_norm``, through
every backward path (one pass, two passes, more streams than the one pass takes, unused outputs),
and through the module and the model."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, FP32_TOL, Launches, branch, check_fwd_bwd, made_by, mhc_params, streams
from test_chained import _grads, _post_pre_inputs, ref_post_pre

from torchmhc import functional as ref
from torchmhc.kernels import mhc_post_pre, post_res, use_kernels

EPS = 1e-5


def _with_norm(post_pre, **options):
    """``post_pre`` with a norm weight as an eighth input."""

    def run(x, f_out, h_post, h_res, fn, scale, base, weight):
        return post_pre(x, f_out, h_post, h_res, fn, scale, base, norm_weight=weight, norm_eps=EPS, **options)

    return run


def _ref_with_norm(x, f_out, h_post, h_res, fn, scale, base, weight):
    y, x_next, coefficients = ref_post_pre(x, f_out, h_post, h_res, fn, scale, base)
    return F.rms_norm(y, (y.shape[-1],), weight.to(y.dtype), EPS), x_next, coefficients


def _two(post_pre, post):
    """Sub-layer l's end and sub-layer l+1 with a branch, every output of ``post_pre`` used."""

    def run(x, f_out, h_post, h_res, fn, scale, base, weight, w):
        u, x_next, (h_pre2, h_post2, h_res2) = post_pre(x, f_out, h_post, h_res, fn, scale, base, weight)
        return post(x_next, branch(u, w), h_post2, h_res2), h_pre2

    return run


def _inputs(n, dtype, t=5, c=64):
    x, f_out, h_post, h_res, fn, scale, base, w = _post_pre_inputs(n, dtype, (t,), c)
    weight = 0.5 + torch.rand(c, device=DEVICE)  # not ones: its gradient and its use are both checked
    return [x, f_out, h_post, h_res, fn, scale, base, weight, w]


fused_two = _two(_with_norm(mhc_post_pre), post_res)
reference_two = _two(_ref_with_norm, ref.post_res)


def _fp64(x, f_out, *params):
    return reference_two(x.double(), f_out.double(), *params)


@pytest.mark.parametrize("n, c", [(1, 64), (4, 128), (3, 320), (8, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_writes_the_rms_norm_of_the_pre_mix(n, c, dtype):
    # z is rms_norm of the MIX launcher's y (the same bits of y, x_next and the coefficients), in
    # several mix steps (C = 320: five of 64), with a partial token tile (t = 21); whole rows padded
    # past C (C = 96, 320), and more streams than one packed half holds (n = 8)
    from torchmhc.kernels.post_res_coefficients_op import (
        post_res_coefficients_pre_mix_fwd,
        post_res_coefficients_pre_mix_norm_fwd,
    )

    t = 21
    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE) / n
    args = (x, f_out, h_post, h_res, *mhc_params(n, c))
    config = (20, 1e-6, 1e-6, 2.0)
    weight = 0.5 + torch.rand(c, device=DEVICE)
    x_next, y, *coefficients = post_res_coefficients_pre_mix_fwd(*args, *config, block_c_mix=64)
    x_next2, z, *coefficients2, rnorm = post_res_coefficients_pre_mix_norm_fwd(*args, weight, *config, EPS, block_c_mix=64)
    for a, b in zip((x_next, *coefficients), (x_next2, *coefficients2)):
        assert torch.equal(a, b)
    # and over whole rows (whole_rows: the same x_next and coefficients, z and rnorm to rounding)
    x_next3, z3, *coefficients3, rnorm3 = post_res_coefficients_pre_mix_norm_fwd(*args, weight, *config, EPS, whole_rows=True)
    for a, b in zip((x_next, *coefficients), (x_next3, *coefficients3)):
        assert torch.equal(a, b)
    exact_r = (y.double().square().mean(-1) + EPS).rsqrt()
    exact = y.double() * exact_r[:, None] * weight.double()
    for z, rnorm in ((z, rnorm), (z3, rnorm3)):
        assert z.dtype == dtype and z.shape == (t, c) and rnorm.dtype == torch.float32 and rnorm.shape == (t,)
        torch.testing.assert_close(rnorm.double(), exact_r, rtol=1e-5, atol=0)
        if dtype == torch.float32:
            torch.testing.assert_close(z.double(), exact, **FP32_TOL)
        else:
            torch.testing.assert_close(z, exact.to(dtype))


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_post_pre_with_norm_matches_reference(n, dtype, one_pass):
    # outputs and the gradients of all nine inputs (the norm weight's included) against fp64; n = 8
    # and two passes take the norm's backward on its own (dispatch._rms_norm_backward)
    inputs = _inputs(n, dtype)
    run = _two(_with_norm(functools.partial(mhc_post_pre, one_pass_backward=one_pass)), post_res)
    with use_kernels("triton"):
        if dtype == torch.float32:
            check_fwd_bwd(run, reference_two, inputs)
        else:
            check_fwd_bwd(run, _fp64, inputs, norm_tol=5e-2)


def test_the_fused_norm_runs_in_the_transition_kernels():
    # forward: the norm launcher and nothing else (no rms_norm after it); backward: norm_dh instead of
    # the pre-mix dh, then the one stream pass
    inputs = [t.requires_grad_() for t in _inputs(4, torch.float32)]
    with use_kernels("triton"):
        with Launches() as forward:
            u, x_next, (h_pre2, h_post2, h_res2) = _with_norm(mhc_post_pre)(*inputs[:8])
        out = post_res(x_next, branch(u, inputs[8]), h_post2, h_res2)
        with Launches() as backward:
            torch.autograd.grad(out.square().sum(), inputs)
    assert forward.calls("post_res_coefficients_pre_mix_norm_fwd") == 1
    assert forward.calls("post_res_coefficients_pre_mix_fwd") == forward.calls("pre_mix_fwd") == 0
    assert made_by(u, "ChainedPostPre")  # no norm node after the transition
    assert backward.calls("norm_dh") == 1 and backward.calls("pre_mix_dh") == 0
    assert backward.calls("transition_bwd_streams") == 1 and backward.calls("coefficients_bwd") == 0


@pytest.mark.parametrize("use", ["layer input only", "streams only", "coefficients only"])
def test_post_pre_with_norm_unused_outputs(use):
    # outputs that get no gradient: x_next's (layer input only: the norm's backward on its own, then
    # the two passes) or the layer input's (the norm weight then gets none either, and is not asked)
    x, f_out, h_post, h_res, fn, scale, base, weight, _ = _inputs(2, torch.float32)
    uses_norm = use == "layer input only"

    # only the streams reach the loss: sub-layer l+1's parameters get no gradient either
    params = [] if use == "streams only" else [fn, scale, base]

    def run(post_pre):
        def f(x_, f_out_, h_post_, h_res_, *rest):
            rest = (*rest, *([fn, scale, base] if use == "streams only" else []))
            if not uses_norm:
                rest = (*rest, weight)
            u, x_next, coefficients = post_pre(x_, f_out_, h_post_, h_res_, *rest)
            return {"layer input only": (u,), "streams only": (x_next,), "coefficients only": tuple(coefficients)}[use]

        return f

    inputs = [x, f_out, h_post, h_res, *params, *([weight] if uses_norm else [])]
    with use_kernels("triton"):
        check_fwd_bwd(run(_with_norm(mhc_post_pre)), run(_ref_with_norm), inputs)


def test_norm_without_the_fused_pre_mix_or_kernels_is_the_composition():
    # fused_pre_mix=False and the reference path apply rms_norm after the transition: same values
    inputs = _inputs(3, torch.float32)
    with use_kernels("triton"):
        check_fwd_bwd(_two(_with_norm(mhc_post_pre, fused_pre_mix=False), post_res), reference_two, inputs)
    with use_kernels("reference"):
        check_fwd_bwd(fused_two, reference_two, inputs)


@pytest.mark.parametrize(
    "weight, eps, match",
    [
        (torch.ones(63), EPS, r"norm_weight must have shape \[C=64\]"),
        (torch.ones(2, 64), EPS, r"norm_weight must be a float tensor of shape \[C=64\]"),
        (torch.ones(64, dtype=torch.int32), EPS, "norm_weight must be a float tensor"),
        ("ones", EPS, "norm_weight must be a float tensor"),
        (torch.ones(64), 0.0, "norm_eps must be a finite number > 0"),
        (torch.ones(64), float("nan"), "norm_eps must be a finite number > 0"),
    ],
)
def test_bad_norm_arguments_are_named(weight, eps, match):
    x, f_out, h_post, h_res, fn, scale, base = _inputs(2, torch.float32)[:7]
    if isinstance(weight, torch.Tensor):
        weight = weight.to(DEVICE)
    with pytest.raises(ValueError, match=match):
        mhc_post_pre(x, f_out, h_post, h_res, fn, scale, base, norm_weight=weight, norm_eps=eps)


def test_ops_schema_and_fake():
    from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_pre_mix_norm_op

    x, f_out, h_post, h_res, fn, scale, base, weight, _ = _inputs(2, torch.float32)
    torch.library.opcheck(
        post_res_coefficients_pre_mix_norm_op,
        (x, f_out, h_post, h_res, fn, scale, base, weight, 20, 1e-6, 1e-6, 2.0, EPS),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_traces_the_fused_norm():
    with use_kernels("triton"):
        compiled = torch.compile(fused_two, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, reference_two, _inputs(2, torch.float32))


def test_hyper_connection_post_pre_with_norm_module():
    # HyperConnection.post_pre(norm=RMSNorm) fuses it; a norm without a weight, or another callable,
    # runs after the transition; all give norm(next_hc.pre(post(...)))
    from test_chained import _module

    first, f, params = _module(3)
    second, _, _ = _module(3)
    x = streams(5, 3, 64, torch.float32)
    norms = [torch.nn.RMSNorm(64, eps=EPS), torch.nn.RMSNorm(64, eps=EPS, elementwise_affine=False), torch.tanh]
    with torch.no_grad():
        norms[0].weight.uniform_(0.5, 1.5)
    with use_kernels("triton"):
        layer_input, ctx = first.pre(x)
        f_out = f(layer_input)
        expected_input = second.pre(first.post(ctx, f_out))[0]
        for norm in norms:
            with Launches() as launches:
                u, _ = first.post_pre(ctx, f_out, second, norm)
            fused = norm is norms[0]
            assert launches.calls("post_res_coefficients_pre_mix_norm_fwd") == int(fused)
            torch.testing.assert_close(u, norm(expected_input), **FP32_TOL)
        with pytest.raises(ValueError, match="norm must be an nn.RMSNorm"):
            first.post_pre(ctx, f_out, second, "rms")


@pytest.mark.parametrize("arch", ["gpt", "moe"])
def test_models_with_and_without_the_fused_norms_agree(arch):
    # model.fuse_branch_norm: the same losses and gradients (the norm weights' included) as the
    # norms in the branches, through the kernels under the interpreter
    from torchmhc.config import ModelConfig
    from torchmhc.models import build_model

    extra = dict(num_experts=4, top_k=2) if arch == "moe" else {}
    cfg = ModelConfig(residual="mhc", arch=arch, dim=64, num_layers=2, num_heads=2, max_seq_len=16,
                      fuse_branch_norm=False, **extra)  # fmt: skip
    torch.manual_seed(0)
    apart = build_model(cfg).to(DEVICE)
    fused = build_model(dataclasses.replace(cfg, fuse_branch_norm=True)).to(DEVICE)
    fused.load_state_dict(apart.state_dict())
    for model in (apart, fused):
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                with torch.no_grad():
                    p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    idx = torch.randint(0, 256, (2, 16), device=DEVICE)
    results = []
    with use_kernels("triton"):
        for model in (apart, fused):
            with Launches() as launches:
                loss = model(idx).square().mean()
            results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
            assert launches.calls("post_res_coefficients_pre_mix_norm_fwd") == (3 if model is fused else 0)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(fused.named_parameters(), results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("t, n, c", [(4096, 4, 2048), (1000, 8, 1280), (555, 3, 320), (8192, 4, 1280)])
def test_gpu_post_pre_with_norm(t, n, c, one_pass):
    # bf16 streams at real shapes: every output and gradient as close to fp64 as the transition with
    # the norm after it (its own rms_norm) is
    inputs = [t_.requires_grad_() for t_ in _inputs(n, torch.bfloat16, t, c)]
    options = dict(one_pass_backward=one_pass)

    def apart(x, f_out, h_post, h_res, fn, scale, base, weight):
        y, x_next, coefficients = mhc_post_pre(x, f_out, h_post, h_res, fn, scale, base, **options)
        return F.rms_norm(y, (c,), weight, EPS), x_next, coefficients

    with use_kernels("triton"):
        fused = _grads(_two(_with_norm(mhc_post_pre, **options), post_res), inputs)
        unfused = _grads(_two(apart, post_res), inputs)
    exact = _grads(_fp64, inputs)

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for i, (a, b, e) in enumerate(zip(fused, unfused, exact)):
        assert torch.isfinite(a).all(), f"output or gradient {i}: non-finite values"
        assert err(a, e) <= max(1e-2, 1.25 * err(b, e)), f"output or gradient {i}: {err(a, e):.2e} vs apart {err(b, e):.2e}"
