"""Supervised fine-tuning (R1 paper 2.3.1, the cold start) and distillation (2.4): `nanoseek sft`, `nanoseek distill`.

Data comes from two places, mixed and shuffled together:
  --data chat.jsonl   one {"messages": [...]} object a line; the last message is the assistant turn to learn and may
                      carry "reasoning_content" (rendered as <think>\\n{reasoning}\\n</think>\\n\\n{content})
  --task T --n N      N synthetic problems of the task's train split with their step-by-step solution traces

The loss is on the final assistant turn only (the mask from Tokenizer.encode_chat_for_training): the model learns to
answer, not to predict user prompts. Sequences are padded to the longest in each batch (targets -1 on padding and
on the prompt), which at this scale costs less than packing's bookkeeping.

Distillation is the same fine-tuning of a small dense student on a teacher's verified reasoning traces. R1's distilled
models (Qwen/Llama 1.5B-70B) are plain SFT on the ~800k samples from rejection sampling, with no RL. Here the
student is a fresh model from a preset or config.json made dense: every block uses the dense SwiGLU FFN
(first_k_dense_replace = num_hidden_layers, n_routed_experts = 0) and it has no MTP module, like the dense students
R1 distils into. It uses the teacher's tokenizer (so the traces tokenize the same).

    nanoseek sample --model rl_ckpt --task T -n 2000 -k 4 --keep-correct --out traces.jsonl
    nanoseek distill --teacher-data traces.jsonl --teacher rl_ckpt --student-preset test --out runs/student
    -> runs/student/final (HF checkpoint + the teacher's tokenizer), run.json, loss.png

sft(SFTConfig) and distill(DistillConfig) are the stages; both train on the shared loop (trainer.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek import distributed
from nanoseek.checkpoint import load_model
from nanoseek.config import ModelConfig, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.osutil import check_writable
from nanoseek.tasks import Task, load_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.pretrain import pretrain_loss
from nanoseek.train.trainer import (
    SupervisedStep,
    TrainConfig,
    Trainer,
    epoch_batch,
    epoch_permutation,
    resolve_device,
    resolve_dtype,
    resume_point,
    set_threads,
    train,
)

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
    return epoch_batch(examples, batch_size, index, seed, "sft")


def prompt_key(example: Example) -> tuple[int, ...]:
    """What an example is an answer to: its tokens before the first target (the conversation up to the last
    assistant turn)."""
    first = next((i for i, t in enumerate(example.targets) if t != IGNORE), len(example.targets))
    return tuple(example.input_ids[:first])


def split_validation(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ~5% of the examples (at most 64, and at most half of the distinct prompts; none when there are fewer
    than 40) for the validation loss: one example each of seeded distinct prompts, and no example of those prompts is
    trained on. A synthetic task repeats problems (and a countdown problem has several traces), so holding out
    examples rather than prompts left most validation examples among the training ones (40 of 64 in a 2-digit
    arithmetic run): a loss that measured memory, not generalisation."""
    if len(examples) < 40:
        return examples, []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(prompt_key(ex), []).append(i)
    keys = list(groups)
    n_val = min(64, len(examples) // 20, len(keys) // 2)
    held = [keys[i] for i in epoch_permutation(len(keys), seed, -1, "sft")[:n_val]]
    val = [examples[groups[k][0]] for k in held]
    held_set = set(held)
    return [ex for ex in examples if prompt_key(ex) not in held_set], val


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
@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """The training settings SFT and distillation share: fine-tuning defaults, and `epochs`, which sets the steps.
    seq_len is the longest example kept (capped at the model's context)."""

    epochs: float | None = None  # passes over the training examples (sets steps)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 1024
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_every: int = 50
    save_every: int = 100
    sample_every: int = 0
    out: Path = Path("runs/sft")


@dataclass(kw_only=True)
class SFTConfig(FinetuneConfig):
    """Fine-tune a checkpoint (`model`), or a fresh model from `preset` / `config` with `tokenizer`, on chat JSONL
    files (`data`) and/or `n` synthetic reasoning traces of `task`."""

    model: Path | None = None  # checkpoint directory to fine-tune (with tokenizer files)
    preset: str | None = None  # start from scratch with this preset (needs tokenizer)
    config: Path | None = None  # start from scratch with this config.json (needs tokenizer)
    tokenizer: Path | None = None  # tokenizer directory (None: the model directory)
    data: list[Path] | None = None  # chat JSONL file(s): {"messages": [...]} per line
    task: str | None = None  # add synthetic reasoning traces of this task, e.g. arithmetic:max_digits=2
    n: int | None = None  # number of task traces (train split)


@dataclass(kw_only=True)
class DistillConfig(FinetuneConfig):
    """Train a dense student on a teacher's verified traces (`teacher_data`), with the teacher's tokenizer: a fresh
    one (`student_preset` or `student_config`, made dense without MTP), or a pre-trained dense checkpoint
    (`student_model`, e.g. `nanoseek pretrain --config` of a dense shape on the teacher's tokenizer), as R1 distils
    into pre-trained Qwen and Llama models."""

    teacher_data: list[Path]  # chat JSONL traces from `nanoseek sample --keep-correct`
    teacher: Path  # teacher checkpoint directory (its tokenizer is used)
    student_preset: str | None = None  # student shape (made dense, no MTP)
    student_config: Path | None = None  # student config.json (made dense, no MTP)
    student_model: Path | None = None  # a pre-trained dense checkpoint to start from (its tokenizer = the teacher's)
    lr: float = 1e-3  # a fresh student: a from-scratch learning rate
    out: Path = Path("runs/distill")


def fit(model: Transformer, examples: list[Example], cfg: FinetuneConfig, pad_id: int, tokenizer_dir: str | Path,
        stage: str = "sft", device: torch.device | None = None) -> Trainer:
    """Fine-tune `model` on examples with the shared Trainer (optimizer, schedule, expert-bias update, checkpoints,
    resume, progress bar) on `device` (default: cfg.device's); writes <out>/final, run.json and loss.png. Returns
    the trainer (history in it).

    Under torchrun (see sft()) every rank draws the same global batch of a step and keeps its rows
    (distributed.shard); the loss is normalised by the whole batch's target tokens (pretrain_loss), so the averaged
    gradient is the single-process one. Every rank scores the whole (small) validation set."""
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    train_examples, val_examples = split_validation(examples, cfg.seed)
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * len(train_examples) / (cfg.batch_size * cfg.grad_accum)))
        cfg = dataclasses.replace(cfg, steps=steps)
    cfg.check(model.config)
    check_writable(out)  # a read-only or full out fails now, not at the first checkpoint
    device = resolve_device(cfg.device) if device is None else device
    model.to(device)
    distributed.local_batch_size(cfg.batch_size)  # every rank needs at least one row
    # before the Trainer builds the optimizer (FSDP shards the parameters)
    model = distributed.wrap_model(model, cfg.parallel, resolve_dtype(cfg.dtype, device, model.config.hidden_size))
    trainer = Trainer(model, cfg, tokenizer_dir=tokenizer_dir, stage=stage)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    val_batches = [collate(val_examples[i:i + cfg.batch_size], pad_id)
                   for i in range(0, len(val_examples), cfg.batch_size)]

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return distributed.shard(collate(batch_at(train_examples, cfg.batch_size, step * cfg.grad_accum + micro,
                                                  cfg.seed), pad_id))

    n = model.num_params()
    n_targets = sum(sum(t != IGNORE for t in ex.targets) for ex in train_examples)
    epochs = cfg.steps * cfg.batch_size * cfg.grad_accum / len(train_examples)
    print(f"{stage}: {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active) | {len(train_examples)} train "
          f"/ {len(val_examples)} val examples, {n_targets:,} target tokens | {cfg.steps} steps of "
          f"{cfg.batch_size}x{cfg.grad_accum} ({epochs:.2f} epochs)")
    train(trainer, SupervisedStep(get_batch, pretrain_loss(cfg.mtp_lambda, cfg.balance_alpha), val_batches))
    final = trainer.save_final()
    record = trainer.write_report()
    print(f"done: {record.steps} steps in {record.wall_seconds / 60:.1f} min, final train loss "
          f"{record.final_train_loss:.4f}; checkpoint (HF layout + tokenizer): {final}")
    return trainer


