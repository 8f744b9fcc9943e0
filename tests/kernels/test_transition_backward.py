"""The transition backward in one pass (``torchmhc.kernels.transition_backward_op``) against an fp64
reference of the same step, and the dispatch's choice between one pass and two."""

import functools

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, Launches, mhc_params, streams

from torchmhc.kernels import mhc_post_pre, use_kernels


def _merged_fn_rows(n: int, width: int) -> list[int | None]:
    """fn row of each column of the merged gradient block (``coefficients_op``): pre streams in
    columns 0..7, post streams in 8..15, H_res[i, j] in 16 + i·NP + j (fn row 2n + j·n + i); None
    for padding."""
    np_ = max(4, 1 << (n - 1).bit_length())
    rows: list[int | None] = []
    for p in range(width):
        if p < 8:
            rows.append(p if p < n else None)
        elif p < 16:
            rows.append(n + p - 8 if p - 8 < n else None)
        else:
            i, j = divmod(p - 16, np_)
            rows.append(2 * n + j * n + i if i < n and j < n and p - 16 < np_ * np_ else None)
    return rows


def _reference(x, f_out, h_post, h_res, fn, dm, cx, d_next, dy, h_pre):
    """fp64 from x_{l+1} as the forward stores it (the post-res kernel's output, which the fused
    forward matches bit for bit): its total gradient d, then the post-res backward of l and dfn."""
    from torchmhc.kernels.post_res_op import post_res_fwd

    t, n, c = x.shape
    x_next = post_res_fwd(x, f_out, h_post, h_res)
    rows = _merged_fn_rows(n, dm.shape[1])
    dm_rows = torch.zeros(t, fn.shape[0], dtype=torch.float64, device=x.device)
    for p, row in enumerate(rows):
        if row is not None:
            dm_rows[:, row] = dm[:, p].double()
    xn = x_next.double()
    d = (dm_rows @ fn.double()).view(t, n, c) + cx.double()[:, None, None] * xn + d_next.double()
    if dy is not None:
        d = d + h_pre.double()[..., None] * dy.double()[:, None]
    xd, fd = x.double(), f_out.double()
    dx = torch.einsum("tij,tic->tjc", h_res.double(), d)
    df = torch.einsum("ti,tic->tc", h_post.double(), d)
    dh_post = torch.einsum("tic,tc->ti", d, fd)
    dh_res = torch.einsum("tic,tjc->tij", d, xd)
    dfn = dm_rows.T @ xn.reshape(t, n * c)
    return dx, df, dh_post, dh_res, dfn


def _inputs(t, n, c, dtype):
    from torchmhc.kernels.coefficients_op import merged_width

    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE) / n
    fn = mhc_params(n, c)[0]
    dm = torch.randn(t, merged_width(n), device=DEVICE)
    cx = torch.randn(t, device=DEVICE) / c
    d_next = streams(t, n, c, dtype)
    dy, h_pre = torch.randn(t, c, device=DEVICE).to(dtype), torch.rand(t, n, device=DEVICE)
    return x, f_out, h_post, h_res, fn, dm, cx, d_next, dy, h_pre


def _relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, n, c", [(7, 1, 64), (21, 2, 192), (37, 3, 64), (18, 4, 128)])
def test_transition_bwd_streams_matches_fp64(t, n, c, dtype, mix):
    # t > 16 spans several token tiles (16 under the interpreter), c = 192 several channel blocks,
    # n = 1 and 3 padding streams; without mix, no h_pre ⊗ dy term
    from torchmhc.kernels.transition_backward_op import transition_bwd_streams

    x, f_out, h_post, h_res, fn, dm, cx, d_next, dy, h_pre = _inputs(t, n, c, dtype)
    got = transition_bwd_streams(x, f_out, h_post, h_res, fn, dm, cx, d_next, (dy, h_pre) if mix else None)
    expected = _reference(x, f_out, h_post, h_res, fn, dm, cx, d_next, dy if mix else None, h_pre)
    names = ("dx", "df", "dh_post", "dh_res", "dfn")
    dtypes = (dtype, dtype, torch.float32, torch.float32, torch.float32)
    for name, a, b, want in zip(names, got, expected, dtypes):
        assert a.shape == b.shape and a.dtype == want, name
        assert torch.isfinite(a).all(), name
        if dtype == torch.float32 or name in ("dh_post", "dh_res", "dfn"):
            torch.testing.assert_close(a.double(), b, **FP32_TOL, msg=name)
        else:  # rounded to bf16 once, from fp32
            assert _relative(a, b) < 4e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, n, c", [(53, 2, 128), (37, 3, 64)])
