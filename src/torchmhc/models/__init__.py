"""Language models with a ``residual=`` switch: a GPT-style decoder, its MoE variant, and a
transformers Llama upcycled to hyper-connections (``arch = "hf-llama"``)."""

from torchmhc.config import ModelConfig
from torchmhc.models.gpt import GPT, Attention, Block
from torchmhc.models.hf import HFLlama
from torchmhc.models.moe import MoE, SwiGLU, grouped_matmul

__all__ = ["GPT", "HFLlama", "Block", "Attention", "MoE", "SwiGLU", "grouped_matmul", "build_model"]


def build_model(cfg: ModelConfig) -> GPT | HFLlama:
    """The model ``cfg`` describes (``cfg.arch`` "gpt", "moe" or "hf-llama"), on the CPU, in fp32."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a torchmhc.config.ModelConfig, got {type(cfg).__name__}.")
    return HFLlama(cfg) if cfg.arch == "hf-llama" else GPT(cfg)
