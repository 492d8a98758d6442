"""`nanoseek pretrain`: tokenizer -> token data -> V3 pre-training objective -> HF checkpoint.

The recipe follows DeepSeek-V3 section 4.2, scaled down: AdamW (betas 0.9/0.95, weight decay 0.1, clip 1.0), a
warmup -> constant -> decay learning rate (the "WSD" shape of V3's schedule), the loss
L_main + lambda * L_MTP + alpha * L_Bal, and auxiliary-loss-free load balancing: after every optimizer step each
expert's routing bias moves by gamma towards the mean load.

The Trainer below (optimizer, schedule, expert-bias update, checkpoints, resume, progress bar, run record) is meant
for reuse by the later stages: they add their arguments with add_training_arguments() and pass their own loss.
Under torchrun (pretrain only) it trains data-parallel with DDP or FSDP2: nanoseek/distributed.py, docs/distributed.md.

Run directory (--out):
  tokenizer/  data/  checkpoints/step_NNNNNN/ (HF checkpoint + trainer_state.json + optimizer.pt)
  checkpoints/latest (names the newest complete checkpoint)  final/  run.json  loss.png  peak_flops.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoseek import distributed
from nanoseek.checkpoint import load_model, save_pretrained
from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.data import TokenDataset, default_corpus_files, prepare_data, read_documents
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer, enable_fp8
from nanoseek.osutil import available_cpus, check_writable, load_average, write_failed, write_file_atomically
from nanoseek.report import RunRecord, cpu_has_native_bf16, machine_peak_flops, plot_losses
from nanoseek.tokenizer import Tokenizer, train_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids, targets), both [B, T] int64
LossFn = Callable[[Transformer, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]

# Training settings whose change on --resume breaks "same run as without the interruption" (a note is printed).
RESUME_SENSITIVE = ("data", "batch_size", "seq_len", "grad_accum", "lr", "min_lr_frac", "warmup_steps", "decay_frac",
                    "decay_shape", "weight_decay", "grad_clip", "dtype", "bias_update_speed", "balance_alpha",
                    "mtp_lambda", "seed", "steps", "fp8")


# --- arguments -----------------------------------------------------------------------------------------------------
def add_training_arguments(p: argparse.ArgumentParser, *, steps: int, batch_size: int, seq_len: int, lr: float,
                           warmup_steps: int, out: str, eval_every: int, save_every: int, sample_every: int,
                           eval_iters: int = 4, min_lr_frac: float = 0.1, decay_frac: float = 0.3) -> None:
    """The optimizer / schedule / checkpoint / machine flags every training stage shares (defaults per stage)."""
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"sequences per micro-batch, over all processes under torchrun (default {batch_size})")
    g.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--min-lr-frac", type=float, default=min_lr_frac,
                   help=f"final lr as a fraction of the peak (default {min_lr_frac:g}; V3: 2.2e-5 / 2.2e-4 = 0.1)")
    g.add_argument("--warmup-steps", type=int, default=warmup_steps,
                   help=f"linear warmup steps (default {warmup_steps})")
    g.add_argument("--decay-frac", type=float, default=decay_frac,
                   help=f"fraction of the steps at the end over which lr decays to min (default {decay_frac:g}; "
                        "warmup -> constant -> decay is V3's schedule shape)")
    g.add_argument("--decay-shape", choices=("cosine", "linear"), default="cosine",
                   help="shape of the final decay (default cosine, as V3)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: bf16 = torch.autocast, master weights stay fp32; auto = bf16 on CUDA, and "
                        "on CPUs with native bf16 for widths >= 256 (where it measured faster; docs/pretrain.md)")
    g.add_argument("--bias-update-speed", type=float, default=0.001,
                   help="gamma of the auxiliary-loss-free expert-bias update, 0 = off (default 0.001, V3)")
    g.add_argument("--balance-alpha", type=float, default=0.0001,
                   help="alpha of the sequence-wise balance loss, 0 = off (default 0.0001, V3)")
    g.add_argument("--mtp-lambda", type=float, default=0.3,
                   help="weight of the multi-token-prediction loss, 0 = off (default 0.3, V3's first 10T tokens)")
    g.add_argument("--eval-every", type=int, default=eval_every,
                   help=f"steps between val losses (default {eval_every})")
    g.add_argument("--eval-iters", type=int, default=eval_iters,
                   help=f"fixed val batches per evaluation (default {eval_iters})")
    g.add_argument("--sample-every", type=int, default=sample_every,
                   help=f"steps between text samples, 0 = never (default {sample_every})")
    g.add_argument("--save-every", type=int, default=save_every,
                   help=f"steps between checkpoints; one is always written at the end (default {save_every})")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order (default 0)")
    g.add_argument("--out", type=Path, default=Path(out), help=f"run directory (default {out})")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    m = p.add_argument_group("machine")
    m.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    m.add_argument("--price-per-hour", type=float, default=0.10,
                   help="USD per machine-hour for the cost in run.json (default 0.10: an assumed on-demand rate "
                        "for a small 2-vCPU cloud VM; V3's cost table uses $2 per H800 GPU-hour)")


def add_model_and_data_arguments(p: argparse.ArgumentParser) -> None:
    """--preset/--config, --data and --vocab-size: the model and the corpus a pre-training run starts from."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model preset (default cpu)")
    src.add_argument("--config", type=Path, help="a config.json (HF DeepseekV3 field names) instead of a preset")
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help=".txt / .jsonl files to train on (default: the bundled tinyshakespeare + GSM8K train)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary when one is trained (default: the config's vocab_size)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_data_arguments(p)
    p.add_argument("--sample-prompt", default="ROMEO:", help="prompt of the periodic text samples (default 'ROMEO:')")
    p.add_argument("--fp8", action="store_true",
                   help="DeepSeek-V3 FP8 GEMMs for every projection and expert (1x128 / 128x128 e4m3 tiles, emulated "
                        "exactly; slower on CPU); embedding, head, gate, norms, attention stay in --dtype")
    p.add_argument("--parallel", choices=distributed.MODES, default="ddp",
                   help="under torchrun: ddp = whole model per process, gradients all-reduced; fsdp = FSDP2, weights, "
                        "gradients and optimizer state sharded (default ddp; docs/distributed.md)")
    add_training_arguments(p, steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=20, out="runs/pretrain",
                           eval_every=50, save_every=100, sample_every=100)