def test_late_prefetch_gives_the_same_bits(t, n, c, dtype):
    # the next tile's loads issued after the products instead of before: the same arithmetic on the
    # same values, whichever tile of a program's run (several tiles a program at these t)
    from torchmhc.kernels.transition_backward_op import transition_bwd_streams

    x, f_out, h_post, h_res, fn, dm, cx, d_next, dy, h_pre = _inputs(t, n, c, dtype)
    args = (x, f_out, h_post, h_res, fn, dm, cx, d_next, (dy, h_pre))
    early = transition_bwd_streams(*args, block_t=16, waves=1)
    late = transition_bwd_streams(*args, block_t=16, waves=1, late_prefetch=True)
    for name, a, b in zip(("dx", "df", "dh_post", "dh_res", "dfn"), early, late):
        assert torch.equal(a, b), name


def _two_sublayer_grads(one_pass, inputs):
    x, f_out, h_post, h_res, fn, scale, base = inputs
    post_pre = functools.partial(mhc_post_pre, one_pass_backward=one_pass)
    layer_input, x_next, c = post_pre(x, f_out, h_post, h_res, fn, scale, base)
    xf = x_next.float()
    out = xf * c.h_post[..., None] + torch.einsum("tij,tjc->tic", c.h_res, xf) + layer_input.float()[:, None].tanh()
    loss = out.square().sum() + (c.h_pre * torch.arange(1.0, x.shape[1] + 1, device=x.device)).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, t", [(2, 64, 19), (4, 192, 5)])
def test_one_pass_and_two_passes_agree(n, c, t, dtype):
    x = streams(t, n, c, dtype)
    f_out = torch.randn(t, c, device=DEVICE).to(dtype)
    h_post, h_res = 2 * torch.rand(t, n, device=DEVICE), torch.rand(t, n, n, device=DEVICE) / n
    inputs = [p.requires_grad_() for p in (x, f_out, h_post, h_res, *mhc_params(n, c))]
    with use_kernels("triton"):
        with Launches() as launches:
            one = _two_sublayer_grads(True, inputs)
        assert launches.calls("transition_bwd_streams") == 1 and launches.calls("coefficients_bwd") == 0
        two = _two_sublayer_grads(False, inputs)
    for i, (a, b) in enumerate(zip(one, two)):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **FP32_TOL, msg=f"gradient {i}")
        else:  # the two passes round x_{l+1}'s gradient to bf16 in between
            assert _relative(a, b.double()) < 1e-2, f"gradient {i}"


def test_eight_streams_take_two_passes():
    n, c, t = 8, 64, 5
    x = streams(t, n, c, torch.float32)
    inputs = [p.requires_grad_() for p in (x, torch.randn(t, c, device=DEVICE), torch.rand(t, n, device=DEVICE),
                                           torch.rand(t, n, n, device=DEVICE) / n, *mhc_params(n, c))]  # fmt: skip
    with use_kernels("triton"), Launches() as launches:
        _two_sublayer_grads(True, inputs)
    assert launches.calls("transition_bwd_streams") == 0 and launches.calls("coefficients_bwd") == 1


@pytest.mark.parametrize("value, one_pass", [("two_pass", False), ("one_pass", True), ("", True), (None, True)])
def test_environment_variable_chooses_the_backward(monkeypatch, value, one_pass):
    # one pass unless the variable says two_pass (empty or unset: the default)
    from torchmhc.kernels.dispatch import _one_pass_backward

    if value is None:
        monkeypatch.delenv("TORCHMHC_TRANSITION_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("TORCHMHC_TRANSITION_BACKWARD", value)
    assert _one_pass_backward(None) is one_pass
    assert _one_pass_backward(not one_pass) is (not one_pass)  # an explicit choice wins


def test_environment_variable_rejects_other_values(monkeypatch):
    from torchmhc.kernels.dispatch import _one_pass_backward

    monkeypatch.setenv("TORCHMHC_TRANSITION_BACKWARD", "fused")
    with pytest.raises(ValueError, match="TORCHMHC_TRANSITION_BACKWARD must be one_pass or two_pass"):
        _one_pass_backward(None)
