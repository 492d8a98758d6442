"""`nanoseek speedrun`: a reasoning model built end to end by one command, with every stage's cost on the card.

    tokenizer -> pretrain (MLA + DeepSeekMoE + MTP) -> SFT (cold start, <think> traces) -> eval -> GRPO -> eval
    -> rejection sampling from the RL model -> distillation into a pre-trained small dense student -> eval
    -> report card
    and beside them, on the second core: pre-training of the dense student -> GRPO alone on that student (R1's
    comparison: distillation vs RL on the same small model) -> eval; R1-Zero (GRPO from the base model) -> eval

Each stage calls the library function of its command (nanoseek.train: pretrain, sft, evaluate_checkpoint, rl,
sample_traces, distill, write_report_card) with a typed config, in this process; the stage's log starts with the
equivalent `nanoseek <command>` line, so one stage can be rerun by hand. The run directory (--out, default
runs/speedrun) holds one sub-directory per stage plus:
  logs/<stage>.log   everything the stage printed            done/<stage>   written when the stage finished
  eval/<model>.json  `nanoseek eval --json` results           report.md      the report card (+ PNGs)

Interrupted and rerun with the same command, it skips the stages in done/ and continues the unfinished one from its
last checkpoint (--resume). On a CPU with at least 2 x --threads cores the "side" stages (the student's pre-training
and GRPO, R1-Zero) run as `nanoseek <command>` subprocesses on a second lane, each starting when the stages it needs
are done, while the main lane runs the teacher's pipeline: the second core does work the card needs instead of
idling (one thread per stage measured fastest at these sizes, docs/speedrun.md). The default fits in 30 minutes on
2 CPU cores; --quick runs the same stages at toy size in about a minute (the test suite's smoke test). Every stage
runs on --device (default: CUDA when present); on a machine with several CUDA GPUs every stage but the tokenizer and
the report runs under torchrun, one process per GPU (at most one per sequence or problem of the stage's batch), any
number of GPUs: the batches are split unevenly where they do not divide (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
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
from nanoseek.train.evaluate import EvalConfig, evaluate_checkpoint, paired_comparison
from nanoseek.train.grpo import RLConfig, rl
from nanoseek.train.pretrain import PretrainConfig, prepare_tokenizer, pretrain
from nanoseek.train.report import read_rl_curves, write_report_card
from nanoseek.train.sample import SampleConfig, sample_traces
from nanoseek.train.sft import DistillConfig, SFTConfig, dense_student_config, distill, sft
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
    rl_eval_every: int  # steps between the RL runs' held-out greedy pass@1 (validation split) for the curves
    student_rl_steps: int  # GRPO alone on the pre-trained student: its update FLOPs >= the distillation's
    sample_n: int  # train problems for rejection sampling
    sample_k: int  # samples per problem
    distill_steps: int
    distill_lr: float
    eval_n: int  # held-out test problems per evaluation
    eval_k: int  # sampled completions per problem (temperature 0.6, top-p 0.95), 0 = greedy only
    max_new_tokens: int


TASK = "arithmetic:min_digits=2,max_digits=2,ops=+-"
PLANS: dict[str, Plan] = {
    # R1's premise at toy scale: a small cold start (200 verified traces, trained to convergence) and GRPO on fresh
    # prompts at lr 1e-4 for 150 steps. Chosen on the validation split (docs/speedrun.md): 2,000 traces left GRPO
    # only +4 points (the cold start already at ~0.83), 120 steps on 2,000 traces (0.41) gave GRPO nothing to build on
    "default": Plan(preset="small", student_preset="test", vocab_size=2048, task=TASK, corpus_traces=20000,
                    pretrain_steps=600, pretrain_batch=16, pretrain_seq_len=256, pretrain_lr=3e-3,
                    sft_n=200, sft_steps=300, sft_lr=1e-3, rl_steps=150, rl_prompts=16, rl_group=8, rl_lr=1e-4,
                    rl_eval_every=10, student_rl_steps=300, sample_n=3000, sample_k=1, distill_steps=600,
                    distill_lr=3e-3, eval_n=500, eval_k=4, max_new_tokens=160),
    # toy size: one-digit additions, which the test preset learns within a minute, so that every stage (rejection
    # sampling included) has something to work with; their whole test split is 8 problems (a+b = b+a)
    "quick": Plan(preset="test", student_preset="test", vocab_size=512,
                  task="arithmetic:min_digits=1,max_digits=1,ops=+", corpus_traces=1000,
                  pretrain_steps=60, pretrain_batch=8, pretrain_seq_len=128, pretrain_lr=3e-3,
                  sft_n=1000, sft_steps=150, sft_lr=3e-3, rl_steps=3, rl_prompts=4, rl_group=4, rl_lr=3e-5,
                  rl_eval_every=3, student_rl_steps=3, sample_n=32, sample_k=2, distill_steps=30, distill_lr=3e-3,
                  eval_n=8, eval_k=0, max_new_tokens=100),
}


# the stages in the order one lane runs them (build_stages defines them); with two lanes the side stages
# (Stage.side) run beside the others, each after the stages it needs (Stage.after)
STAGES = ("tokenizer", "pretrain", "pretrain_student", "eval_base", "sft", "eval_sft", "rl", "eval_rl", "sample",
          "distill", "eval_distill", "rl_student", "eval_rl_student", "rl_zero", "eval_zero", "report")


@dataclass
class Stage:
    name: str
    describe: str  # one line for the progress display
    weight: float  # rough share of the run's time, for the overall progress bar
    run: Callable[[], None]
    summary: Callable[[], str]  # one line printed when the stage ends (loss, accuracy, cost)
    run_dir: Path | None = None  # a training stage's directory: resumed from its checkpoints when unfinished
    command: Callable[[], tuple[str, Any]] | None = None  # (nanoseek command, its config): how the side lane runs it
    side: bool = False  # runs on the second lane when there is one
    after: tuple[str, ...] = ()  # stages that must be done first (the order of STAGES guarantees it in one lane)


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
    p.add_argument("--lanes", default="auto", choices=["auto", "1", "2"],
                   help="2: run the side stages (the student's pre-training and GRPO, R1-Zero) on a second core "
                        "beside the main pipeline; auto (default): 2 on a CPU with >= 2 x --threads cores, else 1")
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
    pre_st, rl_st, rl_zero = out / "pretrain_student", out / "rl_student", out / "rl_zero"
    traces = out / "corpus" / f"{plan.task.split(':')[0]}_traces.jsonl"
    corpus = [*default_corpus_files(), traces]
    on_gpu = resolve_device(device).type == "cuda"
    n_gpus = torch.cuda.device_count() if on_gpu and (device is None or device == "cuda") else 1

    def processes(items: int) -> int:
        """One process per GPU, at most one per item (sequence, prompt, problem) of the stage's batch."""
        return max(1, min(n_gpus, items))

    def job(command: str, function: Callable[[Any], Any], config: Callable[[], Any], items: int,
            ) -> dict[str, Any]:
        """A stage that is one nanoseek command: run in this process (or under torchrun), or by the side lane as a
        subprocess. The config is built when the stage starts (whether to --resume depends on what is on disk)."""
        return {"run": lambda: run_on_gpus(command, function, config(), processes(items)),
                "command": lambda: (command, config())}

    def tokenizer() -> None:
        traces.parent.mkdir(parents=True, exist_ok=True)
        write_trace_corpus(plan.task, plan.corpus_traces, traces)
        pre.mkdir(parents=True, exist_ok=True)
        prepare_tokenizer(corpus, pre, plan.vocab_size)  # pretrain finds and reuses pretrain/tokenizer

    def pretraining(run_dir: Path, student: bool) -> Callable[[], PretrainConfig]:
        def config() -> PretrainConfig:
            kw: dict[str, Any] = {"preset": plan.preset}
            if student:  # the student's dense shape, pre-trained on the same corpus with the teacher's tokenizer
                run_dir.mkdir(parents=True, exist_ok=True)
                if (pre / "tokenizer").is_dir() and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
                    shutil.copytree(pre / "tokenizer", run_dir / "tokenizer", dirs_exist_ok=True)
                shape = dense_student_config(get_preset(plan.student_preset, vocab_size=plan.vocab_size))
                shape.save(run_dir / "student_config.json")
                kw = {"config": run_dir / "student_config.json", "mtp_lambda": 0.0}
            return PretrainConfig(**kw, data=corpus, vocab_size=plan.vocab_size, steps=plan.pretrain_steps,
                                  batch_size=plan.pretrain_batch, seq_len=plan.pretrain_seq_len, lr=plan.pretrain_lr,
                                  warmup_steps=max(1, plan.pretrain_steps // 20),
                                  eval_every=max(1, plan.pretrain_steps // 4),
                                  save_every=max(1, plan.pretrain_steps // 4), sample_every=0,
                                  bias_update_speed=0.01, sample_prompt="What is 25 + 17?", out=run_dir,
                                  resume=resuming(run_dir), **common)
        return config

    def evaluate(model: Path, name: str, zero: bool = False) -> dict[str, Any]:
        def config() -> EvalConfig:
            ev.mkdir(parents=True, exist_ok=True)
            return EvalConfig(model=model, task=plan.task, n=plan.eval_n, k=plan.eval_k,
                              max_new_tokens=plan.max_new_tokens, batch_size=128, threads=threads,
                              json=ev / f"{name}.json", device=device, zero=zero)
        return job("eval", evaluate_checkpoint, config, plan.eval_n)

    def finetune() -> SFTConfig:
        return SFTConfig(model=pre / "final", task=plan.task, n=plan.sft_n, steps=plan.sft_steps, batch_size=32,
                         lr=plan.sft_lr, warmup_steps=10, mtp_lambda=0.3, bias_update_speed=0.01,
                         save_every=max(1, plan.sft_steps // 3), eval_every=max(1, plan.sft_steps // 3), out=sft_dir,
                         resume=resuming(sft_dir), **common)

    def grpo(model: Path, run_dir: Path, steps: int, zero: bool = False) -> Callable[[], RLConfig]:
        def config() -> RLConfig:
            return RLConfig(model=model, task=plan.task, steps=steps, prompts_per_step=plan.rl_prompts,
                            group_size=plan.rl_group, max_new_tokens=plan.max_new_tokens, lr=plan.rl_lr,
                            warmup_steps=3, zero=zero, eval_every=plan.rl_eval_every,
                            save_every=max(1, steps // 4), out=run_dir, resume=resuming(run_dir), **common)
        return config

    def sample() -> SampleConfig:
        smp.mkdir(parents=True, exist_ok=True)
        return SampleConfig(model=rl_dir / "final", task=plan.task, n=plan.sample_n, k=plan.sample_k,
                            keep_correct=True, max_new_tokens=plan.max_new_tokens, batch_size=128, threads=threads,
                            out=smp / "traces.jsonl", device=device)

    def distillation() -> DistillConfig:
        return DistillConfig(teacher_data=[smp / "traces.jsonl"], teacher=rl_dir / "final",
                             student_model=pre_st / "final", steps=plan.distill_steps, batch_size=32,
                             lr=plan.distill_lr, warmup_steps=20, mtp_lambda=0.0,
                             save_every=max(1, plan.distill_steps // 3), eval_every=max(1, plan.distill_steps // 3),
                             out=dst, resume=resuming(dst), **common)

    def report() -> None:
        path = write_report_card([out], out / "report.md", price_per_hour=price, title="nanoseek speedrun")
        with open(path, "a", encoding="utf-8") as f:
            f.write(findings(out) + stage_table(out, price))
        print(f"report card: {path}")

    held_out = f"pass@1 on {plan.eval_n} held-out problems"
    return [
        Stage("tokenizer", f"byte-level BPE ({plan.vocab_size} tokens) on the corpus + {plan.corpus_traces:,} "
              f"worked problems", 0.02, tokenizer, lambda: f"{plan.vocab_size} tokens -> {pre / 'tokenizer'}"),
        Stage("pretrain", f"{plan.preset} preset, MLA + MoE + MTP, {plan.pretrain_steps} steps", 0.33,
              summary=lambda: run_summary(pre), run_dir=pre,
              **job("pretrain", pretrain, pretraining(pre, student=False), plan.pretrain_batch)),
        Stage("pretrain_student", f"dense {plan.student_preset} student, the same corpus, {plan.pretrain_steps} steps",
              0.06, summary=lambda: run_summary(pre_st), run_dir=pre_st, side=True, after=("tokenizer",),
              **job("pretrain", pretrain, pretraining(pre_st, student=True), plan.pretrain_batch)),
        Stage("eval_base", f"the pre-trained model, {held_out}", 0.03, summary=lambda: eval_summary(ev / "base.json"),
              **evaluate(pre / "final", "base")),
        Stage("sft", f"cold start: {plan.sft_n:,} <think> traces, {plan.sft_steps} steps", 0.14,
              summary=lambda: run_summary(sft_dir), run_dir=sft_dir, **job("sft", sft, finetune, 32)),
        Stage("eval_sft", held_out, 0.03, summary=lambda: eval_summary(ev / "sft.json"),
              **evaluate(sft_dir / "final", "sft")),
        Stage("rl", f"GRPO, {plan.rl_steps} steps x {plan.rl_prompts} prompts x {plan.rl_group} samples", 0.16,
              summary=lambda: run_summary(rl_dir), run_dir=rl_dir,
              **job("rl", rl, grpo(sft_dir / "final", rl_dir, plan.rl_steps), plan.rl_prompts)),
        Stage("eval_rl", held_out, 0.03, summary=lambda: eval_summary(ev / "rl.json"),
              **evaluate(rl_dir / "final", "rl")),
        Stage("sample", f"rejection sampling: {plan.sample_n} problems x {plan.sample_k}, keep verified", 0.03,
              summary=lambda: f"{count_lines(smp / 'traces.jsonl')} verified traces",
              **job("sample", sample_traces, sample, plan.sample_n)),
        Stage("distill", f"the pre-trained dense student on the verified traces, {plan.distill_steps} steps", 0.08,
              summary=lambda: run_summary(dst), run_dir=dst, after=("pretrain_student",),
              **job("distill", distill, distillation, 32)),
        Stage("eval_distill", held_out, 0.03, summary=lambda: eval_summary(ev / "distill.json"),
              **evaluate(dst / "final", "distill")),
        Stage("rl_student", f"GRPO alone on the pre-trained student, {plan.student_rl_steps} steps", 0.04,
              summary=lambda: run_summary(rl_st), run_dir=rl_st, side=True, after=("pretrain_student",),
              **job("rl", rl, grpo(pre_st / "final", rl_st, plan.student_rl_steps), plan.rl_prompts)),
        Stage("eval_rl_student", held_out, 0.01, summary=lambda: eval_summary(ev / "rl_student.json"), side=True,
              after=("rl_student",), **evaluate(rl_st / "final", "rl_student")),
        Stage("rl_zero", f"R1-Zero: GRPO from the base model, R1-Zero template, {plan.rl_steps} steps", 0.03,
              summary=lambda: run_summary(rl_zero), run_dir=rl_zero, side=True, after=("pretrain",),
              **job("rl", rl, grpo(pre / "final", rl_zero, plan.rl_steps, zero=True), plan.rl_prompts)),
        Stage("eval_zero", f"{held_out}, R1-Zero template", 0.01, summary=lambda: eval_summary(ev / "zero.json"),
              side=True, after=("rl_zero",), **evaluate(rl_zero / "final", "zero", zero=True)),
        Stage("report", "report card", 0.01, report, lambda: str(out / "report.md"),
              after=("distill", "eval_distill", "eval_rl_student", "eval_zero")),
    ]


def stage_table(out: Path, price: float) -> str:
    """Markdown: every finished stage's wall time (done/<stage> holds its seconds, and "side" for the second lane)
    and cost, evaluations and sampling included, which the run records of the training stages alone do not show;
    the total is the run's elapsed time (elapsed.txt), the two lanes overlapping."""
    rows, total = [], 0.0
    for marker in (out / "done" / name for name in STAGES):
        if not marker.is_file():
            continue
        seconds, side = read_marker(marker)
        total += seconds
        rows.append(f"| {marker.name} | {'2 (side)' if side else '1'} | {_minutes(seconds)} | "
                    f"${seconds / 3600 * price:.4f} |")
    elapsed_file = out / "elapsed.txt"
    elapsed = float(elapsed_file.read_text()) if elapsed_file.is_file() else total
    return ("\n## Speedrun stages\n\nWall time of every stage of this speedrun (the last session of a stage that was "
            f"resumed), at ${price:.2f}/machine-hour. Lane 2 ran beside lane 1 on the second core, so the stages' "
            "times add up to more than the run took; the total is the run's elapsed time (all sessions) and what "
            "the machine cost.\n\n| stage | lane | wall time | cost |\n|---|---:|---:|---:|\n"
            + "\n".join(rows) + f"\n| **total** (elapsed; the stages add up to {_minutes(total)}) | | "
            f"**{_minutes(elapsed)}** | **${elapsed / 3600 * price:.4f}** |\n")


def read_marker(marker: Path) -> tuple[float, bool]:
    """done/<stage>: "<seconds>" or "<seconds> side" -> (seconds, ran on the side lane)."""
    parts = marker.read_text().split()
    return float(parts[0]), parts[1:] == ["side"]


def _compare(out: Path, a: str, b: str) -> dict[str, Any] | None:
    ea, eb = _json(out / "eval" / f"{a}.json"), _json(out / "eval" / f"{b}.json")
    if not ea.get("outcomes") or not eb.get("outcomes"):
        return None
    return paired_comparison(ea, eb)


def _delta(c: dict[str, Any], name: str) -> str:
    if name not in c:
        return "–"
    r = c[name]
    return f"{r['a']:.3f} -> {r['b']:.3f} (**{r['delta']:+.3f}**, p = {r['p']:.2g}, {r['test']})"


def findings(out: Path) -> str:
    """Markdown: R1's three findings as this run measured them, each a paired comparison on the same held-out
    problems (greedy: exact McNemar; sampled pass@1, the mean of k samples: paired bootstrap)."""
    lines = ["", "## R1's findings in this run", ""]
    rows = [("GRPO over the SFT model (the teacher)", "sft", "rl"),
            ("distilled pre-trained student vs the same student trained by GRPO alone", "rl_student", "distill"),
            ("the distilled student vs its teacher", "rl", "distill"),
            ("R1-Zero (GRPO from the base, R1-Zero template) vs SFT then GRPO", "zero", "rl")]
    lines += ["| comparison | from -> to | greedy pass@1 | sampled pass@1 |", "|---|---|---|---|"]
    for what, a, b in rows:
        c = _compare(out, a, b)
        if c is not None:
            lines.append(f"| {what} | {a} -> {b} | {_delta(c, 'greedy')} | {_delta(c, 'sampled')} |")
    dst, grpo_only = _json(out / "distill" / "run.json"), _json(out / "rl_student" / "run.json")
    if dst and grpo_only:
        rollouts = rollout_flops(out / "rl_student", grpo_only)
        lines += ["", f"Compute of the two students after the same pre-training: distillation {dst['flops']:.3g} "
                  f"training FLOPs ({_minutes(dst['wall_seconds'])}); GRPO alone {grpo_only['flops']:.3g} in its "
                  f"updates + {rollouts:.3g} sampling its rollouts = {grpo_only['flops'] + rollouts:.3g} FLOPs "
                  f"({_minutes(grpo_only['wall_seconds'])}). As in R1's comparison the teacher's cost (its training "
                  "and the rejection sampling) is not charged to the distilled student."]
    zero, _ = read_rl_curves(out / "rl_zero")
    if len(zero) >= 2:
        w = min(5, len(zero) // 2)
        first, last = zero[:w], zero[-w:]

        def mean(rs: list[dict[str, Any]], key: str) -> float:
            return sum(r[key] for r in rs) / len(rs)

        lines += ["", f"R1-Zero over its {len(zero)} steps (first {w} -> last {w} steps): accuracy reward "
                  f"{mean(first, 'reward_accuracy'):.3f} -> {mean(last, 'reward_accuracy'):.3f}, format reward "
                  f"{mean(first, 'reward_format'):.3f} -> {mean(last, 'reward_format'):.3f}, mean response length "
                  f"{mean(first, 'response_len_mean'):.0f} -> {mean(last, 'response_len_mean'):.0f} tokens."]
    return "\n".join(lines) + "\n"


def rollout_flops(run_dir: Path, record: dict[str, Any]) -> float:
    """FLOPs an RL run spent sampling: every step's rollouts x their mean completion length x the forward third of
    the run's training FLOPs per token (prompt prefill left out: a lower bound)."""
    rows, _ = read_rl_curves(run_dir)
    return sum(r.get("rollouts", 0) * r.get("response_len_mean", 0.0) for r in rows) * record["flops_per_token"] / 3


def resuming(run_dir: Path) -> bool:
    """Resume when an earlier, interrupted speedrun left a checkpoint in this stage's directory."""
    return (run_dir / "checkpoints" / "latest").is_file()


def two_lanes(device: str | None, threads: int) -> bool:
    """A second lane when the stages run on the CPU and it has a core for each lane's threads."""
    return resolve_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 * threads


class SideLane(threading.Thread):
    """Runs the side stages in order, each as a `nanoseek <command>` subprocess (its output to logs/<stage>.log)
    once the stages in its `after` are done; stops at the first failure or when told to."""

    def __init__(self, stages: list[Stage], out: Path, report: Callable[[Stage, float], None]):
        super().__init__(daemon=True)
        self.stages, self.out, self.report = stages, out, report
        self.failed: str | None = None  # the failing stage's one-line reason
        self.stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        for stage in self.stages:
            marker = self.out / "done" / stage.name
            if marker.is_file():
                continue
            while not all((self.out / "done" / a).is_file() for a in stage.after):
                if self.stop.wait(0.5):
                    return
            assert stage.command is not None
            command, cfg = stage.command()
            log = self.out / "logs" / f"{stage.name}.log"
            argv = [sys.executable, "-m", "nanoseek", *command_line(command, cfg)]
            t0 = time.time()
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"$ nanoseek {shlex.join(argv[3:])}\n")
                f.flush()
                self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                code = self.proc.wait()
            if self.stop.is_set():
                return
            if code != 0:
                self.failed = f"stage {stage.name} (second lane) failed with exit code {code} (log: {log})"
                return
            write_text_atomically(marker, f"{time.time() - t0:.1f} side\n")
            self.report(stage, time.time() - t0)

    def halt(self) -> None:
        """Stop after the running stage has saved: it gets SIGINT, on which nanoseek's training loop writes a
        checkpoint and exits (Ctrl-C in the terminal already sent it one), so a rerun resumes it; killed if it has
        not exited within a minute."""
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.join(60)


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
    lanes = 2 if args.lanes == "auto" and two_lanes(args.device, threads) else int(args.lanes.replace("auto", "1"))
    total = sum(s.weight for s in stages)
    done = [s for s in stages if (out / "done" / s.name).is_file()]
    print(f"nanoseek speedrun{' --quick' if args.quick else ''}: {len(stages)} stages on {lanes} lane(s) -> {out}"
          + (f" ({len(done)} already done: {', '.join(s.name for s in done)})" if done else ""))
    t_start = time.time()
    elapsed_file = out / "elapsed.txt"
    elapsed_before = float(elapsed_file.read_text()) if elapsed_file.is_file() else 0.0
    bar = tqdm(total=round(total * 100), unit="%", dynamic_ncols=True, file=sys.stdout,
               bar_format="{desc} |{bar}| {percentage:3.0f}% [{elapsed}]")
    number = {s.name: i for i, s in enumerate(stages, 1)}

    def finished(stage: Stage, seconds: float) -> None:
        bar.update(round(stage.weight * 100))
        label = f"[{number[stage.name]}/{len(stages)}] {stage.name}"
        bar.write(f"{label:<24} {_minutes(seconds):>7}  {'(lane 2) ' if stage.side and lanes > 1 else ''}"
                  f"{stage.summary()}")

    side = SideLane([s for s in stages if s.side], out, finished) if lanes > 1 else None
    main_lane = [s for s in stages if not (s.side and lanes > 1)]
    def skipped(stage: Stage) -> bool:
        if (out / "done" / stage.name).is_file():
            bar.update(round(stage.weight * 100))
            label = f"[{number[stage.name]}/{len(stages)}] {stage.name}"
            bar.write(f"{label:<24} skipped (done in an earlier run) {stage.summary()}")
            return True
        return False

    try:
        if side is not None:
            for stage in side.stages:
                skipped(stage)
            side.start()
        for stage in main_lane:
            marker = out / "done" / stage.name
            label = f"[{number[stage.name]}/{len(stages)}] {stage.name}"
            if skipped(stage):
                continue
            while not all((out / "done" / a).is_file() for a in stage.after):
                if side is None or side.failed or not side.is_alive():
                    raise NanoseekError(side.failed if side is not None and side.failed else
                                        f"stage {stage.name} needs {', '.join(stage.after)}, which did not finish")
                bar.set_description_str(f"{label}: waiting for lane 2 ({', '.join(stage.after)})")
                time.sleep(0.5)
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
            write_text_atomically(elapsed_file, f"{elapsed_before + time.time() - t_start:.1f}\n")
            finished(stage, time.time() - t0)
    finally:
        if side is not None:
            side.halt()
        bar.close()
    write_text_atomically(elapsed_file, f"{elapsed_before + time.time() - t_start:.1f}\n")
    print(f"speedrun finished in {_minutes(time.time() - t_start)} (this session). Report card: {out / 'report.md'}")
    print("Talk to the reasoning model (GRPO) or the distilled student:")
    print(f"  nanoseek chat --model {out / 'rl' / 'final'}")
    print(f"  nanoseek serve --model {out / 'rl' / 'final'}      # then open http://127.0.0.1:8000")
    print(f"  nanoseek chat --model {out / 'distill' / 'final'}")
