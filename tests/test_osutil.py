"""Portable machine helpers (macOS has no sched_getaffinity, Windows no getloadavg) and atomic writes."""

import errno
import os

import pytest

from nanoseek import NanoseekError
from nanoseek.osutil import available_cpus, check_writable, load_average, write_file_atomically


def test_available_cpus_without_sched_getaffinity(monkeypatch):
    assert available_cpus() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS
    monkeypatch.delattr(os, "process_cpu_count", raising=False)  # Python < 3.13
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert available_cpus() == 1


def test_load_average_without_getloadavg(monkeypatch):
    assert load_average() is None or load_average() >= 0
    monkeypatch.delattr(os, "getloadavg", raising=False)  # Windows
    assert load_average() is None


def test_training_commands_run_without_linux_only_calls(monkeypatch, tmp_path, data_file):
    """The default --threads of every training stage comes from available_cpus(), not os.sched_getaffinity."""
    from nanoseek.cli import main

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "getloadavg", raising=False)
    main(["pretrain", "--preset", "test", "--data", str(data_file), "--vocab-size", "300", "--steps", "1",
          "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1", "--sample-every", "0", "--out",
          str(tmp_path / "run")])
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_write_file_atomically_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(NanoseekError, match=f"could not write {path}: No space left on device"):
        write_file_atomically(path, full)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    write_file_atomically(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_check_writable(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(NanoseekError, match="is not a directory"):
        check_writable(tmp_path / "file")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(NanoseekError, match="is not writable: Read-only file system"):
        check_writable(tmp_path)
