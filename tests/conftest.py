"""Shared test fixtures."""

import pytest
import torch

from nanoseek.data import corpus_dir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster, and immune to a busy machine (threads waiting on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small training text (the first 14,000 characters of the bundled tinyshakespeare) as a .txt file."""
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:14000]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path
