"""The one training loop every stage runs on: TrainConfig, Trainer and train().

The recipe follows DeepSeek-V3 section 4.2, scaled down: AdamW (betas 0.9/0.95, weight decay 0.1, clip 1.0), a
warmup -> constant -> decay learning rate (the "WSD" shape of V3's schedule), and auxiliary-loss-free load
balancing: after every optimizer step each expert's routing bias moves by gamma towards the mean load.

  TrainConfig   the optimizer / schedule / checkpoint / machine settings (typed, validated); each stage's config
                (PretrainConfig, SFTConfig, RLConfig, ...) extends it with its own fields and defaults
  Trainer       one model and one run directory: optimizer, lr schedule, expert-bias update, checkpoints, resume,
                run record
  TrainStep     what one optimizer step of a stage does (SupervisedStep: batches + loss; grpo.GRPOStep: rollouts +
                update) and what runs between steps (evaluation, samples, work after a checkpoint)
  train()       the loop: progress bar, evaluations, samples, periodic checkpoints, Ctrl-C saves

Run directory (TrainConfig.out):
  checkpoints/step_NNNNNN/ (HF checkpoint + trainer_state.json + optimizer.pt; under torchrun config.json +
                            trainer_state.json + dcp/, the model and optimizer as torch.distributed.checkpoint shards)
  checkpoints/latest (names the newest complete checkpoint)  final/  run.json  loss.png  peak_flops.json
Under torchrun the stages train data-parallel with DDP or FSDP2 (nanoseek/distributed.py, docs/distributed.md), and
with pretrain's --ep the routed experts are spread over the ranks (nanoseek/expert_parallel.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoseek import distributed, expert_parallel
from nanoseek.checkpoint import load_model, save_pretrained, save_state_dict, write_dir_atomically
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.osutil import available_cpus, cpu_has_native_bf16, read_json, write_file_atomically
from nanoseek.train.record import RunRecord, machine_peak_flops, plot_losses

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids, targets), both [B, T] int64
LossFn = Callable[[Transformer, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]

# Training settings whose change on --resume breaks "same run as without the interruption" (a note is printed).
RESUME_SENSITIVE = ("data", "batch_size", "seq_len", "grad_accum", "lr", "min_lr_frac", "warmup_steps", "decay_frac",
                    "decay_shape", "weight_decay", "grad_clip", "dtype", "bias_update_speed", "balance_alpha",
                    "mtp_lambda", "seed", "steps", "fp8")


# --- settings -------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainConfig:
    """The settings every training stage shares; the defaults are pre-training's (V3's values where it has one).

    A stage's config subclasses this and redeclares the defaults it changes. Field names are the CLI's flags with
    dashes (`grad_accum` is `--grad-accum`), and so are the names in validation errors.
    """

    steps: int = 300  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, over all processes under torchrun
    seq_len: int = 128  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_frac: float = 0.1  # final lr as a fraction of the peak (V3: 2.2e-5 / 2.2e-4)
    warmup_steps: int = 20  # linear warmup steps
    decay_frac: float = 0.3  # fraction of the steps at the end over which lr decays to min
    decay_shape: str = "cosine"  # "cosine" (V3) or "linear"
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # global gradient-norm clip, 0 = off
    dtype: str = "auto"  # compute dtype: "auto", "bf16" (torch.autocast; master weights stay fp32) or "fp32"
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free expert-bias update, 0 = off (V3)
    balance_alpha: float = 0.0001  # alpha of the sequence-wise balance loss, 0 = off (V3)
    mtp_lambda: float = 0.3  # weight of the multi-token-prediction loss, 0 = off (V3's first 10T tokens)
    eval_every: int = 50  # steps between evaluations
    eval_iters: int = 4  # fixed val batches per evaluation
    sample_every: int = 100  # steps between text samples, 0 = never
    save_every: int = 100  # steps between checkpoints, 0 = only the final one
    keep_last: int = 2  # checkpoints to keep
    seed: int = 0  # initial weights and batch order
    out: Path = Path("runs/pretrain")  # run directory
    resume: bool = False  # continue from out/checkpoints/latest
    device: str | None = None  # torch device (None: cuda if available, else cpu)
    threads: int | None = None  # torch CPU threads (None: all cores)
    price_per_hour: float = 0.10  # USD per machine-hour for the cost in run.json
    parallel: str = "ddp"  # under torchrun: "ddp" (whole model per process) or "fsdp" (FSDP2, sharded)
    async_save: bool = False  # under torchrun: checkpoints written by a background thread after a copy to CPU memory

    def check(self, config: ModelConfig) -> None:
        """One NanoseekError naming the first bad setting (and the flag that sets it)."""
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_iters", "keep_last"):
            if getattr(self, name) < 1:
                raise NanoseekError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "sample_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise NanoseekError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise NanoseekError(f"--lr must be > 0, got {self.lr}")
        for name in ("min_lr_frac", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise NanoseekError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "bias_update_speed", "balance_alpha", "mtp_lambda",
                     "price_per_hour"):
            if getattr(self, name) < 0:
                raise NanoseekError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len > config.max_position_embeddings:
            raise NanoseekError(f"--seq-len {self.seq_len} exceeds the config's max_position_embeddings "
                                f"({config.max_position_embeddings})")

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON values (paths as strings): what trainer_state.json records as "args"."""
        def conv(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v
        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}


