"""Stability measures against hand-computed values, and collection from a model."""

import pytest
import torch
from torch import nn

import torchmhc as mhc
from torchmhc import analysis


def test_gain_profile_of_scaled_identities():
    # layer l is (l + 1)·I: forward composite at l = (l + 1)!, backward composite at l = L!/l!
    layers = [torch.eye(3).mul(l + 1).expand(5, 3, 3) for l in range(4)]
    profile = analysis.gain_profile(layers)
    torch.testing.assert_close(profile.single_forward, torch.tensor([1.0, 2, 3, 4]))
    torch.testing.assert_close(profile.single_backward, torch.tensor([1.0, 2, 3, 4]))
    torch.testing.assert_close(profile.composite_forward, torch.tensor([1.0, 2, 6, 24]))
    torch.testing.assert_close(profile.composite_backward, torch.tensor([24.0, 24, 12, 4]))
    assert profile.max_composite() == 24.0


def test_composites_respect_order_and_orientation():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both destinations copy source 0
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # destination 0 takes source 1
    profile = analysis.gain_profile([a, b])
    # forward composite at layer 1 = b @ a = [[1, 0], [0, 0]]: row sums (1, 0)
    assert profile.composite_forward.tolist() == [1.0, 1.0]
    # backward composite at layer 0 = b @ a, column sums (1, 0); at layer 1 = b: column sums (0, 1)
    assert profile.composite_backward.tolist() == [1.0, 1.0]
    # and a @ b (the wrong order) would give row sums (1, 1) -> still 1; check a case that differs:
    c = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    forward = analysis.gain_profile([c, d]).composite_forward
    assert forward.tolist() == [2.0, 2.0]  # d @ c = [[0, 1], [2, 0]]
    assert analysis.gain_profile([torch.tensor([[1.0, 1.0], [0.0, 0.0]])]).single_backward.item() == 1.0


def test_mhc_composites_stay_bounded_where_hc_like_mixing_explodes():
    torch.manual_seed(0)
    mhc_layers = [mhc.sinkhorn_knopp(2 * torch.randn(32, 4, 4)) for _ in range(40)]
    hc_layers = [torch.eye(4) + 0.2 * torch.randn(32, 4, 4).abs() for _ in range(40)]
    assert analysis.gain_profile(mhc_layers).max_composite() < 1.5
    assert analysis.gain_profile(hc_layers).max_composite() > 1e3


def test_doubly_stochastic_error_and_distances():
    h = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    assert analysis.doubly_stochastic_error(h).item() == pytest.approx(0.1)
    assert analysis.doubly_stochastic_error(torch.tensor([[1.2, -0.2], [-0.2, 1.2]])).item() == pytest.approx(0.2)
    assert analysis.distance_from_identity(torch.eye(3)).item() == 0
    assert analysis.distance_from_uniform(torch.full((3, 3), 1 / 3)).item() == pytest.approx(0, abs=1e-7)


def test_stream_similarity_detects_collapsed_streams():
    h = torch.randn(10, 1, 16)
    collapsed = analysis.stream_similarity(h.expand(10, 3, 16))
    torch.testing.assert_close(collapsed, torch.ones(3, 3))
    independent = analysis.stream_similarity(torch.randn(500, 3, 64))
    assert independent.fill_diagonal_(0).abs().max() < 0.05


class TinyStack(nn.Module):
    def __init__(self, dim=8, n=4, layers=3, residual="mhc"):
        super().__init__()
        self.hcs = nn.ModuleList(mhc.HyperConnection(dim, n, residual, layer_index=i) for i in range(layers))
        self.branches = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.n = n

    def forward(self, h):
        x = mhc.expand_streams(h, self.n)
        for hc, branch in zip(self.hcs, self.branches):
            x = hc(x, branch)
        return x.sum(-2)


def test_collect_coefficients_in_call_order_and_removes_hooks():
    model = TinyStack()
    h = torch.randn(2, 5, 8)
    records = analysis.collect_coefficients(model, h)
    assert [r.name for r in records] == ["hcs.0", "hcs.1", "hcs.2"]
    assert [r.layer_index for r in records] == [0, 1, 2]
    assert records[0].coefficients.h_res.shape == (2, 5, 4, 4)
    assert not records[0].coefficients.h_res.requires_grad
    torch.testing.assert_close(records[0].stream_similarity, torch.ones(4, 4))  # copies of h
    expected = model.hcs[1].coefficients(mhc.expand_streams(h, 4)).h_res
    assert not torch.equal(records[1].coefficients.h_res, expected)  # layer 1 saw layer 0's output
    assert all(len(hc._coefficient_hooks) == 0 for hc in model.hcs)
    h_res = analysis.collect_h_res(model, h)
    assert len(h_res) == 3 and torch.equal(h_res[0], records[0].coefficients.h_res)


def test_collect_from_a_model_without_hyper_connections_is_an_error():
    with pytest.raises(ValueError, match="no torchmhc.HyperConnection"):
        analysis.collect_coefficients(nn.Linear(2, 2), torch.randn(2))


def test_collecting_from_a_compiled_model_compiles_nothing():
    # the hooks inside a compiled block would guard on each layer's index: one graph per layer
    torch._dynamo.reset()
    model = TinyStack()
    for hc in model.hcs:
        hc.compile(backend="eager")
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    records = analysis.collect_coefficients(model, torch.randn(2, 5, 8))
    assert len(records) == 3
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    model(torch.randn(2, 5, 8))  # the compiled path is still used outside the collection
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames
