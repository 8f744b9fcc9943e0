"""Weight layouts of other implementations (DeepSeek-V4, in DeepSeek's names and transformers'), and
hyper-connections for Hugging Face models in ``torchmhc.interop.hf`` (imported on its own: it needs
the 'hf' extra)."""

from .deepseek_v4 import export_deepseek_v4_state, load_deepseek_v4_state

__all__ = ["export_deepseek_v4_state", "load_deepseek_v4_state"]
