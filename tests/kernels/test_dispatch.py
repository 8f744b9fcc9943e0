"""Dispatch between kernels and reference (``torchmhc.kernels.dispatch``), the module path, and
torch.compile over the custom ops."""

import pytest
import torch
from kernel_cases import DEVICE, FP32_TOL, GRAD_TOL, check_fwd_bwd, mhc_params, streams

import torchmhc
from torchmhc import functional as ref
from torchmhc.kernels import dispatch, kernel_mode, mhc_coefficients, post_res, post_res_coefficients, pre_mix, use_kernels


def _forbid_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the reference ran where the kernels should have")

    for name in ("mhc_coefficients", "pre_mix", "post_res"):
        monkeypatch.setattr(dispatch.ref, name, boom)


def test_mode_precedence(monkeypatch):
    monkeypatch.setenv("TORCHMHC_KERNELS", "reference")
    assert kernel_mode() == "reference"
    with use_kernels("triton"):
        assert kernel_mode() == "triton"
        with use_kernels("auto"):
            assert kernel_mode() == "auto"
    assert kernel_mode() == "reference"


def test_bad_modes_raise_value_error(monkeypatch):
    with pytest.raises(ValueError, match="mode"):
        with use_kernels("fast"):
            pass
    monkeypatch.setenv("TORCHMHC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TORCHMHC_KERNELS"):
        kernel_mode()


def test_triton_mode_runs_the_kernels(monkeypatch):
    _forbid_reference(monkeypatch)
    x = streams(3, 4, 64, torch.float32)
    fn, scale, base = mhc_params(4, 64)
    with use_kernels("triton"):
        h_pre, h_post, h_res = mhc_coefficients(x, fn, scale, base)
        post_res(x, pre_mix(x, h_pre), h_post, h_res)


def test_reference_mode_and_unsupported_shapes_take_the_reference(monkeypatch):
    _forbid_reference(monkeypatch)
    x = streams(3, 4, 64, torch.float32)
    with use_kernels("reference"), pytest.raises(AssertionError, match="reference ran"):
        pre_mix(x, torch.rand(3, 4, device=DEVICE))
    odd = streams(3, 4, 48, torch.float32)  # C not a multiple of 64
    with use_kernels("triton"), pytest.raises(AssertionError, match="reference ran"):
        pre_mix(odd, torch.rand(3, 4, device=DEVICE))


def test_auto_mode_on_cpu_takes_the_reference_unless_fp32(monkeypatch):
    # fp32 CPU tensors take the CPU path (tests/kernels/test_cpu.py)
    _forbid_reference(monkeypatch)
    for dtype in (torch.float64, torch.bfloat16):
        with use_kernels("auto"), pytest.raises(AssertionError, match="reference ran"):
            pre_mix(streams(3, 4, 64, dtype, device="cpu"), torch.rand(3, 4))


def test_eps_outside_the_linear_form_takes_the_reference():
    # the kernels divide by (sum + eps): eps = 0 gave NaN for a row whose exponentials underflow;
    # the reference computes that case in the log domain and refuses a non-finite eps
    n, c = 4, 64
    x = streams(3, n, c, torch.float32)
    fn, scale, base = mhc_params(n, c)
    base = base.clone()
    base[2 * n :] = 1e4 * torch.randn(n * n, device=DEVICE)  # extreme Sinkhorn logits
    with use_kernels("triton"):
        h_res = mhc_coefficients(x, fn, scale, base, eps=0.0).h_res
        assert torch.isfinite(h_res).all()
        torch.testing.assert_close(h_res.sum(-1), torch.ones(3, n, device=DEVICE), rtol=0, atol=1e-5)
        _, coefficients = post_res_coefficients(
            x, x[:, 0], torch.rand(3, n, device=DEVICE), torch.rand(3, n, n, device=DEVICE), fn, scale, base, eps=0.0
        )
        assert torch.isfinite(coefficients.h_res).all()
        with pytest.raises(ValueError, match="eps must be a finite number"):
            mhc_coefficients(x, fn, scale, base, eps=float("inf"))


def test_malformed_input_gets_the_reference_error():
    with use_kernels("triton"), pytest.raises(ValueError, match="h_pre"):
        pre_mix(streams(3, 4, 64, torch.float32), torch.rand(3, 5, device=DEVICE))


