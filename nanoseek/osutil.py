"""Portable machine and file helpers: CPU count, name, features and load without Linux-only calls, and writes that
never leave a half-written file behind.

`os.sched_getaffinity` and /proc exist on Linux only and `os.getloadavg` not on Windows; macOS laptops run nanoseek
too, so every caller goes through the fallbacks here. Files are written under a temporary name in the same directory
and renamed into place: a full disk, a read-only directory or a kill leaves the previous file (or none), never a
truncated one that a later run could mistake for a good one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask on Linux, else the machine's count (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        with contextlib.suppress(OSError):
            return max(1, len(os.sched_getaffinity(0)))
    if hasattr(os, "process_cpu_count"):  # Python >= 3.13: the affinity-aware count where the OS has one
        return max(1, os.process_cpu_count() or 1)
    return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() as a fallback off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (avx2, avx512f, avx512_bf16, amx_int8, ...); empty off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16 in /proc/cpuinfo: bf16 matmuls run in hardware, not emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one (Windows)."""
    if hasattr(os, "getloadavg"):
        with contextlib.suppress(OSError):
            return os.getloadavg()[0]
    return None


def read_json(path: Path) -> Any:
    """A JSON file's value; a file that is missing, unreadable, not UTF-8 or not JSON raises one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise NanoseekError(f"{path}: not a text file (invalid UTF-8)") from None
    except OSError as e:
        raise NanoseekError(f"{path}: not readable ({os_error_line(e)})") from None


def os_error_line(e: BaseException) -> str:
    """An OSError (or safetensors' wrapped I/O error) as a short reason: 'No space left on device'."""
    if isinstance(e, OSError):
        return e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e) or type(e).__name__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def write_failed(path: str | Path, e: BaseException) -> NanoseekError:
    return NanoseekError(f"could not write {path}: {os_error_line(e)}")


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) to a temporary file next to `path` (same suffix, so matplotlib picks the format), then rename it
    over `path`. Any failure removes the temporary and leaves `path` as it was; an OSError becomes one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(directory: str | Path, what: str = "--out") -> None:
    """Create `directory` if needed and prove a file can be written and removed there, before hours of work whose
    result would have nowhere to go (read-only mounts, permissions, a full disk)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NanoseekError(f"{what} {directory} is not a directory")
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise NanoseekError(f"{what} {directory} is not writable: {os_error_line(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