def encode_for_training(tokenizer: Tokenizer, convs: list[Conversation], seq_len: int) -> list[Example]:
    """Encode and drop what does not fit in seq_len tokens (the longest example kept)."""
    examples, dropped = encode_all(tokenizer, convs, seq_len)
    if dropped:
        print(f"dropped {dropped} of {len(convs)} examples longer than {seq_len} tokens")
    if not examples:
        raise NanoseekError(f"no training example fits in --seq-len {seq_len} tokens")
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


# ----- the stages ---------------------------------------------------------------------------------------------------
def sft(cfg: SFTConfig) -> Path:
    """Fine-tune into cfg.out; returns the final checkpoint (HF layout + tokenizer). One process, or one rank of
    `torchrun --nproc_per_node=N -m nanoseek sft ... [--parallel fsdp]`."""
    return distributed.run(resolve_device(cfg.device), lambda device: _sft(cfg, device))


def _sft(cfg: SFTConfig, device: torch.device) -> Path:
    if sum(x is not None for x in (cfg.model, cfg.preset, cfg.config)) != 1:
        raise NanoseekError("sft: give exactly one of --model, --preset and --config")
    set_threads(cfg.threads)
    tokenizer_dir = cfg.tokenizer or cfg.model
    if tokenizer_dir is None:
        raise NanoseekError("--preset/--config start from scratch and need --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    convs = read_conversations(cfg.data, cfg.task, cfg.n, cfg.seed)
    if cfg.model is not None:
        model = load_model(cfg.model)
    else:
        model = init_model(cfg.preset, cfg.config, tokenizer.vocab_size, seed=cfg.seed)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise NanoseekError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                            f"({tokenizer.vocab_size})")
    cfg = dataclasses.replace(cfg, seq_len=min(cfg.seq_len, model.config.max_position_embeddings))
    examples = encode_for_training(tokenizer, convs, cfg.seq_len)
    return fit(model, examples, cfg, tokenizer.pad_id, tokenizer_dir, stage="sft", device=device).out_dir / "final"


