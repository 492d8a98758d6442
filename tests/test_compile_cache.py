"""compile=True's on-disk cache of inductor's artefacts (engine/compile_cache.py): which directory, and "off"."""

import os

import pytest
import torch._functorch.config
import torch._inductor.config

from nanoseek.engine import compile_cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No cache variables set, XDG_CACHE_HOME in tmp_path; inductor's switches restored afterwards."""
    for var in (compile_cache.ENV, "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    saved = torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache
    yield tmp_path
    torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache = saved


def test_cache_dir_resolution(clean_env, monkeypatch):
    assert compile_cache.compile_cache_dir() == clean_env / "xdg" / "nanoseek" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(clean_env / "torchs"))  # torch's own variable is respected
    assert compile_cache.compile_cache_dir() == clean_env / "torchs"
    monkeypatch.setenv(compile_cache.ENV, "~/ns-cache")  # nanoseek's wins, ~ expanded
    assert compile_cache.compile_cache_dir() == compile_cache.Path("~/ns-cache").expanduser()
    for off in ("off", " OFF "):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.compile_cache_dir() is None


def test_configure_points_inductor_at_the_cache_or_turns_it_off(clean_env, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(clean_env / "c"))
    path = compile_cache.configure()
    assert path == clean_env / "c" and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.configure() is None
    assert not torch._inductor.config.fx_graph_cache and not torch._functorch.config.enable_autograd_cache
