"""bf16 splitting of fp32 operands (``torchmhc.kernels._precision``)."""

import pytest
import torch

from torchmhc.kernels._common import interpreting


@pytest.mark.parametrize("shape", [(24, 320), (7, 33), (1,)])
def test_split_bf16_parts_sum_to_the_input(shape):
    from torchmhc.kernels._precision import split_bf16

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(shape, device=dev) * torch.logspace(-3, 3, shape[-1], device=dev)
    hi, lo = split_bf16(a)
    assert hi.dtype == lo.dtype == torch.bfloat16 and hi.shape == lo.shape == a.shape
    if dev == "cuda":  # the GPU rounds to nearest; Triton's CPU interpreter truncates
        torch.testing.assert_close(hi, a.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(lo, (a - hi.float()).to(torch.bfloat16), rtol=0, atol=0)
    # hi is a to bf16 precision, and hi + lo keeps ~16 significant bits (14 when truncating)
    assert ((hi.float() - a).abs() <= a.abs() * 2.0**-7).all()
    assert ((hi.float() + lo.float() - a).abs() <= a.abs() * 2.0**-14).all()
