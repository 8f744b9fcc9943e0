"""Every registered H_res constraint: its promise, its gradients, its starts, and the registry."""

import pytest
import torch
from torch.autograd import gradcheck

import torchmhc as mhc
from torchmhc.manifolds import MANIFOLDS, Manifold, get_manifold, register

# column accuracy; Sinkhorn is exact on rows and only approximate on columns after t_max = 20 (docs/math.md §5)
DOUBLY_STOCHASTIC = {"sinkhorn": 0.05, "permutation": 1e-12, "orthostochastic": 1e-12, "identity": 0.0}


def project(name, n, batch=16, scale=2.0, dtype=torch.float64):
    manifold = get_manifold(name)
    logits = scale * torch.randn(batch, manifold.num_logits(n), dtype=dtype)
    return manifold.project(logits, n)


@pytest.mark.parametrize("name", sorted(DOUBLY_STOCHASTIC))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_doubly_stochastic_manifolds(name, n):
    h = project(name, n)
    assert h.shape == (16, n, n)
    assert (h >= -1e-15).all()
    assert (h.sum(-1) - 1).abs().max() <= 1e-5
    assert (h.sum(-2) - 1).abs().max() <= max(DOUBLY_STOCHASTIC[name], 1e-12)
    assert torch.linalg.matrix_norm(h, ord=2).max() <= 1 + max(DOUBLY_STOCHASTIC[name], 1e-12)


@pytest.mark.parametrize("n", [2, 4])
def test_spectral_stays_in_the_unit_ball_and_may_be_negative(n):
    h = project("spectral", n, scale=3.0)
    assert torch.linalg.matrix_norm(h, ord=2).max() <= 1 + 1e-9
    assert (h < 0).any()
    inside = 0.01 * torch.randn(4, n * n, dtype=torch.float64)  # already in the ball: unchanged
    torch.testing.assert_close(get_manifold("spectral").project(inside, n), mhc.functional.comb_to_paper(inside, n))

def test_unconstrained_is_the_comb_transposed():
    logits = torch.randn(3, 16)
    torch.testing.assert_close(get_manifold("unconstrained").project(logits, 4), logits.view(3, 4, 4).transpose(-1, -2))


def test_permutation_is_a_convex_combination_of_permutations():
    manifold = get_manifold("permutation")
    logits = torch.full((1, 24), -1e4)
    logits[0, 5] = 0.0  # all weight on one permutation -> a permutation matrix
    h = manifold.project(logits, 4)[0]
    assert set(h.flatten().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="n=6 > 5"):
        manifold.num_logits(6)


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_manifold_gradcheck(name):
    manifold = get_manifold(name, **({"iters": 6} if name == "sinkhorn" else {}))
    n = 3
    logits = torch.randn(2, manifold.num_logits(n), dtype=torch.float64, requires_grad=True)
    if logits.shape[-1] == 0:
        assert not manifold.project(logits, n).requires_grad  # nothing to learn
        return
    assert gradcheck(lambda t: manifold.project(t, n), (logits,))


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_identity_start_is_near_identity(name):
    manifold = get_manifold(name)
    for n in (1, 2, 4):
        h = manifold.project(manifold.init_logits(n, "identity").double(), n)
        torch.testing.assert_close(h, torch.eye(n, dtype=torch.float64), atol=0.011, rtol=0)


@pytest.mark.parametrize("name", ["sinkhorn", "permutation", "spectral", "unconstrained"])
def test_uniform_start_is_uniform(name):
    manifold = get_manifold(name)
    h = manifold.project(manifold.init_logits(4, "uniform").double(), 4)
    torch.testing.assert_close(h, torch.full((4, 4), 0.25, dtype=torch.float64), atol=1e-5, rtol=0)


def test_orthostochastic_has_no_uniform_start():
    with pytest.raises(ValueError, match="no uniform start"):
        get_manifold("orthostochastic").init_logits(4, "uniform")


def test_wrong_number_of_logits_is_an_error():
    with pytest.raises(ValueError, match="sinkhorn expects 16 logits"):
        get_manifold("sinkhorn").project(torch.randn(2, 15), 4)
    with pytest.raises(ValueError, match="unknown manifold 'birkhoff'"):
        get_manifold("birkhoff")


def test_registering_a_manifold_makes_it_usable_everywhere():
    @register
    class Transposed(Manifold):
        """A toy: the Sinkhorn matrix transposed (still doubly stochastic)."""

        name = "test-transposed"

        def num_logits(self, n):
            return n * n

        def project(self, logits, n):
            return get_manifold("sinkhorn").project(logits, n).transpose(-1, -2)

        def init_logits(self, n, target):
            return get_manifold("sinkhorn").init_logits(n, target)

    try:
        hc = mhc.HyperConnection(8, 3, residual="test-transposed")
        x = torch.randn(5, 3, 8)
        h = hc.coefficients(x).h_res
        assert h.shape == (5, 3, 3) and (h.sum(-2) - 1).abs().max() < 1e-5  # columns exact now
        assert hc.fn.shape == (2 * 3 + 9, 24)
    finally:
        del MANIFOLDS["test-transposed"]
