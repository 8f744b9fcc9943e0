"""The reference math against independent re-derivations from docs/math.md, gradcheck and edge cases."""

import math
import re

import pytest
import torch
from torch.autograd import gradcheck

import torchmhc as mhc
from torchmhc import functional as F
from conftest import make_mhc_params


# -- independent references, written from docs/math.md §5 (not calling the library) --------------------


def sinkhorn_paper_reference(h: torch.Tensor, iters: int) -> torch.Tensor:
    """Paper Eq. 9: M = exp(h); t_max times normalize columns, then rows."""
    m = torch.exp(h)
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


def sinkhorn_v4_comb_reference(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4 in its own comb orientation ([source j, destination k])."""
    comb = torch.softmax(comb, -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


# -- Sinkhorn ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_sinkhorn_is_doubly_stochastic(n):
    logits = torch.randn(64, n, n)
    for convention, row_tol in (("v4", 1e-5), ("paper", 1e-6)):
        h = mhc.sinkhorn_knopp(logits, convention=convention)
        assert h.dtype == torch.float32 and h.shape == (64, n, n)
        assert (h >= 0).all()
        assert (h.sum(-1) - 1).abs().max() < row_tol
        assert (h.sum(-2) - 1).abs().max() < 5e-3  # std-1 logits: t_max = 20 is plenty
        assert torch.linalg.matrix_norm(h, ord=2).max() <= 1 + 1e-5


def test_sinkhorn_columns_converge_with_iterations():
    logits = 3 * torch.randn(256, 4, 4, dtype=torch.float64)
    col_error = [(mhc.sinkhorn_knopp(logits, iters=t).sum(-2) - 1).abs().max().item() for t in (5, 20, 200)]
    assert col_error[0] > col_error[1] > col_error[2]
    assert col_error[1] < 0.1  # docs/math.md §5: ~0.05 after 20 rounds for std-3 logits
    assert col_error[2] < col_error[1] / 10


def test_products_of_many_projections_stay_doubly_stochastic():
    product = torch.eye(4, dtype=torch.float64).expand(16, 4, 4)
    for _ in range(60):  # the paper's 27B model has 60 sub-layers
        product = mhc.sinkhorn_knopp(2 * torch.randn(16, 4, 4, dtype=torch.float64)) @ product
    assert (product >= 0).all()
    assert (product.sum(-1) - 1).abs().max() < 1e-4
    assert (product.sum(-2) - 1).abs().max() < 0.05
    assert torch.linalg.matrix_norm(product, ord=2).max() <= 1 + 1e-4


def test_paper_and_v4_conventions_agree_without_eps():
    h = torch.randn(32, 4, 4, dtype=torch.float64)
    paper = mhc.sinkhorn_knopp(h, iters=20, convention="paper")
    v4 = mhc.sinkhorn_knopp(h, iters=20, eps=0.0, convention="v4")
    torch.testing.assert_close(paper, v4, rtol=0, atol=1e-12)
    torch.testing.assert_close(paper, sinkhorn_paper_reference(h, 20), rtol=0, atol=1e-12)


def test_v4_convention_matches_deepseek_comb_orientation():
    comb = torch.randn(32, 5, 5, dtype=torch.float64)
    ours = mhc.sinkhorn_knopp(comb.transpose(-1, -2), iters=20, eps=1e-6)
    torch.testing.assert_close(ours, sinkhorn_v4_comb_reference(comb, 20, 1e-6).transpose(-1, -2), rtol=0, atol=1e-14)
    # orientation matters: V4's result is not symmetric, so reading it untransposed must differ
    assert (ours - sinkhorn_v4_comb_reference(comb, 20, 1e-6)).abs().max() > 1e-3


@pytest.mark.parametrize("convention", ["v4", "paper"])
def test_sinkhorn_recomputing_backward_matches_autograd_through_the_loop(convention):
    h = torch.randn(8, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(8, 4, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(mhc.sinkhorn_knopp(h, 20, convention=convention), h, grad)
    if convention == "paper":
        reference = sinkhorn_paper_reference(h, 20)
    else:
        reference = sinkhorn_v4_comb_reference(h.transpose(-1, -2), 20, 1e-6).transpose(-1, -2)
    (expected,) = torch.autograd.grad(reference, h, grad)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("convention", ["v4", "paper"])
def test_sinkhorn_keeps_only_the_logits_for_backward(convention):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        mhc.sinkhorn_knopp(torch.randn(8, 4, 4, requires_grad=True), iters=20, convention=convention)
    assert saved == [torch.Size([8, 4, 4])]  # not the 2·t_max intermediates


@pytest.mark.parametrize("convention", ["v4", "paper"])
def test_sinkhorn_gradcheck(convention):
    h = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: mhc.sinkhorn_knopp(t, 10, convention=convention), (h,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("convention", ["v4", "paper"])
def test_sinkhorn_extreme_logits_stay_finite(dtype, convention):
    n = 4
    cases = [
        torch.full((n, n), 1e4),
        torch.full((n, n), -1e4),
        torch.where(torch.rand(n, n) > 0.5, 1e4, -1e4),
        torch.zeros(n, n).index_fill_(0, torch.tensor([0]), 0).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(3e4)),
        torch.randn(n, n) * 1e4,
    ]
    for logits in cases:
        logits = logits.to(dtype).requires_grad_()
        h = mhc.sinkhorn_knopp(logits, convention=convention)
        (grad,) = torch.autograd.grad(h.square().sum(), logits)
        assert torch.isfinite(h).all() and torch.isfinite(grad).all(), logits
        assert h.dtype == torch.float32 and grad.dtype == dtype
    equal = mhc.sinkhorn_knopp(torch.full((n, n), 7.0), convention=convention)
    torch.testing.assert_close(equal, torch.full((n, n), 1 / n))


def sinkhorn_log_reference(h: torch.Tensor, iters: int) -> torch.Tensor:
    """Paper Eq. 9 on log-matrices with torch.logsumexp, for autograd to differentiate."""
    for _ in range(iters):
        h = h - torch.logsumexp(h, -2, keepdim=True)
        h = h - torch.logsumexp(h, -1, keepdim=True)
    return h.exp()


@pytest.mark.parametrize(("dtype", "gap"), [(torch.float32, 200.0), (torch.float64, 800.0)])
def test_paper_sinkhorn_keeps_rows_whose_exponentials_underflow(dtype, gap):
    # exp(-gap) underflows: the plain exp-then-normalize form returned a zero second row
    logits = torch.tensor([[0.0, 0.0], [-gap, -gap]], dtype=dtype)
    for convention, eps in (("paper", 1e-6), ("v4", 0.0)):
        h = mhc.sinkhorn_knopp(logits, convention=convention, eps=eps)
        torch.testing.assert_close(h, torch.full((2, 2), 0.5, dtype=dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [1.0, 30.0, 1e4])
@pytest.mark.parametrize(("convention", "eps"), [("paper", 1e-6), ("v4", 0.0), ("v4", 1e-6)])
def test_sinkhorn_rows_sum_to_one_for_any_finite_logits(dtype, std, convention, eps):
    for n in (3, 4, 5):
        logits = (std * torch.randn(256, n, n, dtype=torch.float64)).to(dtype).requires_grad_()
        h = mhc.sinkhorn_knopp(logits, convention=convention, eps=eps)
        (grad,) = torch.autograd.grad(h.square().sum(), logits)
        assert torch.isfinite(h).all() and torch.isfinite(grad).all()
        assert (h >= 0).all() and (h <= 1).all()
        assert (h.sum(-1) - 1).abs().max() < 1e-5, (n, (h.sum(-1) - 1).abs().max())


def test_v4_without_eps_is_the_paper_function_for_extreme_logits():
    logits = 1e4 * torch.randn(256, 4, 4)
    v4 = mhc.sinkhorn_knopp(logits, eps=0.0)  # was NaN: softmax zeros divided by a zero sum
    torch.testing.assert_close(v4, mhc.sinkhorn_knopp(logits, convention="paper"), rtol=0, atol=0)


@pytest.mark.parametrize("std", [1.0, 30.0, 1e4])
def test_log_domain_backward_matches_autograd_through_the_log_loop(std):
    h = (std * torch.randn(8, 4, 4, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(8, 4, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad(mhc.sinkhorn_knopp(h, 20, convention="paper"), h, grad)
    (expected,) = torch.autograd.grad(sinkhorn_log_reference(h, 20), h, grad)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("std", [30.0, 1e4])
@pytest.mark.parametrize(("convention", "eps"), [("paper", 1e-6), ("v4", 0.0), ("v4", 1e-6)])
def test_sinkhorn_gradcheck_large_logits(std, convention, eps):
    h = (std * torch.randn(3, 3, 3, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda t: mhc.sinkhorn_knopp(t, 10, eps, convention=convention), (h,))


def test_sinkhorn_rejects_bad_eps():
    for eps in (float("inf"), float("nan"), -1e-6):
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got"):
            mhc.sinkhorn_knopp(torch.randn(4, 4), eps=eps)
    for eps in (None, "1e-6", True):
        with pytest.raises(TypeError, match=r"eps must be a finite number >= 0, got"):
            mhc.sinkhorn_knopp(torch.randn(4, 4), eps=eps)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., n, n\]"):
        mhc.sinkhorn_knopp(torch.randn(4, 3))
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        mhc.sinkhorn_knopp(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        mhc.sinkhorn_knopp(torch.randn(4, 4), iters=0)
    with pytest.raises(ValueError, match="convention"):
        mhc.sinkhorn_knopp(torch.randn(4, 4), convention="torch")


# -- mHC coefficients ---------------------------------------------------------------------------


def mhc_coefficients_reference(x, fn, scale, base, n, iters=20, eps=1e-6, rms_eps=1e-6):
    """docs/math.md §4 with DeepSeek-V4's formulas, step by step in comb orientation."""
    flat = x.flatten(-2).double()
    mixes = (flat @ fn.double().T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = (mixes[..., 2 * n :] * scale[2] + base[2 * n :]).unflatten(-1, (n, n))
    return pre, post, sinkhorn_v4_comb_reference(comb, iters, eps).transpose(-1, -2)


@pytest.mark.parametrize("n,c", [(1, 5), (2, 7), (4, 16), (3, 33)])
def test_mhc_coefficients_match_reference(n, c):
    x = torch.randn(2, 3, n, c, dtype=torch.float64)
    fn, scale, base = make_mhc_params(n, c)
    ours = mhc.mhc_coefficients(x, fn, scale, base)
    for got, expected in zip(ours, mhc_coefficients_reference(x, fn, scale, base, n)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_coefficients_are_fp32_for_every_stream_dtype(dtype):
    n, c = 4, 32
    x = torch.randn(5, n, c).to(dtype)
    fn, scale, base = (t.float() for t in make_mhc_params(n, c))
    coefficients = mhc.mhc_coefficients(x, fn, scale, base)
    assert all(t.dtype == torch.float32 for t in coefficients)
    expected = mhc_coefficients_reference(x.float(), fn, scale, base, n)
    for got, want in zip(coefficients, expected):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-5)


def test_mhc_coefficients_gradcheck():
    n, c = 3, 4
    x = torch.randn(2, n, c, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in make_mhc_params(n, c)]

    def flat(*args):
        return torch.cat([t.flatten() for t in mhc.mhc_coefficients(*args, iters=8)])

    assert gradcheck(flat, (x, *params))


def test_mhc_coefficients_errors_name_the_argument():
    n, c = 4, 8
    fn, scale, base = make_mhc_params(n, c, dtype=torch.float32)
    x = torch.randn(3, n, c)
    with pytest.raises(ValueError, match=r"fn must have shape \[24, 36\] for x with n=4 streams of C=9.*got \[24, 32\]"):
        mhc.mhc_coefficients(torch.randn(3, n, c + 1), fn, scale, base)  # wrong C
    with pytest.raises(ValueError, match=r"fn must have shape \[15, 24\]"):
        mhc.mhc_coefficients(torch.randn(3, 3, c), fn, scale, base)  # wrong n
    with pytest.raises(ValueError, match=r"scale must have shape \[3\]"):
        mhc.mhc_coefficients(x, fn, scale[:2], base)
    with pytest.raises(ValueError, match=r"base must have shape \[24\]"):
        mhc.mhc_coefficients(x, fn, scale, base[:-1])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        mhc.mhc_coefficients(x.long(), fn, scale, base)
    with pytest.raises(TypeError, match="fn must be a torch.Tensor"):
        mhc.mhc_coefficients(x, fn.tolist(), scale, base)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., n, C\]"):
        mhc.mhc_coefficients(torch.randn(8), fn, scale, base)
    with pytest.raises(ValueError, match="fn is on meta but x is on cpu"):
        mhc.mhc_coefficients(x, fn.to("meta"), scale, base)


# -- original HC --------------------------------------------------------------------------------


def test_hc_coefficients_match_reference_and_orientation():
    n, c = 4, 6
    x = torch.randn(5, n, c, dtype=torch.float64)
    fn = torch.randn(n + 2, c, dtype=torch.float64)
    scale = torch.rand(3, dtype=torch.float64)
    base = torch.randn(n * n + 2 * n, dtype=torch.float64)
    h_pre, h_post, h_res = mhc.hc_coefficients(x, fn, scale, base)
    for t in range(5):
        for j in range(n):  # stream j's own normalized values decide its weights and outgoing column
            xn = x[t, j] / x[t, j].square().mean().add(1e-6).sqrt()
            d = torch.tanh(fn @ xn)
            assert torch.isclose(h_pre[t, j], base[j] + scale[0] * d[0])
            assert torch.isclose(h_post[t, j], base[n + j] + scale[1] * d[1])
            for k in range(n):  # H_res[k, j]: what destination k takes from source j
                assert torch.isclose(h_res[t, k, j], base[2 * n + j * n + k] + scale[2] * d[2 + k])


def test_hc_coefficients_gradcheck():
    n, c = 3, 4
    args = [
        torch.randn(2, n, c, dtype=torch.float64),
        torch.randn(n + 2, c, dtype=torch.float64),
        torch.rand(3, dtype=torch.float64),
        torch.randn(n * n + 2 * n, dtype=torch.float64),
    ]
    args = [a.requires_grad_() for a in args]
    assert gradcheck(lambda *a: torch.cat([t.flatten() for t in mhc.hc_coefficients(*a)]), args)


def test_hc_coefficients_errors():
    with pytest.raises(ValueError, match=r"fn must have shape \[6, 8\]"):
        mhc.hc_coefficients(torch.randn(2, 4, 8), torch.randn(6, 9), torch.ones(3), torch.zeros(24))


# -- mixes --------------------------------------------------------------------------------------


def test_pre_mix_and_post_res_match_per_token_loops():
    n, c = 3, 5
    x = torch.randn(4, n, c, dtype=torch.float64)
    f_out = torch.randn(4, c, dtype=torch.float64)
    h_pre, h_post = torch.rand(4, n, dtype=torch.float64), torch.rand(4, n, dtype=torch.float64)
    h_res = torch.rand(4, n, n, dtype=torch.float64)
    pre = mhc.pre_mix(x, h_pre)
    post = mhc.post_res(x, f_out, h_post, h_res)
    for t in range(4):
        torch.testing.assert_close(pre[t], sum(h_pre[t, j] * x[t, j] for j in range(n)))
        for i in range(n):
            expected = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * f_out[t]
            torch.testing.assert_close(post[t, i], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mixes_keep_the_stream_dtype(dtype):
    x = torch.randn(2, 7, 4, 16).to(dtype)
    h_pre, h_post, h_res = torch.rand(2, 7, 4), torch.rand(2, 7, 4), torch.rand(2, 7, 4, 4)
    pre = mhc.pre_mix(x, h_pre)
    post = mhc.post_res(x, torch.randn(2, 7, 16).to(dtype), h_post, h_res)
    assert pre.dtype == dtype and post.dtype == dtype
    torch.testing.assert_close(pre, mhc.pre_mix(x.float(), h_pre).to(dtype))


def test_mixes_gradcheck():
    n, c = 3, 4
    x = torch.randn(2, n, c, dtype=torch.float64, requires_grad=True)
    f_out = torch.randn(2, c, dtype=torch.float64, requires_grad=True)
    h_pre, h_post = (torch.rand(2, n, dtype=torch.float64, requires_grad=True) for _ in range(2))
    h_res = torch.rand(2, n, n, dtype=torch.float64, requires_grad=True)
    assert gradcheck(mhc.pre_mix, (x, h_pre))
    assert gradcheck(mhc.post_res, (x, f_out, h_post, h_res))


def test_mix_errors_name_the_argument():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"h_pre must have shape \[2, 4\]"):
        mhc.pre_mix(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"f_out must have shape \[2, 8\]"):
        mhc.post_res(x, torch.randn(2, 7), torch.rand(2, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"h_res must have shape \[2, 4, 4\]"):
        mhc.post_res(x, torch.randn(2, 8), torch.rand(2, 4), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="h_pre is on meta"):
        mhc.pre_mix(x, torch.rand(2, 4, device="meta"))


# -- head mix -----------------------------------------------------------------------------------


def test_head_mix_matches_formula_and_gradcheck():
    n, c = 4, 6
    x = torch.randn(3, n, c, dtype=torch.float64, requires_grad=True)
    fn = torch.randn(n, n * c, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(1, dtype=torch.float64, requires_grad=True)
    base = torch.randn(n, dtype=torch.float64, requires_grad=True)
    flat = x.flatten(-2)
    m = (flat @ fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)
    weights = torch.sigmoid(scale * m + base) + 1e-6
    expected = (weights.unsqueeze(-1) * x).sum(-2)
    torch.testing.assert_close(mhc.head_mix(x, fn, scale, base), expected)
    assert gradcheck(mhc.head_mix, (x, fn, scale, base))


def test_amax_gain_of_known_matrices():
    h = torch.tensor([[[1.0, 2.0], [-3.0, 0.5]]])
    forward, backward = mhc.amax_gain(h)
    assert forward.item() == 3.0  # |−3 + 0.5| = 2.5 < |1 + 2| = 3
    assert backward.item() == 2.5  # columns: |1 − 3| = 2, |2 + 0.5| = 2.5
    assert mhc.amax_gain(torch.eye(4))[0].item() == 1.0


def test_orientation_helpers_are_inverse():
    comb = torch.arange(9.0)
    paper = F.comb_to_paper(comb, 3)
    assert paper[0, 1] == comb[3]  # destination 0 from source 1 = comb[1, 0]
    assert torch.equal(F.paper_to_comb(paper), comb)


# -- scalar options and degenerate shapes -------------------------------------------------------

BAD_EPS = [None, math.inf, -math.inf, math.nan, -1e-6, "1e-6", True]
BAD_RMS_EPS = [None, math.inf, math.nan, -1e-6, 0.0, True]


@pytest.mark.parametrize("value", BAD_EPS)
def test_eps_must_be_a_finite_non_negative_number(value):
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match=rf"eps must be a finite number >= 0, got {re.escape(repr(value))}"):
        mhc.mhc_coefficients(x, *make_mhc_params(4, 8, dtype=torch.float32), eps=value)
    with pytest.raises(ValueError, match=r"^eps must be a finite number >= 0"):
        mhc.head_mix(x, torch.randn(4, 32), torch.rand(1), torch.randn(4), eps=value)


@pytest.mark.parametrize("value", BAD_RMS_EPS)
def test_rms_eps_must_be_a_finite_positive_number(value):
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match=rf"rms_eps must be a finite number > 0, got {re.escape(repr(value))}"):
        mhc.mhc_coefficients(x, *make_mhc_params(4, 8, dtype=torch.float32), rms_eps=value)
    with pytest.raises(ValueError, match="rms_eps must be a finite number > 0"):
        mhc.hc_coefficients(x, torch.randn(6, 8), torch.rand(3), torch.randn(24), rms_eps=value)
    with pytest.raises(ValueError, match="rms_eps must be a finite number > 0"):
        mhc.head_mix(x, torch.randn(4, 32), torch.rand(1), torch.randn(4), rms_eps=value)


@pytest.mark.parametrize("value", [0.0, -2.0, math.inf, math.nan, None])
def test_post_scale_must_be_a_finite_positive_number(value):
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="post_scale must be a finite number > 0"):
        mhc.mhc_coefficients(x, *make_mhc_params(4, 8, dtype=torch.float32), post_scale=value)


def test_iters_of_the_coefficients_must_be_a_positive_integer():
    x = torch.randn(3, 4, 8)
    for value in (0, 2.5, None, True):
        with pytest.raises(ValueError, match="iters must be an integer >= 1"):
            mhc.mhc_coefficients(x, *make_mhc_params(4, 8, dtype=torch.float32), iters=value)


def test_valid_edge_options_give_finite_coefficients():
    # eps = 0 is allowed; a tiny positive rms_eps keeps an all-zero token finite
    x = torch.zeros(2, 4, 8)
    out = mhc.mhc_coefficients(x, *make_mhc_params(4, 8, dtype=torch.float32), eps=0.0, rms_eps=1e-30, post_scale=0.5)
    assert all(torch.isfinite(t).all() for t in out)


def test_amax_gain_of_an_empty_matrix_is_a_value_error():
    with pytest.raises(ValueError, match=r"h must have shape \[\.\.\., n, n\] with n >= 1, got \[3, 0, 0\]"):
        mhc.amax_gain(torch.zeros(3, 0, 0))
    with pytest.raises(TypeError, match="h must be a floating torch.Tensor"):
        mhc.amax_gain([[1.0]])
