"""Cross-sub-layer fusion (``torchmhc.kernels.post_res_coefficients_op``) against the composed reference."""

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, check_fwd_bwd, mhc_params, streams

from torchmhc import functional as ref
from torchmhc.kernels import post_res_coefficients, use_kernels


def _fused(*args):
    x_next, coefficients = post_res_coefficients(*args)
    return (x_next, *coefficients)


def _composed(x, f_out, h_post, h_res, fn, scale, base):
    x_next = ref.post_res(x, f_out, h_post, h_res)
    return (x_next, *ref.mhc_coefficients(x_next, fn, scale, base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, t", [(1, 64, 7), (2, 192, 21), (3, 64, 7), (4, 128, 7), (8, 64, 19)])
def test_post_res_coefficients_matches_composed_reference(n, c, t, dtype):
    # t > 16 spans several token tiles (16 under the interpreter), c = 192 several channel steps
    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE) / n
    # bf16: the reference rounds x_next, and the gradients flowing through it, on its own (the fused
    # backward adds the two gradients of x_next in fp32 and rounds once): last-bit differences that
    # cancellation can magnify elementwise, so bf16 is held to relative errors (METHOD: 1e-3..1e-2);
    # exactness of the fusion itself is the next test's job
    inputs = [x, f_out, h_post, h_res, *mhc_params(n, c)]
    with use_kernels("triton"):
        check_fwd_bwd(_fused, _composed, inputs, norm_tol=1e-2 if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("n", [3, 4])
def test_post_res_coefficients_equals_unfused_kernels(n):
    # the coefficients are computed from the rounded, stored x_next: bit-identical to the unfused path
    from torchmhc.kernels import mhc_coefficients, post_res

    x = streams(7, n, 128, torch.bfloat16)
    f_out = torch.randn(7, 128, device=DEVICE).to(torch.bfloat16)
    h_post, h_res = 2 * torch.rand(7, n, device=DEVICE), torch.rand(7, n, n, device=DEVICE) / n
    params = mhc_params(n, 128)
    with use_kernels("triton"):
        fused = _fused(x, f_out, h_post, h_res, *params)
        x_next = post_res(x, f_out, h_post, h_res)
        unfused = (x_next, *mhc_coefficients(x_next, *params))
    assert torch.equal(fused[0], unfused[0])
    for a, b in zip(fused[1:], unfused[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_post_res_coefficients_op_schema_fake_and_autograd():
    from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_op

    x = streams(5, 2, 64, torch.float32).requires_grad_()
    f_out = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    h_post = torch.rand(5, 2, device=DEVICE, requires_grad=True)
    h_res = torch.rand(5, 2, 2, device=DEVICE, requires_grad=True)
    params = [p.requires_grad_() for p in mhc_params(2, 64)]
    torch.library.opcheck(
        post_res_coefficients_op,
        (x, f_out, h_post, h_res, *params, 20, 1e-6, 1e-6, 2.0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, t", [(1, 64, 7), (2, 192, 21), (3, 320, 7), (4, 128, 21), (8, 64, 19)])
def test_post_res_coefficients_pre_mix_is_the_pre_mix_of_x_next(n, c, t, dtype):
    # the MIX re-walk: y bit-identical to the pre-mix kernel on the stored x_next, everything else
    # what the kernel writes without it; 64-channel mix steps walk C = 192 and 320 (64·odd) in
    # several reversed steps, t = 19, 21 leave a partial second tile of 16 tokens
    from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_fwd, post_res_coefficients_pre_mix_fwd
    from torchmhc.kernels.pre_mix_op import pre_mix_fwd

    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE) / n
    args = (x, f_out, h_post, h_res, *mhc_params(n, c), 20, 1e-6, 1e-6, 2.0)
    x_next, y, *coefficients = post_res_coefficients_pre_mix_fwd(*args, block_c_mix=64)
    plain = post_res_coefficients_fwd(*args)
    for a, b in zip((x_next, *coefficients), plain):
        assert torch.equal(a, b)
    assert y.dtype == dtype and y.shape == (t, c)
    assert torch.equal(y, pre_mix_fwd(x_next, coefficients[0]))
    if c > 64:  # the default mix step, larger
        assert torch.equal(post_res_coefficients_pre_mix_fwd(*args)[1], y)
    exact = torch.einsum("tj,tjc->tc", coefficients[0].double(), x_next.double())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, **FP32_TOL)
    else:
        torch.testing.assert_close(y, exact.to(dtype))


def test_post_res_coefficients_pre_mix_op_schema_and_fake():
    from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_pre_mix_op

    x = streams(5, 2, 64, torch.float32)
    f_out = torch.randn(5, 64, device=DEVICE)
    h_post, h_res = torch.rand(5, 2, device=DEVICE), torch.rand(5, 2, 2, device=DEVICE)
    torch.library.opcheck(
        post_res_coefficients_pre_mix_op,
        (x, f_out, h_post, h_res, *mhc_params(2, 64), 20, 1e-6, 1e-6, 2.0),
        test_utils=("test_schema", "test_faketensor"),
    )