# --- machine, schedule, optimizer ----------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanoseekError(f"--device: unknown device {name!r} (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoseekError("--device cuda: no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device, hidden_size: int) -> torch.dtype:
    """The autocast compute dtype (weights, gradients and optimizer state stay fp32 either way).

    auto: bf16 on CUDA. On CPU, bf16 only where it measured faster (docs/pretrain.md): with native bf16 matmuls
    (AVX-512 BF16 / AMX) and hidden_size >= 256. The cpu preset (256) trains ~1.1-1.3x faster in bf16; the test
    preset (64) 2x slower, its matmuls too small to pay for autocast's casts.
    """
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and hidden_size >= 256 and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def lr_at(step: int, steps: int, peak: float, warmup_steps: int, decay_frac: float, min_lr_frac: float,
          shape: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, constant, then decay to min over the last
    decay_frac of the steps. The warmup and decay factors multiply, so short runs where they overlap stay smooth."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = round(decay_frac * steps)
    progress = (step - (steps - decay_steps) + 1) / decay_steps if decay_steps else 0.0
    progress = min(max(progress, 0.0), 1.0)  # 0 before the decay phase, 1 at the last step
    fall = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
    return peak * warm * (min_lr_frac + (1 - min_lr_frac) * fall)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with V3's betas; weight decay on matrices and expert stacks (dim >= 2) only, not on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CPU and CUDA); the default per-parameter loop took 58.5 ms a step on the
    # cpu preset against 8.7 ms fused (docs/bench_train.md). It also takes FSDP2's DTensor parameters on CPU (checked
    # with torch 2.13 and gloo), so torchrun --parallel fsdp needs no foreach fallback.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def check_training_args(args: argparse.Namespace, config: ModelConfig) -> None:
    positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_iters", "keep_last")
    for name in positive:
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "sample_every", "warmup_steps"):
        if getattr(args, name) < 0:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.lr > 0:
        raise NanoseekError(f"--lr must be > 0, got {args.lr}")
    for name in ("min_lr_frac", "decay_frac"):
        if not 0 <= getattr(args, name) <= 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("weight_decay", "grad_clip", "bias_update_speed", "balance_alpha", "mtp_lambda", "price_per_hour"):
        if getattr(args, name) < 0:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.seq_len > config.max_position_embeddings:
        raise NanoseekError(f"--seq-len {args.seq_len} exceeds the config's max_position_embeddings "
                            f"({config.max_position_embeddings})")


def config_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """'field: a vs b' for the first field that differs, or None."""
    for name in a.__dataclass_fields__:
        if getattr(a, name) != getattr(b, name):
            return f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
    return None


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in vars(args).items() if not k.startswith("_")}


