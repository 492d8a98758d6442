"""Where compile=True keeps its compiled artefacts between runs, so that a second start does not compile again.

torch.compile's inductor caches what it generated on disk (its FX graph cache: the generated C++ and the built
libraries; AOTAutograd's cache: the traced forward), keyed by the graph and the compiler's settings, but by default
under /tmp/torchinductor_$USER, which a reboot or a tmp cleaner empties. nanoseek points it at a cache of its own:

  $NANOSEEK_COMPILE_CACHE                         when set ("off": no persistent cache, every start compiles)
  $TORCHINDUCTOR_CACHE_DIR                        when set (torch's own variable)
  $XDG_CACHE_HOME/nanoseek/inductor               else (~/.cache/nanoseek/inductor)

Measured start-up, cold and warm: docs/engine.md ("Compiled decode").
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "NANOSEEK_COMPILE_CACHE"


def compile_cache_dir() -> Path | None:
    """The directory compiled graphs are cached in (None: caching off)."""
    want = os.environ.get(ENV, "").strip()
    if want.lower() == "off":
        return None
    if want:
        return Path(want).expanduser()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanoseek" / "inductor"


def configure() -> Path | None:
    """Point inductor's on-disk caches at compile_cache_dir() (or turn them off) before the first compile; returns
    the directory. Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it looks for its cache."""
    import torch._functorch.config
    import torch._inductor.config

    path = compile_cache_dir()
    on = path is not None
    torch._inductor.config.fx_graph_cache = on
    torch._functorch.config.enable_autograd_cache = on
    if on:
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path
