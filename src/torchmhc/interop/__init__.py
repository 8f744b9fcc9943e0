"""Weight layouts of other implementations (DeepSeek-V4)."""

from .deepseek_v4 import export_deepseek_v4_state, load_deepseek_v4_state

__all__ = ["export_deepseek_v4_state", "load_deepseek_v4_state"]