# --- machine, schedule, optimizer ----------------------------------------------------------------------------------
resolve_device = distributed.resolve_device  # --device -> torch.device (the stages import it from here)


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


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: `threads`, or one per available core when None (under torchrun the processes of a node
    share its cores: cores / processes each). Returns the number set."""
    threads = threads or max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


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


def epoch_permutation(n: int, seed: int, epoch: int, namespace: str) -> list[int]:
    """A seeded shuffle of range(n), one per (namespace, seed, epoch): the same in every process and run."""
    return list(_permutation(n, seed, epoch, namespace))


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int, namespace: str) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(f"{namespace}:{seed}:{epoch}").shuffle(perm)
    return tuple(perm)


def epoch_batch(items: Sequence[Any], batch_size: int, index: int, seed: int, namespace: str) -> list[Any]:
    """Batch number `index` of an endless stream of epochs over `items`, each epoch a fresh seeded shuffle: a pure
    function of its arguments (a resumed run sees exactly the batches it would have seen), never running dry however
    many batches are asked for. SFT draws its examples and GRPO its problems this way."""
    n = len(items)
    if n == 0:
        raise NanoseekError(f"{namespace}: nothing to draw batches from (the pool is empty)")
    out = []
    for pos in range(index * batch_size, (index + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(items[_permutation(n, seed, epoch, namespace)[i]])
    return out


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with V3's betas; weight decay on matrices and expert stacks (dim >= 2) only, not on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CPU and CUDA); the default per-parameter loop took 58.5 ms a step on the
    # cpu preset against 8.7 ms fused (docs/bench_train.md). It also takes FSDP2's DTensor parameters on CPU (checked
    # with torch 2.13 and gloo), so torchrun --parallel fsdp needs no foreach fallback. It refuses a mix of plain
    # tensors and DTensors (--ep with DDP: the experts are DTensors): then the per-parameter loop.
    mixed = len({type(p) for p in model.parameters()}) > 1
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=not mixed,
                             foreach=False if mixed else None)


def config_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """'field: a vs b' for the first field that differs, or None."""
    for name in a.__dataclass_fields__:
        if getattr(a, name) != getattr(b, name):
            return f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
    return None


# --- the trainer ----------------------------------------------------------------------------------------------------
class Trainer:
    """Optimizer, lr schedule, expert-bias update, checkpoints and resume for one model and one run directory
    (config.out).

    History: {"train": [{"step", "loss", "lr", "maxvio", other parts}], "val": [{"step", "loss"}]} (a stage may add
    lists, as RL's "heldout"); `step` counts completed optimizer steps, and a stage's batches are a pure function of
    it, so resuming needs no RNG state.

    flops_per_token(seq_len) replaces the model config's count (an ablation's swapped attention); with
    checkpoints=False nothing is ever saved (an interrupted run starts again from step 0).
    """

    def __init__(self, model: Transformer, config: TrainConfig, tokenizer_dir: str | Path | None = None,
                 stage: str = "pretrain", *, flops_per_token: Callable[[int], float] | None = None,
                 checkpoints: bool = True):
        self.model, self.config, self.stage = model, config, stage
        self.out_dir = Path(config.out)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.tokenizer_dir = tokenizer_dir
        self.checkpoints = checkpoints
        self.device = next(model.parameters()).device
        self.amp_dtype = resolve_dtype(config.dtype, self.device, model.config.hidden_size)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay)
        self.step = 0
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        self.tokens = 0
        self.train_seconds = 0.0
        self.previous_wall_seconds = 0.0  # wall time of earlier sessions of this run (before --resume)
        self.session_start = time.time()
        self.peak_flops = machine_peak_flops(self.amp_dtype, self.device, cache_file=self.out_dir / "peak_flops.json")
        self._count_flops = flops_per_token
        self._flops_per_token: dict[int, float] = {}
        self._last_saved_step = -1
        self._gathered: Transformer | None = None  # FSDP: rank 0's whole-weights copy for text samples
        self._pending_save: tuple[Any, Callable[[], None]] | None = None  # an async save: (future, what completes it)
        self.expert_parallel = expert_parallel.of(model)  # --ep: the experts' all-to-all and gradient reduction
        model.train()

    # ----- one optimizer step --------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def flops_per_token(self, seq_len: int) -> float:
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = (self._count_flops(seq_len) if self._count_flops is not None else
                                              self.model.config.flops_per_token(seq_len, self.config.mtp_lambda > 0))
        return self._flops_per_token[seq_len]

    def set_lr(self) -> float:
        """Set and return the learning rate of the step about to run (self.step, 0-based)."""
        c = self.config
        lr = lr_at(self.step, c.steps, c.lr, c.warmup_steps, c.decay_frac, c.min_lr_frac, c.decay_shape)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_step(self, record: dict[str, Any], tokens: int, seconds: float) -> dict[str, Any]:
        """Count a finished optimizer step: {"step": n, **record} joins history["train"] and is returned."""
        self.step += 1
        self.tokens += tokens
        self.train_seconds += seconds
        row = {"step": self.step, **record}
        self.history["train"].append(row)
        return row

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> dict[str, Any]:
        """Accumulate gradients over the micro-batches, clip, AdamW step, then the expert-bias update (gamma)
        from the loads routed during these micro-batches. Returns the history record of the step plus its
        throughput (tokens_per_second, mfu)."""
        config, model = self.config, self.model
        t0 = time.perf_counter()
        lr = self.set_lr()
        par = self.expert_parallel
        if par is not None:
            par.bytes_sent = 0
        sums: dict[str, float] = {}
        tokens, flops = 0, 0.0
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # under torchrun the gradients are reduced once, in the last micro-batch's backward
            with distributed.gradient_sync(model, i == len(micro_batches) - 1):
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
        extra = {}
        if par is not None:  # --ep: DDP / FSDP leave the experts' gradients to expert_parallel
            par.reduce_gradients(model)
            extra["a2a_bytes"] = par.total_bytes_sent()  # by all ranks' all-to-alls in this step
        if config.grad_clip > 0 and par is not None:
            expert_parallel.clip_grad_norm_(model.parameters(), config.grad_clip)
        elif config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if dist.is_available() and dist.is_initialized():  # the bias follows the global batch's load (V3 2.1.2)
            for gate in model.gates():
                dist.all_reduce(gate.expert_load)
        maxvio = model.update_expert_bias(config.bias_update_speed)
        dt = time.perf_counter() - t0
        row = self.end_step({**{k: v / len(micro_batches) for k, v in sums.items()}, "lr": lr, "maxvio": maxvio,
                             **extra},
                            tokens, dt)
        # flops are this rank's and peak_flops this process's: the MFU of one rank (all do the same work)
        return {**row, "tokens_per_second": tokens / dt, "mfu": flops / dt / self.peak_flops}

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
        """On rank 0, a plain model with the current whole weights (the model itself unless FSDP shards it), for
        text samples; None on the other ranks. Under FSDP this gathers the shards: every rank must call it."""
        if not distributed.is_sharded(self.model):
            return self.model if distributed.is_main() else None
        full = distributed.full_state_dict_cpu(self.model)
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

        One process writes the HF checkpoint + trainer_state.json + optimizer.pt. Under torchrun every rank calls
        this and writes its own shards of the model and optimizer with torch.distributed.checkpoint (dcp/), rank 0
        adds config.json and trainer_state.json: nobody gathers the whole state, and the checkpoint resumes at any
        world size. With config.async_save the shards are written by a background thread; the checkpoint becomes
        `latest` once they are complete (at the next save, or at the end). Without checkpoints, nothing.
        """
        if not self.checkpoints:
            return self.out_dir
        self.wait_for_save()
        name = f"step_{self.step:06d}"
        path = self.ckpt_dir / name
        self._last_saved_step = self.step
        state = {"stage": self.stage, "step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                 "wall_seconds": self.wall_seconds(), "compute_dtype": str(self.amp_dtype),
                 "args": self.config.to_dict(), "history": self.history,
                 "world_size": distributed.world_size()}
        trainer_state = (json.dumps(state, indent=1) + "\n").encode()
        if distributed.initialized():
            self._save_sharded(name, trainer_state)
            return path
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        extra = {"trainer_state.json": trainer_state, "optimizer.pt": buf.getvalue()}
        save_pretrained(self.model, path, tokenizer_dir=self.tokenizer_dir, extra_files=extra)  # one line on failure
        self._point_latest(name)
        return path

    def _save_sharded(self, name: str, trainer_state: bytes) -> None:
        """Every rank writes its shards into checkpoints/.step_N.dcp-tmp/; rank 0 then moves them into the atomic
        write of step_N (with config.json and trainer_state.json) and points `latest` at it."""
        shards = self.ckpt_dir / f".{name}.dcp-tmp"
        if distributed.is_main():
            shutil.rmtree(shards, ignore_errors=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        future = distributed.save_sharded(self.model, self.optimizer, shards, asynchronous=self.config.async_save)

        def complete() -> None:
            if not distributed.is_main():
                return

            def write(tmp: Path) -> None:
                os.replace(shards, tmp / distributed.SHARDED_DIR)
                (tmp / "config.json").write_text(json.dumps(self.model.config.to_hf_dict(), indent=2) + "\n")
                (tmp / "trainer_state.json").write_bytes(trainer_state)

            write_dir_atomically(self.ckpt_dir / name, write)
            self._point_latest(name)

        if future is None:
            complete()
            distributed.barrier()  # the checkpoint is complete on disk for every rank before any goes on
        else:
            self._pending_save = (future, complete)

    def wait_for_save(self) -> None:
        """Wait for an async save to be written and make it `latest` (a no-op when none is in flight)."""
        if self._pending_save is None:
            return
        future, complete = self._pending_save
        self._pending_save = None
        future.result()
        complete()
        distributed.barrier()

    def _point_latest(self, name: str) -> None:
        def write_latest(tmp: Path) -> None:
            with open(tmp, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())

        write_file_atomically(self.ckpt_dir / "latest", write_latest)  # only now, with the directory complete
        self._prune()

    def _prune(self) -> None:
        """Keep the newest --keep-last checkpoints; remove temporaries of writes that were killed."""
        steps = sorted(p for p in self.ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir())
        latest = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        for old in steps[:-self.config.keep_last]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)  # a checkpoint that could not be removed costs only space
        for stray in self.ckpt_dir.glob(".step_*"):  # .step_N.{tmp,old}-PID / .step_N.dcp-tmp of an interrupted write
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
        sharded = (path / distributed.SHARDED_DIR).is_dir()
        for f in ("trainer_state.json",) if sharded else ("trainer_state.json", "optimizer.pt"):
            if not (path / f).is_file():
                raise NanoseekError(f"--resume: {path} has no {f}: not a training checkpoint")
        state = read_trainer_state(path / "trainer_state.json", self.stage)
        if sharded:  # torchrun's shards, at any world size and with or without FSDP (names identify the tensors)
            distributed.load_sharded(self.model, self.optimizer, path / distributed.SHARDED_DIR)
        else:
            optimizer_state = read_optimizer_state(path / "optimizer.pt", self.optimizer, self.device)
            with torch.no_grad():  # the files hold whole tensors; under FSDP each rank keeps its own shard
                distributed.load_state_dict(self.model, load_model(path).state_dict())
            distributed.load_optimizer_state(self.optimizer, optimizer_state)
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]
        self.train_seconds, self.previous_wall_seconds = state["train_seconds"], state["wall_seconds"]
        self._last_saved_step = self.step
        old, new = state.get("args", {}), self.config.to_dict()
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
        if not self.checkpoints:
            return (f"interrupted: nothing saved for {self.stage} (variants keep no checkpoints); running the same "
                    f"command again keeps the finished variants and retrains this one from step 0")
        return f"interrupted: saved {path} (continue with the same command plus --resume)"

    def save_final(self) -> Path:
        """final/: the weights + tokenizer (no optimizer) in the HF layout: what the next stage or a user loads.
        Under FSDP rank 0 gathers the whole weights into CPU memory, one tensor at a time, and writes them."""
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        self.wait_for_save()
        path = self.out_dir / "final"
        state = distributed.full_state_dict_cpu(self.model)  # a collective under FSDP; {} on ranks > 0
        if distributed.is_main():
            save_state_dict(self.model.config, state, path, tokenizer_dir=self.tokenizer_dir, owned=True)
        del state
        distributed.barrier()
        return path

    def run_record(self) -> RunRecord:
        cfg, config = self.model.config, self.config
        p = cfg.num_params()
        train, val = self.history["train"], self.history["val"]
        return RunRecord(
            stage=self.stage, config=cfg.to_hf_dict(), params_total=p["total"], params_active=p["active"],
            params_mtp=p["mtp_total"], steps=self.step, tokens=self.tokens,
            flops_per_token=self.flops_per_token(config.seq_len), wall_seconds=self.wall_seconds(),
            # threads and peak over all processes, so CPU-hours and MFU count the whole torchrun job
            train_seconds=self.train_seconds, threads=torch.get_num_threads() * distributed.world_size(),
            dtype=str(self.amp_dtype).removeprefix("torch."), device=str(self.device),
            peak_flops=self.peak_flops * distributed.world_size(),
            price_per_hour=config.price_per_hour, final_train_loss=train[-1]["loss"] if train else None,
            final_val_loss=val[-1]["loss"] if val else None, started_from=_path_or_none(
                getattr(config, "model", None) or getattr(config, "student_model", None)),
            teacher=_path_or_none(getattr(config, "teacher", None)))

    def write_report(self, record: RunRecord | None = None) -> RunRecord:
        """run.json (`record`, default run_record()) and loss.png in the run directory (written by rank 0 only;
        every rank gets the record)."""
        if record is None:
            record = self.run_record()
        if not distributed.is_main():
            return record
        record.write(self.out_dir / "run.json")
        plot_losses(self.history, self.out_dir / "loss.png", title=f"nanoseek {self.stage}")
        return record


