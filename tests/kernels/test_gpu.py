"""The kernels at real shapes on a CUDA device (skipped without one): accuracy against an fp64
reference with the TF32-GEMM tolerances of docs/math.md §10, bf16 tolerances for bf16 outputs, and
bitwise run-to-run determinism."""

import pytest
import torch
from kernel_cases import FP32_TOL, check_fwd_bwd, hc_params, mhc_params, streams

from torchmhc import functional as ref
from torchmhc.kernels import hc_coefficients, hc_pre, mhc_coefficients, post_res, pre_mix, use_kernels

pytestmark = pytest.mark.gpu

# odd token counts leave partial tiles (the copy engine zero-fills their loads, clips their stores);
# n = 3 and n = 1 pad the stream axis
SHAPES = [(4096, 4, 1024), (1000, 8, 1280), (777, 2, 4096), (555, 3, 320), (99, 1, 64)]
# HC: the gpu-small and a large training shape too (its dx pass runs on T·n rows)
HC_SHAPES = [(16384, 4, 4096), (8192, 4, 1280), *SHAPES[1:]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", SHAPES)
def test_gpu_coefficients(t, n, c, dtype):
    with use_kernels("triton"):
        # kernel_cases' defaults on CUDA: the TF32-GEMM tolerances (weight gradient atol 3e-2)
        check_fwd_bwd(mhc_coefficients, ref.mhc_coefficients, [streams(t, n, c, dtype), *mhc_params(n, c)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", SHAPES)
def test_gpu_mixes(t, n, c, dtype):
    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device="cuda").to(dtype)
    h_pre, h_post, h_res = torch.rand(t, n, device="cuda"), 2 * torch.rand(t, n, device="cuda"), torch.rand(t, n, n, device="cuda")
    with use_kernels("triton"):
        check_fwd_bwd(pre_mix, ref.pre_mix, [x, h_pre], grad_tol=FP32_TOL)
        check_fwd_bwd(post_res, ref.post_res, [x, f_out, h_post, h_res], grad_tol=FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", HC_SHAPES)
def test_gpu_hc_coefficients(t, n, c, dtype):
    with use_kernels("triton"):
        # kernel_cases' defaults on CUDA: the TF32-GEMM tolerances (weight gradient atol 3e-2)
        check_fwd_bwd(hc_coefficients, ref.hc_coefficients, [streams(t, n, c, dtype), *hc_params(n, c)])


def _unchained(coefficients):
    """A sub-layer's first half from separate coefficient and pre-mix ops, as :func:`hc_pre` returns it."""

    def pre(x, *params):
        h = coefficients(x, *params)
        return pre_mix(x, h.h_pre), x, h

    return pre


@pytest.mark.parametrize(
    "pre, make_params",
    [(_unchained(mhc_coefficients), mhc_params), (_unchained(hc_coefficients), hc_params), (hc_pre, hc_params)],
)
def test_gpu_sublayer_deterministic(pre, make_params):
    x = streams(4096, 4, 1024, torch.bfloat16).requires_grad_()
    params = [p.requires_grad_() for p in make_params(4, 1024)]
    runs = []
    with use_kernels("triton"):
        for _ in range(2):
            layer_in, x_for_post, (_, h_post, h_res) = pre(x, *params)
            out = post_res(x_for_post, layer_in, h_post, h_res)
            runs.append([out, *torch.autograd.grad(out.float().square().sum(), [x, *params])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _post_res_inputs(t: int, n: int, c: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """``[x, f_out, h_post, h_res]`` of a post-res on the GPU."""
    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device="cuda").to(dtype)
    return [x, f_out, 2 * torch.rand(t, n, device="cuda"), torch.rand(t, n, n, device="cuda") / n]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", SHAPES)
def test_gpu_post_res_coefficients(t, n, c, dtype):
    from torchmhc.kernels import post_res_coefficients

    def fused(*args):
        x_next, coefficients = post_res_coefficients(*args)
        return (x_next, *coefficients)

    def composed(x_, f_, hp, hr, fn, scale, base):
        x_next = ref.post_res(x_, f_, hp, hr)
        return (x_next, *ref.mhc_coefficients(x_next, fn, scale, base))

    with use_kernels("triton"):
        check_fwd_bwd(fused, composed, [*_post_res_inputs(t, n, c, dtype), *mhc_params(n, c)], norm_tol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", SHAPES)
def test_gpu_post_res_coefficients_equals_unfused_kernels(t, n, c, dtype):
    # same fused multiply-adds in the same order as post_res: x_next bit-identical on the GPU too
    from torchmhc.kernels import post_res_coefficients

    inputs, params = _post_res_inputs(t, n, c, dtype), mhc_params(n, c)
    with use_kernels("triton"):
        x_next, fused = post_res_coefficients(*inputs, *params)
        unfused_x = post_res(*inputs)
        unfused = mhc_coefficients(unfused_x, *params)
    assert torch.equal(x_next, unfused_x)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # two ~16-bit projections: docs/math.md §10 TF32 tolerance


@pytest.mark.parametrize("t, n, c", [(4096, 4, 1024), (1000, 8, 1280), (555, 3, 320)])
def test_gpu_post_pre_matches_reference_and_is_deterministic(t, n, c):
    # the chained transition (mhc_post_pre): its backward sums x_{l+1}'s three gradients in the
    # coefficient dx pass, then l's post-res backward; against the composed reference, and run to run
    from torchmhc.kernels import mhc_post_pre

    def fused(x_, f_, hp, hr, fn, scale, base):
        u, x_next, c2 = mhc_post_pre(x_, f_, hp, hr, fn, scale, base)
        return (post_res(x_next, u, c2.h_post, c2.h_res), c2.h_pre)

    def composed(x_, f_, hp, hr, fn, scale, base):
        x_next = ref.post_res(x_, f_, hp, hr)
        c2 = ref.mhc_coefficients(x_next, fn, scale, base)
        return (ref.post_res(x_next, ref.pre_mix(x_next, c2.h_pre), c2.h_post, c2.h_res), c2.h_pre)

    inputs = [*_post_res_inputs(t, n, c, torch.bfloat16), *mhc_params(n, c)]
    with use_kernels("triton"):
        check_fwd_bwd(fused, composed, inputs, norm_tol=1e-2)
        leaves = [v.detach().requires_grad_() for v in inputs]
        runs = []
        for _ in range(2):
            out, h_pre = fused(*leaves)
            runs.append([out, *torch.autograd.grad(out.float().square().sum() + h_pre.sum(), leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n, c", [(8192, 4, 2048), (8192, 4, 1280), *SHAPES])
def test_gpu_post_res_coefficients_pre_mix_equals_two_kernels(t, n, c, dtype):
    # the fused kernel's pre-mix re-walk (read back through L2) against the fused kernel without it
    # followed by the pre-mix kernel: every output bit-identical, at the launcher's defaults, and at
    # C = 2048 (more written than the H100's L2 holds) at other token tiles and mix steps too
    from torchmhc.kernels.post_res_coefficients_op import post_res_coefficients_fwd, post_res_coefficients_pre_mix_fwd
    from torchmhc.kernels.pre_mix_op import pre_mix_fwd

    args = (*_post_res_inputs(t, n, c, dtype), *mhc_params(n, c), 20, 1e-6, 1e-6, 2.0)
    for block_t, block_c_mix in ((None, None), (16, 64), (None, 256))[: 3 if c == 2048 else 1]:
        # the same token tile on both sides: the coefficients' fp32 sums are laid out by it
        x_next, *coefficients = post_res_coefficients_fwd(*args, block_t=block_t)
        y = pre_mix_fwd(x_next, coefficients[0])
        fused = post_res_coefficients_pre_mix_fwd(*args, block_t=block_t, block_c_mix=block_c_mix)
        for i, (a, b) in enumerate(zip(fused, (x_next, y, *coefficients))):
            assert torch.equal(a, b), f"block_t={block_t}, block_c_mix={block_c_mix}: output {i}"
