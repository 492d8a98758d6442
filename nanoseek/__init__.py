"""nanoseek: a DeepSeek-V3/R1-style LLM system (MLA + DeepSeekMoE + MTP, GRPO) that trains and serves on a CPU."""

from nanoseek.checkpoint import load_model
from nanoseek.config import ModelConfig, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

__all__ = ["ModelConfig", "Transformer", "NanoseekError", "get_preset", "load_model"]
__version__ = "0.1.0"
