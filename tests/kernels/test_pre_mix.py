"""F_pre kernel (``torchmhc.kernels.pre_mix_op``) against ``torchmhc.functional.pre_mix``."""

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, check_fwd_bwd, streams

from torchmhc import functional as ref
from torchmhc.kernels import pre_mix, use_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64), (4, 192)])
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
@pytest.mark.parametrize("n, c", [(1, 64), (3, 64), (4, 128), (2, 320)])
def test_pre_mix_dh_is_the_backward_without_dx(n, c, dtype):
    from torchmhc.kernels.pre_mix_op import pre_mix_dh_op, pre_mix_bwd, pre_mix_dh

    x = streams(7, n, c, dtype)
    grad = torch.randn(7, c, device=DEVICE).to(dtype)
    dh = pre_mix_dh(grad, x)
    assert torch.equal(dh, pre_mix_bwd(grad, x, torch.rand(7, n, device=DEVICE))[1])
    torch.testing.assert_close(dh.double(), torch.einsum("tc,tjc->tj", grad.double(), x.double()), **FP32_TOL)
    torch.library.opcheck(pre_mix_dh_op, (grad, x), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("block_c", [16, 128, 512])
def test_pre_mix_dh_blocks_that_do_not_divide_c_are_masked(block_c):
    # C = 320 = 5·64: a block of 128 or 512 runs past C, whose tail must read as zeros
    from torchmhc.kernels.pre_mix_op import pre_mix_dh

    x = streams(5, 3, 320, torch.bfloat16)
    grad = torch.randn(5, 320, device=DEVICE).to(torch.bfloat16)
    dh = pre_mix_dh(grad, x, block_c=block_c, num_warps=2)
    torch.testing.assert_close(dh.double(), torch.einsum("tc,tjc->tj", grad.double(), x.double()), **FP32_TOL)


def test_pre_mix_dh_rejects_a_block_that_is_not_a_power_of_two():
    from torchmhc.kernels.pre_mix_op import pre_mix_dh

    with pytest.raises(ValueError, match="block_c must be a power of two"):
        pre_mix_dh(torch.randn(2, 64, device=DEVICE), streams(2, 2, 64, torch.float32), block_c=96)
