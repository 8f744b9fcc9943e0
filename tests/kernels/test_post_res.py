"""F_post,res kernel (``torchmhc.kernels.post_res_op``) against ``torchmhc.functional.post_res``."""

import pytest
import torch
from kernel_cases import DEVICE, check_fwd_bwd, streams

from torchmhc import functional as ref
from torchmhc.kernels import post_res, use_kernels


def _coefficients(t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(1, 64), (2, 128), (3, 64), (4, 128), (8, 64), (4, 192)])
def test_post_res_matches_reference(n, c, dtype):
    x = streams(7, n, c, dtype)
    f_out = torch.randn(7, c, device=DEVICE).to(dtype)
    with use_kernels("triton"):
        check_fwd_bwd(post_res, ref.post_res, [x, f_out, *_coefficients(7, n)])


def test_post_res_branch_output_in_another_dtype():
    # bf16 streams with an fp32 branch output: out in x.dtype, df in f_out's dtype
    x = streams(7, 4, 64, torch.bfloat16)
    f_out = torch.randn(7, 64, device=DEVICE)
    with use_kernels("triton"):
        check_fwd_bwd(post_res, ref.post_res, [x, f_out, *_coefficients(7, 4)], grad_tol=dict(rtol=2e-3, atol=2e-3))


def test_post_res_op_schema_fake_and_autograd():
    from torchmhc.kernels.post_res_op import post_res_op

    x = streams(5, 3, 64, torch.float32).requires_grad_()
    f_out = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    h_post, h_res = (t.requires_grad_() for t in _coefficients(5, 3))
    torch.library.opcheck(
        post_res_op, (x, f_out, h_post, h_res), test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