# --- the trainer ----------------------------------------------------------------------------------------------------
class Trainer:
    """Optimizer, lr schedule, expert-bias update, checkpoints and resume for one model and one run directory.

    The stage supplies batches and a loss function; `args` carries the add_training_arguments() settings.
    History: {"train": [{"step", "loss", "lr", "maxvio", other loss parts}], "val": [{"step", "loss"}]}; `step`
    counts completed optimizer steps, and batches are a pure function of it, so resuming needs no RNG state.
    """

    def __init__(self, model: Transformer, args: argparse.Namespace, out_dir: str | Path,
                 tokenizer_dir: str | Path | None = None, stage: str = "pretrain"):
        self.model, self.args, self.stage = model, args, stage
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.tokenizer_dir = tokenizer_dir
        self.device = next(model.parameters()).device
        self.amp_dtype = resolve_dtype(args.dtype, self.device, model.config.hidden_size)
        self.optimizer = make_optimizer(model, args.lr, args.weight_decay)
        self.step = 0
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        self.tokens = 0
        self.train_seconds = 0.0
        self.previous_wall_seconds = 0.0  # wall time of earlier sessions of this run (before --resume)
        self.session_start = time.time()
        self.peak_flops = machine_peak_flops(self.amp_dtype, self.device, cache_file=self.out_dir / "peak_flops.json")
        self._flops_per_token: dict[int, float] = {}
        self._last_saved_step = -1
        self._gathered: Transformer | None = None  # FSDP: rank 0's whole-weights copy for checkpoints and samples
        model.train()

    # ----- one optimizer step --------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = self.model.config.flops_per_token(seq_len, self.args.mtp_lambda > 0)
        return self._flops_per_token[seq_len]

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> dict[str, Any]:
        """Accumulate gradients over the micro-batches, clip, AdamW step, then the expert-bias update (gamma)
        from the loads routed during these micro-batches. Returns the history record of the step."""
        args, model = self.args, self.model
        t0 = time.perf_counter()
        lr = lr_at(self.step, args.steps, args.lr, args.warmup_steps, args.decay_frac, args.min_lr_frac,
                   args.decay_shape)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        tokens, flops = 0, 0.0
        for x, y in micro_batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss, stats = loss_fn(model, x, y)
            (loss / len(micro_batches)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += x.numel()
            flops += x.numel() * self.flops_per_token(x.shape[1])
        # under torchrun: the logged numbers are the global batch's (means of equal per-rank shards); the gradients
        # are already averaged by DDP / FSDP, so clipping sees the global norm (FSDP: a DTensor norm over all shards)
        sums = distributed.all_reduce_mean(sums)
        tokens *= distributed.world_size()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dist.is_available() and dist.is_initialized():  # the bias follows the global batch's load (V3 2.1.2)
            for gate in model.gates():
                dist.all_reduce(gate.expert_load)
        maxvio = model.update_expert_bias(args.bias_update_speed)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += tokens
        self.train_seconds += dt
        record = {"step": self.step, **{k: v / len(micro_batches) for k, v in sums.items()}, "lr": lr,
                  "maxvio": maxvio}
        self.history["train"].append(record)
        # flops are this rank's and peak_flops this process's: the MFU of one rank (all do the same work)
        return {**record, "tokens_per_second": tokens / dt, "mfu": flops / dt / self.peak_flops}

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch], loss_fn: LossFn) -> float:
        """Mean of stats['loss'] over fixed batches (eval mode: no expert-load counting); appended to history."""
        self.model.eval()
        try:
            total = 0.0
            for x, y in batches:
                with self.autocast():
                    total += loss_fn(self.model, x.to(self.device), y.to(self.device))[1]["loss"]
        finally:
            self.model.train()
        val = distributed.all_reduce_mean({"loss": total / len(batches)})["loss"]  # batches: this rank's shards
        self.history["val"].append({"step": self.step, "loss": val})
        return val

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def wall_seconds(self) -> float:
        return self.previous_wall_seconds + time.time() - self.session_start

    def full_model(self) -> Transformer | None:
        """On rank 0, a plain model with the current whole weights (the model itself unless FSDP shards it);
        None on the other ranks. Under FSDP this gathers the shards: every rank must call it."""
        if not distributed.is_sharded(self.model):
            return self.model if distributed.is_main() else None
        full = distributed.full_state_dict(self.model)
        if not distributed.is_main():
            return None
        if self._gathered is None:
            with torch.random.fork_rng(devices=[]), torch.device(self.device):  # rank 0's RNG stays like the others'
                self._gathered = Transformer(self.model.config)
        self._gathered.load_state_dict(full)
        self._gathered.train(self.model.training)
        return self._gathered

    def save_checkpoint(self) -> Path:
        """checkpoints/step_NNNNNN (written atomically), then `latest` is pointed at it, then old ones pruned.

        Under torchrun every rank calls this (FSDP gathers weights and optimizer moments); rank 0 writes the same
        files a single process would, so the checkpoint resumes at any world size.
        """
        name = f"step_{self.step:06d}"
        path = self.ckpt_dir / name
        model, optimizer_state = self.full_model(), distributed.full_optimizer_state(self.optimizer)
        self._last_saved_step = self.step
        if model is None:  # not rank 0
            return path
        state = {"stage": self.stage, "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                 "wall_seconds": self.wall_seconds(), "compute_dtype": str(self.amp_dtype),
                 "args": _jsonable(self.args), "history": self.history}
        buf = io.BytesIO()
        torch.save(optimizer_state, buf)
        extra = {"trainer_state.json": (json.dumps(state, indent=1) + "\n").encode(), "optimizer.pt": buf.getvalue()}
        save_pretrained(model, path, tokenizer_dir=self.tokenizer_dir, extra_files=extra)  # one line on failure

        def write_latest(tmp: Path) -> None:
            with open(tmp, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())

        write_file_atomically(self.ckpt_dir / "latest", write_latest)  # only now, with the directory complete
        self._prune()
        return path

    def _prune(self) -> None:
        """Keep the newest --keep-last checkpoints; remove temporaries of writes that were killed."""
        steps = sorted(p for p in self.ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir())
        latest = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        for old in steps[:-self.args.keep_last]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)  # a checkpoint that could not be removed costs only space
        for stray in self.ckpt_dir.glob(".step_*"):  # .step_N.tmp-PID / .step_N.old-PID from an interrupted write
            shutil.rmtree(stray, ignore_errors=True)
        for stray in self.ckpt_dir.glob(".latest.tmp-*"):
            stray.unlink(missing_ok=True)
        for stray in self.out_dir.glob(".final.*-*"):  # .final.tmp-PID / .final.old-PID
            shutil.rmtree(stray, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights (fp32), expert biases, optimizer state, step, history and clocks from `path`.

        trainer_state.json and optimizer.pt are checked against this model before anything is loaded: moments of
        the wrong shape would otherwise reach the fused AdamW kernel, which reads out of bounds (a segfault)."""
        check_same_config(self.model.config, path)
        for f in ("trainer_state.json", "optimizer.pt"):
            if not (path / f).is_file():
                raise NanoseekError(f"--resume: {path} has no {f}: not a training checkpoint")
        state = read_trainer_state(path / "trainer_state.json", self.stage)
        optimizer_state = read_optimizer_state(path / "optimizer.pt", self.optimizer, self.device)
        with torch.no_grad():  # the files hold whole tensors; under FSDP each rank keeps its own shard
            distributed.load_state_dict(self.model, load_model(path).state_dict())
        distributed.load_optimizer_state(self.optimizer, optimizer_state)
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]
        self.train_seconds, self.previous_wall_seconds = state["train_seconds"], state["wall_seconds"]
        self._last_saved_step = self.step
        old, new = state.get("args", {}), _jsonable(self.args)
        # more --steps at a constant lr (no decay phase) only makes the run longer: the steps it shares are the same
        constant_lr = old.get("decay_frac") == new.get("decay_frac") == 0
        changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in RESUME_SENSITIVE if k in old and old[k] != new.get(k)
                   and not (k == "steps" and constant_lr and new[k] > old[k])]
        if changed:
            print(f"note: resuming with changed settings ({'; '.join(changed)}): not the same run as an "
                  f"uninterrupted one")
        print(f"resumed from {path} at step {self.step}")

    def interrupted(self, path: Path) -> str:
        """What Ctrl-C tells the user once save_checkpoint() has returned `path`."""
        return f"interrupted: saved {path} (continue with the same command plus --resume)"

    def save_final(self) -> Path:
        """final/: the weights + tokenizer (no optimizer): what the next stage or a user loads."""
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        model, path = self.full_model(), self.out_dir / "final"
        return save_pretrained(model, path, tokenizer_dir=self.tokenizer_dir) if model is not None else path

    def run_record(self) -> RunRecord:
        cfg, args = self.model.config, self.args
        p = cfg.num_params()
        train, val = self.history["train"], self.history["val"]
        return RunRecord(
            stage=self.stage, config=cfg.to_hf_dict(), params_total=p["total"], params_active=p["active"],
            params_mtp=p["mtp_total"], steps=self.step, tokens=self.tokens,
            flops_per_token=self.flops_per_token(args.seq_len), wall_seconds=self.wall_seconds(),
            # threads and peak over all processes, so CPU-hours and MFU count the whole torchrun job
            train_seconds=self.train_seconds, threads=torch.get_num_threads() * distributed.world_size(),
            dtype=("fp8-e4m3 (emulated) + " if getattr(args, "fp8", False) else "")
            + str(self.amp_dtype).removeprefix("torch."), device=str(self.device),
            peak_flops=self.peak_flops * distributed.world_size(),
            price_per_hour=args.price_per_hour, final_train_loss=train[-1]["loss"] if train else None,
            final_val_loss=val[-1]["loss"] if val else None)

    def write_report(self) -> RunRecord:
        """run.json and loss.png in the run directory (written by rank 0 only; every rank gets the record)."""
        record = self.run_record()
        if not distributed.is_main():
            return record
        record.write(self.out_dir / "run.json")
        plot_losses(self.history, self.out_dir / "loss.png", title=f"nanoseek {self.stage}")
        return record


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_trainer_state(file: Path, stage: str) -> dict[str, Any]:
    """trainer_state.json, checked: the counters are numbers, the history lists of {"step", ...} objects."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{file}: invalid JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{file}: not readable ({e})") from None

    def bad(why: str) -> NanoseekError:
        return NanoseekError(f"{file}: {why}: not a trainer state nanoseek wrote")

    if not isinstance(state, dict):
        raise bad("expected a JSON object")
    for key in ("step", "tokens"):
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) or state[key] < 0:
            raise bad(f"{key!r} must be a non-negative integer, got {state.get(key)!r}")
    for key in ("train_seconds", "wall_seconds"):
        if not _is_number(state.get(key)) or not 0 <= state[key] < math.inf:
            raise bad(f"{key!r} must be a non-negative number, got {state.get(key)!r}")
    if "stage" in state and state["stage"] != stage:
        raise NanoseekError(f"{file}: written by `nanoseek {state['stage']}`, not `nanoseek {stage}`: use the "
                            f"{stage} run's --out")
    if not isinstance(state.get("args", {}), dict):
        raise bad("'args' must be an object")
    history = state.get("history")
    if not isinstance(history, dict) or not isinstance(history.get("train"), list) \
            or not isinstance(history.get("val"), list):
        raise bad("'history' must be an object with 'train' and 'val' lists")
    for name, rows in history.items():
        if not isinstance(rows, list):
            raise bad(f"history.{name} must be a list")
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise bad(f"history.{name} holds {str(row)[:60]!r}, not a {{\"step\": N, ...}} object")
            if name in ("train", "val") and not _is_number(row.get("loss")):
                raise bad(f"history.{name} entry of step {row['step']} has no numeric 'loss'")
    return state


def read_optimizer_state(file: Path, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """optimizer.pt (weights_only: tensors and plain containers, never arbitrary pickled objects), checked against
    `optimizer`'s parameters: the same groups and parameter counts, moments of each parameter's shape and dtype,
    finite values, and the hyperparameters AdamW reads as numbers."""
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle weights_only refuses: each its own exception type
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise NanoseekError(f"{file}: not a readable optimizer state ({type(e).__name__}: {first})") from None

    def bad(why: str) -> NanoseekError:
        return NanoseekError(f"{file}: {why}: not the optimizer state of this model")

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise bad("expected an optimizer state_dict with 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if len(saved_groups) != len(groups):
        raise bad(f"{len(saved_groups)} parameter groups, this model's optimizer has {len(groups)}")
    ids: list[int] = []
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise bad(f"parameter group {i} has no 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise bad(f"parameter group {i} holds {len(saved['params'])} parameters, this model's "
                      f"{len(group['params'])}")
        for key in ("lr", "eps", "weight_decay"):
            if not _is_number(saved.get(key)) or not math.isfinite(saved[key]) or saved[key] < 0:
                raise bad(f"parameter group {i}: {key!r} must be a non-negative number, got {saved.get(key)!r}")
        betas = saved.get("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1
                                                                               for b in betas):
            raise bad(f"parameter group {i}: 'betas' must be two numbers in [0, 1), got {betas!r}")
        ids += saved["params"]
    if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise bad("the parameter groups' 'params' must be distinct integer ids")
    params = dict(zip(ids, (p for group in groups for p in group["params"]), strict=True))
    for key, entry in state["state"].items():
        if key not in params or not isinstance(entry, dict):
            raise bad(f"state entry {key!r} belongs to no parameter")
        p = params[key]
        for name, v in entry.items():
            if not torch.is_tensor(v):
                raise bad(f"{name} of parameter {key} is {type(v).__name__}, not a tensor")
            if name == "step":
                numeric = v.is_floating_point() or v.dtype == torch.int64
                if v.numel() != 1 or not numeric or not 0 <= v.item() < 2**53:
                    raise bad(f"step of parameter {key} must be one non-negative number")
            elif name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype:
                    raise bad(f"{name} of parameter {key} is {str(v.dtype)[6:]} {list(v.shape)}, the parameter "
                              f"{str(p.dtype)[6:]} {list(p.shape)}")
                if not torch.isfinite(v).all():
                    raise bad(f"{name} of parameter {key} holds NaN or inf")
            else:
                raise bad(f"unknown entry {name!r} for parameter {key} (AdamW keeps step, exp_avg, exp_avg_sq)")
    return state


def check_same_config(config: ModelConfig, checkpoint: Path) -> None:
    diff = config_difference(config, ModelConfig.load(checkpoint / "config.json"))
    if diff:
        raise NanoseekError(f"--resume: the model config differs from the checkpoint {checkpoint} ({diff}); "
                            f"use the same --preset/--config, or a new --out")


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `ckpt_dir/latest` names, or None when there is no `latest` yet."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{latest}: not readable ({e})") from None
    if not re.fullmatch(r"step_\d+", name):  # never a path: `latest` must not lead a resume out of ckpt_dir
        raise NanoseekError(f"{latest} must name a checkpoint step_NNNNNN of {ckpt_dir}, got {name[:60]!r}")
    path = ckpt_dir / name
    if not path.is_dir():
        raise NanoseekError(f"{latest} names {path.name}, which does not exist")
    return path


def resume_point(out: Path, resume: bool) -> Path | None:
    """The checkpoint a stage resumes from (None for a fresh run); refuses to start a fresh run over an old one."""
    if resume:
        path = latest_checkpoint(out / "checkpoints")
        if path is None:
            raise NanoseekError(f"--resume: no checkpoint to resume from ({out / 'checkpoints' / 'latest'} "
                                f"does not exist)")
        return path
    if (out / "checkpoints" / "latest").is_file():
        raise NanoseekError(f"{out} already holds a run (checkpoints/latest exists): add --resume to continue it, "
                            f"or pick another --out")
    return None


class _StopOnCtrlC:
    """First Ctrl-C asks the loop to stop after the current step (which it then saves); a second one stops at once.

    Stopping between steps, never inside one, means the checkpoint never holds a half-applied optimizer update.
    """

    def __enter__(self) -> _StopOnCtrlC:
        self.requested = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to quit without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


def train(trainer: Trainer, get_batch: Callable[[int, int], Batch], loss_fn: LossFn,
          val_batches: Sequence[Batch] = (), sample: Callable[[], str] | None = None) -> None:
    """Run optimizer steps trainer.step .. args.steps: get_batch(step, micro) gives the micro-batches of a step.

    Evaluates every --eval-every steps and at the end; samples every --sample-every and checkpoints every
    --save-every steps before the last (the caller saves and samples the final model).
    Ctrl-C: the current step finishes, a checkpoint is written, and KeyboardInterrupt is re-raised.
    """
    args = trainer.args
    bar = tqdm(total=args.steps, initial=trainer.step, desc=trainer.stage, unit="step", dynamic_ncols=True,
               disable=not distributed.is_main())
    with _StopOnCtrlC() as ctrl_c:
        try:
            while trainer.step < args.steps:
                step = trainer.step
                r = trainer.train_step([get_batch(step, m) for m in range(args.grad_accum)], loss_fn)
                bar.update(1)
                bar.set_postfix_str(f"loss {r['loss']:.3f} | {r['tokens_per_second']:.0f} tok/s | "
                                    f"MFU {r['mfu']:.1%} | MaxVio {r['maxvio']:.2f} | lr {r['lr']:.2e}")
                done = trainer.step
                if val_batches and (done % args.eval_every == 0 or done == args.steps):
                    tqdm.write(f"step {done}: val loss {trainer.evaluate(val_batches, loss_fn):.4f}")
                if sample is not None and args.sample_every and done % args.sample_every == 0 and done < args.steps:
                    tqdm.write(f"step {done} sample: {sample()!r}")
                if distributed.any_rank(ctrl_c.requested):  # under torchrun all ranks must stop at the same step
                    tqdm.write(trainer.interrupted(trainer.save_checkpoint()))
                    raise KeyboardInterrupt
                if args.save_every and done % args.save_every == 0 and done < args.steps:
                    trainer.save_checkpoint()
        finally:
            bar.close()


# --- text samples ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8,
           seed: int = 0) -> str:
    """Continue `prompt` by recomputing the full sequence each token (no KV cache: the engine comes later).

    temperature 0 = greedy. Stops at eos. Token ids past the tokenizer's vocabulary (padding rows of a larger
    embedding) are never sampled. Returns prompt + continuation.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    n_prompt = len(ids)
    gen = torch.Generator(device=device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids[-limit:]], device=device))[0, -1].float()  # [V]
            logits[tokenizer.vocab_size:] = float("-inf")
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            if nxt == tokenizer.eos_id:
                break
            ids.append(nxt)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(ids[n_prompt:])


# --- the stage ------------------------------------------------------------------------------------------------------
def pretrain_loss(mtp_lambda: float, balance_alpha: float) -> LossFn:
    """L_main + lambda * L_MTP + alpha * L_Bal; stats['loss'] is L_main alone (comparable with the val loss)."""

    def loss_fn(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = model.compute_loss(x, y, mtp_lambda=mtp_lambda if model.training else 0.0,
                                         balance_alpha=balance_alpha if model.training else 0.0)
        return loss, {"loss": stats["loss_main"], "loss_total": stats["loss"],
                      **{k: v for k, v in stats.items() if k in ("loss_mtp", "loss_balance")}}

    return loss_fn


def load_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.load(args.config) if args.config else get_preset(args.preset)


def prepare_tokenizer(paths: list[Path], out_dir: Path, vocab_size: int) -> Tokenizer:
    """out_dir/tokenizer: reused when present, else trained on the documents of `paths`."""
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(tok_dir)
        print(f"tokenizer: reusing {tok_dir} ({tok.vocab_size} tokens; delete it to train a new one)")
        return tok
    t = time.time()
    tmp = out_dir / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = train_tokenizer((doc for p in paths for doc in read_documents(p)), vocab_size, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)  # a tokenizer/ without tokenizer.json is a leftover
        os.replace(tmp, tok_dir)  # a half-trained tokenizer must never be mistaken for a finished one
    except OSError as e:
        raise write_failed(tok_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tokenizer: trained {tok.vocab_size} tokens in {time.time() - t:.1f}s -> {tok_dir}")
    return tok


def prepare_corpus(paths: list[Path], out: Path, config: ModelConfig, vocab_size: int | None, seq_len: int,
                   seed: int) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """out/tokenizer (trained or reused) and the train/val token shards in out/data, checked against the model's
    vocabulary and the sequence length. Under torchrun rank 0 builds them and the other ranks reuse them."""
    vocab = vocab_size or config.vocab_size
    if vocab > config.vocab_size:
        raise NanoseekError(f"--vocab-size {vocab} exceeds the model's vocab_size ({config.vocab_size})")
    tokenizer = distributed.main_first(lambda: prepare_tokenizer(paths, out, vocab))
    if tokenizer.vocab_size > config.vocab_size:
        raise NanoseekError(f"{out / 'tokenizer'} has {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size ({config.vocab_size}); delete it or use another --out")
    t = time.time()
    meta = distributed.main_first(lambda: prepare_data(paths, tokenizer, out / "data", seed=seed))
    train_ds = TokenDataset(out / "data" / "train.bin", meta["dtype"])
    val_ds = TokenDataset(out / "data" / "val.bin", meta["dtype"])
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if len(ds) < seq_len + 1:
            raise NanoseekError(f"data: the {name} split has {len(ds)} tokens, fewer than --seq-len + 1 = "
                                f"{seq_len + 1}; add data or lower --seq-len")
    print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {out / 'data'} "
          f"({time.time() - t:.1f}s)")
    return tokenizer, train_ds, val_ds


def run(args: argparse.Namespace) -> None:
    """One process, or one rank of `torchrun --nproc_per_node=N -m nanoseek pretrain ... [--parallel fsdp]`."""
    device = distributed.setup(resolve_device(args.device))  # joins torchrun's process group; no-op without it
    try:
        if distributed.is_main():
            _run(args, device)
        else:  # only rank 0 prints (errors still reach stderr from every rank)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                _run(args, device)
    finally:  # also on errors and Ctrl-C: a rank that leaves must not keep the others waiting
        distributed.cleanup()


def _run(args: argparse.Namespace, device: torch.device) -> None:
    t_start = time.time()
    # under torchrun the processes share the cores: by default each gets cores / processes-per-node threads
    threads = args.threads or max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    cores, load = available_cpus(), load_average() or 0.0
    if threads > 1 and load > cores and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # measured on the 2-core dev box at load ~7: 2 threads ran 3-5x slower than 1 (docs/pretrain.md)
        print(f"note: the machine is busy (load {load:.1f} on {cores} cores): {threads} OpenMP threads spin-waiting "
              f"on each other can run several times slower; try --threads 1 or OMP_WAIT_POLICY=PASSIVE")
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the tokenizers library's thread pool
    config = load_config(args)
    check_training_args(args, config)
    local_batch = distributed.local_batch_size(args.batch_size)  # --batch-size is global: same run at any world size
    paths = [Path(p) for p in (args.data or default_corpus_files())]
    for p in paths:
        read_documents(p)  # raises NanoseekError naming a missing or unsupported file, before any work
    out: Path = args.out
    resume_from = resume_point(out, args.resume)
    if resume_from is not None:
        check_same_config(config, resume_from)  # fail before the tokenizer and data work, not after
    check_writable(out)  # a read-only or full --out fails now, not at the first checkpoint

    tokenizer, train_ds, val_ds = prepare_corpus(paths, out, config, args.vocab_size, args.seq_len, args.seed)

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(config)
    if args.fp8:
        print(f"fp8: {enable_fp8(model)} weight tensors compute with DeepSeek-V3 FP8 GEMMs (emulated)")
    model = distributed.wrap_model(model, args.parallel)  # before the Trainer builds the optimizer (FSDP shards)
    trainer = Trainer(model, args, out, tokenizer_dir=out / "tokenizer", stage="pretrain")
    trainer.session_start = t_start  # the wall clock includes tokenizer and data preparation
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    n = config.num_params()
    print(f"model: {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active, MTP {n['mtp_total'] / 1e6:.2f}M) | "
          f"{args.batch_size}x{args.seq_len}x{args.grad_accum} tokens/step | {str(trainer.amp_dtype)[6:]} on "
          f"{device} x{threads} threads | measured peak {trainer.peak_flops / 1e9:.0f} GFLOP/s")

    if distributed.initialized():
        print(f"distributed: {distributed.world_size()} processes ({args.parallel}, {dist.get_backend()}), "
              f"{local_batch} of the {args.batch_size} sequences per micro-batch each")
    loss_fn = pretrain_loss(args.mtp_lambda, args.balance_alpha)
    # every rank draws the same global batch and keeps its rows (distributed.shard): the tokens of a step do not
    # depend on the world size
    val_batches = [distributed.shard(val_ds.get_batch(args.batch_size, args.seq_len, step=i, seed=args.seed))
                   for i in range(args.eval_iters)]

    def get_batch(step: int, micro: int) -> Batch:
        return distributed.shard(train_ds.get_batch(args.batch_size, args.seq_len, step, micro=micro, seed=args.seed))

    def show_sample() -> str:
        full = trainer.full_model()  # FSDP gathers the shards (every rank calls this); only rank 0 samples
        if full is None:
            return ""
        return sample(full, tokenizer, args.sample_prompt, max_new_tokens=48, temperature=0.8, seed=args.seed)

    train(trainer, get_batch, loss_fn, val_batches, show_sample)
    final = trainer.save_final()
    print(f"sample: {show_sample()!r}")
    r = trainer.write_report()
    val = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "n/a"
    print(f"done: {r.steps} steps, {r.tokens:,} tokens in {r.wall_seconds / 60:.1f} min "
          f"({r.tokens_per_second:.0f} tok/s, MFU {r.mfu:.1%}, {r.cpu_hours:.3f} CPU-h, ~${r.cost_usd:.4f}); "
          f"final val loss {val}")
    print(f"final checkpoint (HF DeepseekV3 layout + tokenizer): {final}")
    print(f"run record: {out / 'run.json'}   loss curve: {out / 'loss.png'}")
    print(f"next: nanoseek info --config {final}")
