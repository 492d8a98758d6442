"""Flags several commands share, and argparse values -> a stage's config dataclass. Not a command itself.

The defaults of the flags are the config dataclass's (nanoseek.train): one place states each stage's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.errors import NanoseekError

if TYPE_CHECKING:
    from nanoseek.train.ablate import AblateConfig
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.sft import FinetuneConfig
    from nanoseek.train.trainer import TrainConfig

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, **values: Any) -> C:
    """cls(...) from the parsed flags of the same names (dest = field name) plus `values`; a field the command has
    no flag for keeps the dataclass default."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**kw, **values})


def add_training_arguments(p: argparse.ArgumentParser, d: TrainConfig, out: str | None = None) -> None:
    """The optimizer / schedule / checkpoint / machine flags every training stage shares, with the defaults of
    `d` (a stage's config); `out` is the --out default shown in the help (default: d.out)."""
    out = str(d.out) if out is None else out
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences per micro-batch, over all processes under torchrun (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    g.add_argument("--min-lr-frac", type=float, default=d.min_lr_frac,
                   help=f"final lr as a fraction of the peak (default {d.min_lr_frac:g}; V3: 2.2e-5 / 2.2e-4 = 0.1)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warmup steps (default {d.warmup_steps})")
    g.add_argument("--decay-frac", type=float, default=d.decay_frac,
                   help=f"fraction of the steps at the end over which lr decays to min (default {d.decay_frac:g}; "
                        "warmup -> constant -> decay is V3's schedule shape)")
    g.add_argument("--decay-shape", choices=("cosine", "linear"), default=d.decay_shape,
                   help="shape of the final decay (default cosine, as V3)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"global gradient-norm clip, 0 = off (default {d.grad_clip})")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d.dtype,
                   help="compute dtype: bf16 = torch.autocast, master weights stay fp32; auto = bf16 on CUDA, and "
                        "on CPUs with native bf16 for widths >= 256 (where it measured faster; docs/pretrain.md)")
    g.add_argument("--bias-update-speed", type=float, default=d.bias_update_speed,
                   help=f"gamma of the auxiliary-loss-free expert-bias update, 0 = off (default "
                        f"{d.bias_update_speed:g}, V3)")
    g.add_argument("--balance-alpha", type=float, default=d.balance_alpha,
                   help=f"alpha of the sequence-wise balance loss, 0 = off (default {d.balance_alpha:g}, V3)")
    g.add_argument("--mtp-lambda", type=float, default=d.mtp_lambda,
                   help=f"weight of the multi-token-prediction loss, 0 = off (default {d.mtp_lambda:g}, V3's first "
                        "10T tokens)")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"steps between val losses (default {d.eval_every})")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters,
                   help=f"fixed val batches per evaluation (default {d.eval_iters})")
    g.add_argument("--sample-every", type=int, default=d.sample_every,
                   help=f"steps between text samples, 0 = never (default {d.sample_every})")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"steps between checkpoints; one is always written at the end (default {d.save_every})")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help=f"checkpoints to keep (default {d.keep_last})")
    g.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed for the initial weights and the batch order (default {d.seed})")
    g.add_argument("--out", type=Path, default=d.out, help=f"run directory (default {out})")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    m = p.add_argument_group("machine")
    m.add_argument("--device", default=d.device, help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: all cores)")
    m.add_argument("--price-per-hour", type=float, default=d.price_per_hour,
                   help=f"USD per machine-hour for the cost in run.json (default {d.price_per_hour:.2f}: an assumed "
                        "on-demand rate for a small 2-vCPU cloud VM; V3's cost table uses $2 per H800 GPU-hour)")


def add_distributed_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """--parallel and --async-save: how a stage trains under torchrun (ignored in one process)."""
    g = p.add_argument_group("torchrun (docs/distributed.md)")
    g.add_argument("--parallel", choices=("ddp", "fsdp"), default=d.parallel,
                   help="under torchrun: ddp = whole model per process, gradients all-reduced; fsdp = FSDP2, weights, "
                        f"gradients and optimizer state sharded (default {d.parallel})")
    g.add_argument("--async-save", action="store_true",
                   help="under torchrun: write checkpoints from a background thread after copying the shards to CPU "
                        "memory (training goes on meanwhile)")


def add_model_and_data_arguments(p: argparse.ArgumentParser, d: PretrainConfig | AblateConfig) -> None:
    """--preset/--config, --data and --vocab-size: the model and the corpus a pre-training run starts from (defaults
    from `d`)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), default=d.preset, help=f"model preset (default {d.preset})")
    src.add_argument("--config", type=Path, help="a config.json (HF DeepseekV3 field names) instead of a preset")
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help=".txt / .jsonl files to train on (default: the bundled tinyshakespeare + GSM8K train)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary when one is trained (default: the config's vocab_size)")


def add_finetune_arguments(p: argparse.ArgumentParser, d: FinetuneConfig) -> None:
    """--epochs and the training flags with fine-tuning's defaults (`d`: an SFTConfig or DistillConfig); --seq-len
    is the longest example kept, capped at the model's context."""
    p.add_argument("--epochs", type=float, help="passes over the training examples (sets --steps)")
    add_training_arguments(p, d)


def set_threads(threads: int | None) -> None:
    """--threads: torch's CPU threads (None: torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """--device for the commands that run the engine (generate, chat, serve)."""
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N (default: cuda if available, else cpu); on CUDA the weights "
                        "and the latent cache are bf16")


def engine_placement(device: str | None, dtype: str | None = None) -> tuple[str, Any]:
    """--device (and generate's --dtype) -> (device, torch dtype) for Engine.from_pretrained: bf16 on CUDA, fp32 on
    the CPU unless --dtype says otherwise."""
    import torch

    from nanoseek.distributed import inference_dtype, resolve_device

    resolved = resolve_device(device)
    if dtype is None:
        return str(resolved), inference_dtype(resolved)
    return str(resolved), {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def check_speculate(k: int, model: Path) -> None:
    """--speculate K: 0 (off) or 1..8 drafts, and a checkpoint with MTP weights, refused before it is loaded and
    saying why. transformers' save_pretrained keeps num_nextn_predict_layers in config.json but writes no MTP
    weights: such a checkpoint loads without MTP, and the engine's own refusal ("needs config
    num_nextn_predict_layers >= 1") would contradict its config.json."""
    if not 0 <= k <= 8:
        raise NanoseekError(f"--speculate takes 1 to 8 draft tokens, got {k}")
    if not k:
        return
    from nanoseek.checkpoint import checkpoint_config

    if checkpoint_config(model, warn=False).num_nextn_predict_layers:
        return
    declared = ModelConfig.load(model).num_nextn_predict_layers
    if declared:
        why = (f"holds no MTP weights, though its config.json declares num_nextn_predict_layers = {declared} "
               "(transformers' save_pretrained writes none)")
    else:
        why = "has none (its config.json has num_nextn_predict_layers = 0)"
    raise NanoseekError(f"--speculate needs the checkpoint's MTP module: {model} {why}; drop --speculate")
