"""Run records and loss plots: what each training stage cost (FLOPs, CPU-hours, USD, MFU).

Every stage writes `run.json` (a RunRecord) and `loss.png` into its run directory. MFU is measured against this
machine's own matmul peak (machine_peak_flops), not a datasheet number: on a shared 2-core CPU the datasheet says
little about what a process can actually get. The report card (report.py) reads these records back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.errors import NanoseekError
from nanoseek.osutil import cpu_has_native_bf16, cpu_model, write_file_atomically, write_text_atomically

_PEAK_CACHE: dict[tuple[str, str, int], float] = {}  # (device type, dtype, threads) -> FLOP/s, per process


def machine_info() -> dict[str, Any]:
    """world_size: processes of the job (torchrun sets WORLD_SIZE), i.e. GPUs for a multi-GPU run."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def _measure_matmul_flops(dtype: torch.dtype, device: torch.device, seconds: float) -> float:
    """Best FLOP/s of repeated n x n matmuls over about `seconds` (best, not mean: other processes share the CPU)."""
    n = 4096 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)  # leave the caller's global RNG stream untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call picks kernels and allocates
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def machine_peak_flops(dtype: torch.dtype, device: str | torch.device = "cpu", cache_file: str | Path | None = None,
                       seconds: float = 2.0) -> float:
    """This machine's matmul peak in FLOP/s for `dtype` at the current torch thread count.

    Measured once (about `seconds` of large square matmuls), then cached in this process and, if `cache_file` is
    given, in that JSON file (keyed by CPU model, device, dtype, threads and torch version) for later runs.
    """
    device = torch.device(device)
    threads = torch.get_num_threads()
    key = (device.type, str(dtype), threads)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    file_key = f"{cpu_model()} | {device.type} | {dtype} | {threads} threads | torch {torch.__version__}"
    cache: dict[str, float] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except json.JSONDecodeError:
            cache = {}  # a damaged cache is only a cache: measure again and overwrite it
    if not isinstance(cache.get(file_key), (int, float)):
        cache[file_key] = _measure_matmul_flops(dtype, device, seconds)
        if cache_file is not None:
            with contextlib.suppress(NanoseekError):  # only a cache: an unwritable one means measuring next time
                write_text_atomically(cache_file, json.dumps(cache, indent=2) + "\n")
    _PEAK_CACHE[key] = float(cache[file_key])
    return _PEAK_CACHE[key]


@dataclass
class RunRecord:
    """One stage's run, written as run.json. Derived numbers (CPU-hours, cost, MFU, throughput) are computed."""

    stage: str
    config: dict[str, Any]
    params_total: int  # main model (embedding and head included), as DeepSeek counts it
    params_active: int  # activated per token
    params_mtp: int  # the MTP modules, counted separately as in the V3 paper
    steps: int
    tokens: int  # training tokens processed (batch x seq_len x grad_accum x steps)
    flops_per_token: float  # config.flops_per_token(seq_len): forward + backward, MoE at its activated size
    wall_seconds: float  # the whole stage: tokenizer, data, training, evaluation, checkpoints (all sessions)
    train_seconds: float  # optimizer steps only: the base of throughput and MFU
    threads: int
    dtype: str  # autocast compute dtype (master weights are always fp32)
    device: str
    peak_flops: float  # machine_peak_flops(dtype) at `threads`
    price_per_hour: float  # USD per machine-hour
    final_train_loss: float | None
    final_val_loss: float | None
    machine: dict[str, Any] = field(default_factory=machine_info)
    started_from: str | None = None  # the checkpoint the run fine-tuned (sft, rl: --model; distill: --student-model)
    teacher: str | None = None  # distill: the teacher whose traces it learnt (the report pairs their evals)

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def cpu_hours(self) -> float:
        return self.wall_seconds * self.threads / 3600

    @property
    def cost_usd(self) -> float:
        return self.wall_seconds / 3600 * self.price_per_hour

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the measured matmul peak."""
        return self.flops / self.train_seconds / self.peak_flops if self.train_seconds and self.peak_flops else 0.0

    @classmethod
    def from_dict(cls, d: Any, source: str = "run record") -> RunRecord:
        """The inverse of to_dict (derived keys are recomputed, not read), checking every field's type."""
        if not isinstance(d, dict):
            raise NanoseekError(f"{source}: expected a JSON object")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.name == "machine":
                    kw["machine"] = {}  # never this machine's info: the run may have been elsewhere
                    continue
                if f.name in ("started_from", "teacher"):  # records written before 2026-12-06
                    continue
                raise NanoseekError(f"{source}: missing field {f.name!r}")
            v = d[f.name]
            want = {"stage": str, "dtype": str, "device": str, "config": dict, "machine": dict}.get(f.name)
            optional = f.name in ("final_train_loss", "final_val_loss")
            if f.name in ("started_from", "teacher"):
                ok = v is None or isinstance(v, str)
            elif want is not None:
                ok = isinstance(v, want)
            else:
                ok = (v is None and optional) or (isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                raise NanoseekError(f"{source}: field {f.name!r} has the wrong type ({type(v).__name__}: {v!r:.40})")
            kw[f.name] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(flops=self.flops, cpu_hours=self.cpu_hours, cost_usd=self.cost_usd,
                 tokens_per_second=self.tokens_per_second, mfu=self.mfu)
        return d

    def write(self, path: str | Path) -> Path:
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")


def plot_losses(history: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Loss curves to a PNG: train and val loss on top, MaxVio (expert-load imbalance) below.

    history = {"train": [{"step", "loss", "maxvio", ...}], "val": [{"step", "loss"}]}. Uses the Agg canvas directly,
    so no pyplot state or display backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = history.get("train", []), history.get("val", [])
    fig = Figure(figsize=(8, 6), tight_layout=True)
    FigureCanvasAgg(fig)
    ax_loss, ax_vio = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.8, label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", ms=3, label="val")
    ax_loss.set_ylabel("loss (next-token cross-entropy)")
    ax_loss.grid(alpha=0.3)
    if train or val:
        ax_loss.legend()
    if title:
        ax_loss.set_title(title)
    vio = [r for r in train if r.get("maxvio") is not None]
    if vio:
        ax_vio.plot([r["step"] for r in vio], [r["maxvio"] for r in vio], lw=0.8, color="tab:red")
    ax_vio.set_ylabel("MaxVio")
    ax_vio.set_xlabel("step")
    ax_vio.grid(alpha=0.3)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
