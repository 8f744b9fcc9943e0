"""A transformers Llama as the subject of ``torchmhc train`` / ``compare`` (``model.arch = "hf-llama"``).

The model is built from the run's ``[model]`` section (randomly initialized from a config; nothing
is downloaded) and, for every ``residual`` but ``"residual"``, converted by
``torchmhc.interop.hf.add_hyper_connections``: the same weights, upcycled to n streams with a
function-preserving start. So with one seed the ``residual`` variant and the hyper-connected ones
start from the same Llama and the same loss, and a comparison shows what continuing training with
hyper-connections does.
"""

from torch import Tensor, nn

from torchmhc.config import ModelConfig
from torchmhc.layers import HyperConnection
from torchmhc.residuals import get_residual

__all__ = ["HFLlama", "llama_config"]


def llama_config(cfg: ModelConfig):
    """The ``transformers.LlamaConfig`` of ``cfg``: its dim, layers, heads (as many key/value heads),
    SwiGLU width, vocabulary, context length, RoPE theta and embedding tying."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.effective_ffn_hidden,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


class HFLlama(nn.Module):
    """``transformers.LlamaForCausalLM`` behind the training loop's interface: token ids ``[B, T]``
    int64 -> logits ``[B, T, V]`` (fp32 on the CPU). The Llama itself is ``self.hf``."""

    def __init__(self, cfg: ModelConfig) -> None:
        try:
            from transformers import LlamaForCausalLM
        except ImportError as exc:
            raise ImportError("model.arch = 'hf-llama' needs transformers: pip install 'torchmhc[hf]'") from exc

        from torchmhc.interop.hf import add_hyper_connections

        super().__init__()
        self.cfg = cfg
        self.num_streams = cfg.effective_num_streams
        self.hf = LlamaForCausalLM(llama_config(cfg))
        if get_residual(cfg.residual).form != "residual":  # the plain residual is the Llama as it is
            add_hyper_connections(self.hf, cfg.num_streams, cfg.residual)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {list(idx.shape)}.")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"idx has sequence length {idx.shape[1]} > model max_seq_len {self.cfg.max_seq_len}.")
        return self.hf(input_ids=idx, use_cache=False).logits  # [B, T, V]

    def hyper_connections(self) -> list[HyperConnection]:
        """The 2L hyper-connections in sub-layer order (none for the plain residual)."""
        return [m for m in self.hf.modules() if isinstance(m, HyperConnection)]

    def update_router_bias(self, keep: Tensor | float = 1.0) -> None:
        """No experts: nothing to balance (the training loop calls this after every step)."""

    def num_params(self) -> int:
        """Number of parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
