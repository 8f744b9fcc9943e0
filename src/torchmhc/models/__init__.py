"""Language models with a ``residual=`` switch: a GPT-style decoder and its MoE variant."""

from torchmhc.config import ModelConfig
from torchmhc.models.gpt import GPT, Attention, Block
from torchmhc.models.moe import MoE, SwiGLU, grouped_matmul

__all__ = ["GPT", "Block", "Attention", "MoE", "SwiGLU", "grouped_matmul", "build_model"]


def build_model(cfg: ModelConfig) -> GPT:
    """The model ``cfg`` describes (``cfg.arch`` "gpt" or "moe"), on the CPU, in fp32."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a torchmhc.config.ModelConfig, got {type(cfg).__name__}.")
    return GPT(cfg)
