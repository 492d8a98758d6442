"""`nanoseek sft`: supervised fine-tuning on chat data and task reasoning traces (R1's cold start, paper 2.3.1).

Data comes from two places, mixed and shuffled together:
  --data chat.jsonl   one {"messages": [...]} object a line; the last message is the assistant turn to learn and may
                      carry "reasoning_content" (rendered as <think>\\n{reasoning}\\n</think>\\n\\n{content})
  --task T --n N      N synthetic problems of the task's train split with their step-by-step solution traces

The loss is on the final assistant turn only (the mask from Tokenizer.encode_chat_for_training): the model learns to
answer, not to predict user prompts. Sequences are padded to the longest in each batch (targets -1 on padding and
on the prompt), which at this scale costs less than packing's bookkeeping.

The same loop trains the dense students of `nanoseek distill` (distill.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import load_model
from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.osutil import available_cpus, check_writable
from nanoseek.pretrain import (
    Trainer,
    add_training_arguments,
    check_training_args,
    pretrain_loss,
    resolve_device,
    resume_point,
    train,
)
from nanoseek.tasks import Task, load_task
from nanoseek.tokenizer import Tokenizer

IGNORE = -1  # target id that carries no loss


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str  # "file:line" or "task:index", named in errors


@dataclass
class Example:
    input_ids: list[int]  # [T] the conversation without its last token
    targets: list[int]  # [T] next token where the loss applies, IGNORE elsewhere


# ----- data ---------------------------------------------------------------------------------------------------------
def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    """Conversations of a chat JSONL file; a line without a usable "messages" list raises NanoseekError(file:line)."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"sft data: file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoseekError(f"{where}: invalid JSON ({e.msg})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise NanoseekError(f"{where}: expected an object with a non-empty \"messages\" list")
            if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                raise NanoseekError(f"{where}: the last message must be an assistant turn (the one trained on)")
            out.append(Conversation(messages, where))
    return out


