"""The residual-kind registry: one entry per kind that every module asks (no string checks elsewhere)."""

import pytest
import torch

from torchmhc import HyperConnection
from torchmhc.config import ModelConfig, load_config
from torchmhc.manifolds import MANIFOLDS, Manifold, register
from torchmhc.models import build_model
from torchmhc.report import findings
from torchmhc.residuals import RESIDUALS, get_residual, residual_kinds


def test_aliases_are_accepted_alike_by_the_module_and_the_config():
    for alias, name in (("sinkhorn", "mhc"), ("permutation", "mhc-lite")):
        assert get_residual(alias) is RESIDUALS[name]
        assert HyperConnection(64, 4, alias).residual == name  # recorded under the kind's name
        cfg = ModelConfig(residual=alias, dim=64, num_layers=1, num_heads=2)
        assert build_model(cfg).blocks[0].attn_hc.residual == name
    with pytest.raises(ValueError, match="residual must be one of .*mhc.*got 'sinkhorm'"):
        HyperConnection(64, 4, "sinkhorm")
    with pytest.raises(ValueError, match="model.residual must be one of"):
        ModelConfig(residual="sinkhorm")
    with pytest.raises(ValueError, match="compare.variants has unknown entries"):
        load_config("tiny", ["compare.variants=['residual', 'mhcc']"])


def test_the_kinds_know_their_streams_and_constraint():
    assert ModelConfig(residual="residual", num_streams=4).effective_num_streams == 1
    assert ModelConfig(residual="hc", num_streams=3).effective_num_streams == 3
    doubly = {name for name in residual_kinds() if get_residual(name).doubly_stochastic}
    assert doubly == {"mhc", "mhc-lite", "orthostochastic", "identity"}
    assert {name for name in residual_kinds() if get_residual(name).fused_coefficients} == {"hc", "mhc"}
    assert len({get_residual(name).color for name in residual_kinds()}) == len(residual_kinds())


def test_a_manifold_registered_later_is_a_kind_everywhere(monkeypatch):
    class Halves(Manifold):
        name = "halves"

        def num_logits(self, n):
            return 0

        def project(self, logits, n):
            return torch.full((*logits.shape[:-1], n, n), 1.0 / n, dtype=logits.dtype, device=logits.device)

        def init_logits(self, n, target):
            return torch.zeros(0)

    monkeypatch.setitem(MANIFOLDS, "halves", Halves)
    register(Halves)
    assert "halves" in residual_kinds() and get_residual("halves").label == "halves"
    assert not get_residual("halves").doubly_stochastic  # it did not claim to be
    model = build_model(ModelConfig(residual="halves", dim=64, num_layers=1, num_heads=2))
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)


def test_report_findings_take_the_constraint_from_the_registry():
    analysis = {"single_forward_max_deviation": 0.5, "max_composite_gain": 9.0, "ds_error": [0.2],
                "single_forward": [1.5, 0.9]}
    summary = {"val_loss": 1.0, "stopped": None, "steps": 1}

    class Result:
        def __init__(self, variant):
            self.variant, self.analysis, self.summary = variant, analysis, summary

    # "sinkhorn" is mHC: the doubly-stochastic sentence, which here must say NOT (the numbers are off)
    text = " ".join(findings([Result("sinkhorn"), Result("spectral")]))
    assert "mHC: every single-layer forward gain" in text and "NOT as the doubly-stochastic" in text
    assert "Spectral: single-layer forward gains range" in text