def _path_or_none(path: Any) -> str | None:
    return None if path is None else str(path)


# --- resume ---------------------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_trainer_state(file: Path, stage: str) -> dict[str, Any]:
    """trainer_state.json, checked: the counters are numbers, the history lists of {"step", ...} objects."""
    state = read_json(file)

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


# --- the loop -------------------------------------------------------------------------------------------------------
class TrainStep:
    """What a stage trains on. step() runs one optimizer step (through the trainer, which counts it) and returns
    its history row; train() calls the other methods between steps (each does nothing by default)."""

    def step(self, trainer: Trainer) -> dict[str, Any]:
        raise NotImplementedError

    def progress(self, row: dict[str, Any]) -> str:
        """The progress bar's text after a step."""
        return ""

    def evaluate(self, trainer: Trainer) -> None:
        """Every config.eval_every steps and after the last."""

    def sample(self, trainer: Trainer) -> None:
        """Every config.sample_every steps before the last."""

    def saved(self, trainer: Trainer) -> None:
        """After each checkpoint train() writes."""


class SupervisedStep(TrainStep):
    """Batches and a loss: get_batch(step, micro) gives the micro-batches of a step (a pure function of its
    arguments, so a resumed run sees the same ones); val_batches are scored with the same loss; sample() returns a
    text sample to print."""

    def __init__(self, get_batch: Callable[[int, int], Batch], loss_fn: LossFn, val_batches: Sequence[Batch] = (),
                 sample: Callable[[], str] | None = None):
        self.get_batch, self.loss_fn, self.val_batches, self.sample_text = get_batch, loss_fn, val_batches, sample

    def step(self, trainer: Trainer) -> dict[str, Any]:
        return trainer.train_step([self.get_batch(trainer.step, m) for m in range(trainer.config.grad_accum)],
                                  self.loss_fn)

    def progress(self, r: dict[str, Any]) -> str:
        return (f"loss {r['loss']:.3f} | {r['tokens_per_second']:.0f} tok/s | MFU {r['mfu']:.1%} | "
                f"MaxVio {r['maxvio']:.2f} | lr {r['lr']:.2e}")

    def evaluate(self, trainer: Trainer) -> None:
        if self.val_batches:
            tqdm.write(f"step {trainer.step}: val loss {trainer.evaluate(self.val_batches, self.loss_fn):.4f}")

    def sample(self, trainer: Trainer) -> None:
        if self.sample_text is not None:
            tqdm.write(f"step {trainer.step} sample: {self.sample_text()!r}")


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