def task_conversations(task: Task, n: int, seed: int = 0) -> list[Conversation]:
    """n train problems of a task as chats: user = the problem, assistant = its trace (reasoning) and answer."""
    convs = []
    for i, problem in enumerate(task.problems("train", n, seed=seed)):
        reasoning, answer = task.solution_trace(problem)
        messages = [{"role": "user", "content": problem.prompt},
                    {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
        convs.append(Conversation(messages, f"{task.name}:{i}"))
    return convs


def encode_conversation(tokenizer: Tokenizer, conv: Conversation) -> Example:
    """Token ids and shifted targets; only tokens of the final assistant turn are targets."""
    try:
        ids, mask = tokenizer.encode_chat_for_training(conv.messages)
    except NanoseekError as e:
        raise NanoseekError(f"{conv.source}: {e}") from None
    targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]
    return Example(ids[:-1], targets)


def encode_all(tokenizer: Tokenizer, convs: list[Conversation], max_len: int) -> tuple[list[Example], int]:
    """Encode conversations; drops those longer than max_len tokens (truncating would cut off the answer and its
    end-of-sentence token). Returns (examples, number dropped)."""
    examples, dropped = [], 0
    for conv in convs:
        ex = encode_conversation(tokenizer, conv)
        if len(ex.input_ids) > max_len:
            dropped += 1
            continue
        examples.append(ex)
    return examples, dropped


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the batch's longest example -> input_ids [B,T], targets [B,T] (IGNORE on padding)."""
    t = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    for i, ex in enumerate(batch):
        input_ids[i, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        targets[i, : len(ex.targets)] = torch.tensor(ex.targets)
    return input_ids, targets


def batch_at(examples: list[Example], batch_size: int, index: int, seed: int) -> list[Example]:
    """Batch number `index` of an endless stream of seeded epoch shuffles: a pure function of its arguments, so a
    resumed run sees exactly the batches it would have seen."""
    n = len(examples)
    out = []
    for pos in range(index * batch_size, (index + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(examples[_permutation(n, seed, epoch)[i]])
    return out


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    perm = list(range(n))
    random.Random(f"sft:{seed}:{epoch}").shuffle(perm)
    return perm


def split_validation(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ~5% (at most 64) examples for the validation loss; none when there are fewer than 40."""
    if len(examples) < 40:
        return examples, []
    order = _permutation(len(examples), seed, -1)
    n_val = min(64, len(examples) // 20)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# ----- model --------------------------------------------------------------------------------------------------------
def dense_student_config(config: ModelConfig) -> ModelConfig:
    """The same shape with every block dense (no routed experts) and no MTP: R1's distilled students are dense."""
    d = asdict(config)
    d.update(first_k_dense_replace=config.num_hidden_layers, n_routed_experts=0, num_nextn_predict_layers=0)
    return ModelConfig(**d)


def init_model(preset: str | None, config_path: Path | None, vocab_size: int, dense: bool = False,
               seed: int = 0) -> Transformer:
    """A freshly initialised model from a preset or config.json, with the tokenizer's vocabulary size."""
    if config_path is not None:
        cfg = ModelConfig.load(config_path)
        cfg = ModelConfig(**{**asdict(cfg), "vocab_size": vocab_size})
    else:
        cfg = get_preset(preset or "cpu", vocab_size=vocab_size)
    if dense:
        cfg = dense_student_config(cfg)
    torch.manual_seed(seed)
    return Transformer(cfg)


# ----- training -----------------------------------------------------------------------------------------------------
def fit(model: Transformer, examples: list[Example], args: argparse.Namespace, pad_id: int,
        tokenizer_dir: str | Path, stage: str = "sft") -> Trainer:
    """Fine-tune `model` on examples with the shared Trainer (optimizer, schedule, expert-bias update, checkpoints,
    --resume, progress bar); writes <out>/final, run.json and loss.png. Returns the trainer (history in it)."""
    out: Path = args.out
    resume_from = resume_point(out, args.resume)
    train_examples, val_examples = split_validation(examples, args.seed)
    if args.epochs is not None:
        args.steps = max(1, math.ceil(args.epochs * len(train_examples) / (args.batch_size * args.grad_accum)))
    check_training_args(args, model.config)
    check_writable(out)  # a read-only or full --out fails now, not at the first checkpoint
    model.to(resolve_device(args.device))
    trainer = Trainer(model, args, out, tokenizer_dir=tokenizer_dir, stage=stage)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    val_batches = [collate(val_examples[i:i + args.batch_size], pad_id)
                   for i in range(0, len(val_examples), args.batch_size)]

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(batch_at(train_examples, args.batch_size, step * args.grad_accum + micro, args.seed), pad_id)

    n = model.num_params()
    n_targets = sum(sum(t != IGNORE for t in ex.targets) for ex in train_examples)
    epochs = args.steps * args.batch_size * args.grad_accum / len(train_examples)
    print(f"{stage}: {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active) | {len(train_examples)} train "
          f"/ {len(val_examples)} val examples, {n_targets:,} target tokens | {args.steps} steps of "
          f"{args.batch_size}x{args.grad_accum} ({epochs:.2f} epochs)")
    train(trainer, get_batch, pretrain_loss(args.mtp_lambda, args.balance_alpha), val_batches)
    final = trainer.save_final()
    record = trainer.write_report()
    print(f"done: {record.steps} steps in {record.wall_seconds / 60:.1f} min, final train loss "
          f"{record.final_train_loss:.4f}; checkpoint (HF layout + tokenizer): {final}")
    return trainer


# ----- CLI ----------------------------------------------------------------------------------------------------------
def add_data_arguments(p: argparse.ArgumentParser, lr: float = 1e-4, out: str = "runs/sft") -> None:
    """The pre-training flags (pretrain.add_training_arguments) with SFT defaults; --seq-len is the longest example
    kept, capped at the model's context."""
    p.add_argument("--epochs", type=float, help="passes over the training examples (sets --steps)")
    add_training_arguments(p, steps=200, batch_size=16, seq_len=1024, lr=lr, warmup_steps=10, out=out,
                           eval_every=50, save_every=100, sample_every=0)


def encode_for_training(tokenizer: Tokenizer, convs: list[Conversation], args: argparse.Namespace,
                        context: int) -> list[Example]:
    """Encode and drop what does not fit: --seq-len here is the longest example kept (capped at the context)."""
    args.seq_len = min(args.seq_len, context)
    examples, dropped = encode_all(tokenizer, convs, args.seq_len)
    if dropped:
        print(f"dropped {dropped} of {len(convs)} examples longer than {args.seq_len} tokens")
    if not examples:
        raise NanoseekError(f"no training example fits in --seq-len {args.seq_len} tokens")
    return examples


def read_conversations(data: list[Path] | None, task_spec: str | None, n: int | None, seed: int,
                       ) -> list[Conversation]:
    convs: list[Conversation] = []
    for path in data or []:
        convs += read_chat_jsonl(path)
    if task_spec:
        if not n or n <= 0:
            raise NanoseekError("--task needs --n, the number of synthetic traces (a positive integer)")
        convs += task_conversations(load_task(task_spec), n, seed)
    if not convs:
        raise NanoseekError("no training data: give --data chat.jsonl and/or --task T --n N")
    return convs


def setup_threads(args: argparse.Namespace) -> None:
    threads = args.threads or available_cpus()
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint directory to fine-tune (with tokenizer files)")
    src.add_argument("--preset", choices=list(PRESETS), help="start from scratch with this preset (needs --tokenizer)")
    src.add_argument("--config", type=Path, help="start from scratch with this config.json (needs --tokenizer)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the --model directory)")
    p.add_argument("--data", type=Path, nargs="+", help="chat JSONL file(s): {\"messages\": [...]} per line")
    p.add_argument("--task", help="add synthetic reasoning traces of this task, e.g. arithmetic:max_digits=2")
    p.add_argument("--n", type=int, help="number of task traces (train split)")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> None:
    setup_threads(args)
    tokenizer_dir = args.tokenizer or args.model
    if tokenizer_dir is None:
        raise NanoseekError("--preset/--config start from scratch and need --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    convs = read_conversations(args.data, args.task, args.n, args.seed)
    if args.model is not None:
        model = load_model(args.model)
    else:
        model = init_model(args.preset, args.config, tokenizer.vocab_size, seed=args.seed)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise NanoseekError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                            f"({tokenizer.vocab_size})")
    examples = encode_for_training(tokenizer, convs, args, model.config.max_position_embeddings)
    fit(model, examples, args, tokenizer.pad_id, tokenizer_dir, stage="sft")
