"""nanoseek: a DeepSeek-V3/R1-style LLM system (MLA + DeepSeekMoE + MTP, GRPO) that trains and serves on a CPU.

    from nanoseek import load_model, save_pretrained, Engine, SamplingParams

The public names are imported on first use (module __getattr__), so `import nanoseek` and every `nanoseek <command>`
start without torch, and only the commands that need the engine import it.
"""

import importlib
import os
from typing import Any

# OpenMP threads that spin-wait steal the core their partner needs on a small, shared machine: measured 2-3x slower
# training at 2 threads on 2 busy cores (docs/pretrain.md). libgomp reads this once, when torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_PUBLIC = {  # name -> the module that defines it
    "ModelConfig": "nanoseek.config",
    "get_preset": "nanoseek.config",
    "NanoseekError": "nanoseek.errors",
    "Transformer": "nanoseek.model",
    "load_model": "nanoseek.checkpoint",
    "save_pretrained": "nanoseek.checkpoint",
    "Engine": "nanoseek.engine",
    "SamplingParams": "nanoseek.engine",
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
