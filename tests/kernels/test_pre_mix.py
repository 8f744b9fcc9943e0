"""F_pre kernel (``torchmhc.kernels.pre_mix_op``) against ``torchmhc.functional.pre_mix``."""

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, check_fwd_bwd, streams

from torchmhc import functional as ref
from torchmhc.kernels import pre_mix, use_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64)])
def test_pre_mix_matches_reference(n, c, dtype):
    x = streams(7, n, c, dtype)
    h_pre = torch.rand(7, n, device=DEVICE) + 0.1
    with use_kernels("triton"):
        check_fwd_bwd(pre_mix, ref.pre_mix, [x, h_pre])


def test_pre_mix_keeps_leading_dims():
    x = streams(3 * 5, 4, 64, torch.float32).view(3, 5, 4, 64)
    h_pre = torch.rand(3, 5, 4, device=DEVICE)
    with use_kernels("triton"):
        check_fwd_bwd(pre_mix, ref.pre_mix, [x, h_pre])


def test_pre_mix_op_schema_fake_and_autograd():
    from torchmhc.kernels.pre_mix_op import pre_mix_op

    x = streams(5, 3, 64, torch.float32).requires_grad_()
    h_pre = torch.rand(5, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(pre_mix_op, (x, h_pre), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64)])
def test_pre_mix_backward_adds_in_the_same_pass(n, c, dtype):
    from torchmhc.kernels.pre_mix_op import pre_mix_bwd

    x = streams(7, n, c, dtype)
    h_pre = torch.rand(7, n, device=DEVICE) + 0.1
    grad = torch.randn(7, c, device=DEVICE).to(dtype)
    add = streams(7, n, c, dtype)
    dx, dh = pre_mix_bwd(grad, x, h_pre, add=add)
    dx_plain, dh_plain = pre_mix_bwd(grad, x, h_pre)
    assert torch.equal(dh, dh_plain)  # dh_pre does not see the added gradient
    expected = h_pre.double()[..., None] * grad.double()[:, None, :] + add.double()  # summed, then rounded once
    if dtype == torch.float32:
        torch.testing.assert_close(dx.double(), expected, **FP32_TOL)
        if DEVICE == "cpu":  # the interpreter's arithmetic (the GPU fuses h·g + add into one FMA)
            assert torch.equal(dx, dx_plain + add)  # the sum autograd would form, bit for bit
    else:
        torch.testing.assert_close(dx, expected.to(dtype))


def test_pre_mix_backward_op_schema_and_fake_with_add():
    from torchmhc.kernels.pre_mix_op import _pre_mix_backward_op

    x = streams(5, 3, 64, torch.float32)
    args = (torch.randn(5, 64, device=DEVICE), x, torch.rand(5, 3, device=DEVICE))
    for add in (None, torch.randn_like(x)):
        torch.library.opcheck(_pre_mix_backward_op, (*args, add), test_utils=("test_schema", "test_faketensor"))