def test_hyper_connection_module_uses_kernels():
    torch.manual_seed(0)
    hc = torchmhc.HyperConnection(64, n=4).to(DEVICE)
    with torch.no_grad():  # non-trivial coefficients
        hc.fn.normal_(0, 0.05)
        hc.base.normal_()
        hc.scale.fill_(0.7)
    x = streams(5, 4, 64, torch.float32)

    def run(mode):
        with use_kernels(mode):
            return hc(x, torch.tanh)

    out_k, out_r = run("triton"), run("reference")
    torch.testing.assert_close(out_k, out_r, **FP32_TOL)
    g_k = torch.autograd.grad(run("triton").sum(), list(hc.parameters()))
    g_r = torch.autograd.grad(run("reference").sum(), list(hc.parameters()))
    for a, b in zip(g_k, g_r):  # on CPU the reference is fp32 here, not fp64: 1e-4
        torch.testing.assert_close(a, b, **(GRAD_TOL or dict(rtol=1e-4, atol=1e-5)))


def test_torch_compile_traces_the_custom_ops():
    x = streams(5, 2, 64, torch.float32).requires_grad_()
    fn, scale, base = mhc_params(2, 64)

    def sublayer(x_):
        h_pre, h_post, h_res = mhc_coefficients(x_, fn, scale, base)
        return post_res(x_, pre_mix(x_, h_pre), h_post, h_res)

    with use_kernels("triton"):
        compiled = torch.compile(sublayer, backend="aot_eager", fullgraph=True)
        check_fwd_bwd(compiled, lambda x_: sublayer_ref(x_, fn, scale, base), [x])


def sublayer_ref(x, fn, scale, base):
    p = [t.double() for t in (fn, scale, base)]
    h_pre, h_post, h_res = ref.mhc_coefficients(x, *p)
    return ref.post_res(x, ref.pre_mix(x, h_pre), h_post, h_res)


def test_triton_mode_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_kernels("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pre_mix(streams(3, 4, 64, torch.float32, device="cpu"), torch.rand(3, 4))


BAD_OPTIONS = [
    dict(eps=None), dict(eps=float("inf")), dict(eps=float("nan")), dict(eps=-1e-6),
    dict(rms_eps=-1e-6), dict(rms_eps=float("nan")), dict(rms_eps=0.0),
    dict(post_scale=0.0), dict(post_scale=float("inf")),
    dict(iters=0), dict(iters=1.5),
]


def _error(call) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_dispatch_refuses_bad_options_like_the_reference(options):
    x = streams(3, 4, 64, torch.float32)
    fn, scale, base = mhc_params(4, 64)
    f_out, h_post, h_res = torch.randn(3, 64, device=DEVICE), torch.rand(3, 4, device=DEVICE), torch.rand(3, 4, 4, device=DEVICE)
    expected = _error(lambda: ref.mhc_coefficients(x, fn, scale, base, **options))
    assert expected[0] is ValueError and expected[1].startswith(f"{next(iter(options))} must be ")
    calls = {
        "mhc_coefficients": lambda: mhc_coefficients(x, fn, scale, base, **options),
        "mhc_pre": lambda: dispatch.mhc_pre(x, fn, scale, base, **options),
        "mhc_post_pre": lambda: dispatch.mhc_post_pre(x, f_out, h_post, h_res, fn, scale, base, **options),
        "post_res_coefficients": lambda: dispatch.post_res_coefficients(x, f_out, h_post, h_res, fn, scale, base, **options),
    }
    for mode in ("reference", "triton"):
        with use_kernels(mode):
            for name, call in calls.items():
                assert _error(call) == expected, (mode, name)


def test_zero_channels_get_the_reference_error():
    # C = 0 is a multiple of 64 but no shape the kernels handle: the reference names it
    from torchmhc.kernels import hc_coefficients

    x = torch.randn(3, 2, 0, device=DEVICE)
    scale, base = torch.ones(3, device=DEVICE), torch.zeros(8, device=DEVICE)
    with use_kernels("triton"):
        with pytest.raises(ValueError, match="C >= 1"):
            mhc_coefficients(x, torch.randn(8, 0, device=DEVICE), scale, base)
        with pytest.raises(ValueError, match="C >= 1"):
            hc_coefficients(x, torch.randn(4, 0, device=DEVICE), scale, base)
        with pytest.raises(ValueError, match="C >= 1"):
            pre_mix(x, torch.rand(3, 2, device=DEVICE))
