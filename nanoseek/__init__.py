"""nanoseek: a DeepSeek-V3/R1-style LLM system (MLA + DeepSeekMoE + MTP, GRPO) that trains and serves on a CPU."""

import os

# OpenMP threads that spin-wait steal the core their partner needs on a small, shared machine: measured 2-3x slower
# training at 2 threads on 2 busy cores (docs/pretrain.md). libgomp reads this once, when torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nanoseek.checkpoint import load_model  # noqa: E402
from nanoseek.config import ModelConfig, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

__all__ = ["ModelConfig", "Transformer", "NanoseekError", "get_preset", "load_model"]
__version__ = "0.1.0"