def load_pretrained_student(path: Path, teacher: Path, vocab_size: int) -> Transformer:
    """A pre-trained dense student checkpoint, checked against the teacher: the traces are token ids of the teacher's
    tokenizer, so the student must have been trained on the same one (same tokenizer.json) and hold its vocabulary."""
    student = load_model(path)
    c = student.config
    if c.first_k_dense_replace < c.num_hidden_layers:
        raise NanoseekError(f"distill: --student-model {path} has routed experts; the student must be dense (pre-train "
                            f"it with a config whose first_k_dense_replace = num_hidden_layers)")
    if c.num_nextn_predict_layers:  # MTP is a pre-training objective; the distilled student drops it, as R1's
        state = {k: v for k, v in student.state_dict().items() if not k.startswith("mtp.")}
        student = Transformer(dense_student_config(c))
        student.load_state_dict(state)
    same = [(Path(d) / "tokenizer.json").read_bytes() if (Path(d) / "tokenizer.json").is_file() else None
            for d in (path, teacher)]
    if same[0] != same[1]:
        raise NanoseekError(f"distill: --student-model {path} was trained with another tokenizer than the teacher "
                            f"{teacher} (their tokenizer.json differ); pre-train it on the teacher's tokenizer")
    if c.vocab_size < vocab_size:
        raise NanoseekError(f"distill: --student-model {path} has vocab_size {c.vocab_size}, the teacher's tokenizer "
                            f"needs {vocab_size}")
    return student


def distill(cfg: DistillConfig) -> Path:
    """Train the dense student into cfg.out; returns its final checkpoint (HF layout + the teacher's tokenizer).
    One process, or one rank of `torchrun --nproc_per_node=N -m nanoseek distill ...`."""
    return distributed.run(resolve_device(cfg.device), lambda device: _distill(cfg, device))


def _distill(cfg: DistillConfig, device: torch.device) -> Path:
    if sum(x is not None for x in (cfg.student_preset, cfg.student_config, cfg.student_model)) != 1:
        raise NanoseekError("distill: give exactly one of --student-preset, --student-config and --student-model")
    set_threads(cfg.threads)
    tokenizer = Tokenizer.from_dir(cfg.teacher)
    vocab_size = tokenizer.vocab_size
    if (cfg.teacher / "config.json").is_file():  # keep the teacher's (possibly padded) embedding size
        vocab_size = max(vocab_size, ModelConfig.load(cfg.teacher).vocab_size)
    convs = [c for path in cfg.teacher_data for c in read_chat_jsonl(path)]
    if not convs:  # e.g. a teacher that got no sample right: say so, not sft's generic "no training data"
        raise NanoseekError(f"distill: no traces in {', '.join(map(str, cfg.teacher_data))}; did `nanoseek sample "
                            f"--keep-correct` keep none (0 verified-correct samples)?")
    if cfg.student_model is not None:
        student = load_pretrained_student(cfg.student_model, cfg.teacher, vocab_size)
    else:
        student = init_model(cfg.student_preset, cfg.student_config, vocab_size, dense=True, seed=cfg.seed)
    if student.config.n_routed_experts or student.config.num_nextn_predict_layers:
        raise NanoseekError("distill: the student must be dense without MTP")  # dense_student_config guarantees it
    cfg = dataclasses.replace(cfg, seq_len=min(cfg.seq_len, student.config.max_position_embeddings))
    examples = encode_for_training(tokenizer, convs, cfg.seq_len)
    return fit(student, examples, cfg, tokenizer.pad_id, cfg.teacher, stage="distill", device=device).out_dir \
        / "final"
