"""Coefficient kernels (``torchmhc.kernels.coefficients_op``) against ``torchmhc.functional.mhc_coefficients``."""

import pytest
import torch
from kernel_cases import check_fwd_bwd, mhc_params, streams

from torchmhc import functional as ref
from torchmhc.kernels import mhc_coefficients, use_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64)])
def test_coefficients_match_reference(n, c, dtype):
    x = streams(7, n, c, dtype)
    with use_kernels("triton"):
        check_fwd_bwd(mhc_coefficients, ref.mhc_coefficients, [x, *mhc_params(n, c)])


@pytest.mark.parametrize("iters", [1, 2, 7])  # the kernels unroll 2·iters − 1 steps; iters = 1 is one step
def test_coefficients_other_hyperparameters(iters):
    x = streams(5, 4, 64, torch.float32).view(1, 5, 4, 64)

    def kernel(*args):
        return mhc_coefficients(*args, iters=iters, eps=1e-4, rms_eps=1e-3, post_scale=1.5)

    def reference(*args):
        return ref.mhc_coefficients(*args, iters=iters, eps=1e-4, rms_eps=1e-3, post_scale=1.5)

    with use_kernels("triton"):
        check_fwd_bwd(kernel, reference, [x, *mhc_params(4, 64)])


def test_coefficients_finite_for_extreme_logits():
    # logits of order 1e4: the max-shifted softmax must give exact zeros, never NaN/Inf
    x = streams(5, 4, 64, torch.float32)
    fn, scale, base = mhc_params(4, 64)
    base = base * 1e4
    with use_kernels("triton"):
        check_fwd_bwd(mhc_coefficients, ref.mhc_coefficients, [x, fn, scale, base], grad_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accepts_a_misaligned_view(dtype):
    # the dx step moves tiles by the copy engine, which needs 16-byte aligned bases: a view that
    # starts one element into its storage must give what an aligned copy gives, not fail or misread
    from torchmhc.kernels.coefficients_op import coefficients_bwd, coefficients_fwd

    t, n, c = 5, 4, 64
    x = streams(1 + t * n * c, 1, 1, dtype).flatten()[1:].view(t, n, c)
    assert x.data_ptr() % 16
    params = mhc_params(n, c)
    saved = coefficients_fwd(x, *params, 20, 1e-6, 1e-6, 2.0)[3:]
    grads = (torch.randn(t, n, device=x.device), torch.randn(t, n, device=x.device), torch.randn(t, n, n, device=x.device))
    add = streams(1 + t * n * c, 1, 1, dtype).flatten()[1:].view(t, n, c)
    args = (*saved, *grads, 20, 1e-6, 2.0)
    misaligned = coefficients_bwd(x, *params, *args, add=add)
    aligned = coefficients_bwd(x.clone(), *params, *args, add=add.clone())
    for a, b in zip(misaligned, aligned):
        assert torch.equal(a, b)


def test_coefficients_are_deterministic():
    x = streams(7, 4, 64, torch.float32).requires_grad_()
    params = [p.requires_grad_() for p in mhc_params(4, 64)]
    runs = []
    with use_kernels("triton"):
        for _ in range(2):
            out = mhc_coefficients(x, *params)
            loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
            runs.append([*out, *torch.autograd.grad(loss, [x, *params])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_coefficients_op_schema_fake_and_autograd():
    from torchmhc.kernels.coefficients_op import coefficients_op

    x = streams(5, 2, 64, torch.float32).requires_grad_()
    params = [p.requires_grad_() for p in mhc_params(2, 64)]
    torch.library.opcheck(
        coefficients_op,
        (x, *params, 20, 1e-6, 1e-6, 2.0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )

