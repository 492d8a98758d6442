"""Reasoning end to end, R1-style: a small cold-start SFT, then GRPO on fresh prompts with rule-based rewards, against
a control that spends the same compute on more SFT; optionally distillation of the RL model into a dense student.

    python benchmarks/bench_reasoning.py --quick                      # <= 10 min on 2 cores: SFT, eval, GRPO, eval
    python benchmarks/bench_reasoning.py [--seed S]                   # the full setting, + the SFT control
    python benchmarks/bench_reasoning.py --distill --workdir DIR      # + distillation vs GRPO for a dense student
    python benchmarks/bench_reasoning.py --dynamic-sampling 4         # GRPO with DAPO dynamic sampling (4 rounds)
    python benchmarks/bench_reasoning.py --plot OUT.png DIR [DIR...]  # curves of finished runs' work directories
    python benchmarks/bench_reasoning.py --zero --base BASE/final     # R1-Zero vs SFT-then-RL from one base model
    python benchmarks/bench_reasoning.py --stage3                     # + R1's stage 3 and the self-SFT control

The setting (docs/reasoning.md, "Demonstration"):

- cold start: a tiny model (the `test` preset, or --model-config) trained from scratch on a LIMITED set of verified
  traces (--cold-start, default 200 train problems), as R1's cold start is a small set of long-CoT examples, for
  --sft-steps (default 3000); checkpoints every --select-every steps are scored on validation problems (train
  split, none of the traces) and the best one is the cold start, so the SFT is trained to its best point without
  looking at the test split;
- GRPO: prompts only, drawn fresh from the train split (another seed), scored by the task's rules (default 800 steps
  at lr 1e-4);
- control: more SFT from the same checkpoint on the same cold-start traces (more epochs), for as much compute as GRPO
  used, matched in FLOPs (forward + backward tokens of training, forward tokens of sampling; the wall-clock match is
  recorded too);
- distillation (--distill): verified samples of the GRPO model (`nanoseek sample --keep-correct`) train a fresh
  dense student (`nanoseek distill`); against it, the same dense student trained by the cold-start SFT and then GRPO,
  with the distilled student given the same number of FLOPs as that SFT + GRPO (the teacher's cost is not counted, as
  in R1's comparison).

--stage3 adds three rows (docs/reasoning.md, "R1's stage 3 and the self-SFT control"), each evaluated like the
others and compared with the cold start and with GRPO by paired tests (paired_comparison):

- self-SFT, the control the one above is missing (expert iteration / STaR): `sample --keep-correct` of the cold start
  on fresh train problems, then SFT from the cold start on those verified samples, sampling + SFT matched in FLOPs to
  GRPO (--self-sample-frac of them for the sampling);
- stage 3 SFT: `sample --keep-correct` of the GRPO model on --stage3-problems fresh train problems, SFT on the
  cold-start traces + those with the cold start's recipe from the cold start's starting point (a fresh init, as R1
  re-trains the base; --stage3-init), checkpoint picked on the same validation problems;
- stage 3 SFT + GRPO: --stage3-rl-steps of GRPO from it, on fresh prompts.

Sampled problems that are cold-start traces or validation problems are dropped before any SFT.

--zero compares R1-Zero with the R1 path from ONE pre-trained base (--base, or one pre-trained here on the task's
worked traces as plain text): GRPO straight from the base with the R1-Zero template (`nanoseek rl --zero`), against
SFT on --cold-start traces (chat template) then GRPO. Both GRPO runs have the same steps, prompts, samples, length and
lr, so the same rollouts; the SFT path also pays for its SFT, which the result records in token-equivalents. Accuracy
is measured on the VALIDATION split only (the rl monitor every --eval-every steps, greedy, and a final `eval --split
val`), with mean response length and reward over steps from rl_log.jsonl; curves in WORKDIR/zero_curves.png.
`--arm zero` / `--arm sft` run one side only (two processes on two cores); a run of both then assembles the result.

--quick is a reduced version: 400 traces, 1500 SFT steps (the last one; no validation pass), 100 GRPO steps at 1e-4,
200 test problems, no control. The earlier setting of the doc is `--cold-start 1000 --sft-steps 900 --select-every 0
--rl-steps 100 --rl-lr 3e-5`.

pass@1 is R1's: the mean correctness of k=4 samples at temperature 0.6, top-p 0.95, per held-out (test split)
problem; greedy pass@1, pass@4 and maj@4 are reported too, each with its 95% interval.

Every stage runs through the `nanoseek` CLI in a work directory (default: a temporary one). A stage whose output
already exists in --workdir is skipped, so an interrupted run can be continued; a finished run given more
--rl-steps continues its GRPO and its control from their last step (constant lr: the same as the longer run). The
LAST line printed is a JSON object: {"task", "n", "before", "after", ...} with pass@1 fractions; the same object goes
to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanoseek.cli import main as nanoseek  # noqa: E402
from nanoseek.commands.speedrun import write_trace_corpus  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.tasks import Problem, Task, format_completion, load_task  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from nanoseek.train.evaluate import evaluate as evaluate_engine  # noqa: E402
from nanoseek.train.evaluate import paired_comparison  # noqa: E402
from nanoseek.train.grpo import RL_DRAW_OFFSET  # noqa: E402
from nanoseek.train.rollout import load_engine, prompt_ids  # noqa: E402
from nanoseek.train.sft import dense_student_config  # noqa: E402

TASKS = {"arithmetic": "arithmetic:min_digits=2,max_digits=2,ops=+-",  # 2-digit addition and subtraction
         # 3-4 one-digit numbers, targets up to 30: ~1,180 distinct test problems (3 numbers alone have only 148)
         "countdown": "countdown:min_numbers=3,max_numbers=4,max_number=9,max_target=30"}
K = 4  # samples per test problem for pass@1 (R1: pass@1 averaged over k samples)
SAMPLE_K = 4  # samples per train problem of the rejection sampling (--stage3, --distill)
# --stage3's draw seeds, offsets from --seed that no other stage uses: the cold-start traces are drawn with the seed
# itself, GRPO's prompts with RL_DRAW_OFFSET + seed + 100, the distillation's samples with seed + 200, the validation
# problems with seed + 10_000
SELF_SEED_OFFSET = 300  # the self-SFT control's sampled problems
STAGE3_SEED_OFFSET = 400  # stage 3's rejection-sampled problems
STAGE3_RL_SEED_OFFSET = 500  # stage 3's GRPO (its prompts: RL_DRAW_OFFSET + seed + 500)
STAGE3_ROWS = {"sft": "cold-start SFT", "rl": "+ GRPO", "control": "+ SFT control, same traces (FLOP-matched)",
               "self_sft": "SFT on own verified samples (FLOP-matched)",
               "stage3_sft": "stage 3 SFT (rejection-sampled)", "stage3_rl": "stage 3 SFT + GRPO"}
MAX_NEW_TOKENS = 160  # reference traces: <= 131 tokens for arithmetic, <= 145 for 3-4-number countdown


def metrics(path: Path) -> dict[str, dict[str, float]]:
    """{metric: {"value", "low", "high"}} of an `nanoseek eval --json` file (the 95% interval as low/high)."""
    out = {}
    for name, v in json.loads(path.read_text())["metrics"].items():
        if isinstance(v, dict):
            lo, hi = v.get("ci95", (None, None))
            out[name] = {"value": v["value"], "low": lo, "high": hi}
    return out


def validation_problems(task: Task, n: int, seed: int, exclude: list[Problem]) -> list[Problem]:
    """n train-split problems that are not among `exclude` (the cold-start traces): the validation set that picks the
    cold start's step count. Never the test split, which only reports. Problems are compared by identity (countdown:
    the sorted numbers and target), so a trace's problem with its numbers in another order is excluded too."""
    seen = {q.identity for q in exclude}
    out = []
    for q in task.problems("train", 2 * n + len(seen), seed=seed):  # problems may repeat within a split
        if q.identity not in seen and len(out) < n:
            out.append(q)
            seen.add(q.identity)
    if len(out) < n:
        raise NanoseekError(f"only {len(out)} validation problems outside the {len(seen)} cold-start traces")
    return out


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the saved training checkpoints of a run, by step."""
    found = [(int(d.name.split("_")[1]), d) for d in (run_dir / "checkpoints").glob("step_*") if d.is_dir()]
    return sorted(found)


def select_checkpoint(work: Path, task: Task, n_val: int, cold_start: int, seed: int, threads: int,
                      run: str = "sft") -> tuple[Path, dict]:
    """The checkpoint of work/run (the cold start by default) with the best validation pass@1 (mean of K samples;
    ties go to the earlier step), and the validation curve. Cached in work/val_curve.json (val_curve_<run>.json for
    another run) so a continued run does not redo it."""
    cache = work / ("val_curve.json" if run == "sft" else f"val_curve_{run}.json")
    if cache.exists():
        curve = json.loads(cache.read_text())
    else:
        torch.set_num_threads(threads)
        val = validation_problems(task, n_val, seed + 10_000, task.problems("train", cold_start, seed=seed))
        curve = []
        for step, ckpt in checkpoints(work / run):
            r = evaluate_engine(load_engine(ckpt, 100), Tokenizer.from_dir(ckpt), task, val, k=K,
                                max_new_tokens=MAX_NEW_TOKENS, seed=seed + 10_000, greedy=False)
            curve.append({"step": step, "val_pass@1": r["metrics"][f"pass@1_sampled_mean@{K}"]["value"],
                          "val_pass@k": r["metrics"][f"pass@{K}"]["value"]})
            print(f"validation ({n_val} train problems): step {step}  pass@1 {curve[-1]['val_pass@1']:.3f}  "
                  f"pass@{K} {curve[-1]['val_pass@k']:.3f}", flush=True)
        cache.write_text(json.dumps(curve, indent=1) + "\n")
    best = max(curve, key=lambda c: (c["val_pass@1"], -c["step"]))
    print(f"{'cold start' if run == 'sft' else run}: step {best['step']} (validation pass@1 "
          f"{best['val_pass@1']:.3f})", flush=True)
    return work / run / "checkpoints" / f"step_{best['step']:06d}", {"val_curve": curve, "val_n": n_val,
                                                                     "selected_step": best["step"]}


def sft_step_cost(run_dir: Path) -> tuple[float, float]:
    """(token-equivalents, seconds) per optimizer step of an SFT run, from its run.json. A token-equivalent is one
    token through forward + backward (~6 x active params FLOPs); both runs have the same model, so FLOPs are
    proportional to it."""
    r = json.loads((run_dir / "run.json").read_text())
    return r["tokens"] / r["steps"], r["train_seconds"] / r["steps"]


def rl_cost(run_dir: Path, prompt_len: float, rollouts: int = 128) -> tuple[float, float]:
    """(token-equivalents, seconds) of a GRPO run. Training: the trainer's tokens (padded [prompt ‖ completion] rows
    of the groups that were kept), forward + backward; sampling: every prompt and completion token of all B x G
    rollouts, forward only, so a third of a token-equivalent. Seconds: the run's wall time (sampling + training)."""
    r = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "rl_log.jsonl").read_text().splitlines()]
    # rollouts a step: B x G, or more with --dynamic-sampling (logged per step)
    sampled = sum(row.get("rollouts", rollouts) * (prompt_len + row["response_len_mean"]) for row in rows)
    return r["tokens"] + sampled / 3, r["wall_seconds"]


def self_sft_budget(rl_tokens: float, step_tokens: float, prompt_len: float, completion_len: float, k: int,
                    sample_frac: float) -> dict[str, float]:
    """Split GRPO's token-equivalents between the self-SFT control's two parts: sampling `problems` x k completions
    (every prompt and completion token forward only: a third of a token-equivalent, as rl_cost counts GRPO's
    rollouts) for about `sample_frac` of them, and SFT steps (step_tokens each, the cold start's) for the rest.
    completion_len is the model's mean sampled completion length (its eval: same temperature, top-p and
    max_new_tokens)."""
    per_problem = k * (prompt_len + completion_len) / 3
    problems = max(1, math.floor(sample_frac * rl_tokens / per_problem))
    sampling = problems * per_problem
    steps = max(1, math.ceil((rl_tokens - sampling) / step_tokens))
    return {"problems": problems, "sampling_token_equivalents": sampling, "sft_steps": steps}


def keep_fresh_traces(task: Task, samples: Path, out: Path, n: int, seed: int, exclude: list[Problem],
                      ) -> dict[str, int]:
    """Copy the records of `nanoseek sample -n n --seed seed` (samples) to out, less those whose problem (by
    identity) is in `exclude` (the cold-start traces and the validation problems: a sampled problem that is one of
    them would be trained on twice, or would bias the validation pick). Returns the counts."""
    problems = task.problems("train", n, seed=seed)  # what `sample` drew: a record's "problem" indexes it
    seen = {q.identity for q in exclude}
    kept, dropped = [], 0
    for line in samples.read_text().splitlines():
        if line.strip():
            if problems[json.loads(line)["problem"]].identity in seen:
                dropped += 1
            else:
                kept.append(line)
    out.write_text("".join(line + "\n" for line in kept))
    distinct = {json.loads(line)["problem"] for line in kept}
    return {"problems": n, "traces": len(kept), "problems_with_trace": len(distinct), "dropped_seen": dropped}


def stage3_table(rows: dict[str, str], evals: dict[str, dict], paired: dict[str, dict]) -> str:
    """The stage-3 comparison as a text table, a row per model (rows: eval name -> label): pass@1 with its 95%
    interval, greedy pass@1, and the paired difference of pass@1 in points with its p-value against the cold start
    ("<name>_vs_sft" in paired) and against GRPO ("<name>_vs_rl")."""
    sampled = f"pass@1_sampled_mean@{K}"
    lines = [f"{'model':<48} {'pass@1 [95% CI]':<22} {'greedy':<7} {'vs cold start (p)':<20} vs GRPO (p)"]
    for name, label in rows.items():
        m = evals[name]["metrics"]
        lo, hi = m[sampled]["ci95"]
        cells = []
        for ref in ("sft", "rl"):
            c = paired.get(f"{name}_vs_{ref}", {}).get("sampled")
            cells.append(f"{100 * c['delta']:+.1f} (p={c['p']:.2g})" if c else "")
        lines.append(f"{label:<48} {m[sampled]['value']:.3f} [{lo:.3f}, {hi:.3f}]   {m['pass@1_greedy']['value']:.3f}"
                     f"   {cells[0]:<20} {cells[1]}")
    return "\n".join(lines)


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over `window` steps (the per-step values of 128 samples are noisy)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_runs(work_dirs: list[Path], path: Path) -> None:
    """One figure for several bench work directories (e.g. seeds): the cold start's validation pass@1 against SFT
    step (when --select-every was used), then over GRPO steps the training samples' accuracy reward, the fraction of
    groups with all-equal rewards, and the mean response length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax_val, ax_acc, ax_zero, ax_len = fig.subplots(1, 4)
    for i, work in enumerate(work_dirs):
        color = f"C{i}"
        if (work / "val_curve.json").exists():
            curve = json.loads((work / "val_curve.json").read_text())
            ax_val.plot([c["step"] for c in curve], [c["val_pass@1"] for c in curve], "o-", color=color,
                        label=work.name)
        rows = [json.loads(line) for line in (work / "rl" / "rl_log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows]
        for ax, key in ((ax_acc, "accuracy"), (ax_zero, "frac_zero_std"), (ax_len, "response_len_mean")):
            ax.plot(steps, [r[key] for r in rows], color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth([r[key] for r in rows], max(10, len(rows) // 40)), color=color, label=work.name)
    ax_val.set_title("cold start: validation pass@1 (train split)")
    ax_val.set_xlabel("SFT step")
    ax_acc.set_title("GRPO: accuracy of the training samples (T = 1)")
    ax_zero.set_title("GRPO: groups with all-equal rewards")
    ax_len.set_title("GRPO: mean response length (tokens)")
    for ax in (ax_val, ax_acc, ax_zero, ax_len):
        if ax is not ax_val:
            ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_val, ax_acc, ax_zero):
        ax.set_ylim(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def rl_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per GRPO step: reward, its accuracy and format parts, mean response length (rl_log.jsonl); and the validation
    monitor's greedy accuracy by step (history["heldout"] of the run's last checkpoint)."""
    rows = [json.loads(line) for line in (run_dir / "rl_log.jsonl").read_text().splitlines()]
    curves = {key: [r[key] for r in rows] for key in ("step", "reward", "reward_accuracy", "reward_format",
                                                      "response_len_mean", "frac_zero_std")}
    last = checkpoints(run_dir)[-1][1]
    heldout = json.loads((last / "trainer_state.json").read_text())["history"].get("heldout", [])
    curves["val_step"] = [h["step"] for h in heldout]
    curves["val_greedy"] = [h["accuracy"] for h in heldout]
    return curves


def plot_zero(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """R1-Zero vs SFT-then-GRPO over GRPO steps: validation greedy accuracy, training reward (accuracy + format)
    and mean response length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax_val, ax_rew, ax_len = fig.subplots(1, 3)
    for i, (name, c) in enumerate(curves.items()):
        ax_val.plot(c["val_step"], c["val_greedy"], "o-", color=f"C{i}", label=name)
        for ax, key in ((ax_rew, "reward"), (ax_len, "response_len_mean")):
            ax.plot(c["step"], c[key], color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(c["step"], smooth(c[key]), color=f"C{i}", label=name)
    ax_val.set_title("validation greedy pass@1")
    ax_rew.set_title("training reward (accuracy + 0.1 format), T = 1")
    ax_len.set_title("mean response length (tokens)")
    for ax in (ax_val, ax_rew, ax_len):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def run_zero(args: argparse.Namespace, spec: str, work: Path, stage: Callable[..., None],
             times: dict[str, float]) -> dict | None:
    """R1-Zero against SFT-then-GRPO from one base model (--zero; the module docstring). Returns the result, or None
    when only one --arm ran."""
    threads, seed = ["--threads", str(args.threads)], ["--seed", str(args.seed)]
    base = args.base
    if base is None:  # a base pre-trained here, on the task's worked problems as plain text (as the speedrun does)
        corpus = work / "corpus" / "traces.jsonl"
        if not corpus.exists():
            corpus.parent.mkdir(parents=True, exist_ok=True)
            write_trace_corpus(spec, args.pretrain_traces, corpus)
        shape = ["--config", str(args.model_config)] if args.model_config else ["--preset", args.preset]
        stage("pretrain", ["pretrain", *shape, "--data", str(corpus), "--steps", str(args.pretrain_steps),
                           "--batch-size", "16", "--seq-len", "256", "--warmup-steps",
                           str(max(1, args.pretrain_steps // 20)), "--eval-every", str(args.pretrain_steps),
                           "--sample-every", "0", "--save-every", "0", *seed, *threads,
                           "--out", str(work / "pretrain")],
              work / "pretrain" / "final")
        base = work / "pretrain" / "final"
    rl_common = ["--task", spec, "--steps", str(args.rl_steps), "-B", str(args.prompts_per_step), "-G",
                 str(args.group_size), "--max-new-tokens", str(MAX_NEW_TOKENS), "--lr", str(args.rl_lr),
                 "--warmup-steps", "3", "--eval-every", str(args.eval_every), "--eval-n", str(args.val_n),
                 "--save-every", "0", "--seed", str(args.seed + 100), *threads]

    def evaluate(name: str, model: Path, zero: bool) -> None:
        out = work / f"eval_{name}.json"
        stage(f"eval_{name}", ["eval", "--model", str(model), "--task", spec, "--split", "val", "-n", str(args.n),
                               "--k", str(K), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "100",
                               *(["--zero"] if zero else []), *seed, *threads, "--json", str(out)], out)

    if args.arm in ("zero", "both"):
        evaluate("base", base, zero=True)
        stage("zero_rl", ["rl", "--zero", "--model", str(base), *rl_common, "--out", str(work / "zero_rl")],
              work / "zero_rl" / "final", args.rl_steps)
        evaluate("zero_rl", work / "zero_rl" / "final", zero=True)
    if args.arm in ("sft", "both"):
        stage("sft", ["sft", "--model", str(base), "--task", spec, "--n", str(args.cold_start), "--steps",
                      str(args.sft_steps), "--lr", str(args.sft_lr), "--warmup-steps", "20", "--batch-size", "32",
                      "--mtp-lambda", "0", "--save-every", "0", *seed, *threads, "--out", str(work / "sft")],
              work / "sft" / "final")
        evaluate("sft", work / "sft" / "final", zero=False)
        stage("sft_rl", ["rl", "--model", str(work / "sft" / "final"), *rl_common, "--out", str(work / "sft_rl")],
              work / "sft_rl" / "final", args.rl_steps)
        evaluate("sft_rl", work / "sft_rl" / "final", zero=False)
    if args.arm != "both":
        return None

    evals = {name: json.loads((work / f"eval_{name}.json").read_text()) for name in ("base", "zero_rl", "sft",
                                                                                      "sft_rl")}
    sampled = f"pass@1_sampled_mean@{K}"
    tok = Tokenizer.from_dir(base)
    task = load_task(spec)
    probe = task.problems("train", 200, args.seed + 100)
    curves = {"R1-Zero (GRPO from the base)": rl_curves(work / "zero_rl"),
              "SFT then GRPO": rl_curves(work / "sft_rl")}
    plot_zero(curves, work / "zero_curves.png")
    cost = {}
    for arm, zero in (("zero_rl", True), ("sft_rl", False)):
        prompt_len = sum(len(prompt_ids(tok, q, zero)) for q in probe) / len(probe)
        cost[arm] = rl_cost(work / arm, prompt_len, args.group_size * args.prompts_per_step)[0]
    sft_tokens = json.loads((work / "sft" / "run.json").read_text())["tokens"]
    return {
        "task": spec, "base": str(base), "split": "val", "n": evals["base"]["n"],
        "metric": f"pass@1 = mean correctness of {K} samples (temperature 0.6, top-p 0.95) per validation problem",
        "pass@1": {name: e["metrics"][sampled]["value"] for name, e in evals.items()},
        "pass@1_greedy": {name: e["metrics"]["pass@1_greedy"]["value"] for name, e in evals.items()},
        "format_sampled": {name: e["metrics"]["format_sampled"] for name, e in evals.items()},
        "mean_tokens_sampled": {name: e["sampled_mean_tokens"] for name, e in evals.items()},
        "zero_rl_vs_sft_rl": paired_comparison(evals["zero_rl"], evals["sft_rl"]),
        "zero_rl_vs_base": paired_comparison(evals["base"], evals["zero_rl"]),
        "sft_rl_vs_sft": paired_comparison(evals["sft"], evals["sft_rl"]),
        "compute": {"matched": "equal GRPO steps, prompts x samples, max_new_tokens and lr in both arms; the SFT "
                               "arm also spends its SFT",
                    "zero_rl_token_equivalents": cost["zero_rl"], "sft_rl_token_equivalents": cost["sft_rl"],
                    "sft_token_equivalents": sft_tokens},
        "cold_start_traces": args.cold_start, "sft_steps": args.sft_steps, "sft_lr": args.sft_lr,
        "rl_steps": args.rl_steps, "rl_lr": args.rl_lr, "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step, "max_new_tokens": MAX_NEW_TOKENS, "seed": args.seed,
        "threads": args.threads, "stage_seconds": times,
        # from the runs' own records, so a result assembled from finished stages still has them
        "wall_seconds": {**{run: json.loads((work / run / "run.json").read_text())["wall_seconds"]
                            for run in ("zero_rl", "sft", "sft_rl")},
                         **{f"eval_{name}": e["seconds"] for name, e in evals.items()}},
        "curves": curves, "eval_metrics": {name: e["metrics"] for name, e in evals.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (<= 10 min on 2 cores): no control")
    p.add_argument("--task", default="arithmetic", help=f"{' or '.join(TASKS)}, or any task spec")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per stage (default 1: the matrices are tiny, and on a shared 2-core machine a "
                        "second thread mostly adds contention)")
    p.add_argument("--cold-start", type=int,
                   help="verified traces for the cold-start SFT (default 200; 400 with --quick)")
    p.add_argument("--sft-steps", type=int, help="cold-start SFT steps, batch 32 (default 3000; 1500 with --quick)")
    p.add_argument("--select-every", type=int,
                   help="save the cold start every N steps and continue (GRPO, control) from the checkpoint with the "
                        "best validation pass@1 (default 250; 0 = the last step, the default with --quick)")
    p.add_argument("--val-n", type=int, default=200,
                   help="validation problems for --select-every: train split, none of the cold-start traces")
    p.add_argument("--model-config", type=Path, metavar="JSON",
                   help="config.json of the cold-start model (default: the `test` preset), e.g. "
                        "benchmarks/configs/test_h128.json; its file name goes into the result's name")
    p.add_argument("--rl-steps", type=int, help="GRPO steps of -B prompts x -G samples (default 800; 100 with --quick)")
    p.add_argument("--rl-lr", type=float, default=1e-4, help="GRPO learning rate (default 1e-4)")
    p.add_argument("-G", "--group-size", type=int, default=8, help="GRPO samples per prompt (default 8)")
    p.add_argument("-B", "--prompts-per-step", type=int, default=16, help="GRPO prompts per step (default 16)")
    p.add_argument("--mu", type=int, default=1, help="GRPO policy updates per batch of samples (default 1)")
    p.add_argument("--epsilon-high", type=float,
                   help="GRPO clip-higher: rho <= 1 + EPSILON_HIGH (default: 0.2 both sides; only acts with --mu > 1)")
    p.add_argument("--dynamic-sampling", type=int, metavar="ROUNDS", default=0,
                   help="GRPO with DAPO dynamic sampling, up to ROUNDS batches of fresh prompts a step (default 0: "
                        "off); the control is FLOP-matched to every sampled rollout")
    p.add_argument("--control-lr", type=float, default=3e-4,
                   help="lr of the SFT control (default 3e-4: where the cold-start SFT's schedule ended)")
    p.add_argument("-n", type=int, help="held-out problems for each eval (default 200 quick, 500 full)")
    p.add_argument("--stage3", action="store_true",
                   help="also R1's stage 3 (rejection sampling from the GRPO model, SFT on the cold-start traces + "
                        "those, GRPO again) and the self-SFT control (SFT from the cold start on its own verified "
                        "samples of fresh prompts, FLOP-matched to GRPO)")
    p.add_argument("--self-sample-frac", type=float, default=0.5,
                   help="with --stage3: the share of GRPO's FLOPs the self-SFT control spends on sampling (default "
                        "0.5; the rest trains)")
    p.add_argument("--stage3-problems", type=int, default=2000,
                   help=f"with --stage3: fresh train problems to sample the GRPO model on, {SAMPLE_K} samples each "
                        f"(default 2000)")
    p.add_argument("--stage3-init", choices=("auto", "scratch", "cold-start"), default="auto",
                   help="with --stage3: where stage 3's SFT starts: a fresh init (R1), the cold-start checkpoint, or "
                        "auto (default): a fresh init, and also the cold start if that stays below the cold start's "
                        "validation pass@1; the better on validation is kept")
    p.add_argument("--stage3-rl-steps", type=int, help="with --stage3: GRPO steps after stage 3 (default: --rl-steps)")
    p.add_argument("--distill", action="store_true", help="also distil the GRPO model into a dense student")
    p.add_argument("--distill-problems", type=int, default=1000,
                   help="train problems to sample the GRPO teacher on, 4 samples each (default 1000)")
    p.add_argument("--student-rl-steps", type=int, help="GRPO steps of the dense student (default: --rl-steps)")
    p.add_argument("--zero", action="store_true",
                   help="R1-Zero (GRPO from the base, R1-Zero template) vs SFT-then-GRPO from the same base, equal "
                        "GRPO steps and samples, on the validation split (defaults: --cold-start 2000, --sft-steps "
                        "300, --rl-steps 100, -n 200)")
    p.add_argument("--base", type=Path, help="with --zero: the pre-trained base model directory (default: pre-train "
                                             "one here on --pretrain-traces worked problems)")
    p.add_argument("--preset", default="small",
                   help="with --zero and no --base: the base's preset when --model-config is not given (default "
                        "small: its 512-token context holds the ~160-token template and the answer)")
    p.add_argument("--pretrain-steps", type=int, default=600,
                   help="with --zero and no --base: pre-training steps of 16 x 256 tokens (default 600)")
    p.add_argument("--pretrain-traces", type=int, default=20000,
                   help="with --zero and no --base: worked train problems, as plain text, to pre-train on")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="with --zero: lr of the SFT from the base (default 1e-3)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="with --zero: greedy validation accuracy every N GRPO steps (default 10)")
    p.add_argument("--arm", choices=("zero", "sft", "both"), default="both",
                   help="with --zero: run only one side (then no result is written)")
    p.add_argument("--result", type=Path, help="write the result JSON here (default: benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, nargs="+", metavar=("PNG", "WORKDIR"),
                   help="only plot: PNG, then the --workdir of finished runs (validation and GRPO curves)")
    args = p.parse_args()
    if args.plot:
        plot_runs(args.plot[1:], args.plot[0])
        return
    spec = TASKS.get(args.task, args.task)
    if args.zero:  # the R1-Zero comparison's own defaults: the speedrun's cold start and a short GRPO run
        for name, default in (("cold_start", 2000), ("sft_steps", 300), ("rl_steps", 100), ("n", 200)):
            if getattr(args, name) is None:
                setattr(args, name, default)
        args.select_every = 0
    if args.stage3 and args.select_every is None:  # stage 3's SFT is picked on validation, as the cold start
        args.select_every = 250
    # defaults: the setting of docs/reasoning.md, "Demonstration"; --quick is a reduced version of it that needs no
    # validation pass (more traces, so the cold start learns the algorithm in half the steps)
    for name, full, quick in (("cold_start", 200, 400), ("sft_steps", 3000, 1500), ("select_every", 250, 0),
                              ("rl_steps", 800, 100), ("n", 500, 200)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    rl_steps, n_eval = args.rl_steps, args.n
    if args.stage3 and (args.zero or not args.select_every):
        raise NanoseekError("--stage3 picks stage 3's SFT checkpoint on validation like the cold start's: it needs "
                            "--select-every N > 0, and not --zero")
    t_start = time.time()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_reasoning_")
        args.workdir = Path(tmp.name)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    seed = ["--seed", str(args.seed)]
    times: dict[str, float] = {}
    continued: dict[str, int] = {}  # stage -> the step a finished shorter run of it was continued from

    def stage(name: str, argv: list[str], output: Path, steps: int | None = None) -> None:
        """Run `nanoseek argv` unless `output` already exists (a finished stage of an earlier run). A finished
        training run (output = <run>/final) of fewer than `steps` steps is continued with --resume instead: GRPO and
        the control run at a constant lr on step-indexed data, so that is the run `steps` would have been from the
        start."""
        # a training run records the arguments it was started with: reusing it for other settings would be wrong
        recorded = output.parent / "bench_argv.json" if output.name == "final" else None
        settings = [a for i, a in enumerate(argv) if a not in ("--steps", "--resume") and argv[i - 1] != "--steps"]
        if output.exists():
            if recorded is not None and recorded.exists() and json.loads(recorded.read_text()) != settings:
                raise NanoseekError(f"{output.parent} holds a {name} run with other settings "
                                    f"({recorded}): pick another --workdir")
            done = json.loads((output.parent / "run.json").read_text())["steps"] if steps else None
            if done is None or done == steps:
                print(f"\n[{name}: {output} exists, skipped]", flush=True)
                return
            if done > steps:
                raise NanoseekError(f"{output.parent} holds a {done}-step {name} run, longer than the {steps} steps "
                                    f"asked for: pick another --workdir")
            print(f"\n[{name}: continuing the {done}-step run in {output.parent} to {steps} steps]", flush=True)
            continued[name] = done
            argv = [*argv, "--resume"]
        print(f"\n$ nanoseek {' '.join(argv)}", flush=True)
        t0 = time.time()
        if recorded is not None:
            recorded.parent.mkdir(parents=True, exist_ok=True)
            recorded.write_text(json.dumps(settings) + "\n")
        nanoseek(argv)
        times[name] = round(time.time() - t0, 1)

    def evaluate(name: str, model: Path) -> dict[str, dict[str, float]]:
        out = work / f"eval_{name}.json"
        if out.exists() and out.stat().st_mtime < (model / "model.safetensors").stat().st_mtime:
            out.unlink()  # the model was trained further since (a continued run): evaluate it again
        stage(f"eval_{name}", ["eval", "--model", str(model), "--task", spec, "-n", str(n_eval), "--k", str(K),
                               "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "100", *seed, *threads,
                               "--json", str(out)], out)
        return metrics(out)

    if args.zero:
        result = run_zero(args, spec, work, stage, times)
        if result is not None:
            out = args.result or ROOT / "benchmarks" / "results" / (
                f"bench_reasoning_zero_{args.task if args.task in TASKS else 'custom'}_cs{args.cold_start}_sft"
                f"{args.sft_steps}_rl{rl_steps}_lr{args.rl_lr:g}_seed{args.seed}.json")
            result["seconds"] = round(time.time() - t_start, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k not in ("curves", "eval_metrics")}))
        if tmp is not None:
            tmp.cleanup()
        return

    # 1. a tokenizer for the task: BPE on 2000 train traces (prompt + completion)
    task = load_task(spec)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = [q.prompt + "\n" + format_completion(*task.solution_trace(q)) for q in task.problems("train", 2000, 1)]
        train_tokenizer(texts, vocab_size=512, out_dir=tok_dir)
    tok = Tokenizer.from_dir(tok_dir)

    # 2. cold start: SFT from scratch on a limited set of verified traces
    cold = ["--task", spec, "--n", str(args.cold_start)]
    sft_common = ["--batch-size", "32", "--mtp-lambda", "0", "--save-every", "0", *seed, *threads]
    keep = ["--save-every", str(args.select_every), "--keep-last", str(args.sft_steps // args.select_every + 1)] \
        if args.select_every else []
    shape = ["--config", str(args.model_config)] if args.model_config else ["--preset", "test"]
    stage("sft", ["sft", *shape, "--tokenizer", str(tok_dir), *cold, "--steps", str(args.sft_steps),
                  "--lr", "3e-3", "--warmup-steps", "20", *sft_common, *keep, "--out", str(work / "sft")],
          work / "sft" / "final")
    sft = work / "sft" / "final"
    selection = None
    if args.select_every:
        # early stopping on validation: with few traces the cold start can overfit before its last step
        sft, selection = select_checkpoint(work, task, args.val_n, args.cold_start, args.seed, args.threads)
    sft_m = evaluate("sft", sft)

    # 3. GRPO from the cold-start model, on fresh train prompts (another seed than the cold-start traces)
    rl_seed = str(args.seed + 100)
    dynamic = ["--dynamic-sampling", "--max-sampling-rounds", str(args.dynamic_sampling)] if args.dynamic_sampling \
        else []
    clip_high = ["--epsilon-high", str(args.epsilon_high)] if args.epsilon_high is not None else []

    def rl_args(steps: int, rl_seed: str = rl_seed) -> list[str]:
        return ["--task", spec, "--steps", str(steps), "-B", str(args.prompts_per_step), "-G", str(args.group_size),
                "--mu", str(args.mu), *clip_high, "--max-new-tokens", str(MAX_NEW_TOKENS), "--lr", str(args.rl_lr),
                "--warmup-steps", "3", "--eval-every", "0", "--save-every", "0", "--seed", rl_seed, *threads,
                *dynamic]

    stage("rl", ["rl", "--model", str(sft), *rl_args(rl_steps), "--out", str(work / "rl")], work / "rl" / "final",
          rl_steps)
    rl_m = evaluate("rl", work / "rl" / "final")

    sampled = f"pass@1_sampled_mean@{K}"
    n_distinct = json.loads((work / "eval_sft.json").read_text())["n"]  # fewer than -n if the test split is smaller
    result = {"task": spec, "n": n_distinct, "before": sft_m[sampled]["value"], "after": rl_m[sampled]["value"],
              "metric": f"pass@1 = mean correctness of {K} samples (temperature 0.6, top-p 0.95) per test problem",
              "before_greedy": sft_m["pass@1_greedy"]["value"], "after_greedy": rl_m["pass@1_greedy"]["value"],
              "sft_metrics": sft_m, "rl_metrics": rl_m, "cold_start_traces": args.cold_start,
              "sft_steps": args.sft_steps, "rl_steps": rl_steps, "rl_lr": args.rl_lr,
              "dynamic_sampling_rounds": args.dynamic_sampling, "group_size": args.group_size,
              "prompts_per_step": args.prompts_per_step, "mu": args.mu, "epsilon_high": args.epsilon_high,
              "model_config": str(args.model_config or "test preset"), "seed": args.seed,
              "threads": args.threads}
    if selection is not None:
        result.update(selection)
        if selection["selected_step"] != args.sft_steps:  # the last step too, to show what early stopping bought
            result["sft_last_metrics"] = evaluate("sft_last", work / "sft" / "final")

    # 4. the control: more SFT on the same cold-start traces, for as much compute as GRPO used
    prompt_len = sum(len(prompt_ids(tok, q)) for q in task.problems("train", 200, args.seed + 100)) / 200
    rl_tokens, rl_seconds = rl_cost(work / "rl", prompt_len, args.group_size * args.prompts_per_step)
    step_tokens, step_seconds = sft_step_cost(work / "sft")
    result.update(rl_token_equivalents=rl_tokens, rl_seconds=rl_seconds, sft_step_token_equivalents=step_tokens,
                  sft_step_seconds=step_seconds)
    if not args.quick:
        # FLOP-matched: deterministic, unlike wall-clock on a shared machine; the wall-clock match is recorded too
        control_steps = math.ceil(rl_tokens / step_tokens)
        result.update(control_steps=control_steps, control_steps_wall_matched=math.ceil(rl_seconds / step_seconds),
                      control_lr=args.control_lr)
        stage("control", ["sft", "--model", str(sft), *cold, "--steps", str(control_steps), "--lr",
                          str(args.control_lr), "--warmup-steps", "0", "--decay-frac", "0", *sft_common,
                          "--out", str(work / "control")], work / "control" / "final", control_steps)
        result["control_metrics"] = evaluate("control", work / "control" / "final")
        result["control"] = result["control_metrics"][sampled]["value"]

    # 4b. R1's stage 3 and the self-SFT control (--stage3)
    if args.stage3:
        cold_traces = task.problems("train", args.cold_start, seed=args.seed)
        val = validation_problems(task, args.val_n, args.seed + 10_000, cold_traces)
        rl_pool = task.problems("train", rl_steps * args.prompts_per_step, seed=RL_DRAW_OFFSET + int(rl_seed))

        def fresh_traces(name: str, model: Path, n: int, seed_: int) -> tuple[Path, dict]:
            """Verified samples of `model` on n train problems drawn with seed_, less the cold-start traces' and
            the validation problems; with how many of their problems GRPO's prompts also held."""
            samples, traces = work / f"{name}_samples.jsonl", work / f"{name}_traces.jsonl"
            stage(f"{name}_sample", ["sample", "--model", str(model), "--task", spec, "-n", str(n), "-k",
                                     str(SAMPLE_K), "--keep-correct", "--max-new-tokens", str(MAX_NEW_TOKENS),
                                     "--batch-size", "128", "--seed", str(seed_), *threads, "--out", str(samples)],
                  samples)
            counts = keep_fresh_traces(task, samples, traces, n, seed_, cold_traces + val)
            grpo_seen = {q.identity for q in rl_pool}
            drawn = task.problems("train", n, seed=seed_)
            counts["problems_also_grpo_prompts"] = len({json.loads(line)["problem"] for line in traces.open()
                                                        if drawn[json.loads(line)["problem"]].identity in grpo_seen})
            return traces, {"seed": seed_, **counts}

        # (a) the missing control: SFT from the cold start on its own verified samples of fresh prompts (expert
        # iteration / STaR), sampling + training matched to GRPO's FLOPs like the control above
        cold_len = json.loads((work / "eval_sft.json").read_text())["sampled_mean_tokens"]
        plan = self_sft_budget(rl_tokens, step_tokens, prompt_len, cold_len, SAMPLE_K, args.self_sample_frac)
        self_traces, self_counts = fresh_traces("self", sft, plan["problems"], args.seed + SELF_SEED_OFFSET)
        if not self_counts["traces"]:
            raise NanoseekError(f"the cold start got no fresh sample of {plan['problems']} problems right: the "
                                f"self-SFT control has nothing to train on")
        stage("self_sft", ["sft", "--model", str(sft), "--data", str(self_traces), "--steps", str(plan["sft_steps"]),
                           "--lr", str(args.control_lr), "--warmup-steps", "0", "--decay-frac", "0", *sft_common,
                           "--out", str(work / "self_sft")], work / "self_sft" / "final")
        self_tokens = json.loads((work / "self_sft" / "run.json").read_text())["tokens"]
        result["self_sft_plan"] = {**plan, **self_counts, "sample_frac": args.self_sample_frac,
                                   "completion_len_estimate": cold_len, "k": SAMPLE_K, "lr": args.control_lr,
                                   "sft_token_equivalents": self_tokens,
                                   "token_equivalents": plan["sampling_token_equivalents"] + self_tokens}
        result["self_sft_metrics"] = evaluate("self_sft", work / "self_sft" / "final")
        result["self_sft"] = result["self_sft_metrics"][sampled]["value"]

        # (b) stage 3: rejection sampling from the GRPO model on fresh prompts, SFT on the cold-start traces + those,
        # from the cold start's starting point (a fresh init, R1's re-training of the base) or, if that stays below
        # the cold start on validation, also from the cold-start checkpoint (the better on validation is kept)
        rl_len = json.loads((work / "eval_rl.json").read_text())["sampled_mean_tokens"]
        s3_traces, s3_counts = fresh_traces("stage3", work / "rl" / "final", args.stage3_problems,
                                            args.seed + STAGE3_SEED_OFFSET)
        cold_val = max(c["val_pass@1"] for c in selection["val_curve"])
        picks: dict[str, tuple[Path, dict]] = {}
        for init, run, start in (("scratch", "stage3_sft", [*shape, "--tokenizer", str(tok_dir)]),
                                 ("cold-start", "stage3_sft_cold", ["--model", str(sft)])):
            best_so_far = max((c["val_pass@1"] for _, sel in picks.values() for c in sel["val_curve"]), default=-1)
            if args.stage3_init == init or (args.stage3_init == "auto" and (init == "scratch" or best_so_far <
                                                                              cold_val)):
                stage(run, ["sft", *start, "--data", str(s3_traces), *cold, "--steps", str(args.sft_steps), "--lr",
                            "3e-3", "--warmup-steps", "20", *sft_common, *keep, "--out", str(work / run)],
                      work / run / "final")
                picks[init] = select_checkpoint(work, task, args.val_n, args.cold_start, args.seed, args.threads,
                                                run=run)
        # the better validation pass@1; a tie goes to the fresh init (R1's choice)
        init = max(picks, key=lambda i: (max(c["val_pass@1"] for c in picks[i][1]["val_curve"]), i == "scratch"))
        s3_sft, s3_sel = picks[init]
        s3_sft_tokens = sum(json.loads((work / run / "run.json").read_text())["tokens"]
                            for run in ("stage3_sft", "stage3_sft_cold") if (work / run / "run.json").exists())
        result["stage3_sft_metrics"] = evaluate("stage3_sft", s3_sft)
        result["stage3_sft"] = result["stage3_sft_metrics"][sampled]["value"]
        s3_rl_steps = args.stage3_rl_steps or rl_steps
        stage("stage3_rl", ["rl", "--model", str(s3_sft), *rl_args(s3_rl_steps, str(args.seed + STAGE3_RL_SEED_OFFSET)),
                            "--out", str(work / "stage3_rl")], work / "stage3_rl" / "final", s3_rl_steps)
        result["stage3_rl_metrics"] = evaluate("stage3_rl", work / "stage3_rl" / "final")
        result["stage3_rl"] = result["stage3_rl_metrics"][sampled]["value"]
        result["stage3"] = {
            **s3_counts, "k": SAMPLE_K, "init": init, "init_rule": args.stage3_init, "cold_start_val_pass@1": cold_val,
            "val_curves": {i: sel["val_curve"] for i, (_, sel) in picks.items()},
            "selected_step": s3_sel["selected_step"], "rl_steps": s3_rl_steps,
            "rl_seed": args.seed + STAGE3_RL_SEED_OFFSET,
            # the pipeline's cost, in token-equivalents (no matching: stage 3 is the recipe, not a control)
            "sampling_token_equivalents": args.stage3_problems * SAMPLE_K * (prompt_len + rl_len) / 3,
            "completion_len_estimate": rl_len, "sft_token_equivalents": s3_sft_tokens,
            "rl_token_equivalents": rl_cost(work / "stage3_rl", prompt_len, args.group_size * args.prompts_per_step)[0]}

        names = ["sft", "rl", *(["control"] if "control_metrics" in result else []), "self_sft", "stage3_sft",
                 "stage3_rl"]
        evals = {name: json.loads((work / f"eval_{name}.json").read_text()) for name in names}
        paired = {f"{name}_vs_{ref}": paired_comparison(evals[ref], evals[name])
                  for name in names for ref in ("sft", "rl") if name not in ("sft", ref)}
        paired["stage3_rl_vs_stage3_sft"] = paired_comparison(evals["stage3_sft"], evals["stage3_rl"])
        result["paired"] = paired
        result["p_values"] = {key: {m: c[m]["p"] for m in ("sampled", "greedy") if m in c}
                              for key, c in paired.items()}
        print("\n" + stage3_table({name: STAGE3_ROWS[name] for name in names}, evals, paired), flush=True)

    # 5. distillation into a dense student vs the same student trained by cold-start SFT + GRPO
    if args.distill:
        cfg = dense_student_config(ModelConfig.load(sft))  # the teacher's shape, every block dense
        cfg_path = work / "student_config.json"
        cfg.save(cfg_path)
        traces = work / "teacher_traces.jsonl"
        stage("sample", ["sample", "--model", str(work / "rl" / "final"), "--task", spec, "-n",
                         str(args.distill_problems), "-k", "4", "--keep-correct", "--max-new-tokens",
                         str(MAX_NEW_TOKENS), "--batch-size", "128", "--seed", str(args.seed + 200), *threads,
                         "--out", str(traces)], traces)
        # the GRPO student: the same cold start as the teacher, on the dense shape, then student_rl_steps of GRPO.
        # The distilled student gets the same FLOPs: the cold start's steps plus the SFT-step equivalent of those GRPO
        # steps, costed from the teacher's GRPO run (same token counts), so distill need not wait for student_rl
        s_rl_steps = args.student_rl_steps or rl_steps
        distill_steps = args.sft_steps + math.ceil(rl_tokens / step_tokens * s_rl_steps / rl_steps)
        stage("distill", ["distill", "--teacher-data", str(traces), "--teacher", str(work / "rl" / "final"),
                          "--student-config", str(cfg_path), "--steps", str(distill_steps), "--lr", "3e-3",
                          "--warmup-steps", "20", *sft_common, "--out", str(work / "distill")],
              work / "distill" / "final")
        stage("student_sft", ["sft", "--config", str(cfg_path), "--tokenizer", str(tok_dir), *cold, "--steps",
                              str(args.sft_steps), "--lr", "3e-3", "--warmup-steps", "20", *sft_common,
                              "--out", str(work / "student_sft")], work / "student_sft" / "final")
        stage("student_rl", ["rl", "--model", str(work / "student_sft" / "final"), *rl_args(s_rl_steps),
                             "--out", str(work / "student_rl")], work / "student_rl" / "final")
        s_rl_cost, _ = rl_cost(work / "student_rl", prompt_len, args.group_size * args.prompts_per_step)
        result.update(teacher_traces=sum(1 for _ in traces.open()), distill_steps=distill_steps,
                      student_rl_steps=s_rl_steps,
                      student_rl_sft_step_equivalents=round(s_rl_cost / sft_step_cost(work / "student_sft")[0], 1),
                      distill_metrics=evaluate("distill", work / "distill" / "final"),
                      student_sft_metrics=evaluate("student_sft", work / "student_sft" / "final"),
                      student_rl_metrics=evaluate("student_rl", work / "student_rl" / "final"))

    result["seconds"] = round(time.time() - t_start, 1)
    result["stage_seconds"] = times
    if continued:
        result["continued_from_step"] = continued
    name = args.task if args.task in TASKS else "custom"
    ds = f"_ds{args.dynamic_sampling}" if args.dynamic_sampling else ""
    variant = "" if (args.group_size, args.prompts_per_step) == (8, 16) \
        else f"_G{args.group_size}B{args.prompts_per_step}"
    variant += f"_mu{args.mu}" if args.mu != 1 else ""
    variant += f"_eh{args.epsilon_high:g}" if args.epsilon_high is not None else ""
    variant += f"_{args.model_config.stem}" if args.model_config else ""
    variant += "_stage3" if args.stage3 else ""
    setting = f"cs{args.cold_start}_sft{args.sft_steps}_rl{rl_steps}_lr{args.rl_lr:g}{ds}{variant}_seed{args.seed}"
    suffix = f"_quick{'_stage3' if args.stage3 else ''}" if args.quick else f"_{name}_{setting}"
    out = args.result or ROOT / "benchmarks" / "results" / f"bench_reasoning{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except NanoseekError as e:  # the bench's own checks (a --workdir that holds other runs): one line, no traceback
        sys.stderr.write(f"bench_reasoning: error: {e}\n")
        sys.exit(2)