def train(trainer: Trainer, steps: TrainStep) -> None:
    """Run optimizer steps trainer.step .. config.steps with steps.step(trainer).

    Evaluates every eval_every steps (0 = never) and after the last; samples every sample_every and checkpoints
    every save_every steps before the last (the caller saves and samples the final model).
    Ctrl-C: the current step finishes, a checkpoint is written, and KeyboardInterrupt is re-raised.
    """
    config = trainer.config
    bar = tqdm(total=config.steps, initial=trainer.step, desc=trainer.stage, unit="step", dynamic_ncols=True,
               disable=not distributed.is_main())
    with _StopOnCtrlC() as ctrl_c:
        try:
            while trainer.step < config.steps:
                row = steps.step(trainer)
                bar.update(1)
                bar.set_postfix_str(steps.progress(row))
                done = trainer.step
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    steps.evaluate(trainer)
                if config.sample_every and done % config.sample_every == 0 and done < config.steps:
                    steps.sample(trainer)
                if distributed.any_rank(ctrl_c.requested):  # under torchrun all ranks must stop at the same step
                    path = trainer.save_checkpoint()
                    steps.saved(trainer)
                    tqdm.write(trainer.interrupted(path))
                    raise KeyboardInterrupt
                if config.save_every and done % config.save_every == 0 and done < config.steps:
                    trainer.save_checkpoint()
                    steps.saved(trainer)
        finally:
            bar.close()
