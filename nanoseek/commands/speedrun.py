"""`nanoseek speedrun`: a reasoning model built end to end by one command, with every stage's cost on the card.

    tokenizer -> pretrain (MLA + DeepSeekMoE + MTP) -> SFT (cold start, <think> traces) -> eval -> GRPO -> eval
    -> rejection sampling from the RL model -> distillation into a small dense student -> eval -> report card

Each stage calls the library function of its command (nanoseek.train: pretrain, sft, evaluate_checkpoint, rl,
sample_traces, distill, write_report_card) with a typed config, in this process; the stage's log starts with the
equivalent `nanoseek <command>` line, so one stage can be rerun by hand. The run directory (--out, default
runs/speedrun) holds one sub-directory per stage plus:
  logs/<stage>.log   everything the stage printed            done/<stage>   written when the stage finished
  eval/<model>.json  `nanoseek eval --json` results           report.md      the report card (+ PNGs)

Interrupted and rerun with the same command, it skips the stages in done/ and continues the unfinished one from its
last checkpoint (--resume). The default fits in 30 minutes on 2 CPU cores; --quick runs the same stages at toy size
in about a minute (the test suite's smoke test). Every stage runs on --device (default: CUDA when present); on a
machine with several CUDA GPUs every stage but the tokenizer and the report runs under torchrun, one process per GPU
(at most one per sequence or problem of the stage's batch), any number of GPUs: the batches are split unevenly
where they do not divide (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.config import get_preset
from nanoseek.data import default_corpus_files
from nanoseek.distributed import resolve_device
from nanoseek.errors import NanoseekError
from nanoseek.osutil import check_writable, write_file_atomically, write_text_atomically
from nanoseek.tasks import format_completion, load_task
from nanoseek.train.evaluate import EvalConfig, evaluate_checkpoint
from nanoseek.train.grpo import RLConfig, rl
from nanoseek.train.pretrain import PretrainConfig, prepare_tokenizer, pretrain
from nanoseek.train.report import write_report_card
from nanoseek.train.sample import SampleConfig, sample_traces
from nanoseek.train.sft import DistillConfig, SFTConfig, distill, sft
from nanoseek.train.trainer import TrainConfig


@dataclass
class Plan:
    """The sizes of one speedrun. Step counts are optimizer steps; n = problems."""

    preset: str  # the pre-trained MoE model (teacher)
    student_preset: str  # the distilled dense student's shape
    vocab_size: int  # tokenizer vocabulary
    task: str  # the verifiable reasoning task (nanoseek/tasks)
    corpus_traces: int  # worked problems of the task added to the pre-training text (train split)
    pretrain_steps: int
    pretrain_batch: int
    pretrain_seq_len: int
    pretrain_lr: float
    sft_n: int  # cold-start traces
    sft_steps: int
    sft_lr: float
    rl_steps: int
    rl_prompts: int  # B prompts per step
    rl_group: int  # G samples per prompt
    rl_lr: float
    sample_n: int  # train problems for rejection sampling
    sample_k: int  # samples per problem
    distill_steps: int
    distill_lr: float
    eval_n: int  # held-out test problems per evaluation
    eval_k: int  # sampled completions per problem (temperature 0.6, top-p 0.95), 0 = greedy only
    max_new_tokens: int


TASK = "arithmetic:min_digits=2,max_digits=2,ops=+-"
PLANS: dict[str, Plan] = {
    "default": Plan(preset="small", student_preset="test", vocab_size=2048, task=TASK, corpus_traces=20000,
                    pretrain_steps=600, pretrain_batch=16, pretrain_seq_len=256, pretrain_lr=3e-3,
                    sft_n=2000, sft_steps=300, sft_lr=1e-3, rl_steps=60, rl_prompts=16, rl_group=8, rl_lr=3e-5,
                    sample_n=3000, sample_k=1, distill_steps=600, distill_lr=3e-3, eval_n=500, eval_k=4,
                    max_new_tokens=160),
    # toy size: one-digit additions, which the test preset learns within a minute, so that every stage (rejection
    # sampling included) has something to work with; their whole test split is 8 problems (a+b = b+a)
    "quick": Plan(preset="test", student_preset="test", vocab_size=512,
                  task="arithmetic:min_digits=1,max_digits=1,ops=+", corpus_traces=1000,
                  pretrain_steps=60, pretrain_batch=8, pretrain_seq_len=128, pretrain_lr=3e-3,
                  sft_n=1000, sft_steps=150, sft_lr=3e-3, rl_steps=3, rl_prompts=4, rl_group=4, rl_lr=3e-5,
                  sample_n=32, sample_k=2, distill_steps=30, distill_lr=3e-3, eval_n=8, eval_k=0,
                  max_new_tokens=100),
}


# the stages in order (build_stages defines them)
STAGES = ("tokenizer", "pretrain", "eval_base", "sft", "eval_sft", "rl", "eval_rl", "sample", "distill",
          "eval_distill", "report")


@dataclass
class Stage:
    name: str
    describe: str  # one line for the progress display
    weight: float  # rough share of the run's time, for the overall progress bar
    run: Callable[[], None]
    summary: Callable[[], str]  # one line printed when the stage ends (loss, accuracy, cost)
    run_dir: Path | None = None  # a training stage's directory: resumed from its checkpoints when unfinished


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the same stages at toy size (about a minute on 2 cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default runs/speedrun, or runs/speedrun-quick with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per stage (default 1: at these sizes a second thread made a pre-training "
                        "step slower, 1.5 s vs 0.85 s, on the 2-core dev box; docs/speedrun.md)")
    p.add_argument("--price-per-hour", type=float, default=0.10,
                   help="USD per machine-hour for the report card (default 0.10, as nanoseek pretrain)")
    p.add_argument("--restart", action="store_true", help="delete --out first and start from scratch")
    p.add_argument("--device", default=None,
                   help="torch device of every stage (default: cuda if available, else cpu); with several GPUs "
                        "visible the stages run under torchrun, one process per GPU")


# --- stage runners --------------------------------------------------------------------------------------------------
def command_line(command: str, cfg: Any) -> list[str]:
    """The `nanoseek <command>` argv that builds `cfg`: a flag for every field that differs from its default (field
    `batch_size` is `--batch-size`; True booleans are bare flags; lists are several values), the stage's own
    settings before the shared training ones."""
    argv = [command]
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in sorted(dataclasses.fields(cfg), key=lambda f: f.name in shared):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and value == default:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_stage(command: str, stage: Callable[[Any], Any], cfg: Any) -> None:
    """Print the command line of `cfg`, then run the library function of the stage with it; a NanoseekError
    propagates (the speedrun names the stage)."""
    print(f"$ nanoseek {shlex.join(command_line(command, cfg))}", flush=True)
    stage(cfg)


def run_on_gpus(command: str, stage: Callable[[Any], Any], cfg: Any, processes: int) -> None:
    """A stage as one process (run_stage), or with processes > 1 the same command under torchrun, one process per
    GPU (DDP for the training stages, each rank its share of the problems for eval and sample)."""
    if processes <= 1:
        run_stage(command, stage, cfg)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "nanoseek", *command_line(command, cfg)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    sys.stdout.flush()
    if subprocess.run(cmd, stdout=sys.stdout, stderr=sys.stderr).returncode != 0:
        raise NanoseekError(f"`nanoseek {command}` under torchrun with {processes} processes failed (its output is in "
                            f"the stage's log)")


def write_trace_corpus(task_spec: str, n: int, path: Path) -> Path:
    """n worked train-split problems as plain-text documents (question, reasoning, answer) for pre-training.

    V3's pre-training corpus is rich in maths; this is that at toy scale: the base model sees the digits, the
    column-by-column steps and the \\boxed{} answers before SFT teaches the chat format around them."""
    task = load_task(task_spec)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in task.problems("train", n, seed=12345):
                reasoning, answer = task.solution_trace(p)
                text = f"{p.prompt}\n{format_completion(reasoning, answer)}"
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    return write_file_atomically(path, write)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def run_summary(run_dir: Path) -> str:
    r = _json(run_dir / "run.json")
    if not r:
        return ""
    loss = f"val loss {r['final_val_loss']:.3f}" if r.get("final_val_loss") is not None else (
        f"train loss {r['final_train_loss']:.3f}" if r.get("final_train_loss") is not None else "")
    return f"{r['steps']} steps, {r['tokens']:,} tokens, {loss}, MFU {r['mfu']:.1%}, ${r['cost_usd']:.4f}"


def eval_summary(path: Path) -> str:
    m = _json(path).get("metrics", {})
    greedy = m.get("pass@1_greedy", {}).get("value")
    sampled = next((v["value"] for k, v in m.items() if k.startswith("pass@1_sampled")), None)
    parts = [f"greedy pass@1 {greedy:.3f}" if greedy is not None else "",
             f"sampled pass@1 {sampled:.3f}" if sampled is not None else ""]
    return ", ".join(p for p in parts if p)


def build_stages(plan: Plan, out: Path, threads: int, price: float, device: str | None = None) -> list[Stage]:
    """The stages, each a library call with the config of the nanoseek command a user would type, on `device`
    (None: CUDA when present); with several GPUs under torchrun."""
    common: dict[str, Any] = {"threads": threads, "price_per_hour": price, "device": device}
    pre, sft_dir, rl_dir, smp, dst, ev = (out / d for d in ("pretrain", "sft", "rl", "sample", "distill", "eval"))
    traces = out / "corpus" / f"{plan.task.split(':')[0]}_traces.jsonl"
    corpus = [*default_corpus_files(), traces]
    on_gpu = resolve_device(device).type == "cuda"
    n_gpus = torch.cuda.device_count() if on_gpu and (device is None or device == "cuda") else 1

    def processes(items: int) -> int:
        """One process per GPU, at most one per item (sequence, prompt, problem) of the stage's batch."""
        return max(1, min(n_gpus, items))

    def tokenizer() -> None:
        traces.parent.mkdir(parents=True, exist_ok=True)
        write_trace_corpus(plan.task, plan.corpus_traces, traces)
        pre.mkdir(parents=True, exist_ok=True)
        prepare_tokenizer(corpus, pre, plan.vocab_size)  # pretrain finds and reuses pretrain/tokenizer

    def pretraining() -> None:
        cfg = PretrainConfig(preset=plan.preset, data=corpus, vocab_size=plan.vocab_size, steps=plan.pretrain_steps,
                             batch_size=plan.pretrain_batch, seq_len=plan.pretrain_seq_len, lr=plan.pretrain_lr,
                             warmup_steps=max(1, plan.pretrain_steps // 20),
                             eval_every=max(1, plan.pretrain_steps // 4), save_every=max(1, plan.pretrain_steps // 4),
                             sample_every=0, bias_update_speed=0.01, sample_prompt="What is 25 + 17?", out=pre,
                             resume=resuming(pre), **common)
        run_on_gpus("pretrain", pretrain, cfg, processes(plan.pretrain_batch))

    def evaluate(model: Path, name: str) -> Callable[[], None]:
        def run_eval() -> None:
            ev.mkdir(parents=True, exist_ok=True)
            run_on_gpus("eval", evaluate_checkpoint, EvalConfig(
                model=model, task=plan.task, n=plan.eval_n, k=plan.eval_k, max_new_tokens=plan.max_new_tokens,
                batch_size=128, threads=threads, json=ev / f"{name}.json", device=device), processes(plan.eval_n))
        return run_eval

    def finetune() -> None:
        run_on_gpus("sft", sft, SFTConfig(
            model=pre / "final", task=plan.task, n=plan.sft_n, steps=plan.sft_steps, batch_size=32, lr=plan.sft_lr,
            warmup_steps=10, mtp_lambda=0.3, bias_update_speed=0.01, save_every=max(1, plan.sft_steps // 3),
            eval_every=max(1, plan.sft_steps // 3), out=sft_dir, resume=resuming(sft_dir), **common), processes(32))

    def grpo() -> None:
        run_on_gpus("rl", rl, RLConfig(
            model=sft_dir / "final", task=plan.task, steps=plan.rl_steps, prompts_per_step=plan.rl_prompts,
            group_size=plan.rl_group, max_new_tokens=plan.max_new_tokens, lr=plan.rl_lr, warmup_steps=3,
            eval_every=0, save_every=max(1, plan.rl_steps // 4), out=rl_dir, resume=resuming(rl_dir), **common),
            processes(plan.rl_prompts))

    def sample() -> None:
        smp.mkdir(parents=True, exist_ok=True)
        run_on_gpus("sample", sample_traces, SampleConfig(
            model=rl_dir / "final", task=plan.task, n=plan.sample_n, k=plan.sample_k, keep_correct=True,
            max_new_tokens=plan.max_new_tokens, batch_size=128, threads=threads, out=smp / "traces.jsonl",
            device=device), processes(plan.sample_n))

    def distillation() -> None:
        run_on_gpus("distill", distill, DistillConfig(
            teacher_data=[smp / "traces.jsonl"], teacher=rl_dir / "final", student_preset=plan.student_preset,
            steps=plan.distill_steps, batch_size=32, lr=plan.distill_lr, warmup_steps=20, mtp_lambda=0.0,
            save_every=max(1, plan.distill_steps // 3), eval_every=max(1, plan.distill_steps // 3), out=dst,
            resume=resuming(dst), **common), processes(32))

    def report() -> None:
        path = write_report_card([out], out / "report.md", price_per_hour=price, title="nanoseek speedrun")
        with open(path, "a", encoding="utf-8") as f:
            f.write(stage_table(out, price))
        print(f"report card: {path}")

    return [
        Stage("tokenizer", f"byte-level BPE ({plan.vocab_size} tokens) on the corpus + {plan.corpus_traces:,} "
              f"worked problems", 0.02, tokenizer, lambda: f"{plan.vocab_size} tokens -> {pre / 'tokenizer'}"),
        Stage("pretrain", f"{plan.preset} preset, MLA + MoE + MTP, {plan.pretrain_steps} steps", 0.40, pretraining,
              lambda: run_summary(pre), pre),
        Stage("eval_base", f"the pre-trained model, pass@1 on {plan.eval_n} held-out problems", 0.03,
              evaluate(pre / "final", "base"), lambda: eval_summary(ev / "base.json")),
        Stage("sft", f"cold start: {plan.sft_n:,} <think> traces, {plan.sft_steps} steps", 0.17, finetune,
              lambda: run_summary(sft_dir), sft_dir),
        Stage("eval_sft", f"pass@1 on {plan.eval_n} held-out problems", 0.03, evaluate(sft_dir / "final", "sft"),
              lambda: eval_summary(ev / "sft.json")),
        Stage("rl", f"GRPO, {plan.rl_steps} steps x {plan.rl_prompts} prompts x {plan.rl_group} samples", 0.16,
              grpo, lambda: run_summary(rl_dir), rl_dir),
        Stage("eval_rl", f"pass@1 on {plan.eval_n} held-out problems", 0.03, evaluate(rl_dir / "final", "rl"),
              lambda: eval_summary(ev / "rl.json")),
        Stage("sample", f"rejection sampling: {plan.sample_n} problems x {plan.sample_k}, keep verified", 0.03,
              sample, lambda: f"{count_lines(smp / 'traces.jsonl')} verified traces"),
        Stage("distill", f"dense {plan.student_preset} student, {plan.distill_steps} steps", 0.12, distillation,
              lambda: run_summary(dst), dst),
        Stage("eval_distill", f"pass@1 on {plan.eval_n} held-out problems", 0.03,
              evaluate(dst / "final", "distill"), lambda: eval_summary(ev / "distill.json")),
        Stage("report", "report card", 0.01, report, lambda: str(out / "report.md")),
    ]


def stage_table(out: Path, price: float) -> str:
    """Markdown: every finished stage's wall time (done/<stage> holds its seconds) and cost, evaluations and
    sampling included, which the run records of the training stages alone do not show."""
    rows, total = [], 0.0
    for marker in (out / "done" / name for name in STAGES):
        if not marker.is_file():
            continue
        seconds = float(marker.read_text())
        total += seconds
        rows.append(f"| {marker.name} | {_minutes(seconds)} | ${seconds / 3600 * price:.4f} |")
    return ("\n## Speedrun stages\n\nWall time of every stage of this speedrun (the last session of a stage that was "
            f"resumed), at ${price:.2f}/machine-hour.\n\n| stage | wall time | cost |\n|---|---:|---:|\n"
            + "\n".join(rows) + f"\n| **total** | **{_minutes(total)}** | **${total / 3600 * price:.4f}** |\n")


def resuming(run_dir: Path) -> bool:
    """Resume when an earlier, interrupted speedrun left a checkpoint in this stage's directory."""
    return (run_dir / "checkpoints" / "latest").is_file()


# --- the command ----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    plan = PLANS["quick" if args.quick else "default"]
    out: Path = args.out or Path("runs/speedrun-quick" if args.quick else "runs/speedrun")
    threads = args.threads
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    if args.price_per_hour < 0:
        raise NanoseekError(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    get_preset(plan.preset)  # fail early on a bad plan
    if args.restart and out.exists():
        shutil.rmtree(out)
    check_writable(out)  # a read-only or full --out fails now, not after the first stages
    plan_file = out / "plan.json"
    if plan_file.is_file() and _json(plan_file) != asdict(plan):
        raise NanoseekError(f"{out} holds a speedrun with another plan ({plan_file}); use --restart or another --out")
    write_text_atomically(plan_file, json.dumps(asdict(plan), indent=1) + "\n")
    for d in ("logs", "done"):
        (out / d).mkdir(exist_ok=True)

    resolve_device(args.device)  # a bad or missing device fails now, in one line
    stages = build_stages(plan, out, threads, args.price_per_hour, args.device)
    assert tuple(s.name for s in stages) == STAGES
    total = sum(s.weight for s in stages)
    done = [s for s in stages if (out / "done" / s.name).is_file()]
    print(f"nanoseek speedrun{' --quick' if args.quick else ''}: {len(stages)} stages -> {out}"
          + (f" ({len(done)} already done: {', '.join(s.name for s in done)})" if done else ""))
    t_start = time.time()
    bar = tqdm(total=round(total * 100), unit="%", dynamic_ncols=True, file=sys.stdout,
               bar_format="{desc} |{bar}| {percentage:3.0f}% [{elapsed}]")
    try:
        for i, stage in enumerate(stages, 1):
            marker = out / "done" / stage.name
            label = f"[{i}/{len(stages)}] {stage.name}"
            if marker.is_file():
                bar.update(round(stage.weight * 100))
                bar.write(f"{label:<20} skipped (done in an earlier run) {stage.summary()}")
                continue
            resumed = stage.run_dir is not None and resuming(stage.run_dir)
            bar.set_description_str(f"{label}: {stage.describe}{' (resuming)' if resumed else ''}")
            t0 = time.time()
            log = out / "logs" / f"{stage.name}.log"
            try:
                with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
                    stage.run()  # its own progress bar (stderr) shows under the overall one
            except NanoseekError as e:
                raise NanoseekError(f"stage {stage.name}: {e} (log: {log})") from None
            except KeyboardInterrupt:
                bar.write(f"{label} interrupted; rerun the same command to continue from its last checkpoint")
                raise
            write_text_atomically(marker, f"{time.time() - t0:.1f}\n")
            bar.update(round(stage.weight * 100))
            bar.write(f"{label:<20} {_minutes(time.time() - t0):>7}  {stage.summary()}")
    finally:
        bar.close()
    print(f"speedrun finished in {_minutes(time.time() - t_start)} (this session). Report card: {out / 'report.md'}")
    print("Talk to the reasoning model (GRPO) or the distilled student:")
    print(f"  nanoseek chat --model {out / 'rl' / 'final'}")
    print(f"  nanoseek serve --model {out / 'rl' / 'final'}      # then open http://127.0.0.1:8000")
    print(f"  nanoseek chat --model {out / 'distill' / 'final'}")
