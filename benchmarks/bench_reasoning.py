"""Reasoning end to end, R1-style: a small cold-start SFT, then GRPO on fresh prompts with rule-based rewards, against
a control that spends the same compute on more SFT; optionally distillation of the RL model into a dense student.

    python benchmarks/bench_reasoning.py --quick                      # <= 10 min on 2 cores: SFT, eval, GRPO, eval
    python benchmarks/bench_reasoning.py --task countdown             # + the compute-matched SFT control
    python benchmarks/bench_reasoning.py --distill --workdir DIR      # + distillation vs GRPO for a dense student

The setting (docs/reasoning.md, "Demonstration"):

- cold start: a tiny model (`test` preset) trained from scratch on a LIMITED set of verified traces (--cold-start,
  default 1000 train problems), as R1's cold start is a small set of long-CoT examples;
- GRPO: prompts only, drawn fresh from the train split (another seed), scored by the task's rules;
- control: more SFT from the same checkpoint on the same cold-start traces (more epochs), for as much compute as GRPO
  used, matched in FLOPs (forward + backward tokens of training, forward tokens of sampling; the wall-clock match is
  recorded too);
- distillation (--distill): verified samples of the GRPO model (`nanoseek sample --keep-correct`) train a fresh
  dense student (`nanoseek distill`); against it, the same dense student trained by the cold-start SFT and then GRPO,
  with the distilled student given the same number of FLOPs as that SFT + GRPO (the teacher's cost is not counted, as
  in R1's comparison).

pass@1 is R1's: the mean correctness of k=4 samples at temperature 0.6, top-p 0.95, per held-out (test split)
problem; greedy pass@1, pass@4 and maj@4 are reported too, each with its 95% interval.

Every stage runs through the `nanoseek` CLI in a work directory (default: a temporary one). A stage whose output
already exists in --workdir is skipped, so an interrupted run can be continued. The LAST line printed is a JSON
object: {"task", "n", "before", "after", ...} with pass@1 fractions; the same object goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.cli import main as nanoseek  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.evaluate import prompt_ids  # noqa: E402
from nanoseek.sft import dense_student_config  # noqa: E402
from nanoseek.tasks import format_completion, load_task  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

TASKS = {"arithmetic": "arithmetic:min_digits=2,max_digits=2,ops=+-",  # 2-digit addition and subtraction
         "countdown": "countdown:min_numbers=3,max_numbers=3,max_number=9,max_target=30"}  # 3 one-digit numbers
K = 4  # samples per test problem for pass@1 (R1: pass@1 averaged over k samples)
MAX_NEW_TOKENS = 160  # the reference traces are <= 131 tokens for both tasks


def metrics(path: Path) -> dict[str, dict[str, float]]:
    """{metric: {"value", "low", "high"}} of an `nanoseek eval --json` file (the 95% interval as low/high)."""
    out = {}
    for name, v in json.loads(path.read_text())["metrics"].items():
        if isinstance(v, dict):
            lo, hi = v.get("ci95", (None, None))
            out[name] = {"value": v["value"], "low": lo, "high": hi}
    return out


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
    sampled = sum(rollouts * (prompt_len + row["response_len_mean"]) for row in rows)
    return r["tokens"] + sampled / 3, r["wall_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (<= 10 min on 2 cores): no control")
    p.add_argument("--task", default="arithmetic", help=f"{' or '.join(TASKS)}, or any task spec")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per stage (default 1: the matrices are tiny, and on a shared 2-core machine a "
                        "second thread mostly adds contention)")
    p.add_argument("--cold-start", type=int, default=1000, help="verified traces for the cold-start SFT (default 1000)")
    p.add_argument("--sft-steps", type=int, default=900, help="cold-start SFT steps, batch 32 (default 900)")
    p.add_argument("--rl-steps", type=int, help="GRPO steps, 16 prompts x 8 samples (default 80 quick, 100 full)")
    p.add_argument("--rl-lr", type=float, default=3e-5)
    p.add_argument("--control-lr", type=float, default=3e-4,
                   help="lr of the SFT control (default 3e-4: where the cold-start SFT's schedule ended)")
    p.add_argument("-n", type=int, help="held-out problems for each eval (default 200 quick, 500 full)")
    p.add_argument("--distill", action="store_true", help="also distil the GRPO model into a dense student")
    p.add_argument("--distill-problems", type=int, default=1000,
                   help="train problems to sample the GRPO teacher on, 4 samples each (default 1000)")
    p.add_argument("--student-rl-steps", type=int, help="GRPO steps of the dense student (default: --rl-steps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    spec = TASKS.get(args.task, args.task)
    rl_steps = args.rl_steps or (80 if args.quick else 100)
    n_eval = args.n or (200 if args.quick else 500)
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

    def stage(name: str, argv: list[str], output: Path) -> None:
        """Run `nanoseek argv` unless `output` already exists (a finished stage of an earlier run)."""
        if output.exists():
            print(f"\n[{name}: {output} exists, skipped]", flush=True)
            return
        print(f"\n$ nanoseek {' '.join(argv)}", flush=True)
        t0 = time.time()
        nanoseek(argv)
        times[name] = round(time.time() - t0, 1)

    def evaluate(name: str, model: Path) -> dict[str, dict[str, float]]:
        out = work / f"eval_{name}.json"
        stage(f"eval_{name}", ["eval", "--model", str(model), "--task", spec, "-n", str(n_eval), "--k", str(K),
                               "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "100", *seed, *threads,
                               "--json", str(out)], out)
        return metrics(out)

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
    stage("sft", ["sft", "--preset", "test", "--tokenizer", str(tok_dir), *cold, "--steps", str(args.sft_steps),
                  "--lr", "3e-3", "--warmup-steps", "20", *sft_common, "--out", str(work / "sft")],
          work / "sft" / "final")
    sft = work / "sft" / "final"
    sft_m = evaluate("sft", sft)

    # 3. GRPO from the cold-start model, on fresh train prompts (another seed than the cold-start traces)
    rl_seed = str(args.seed + 100)

    def rl_args(steps: int) -> list[str]:
        return ["--task", spec, "--steps", str(steps), "-B", "16", "-G", "8", "--max-new-tokens", str(MAX_NEW_TOKENS),
                "--lr", str(args.rl_lr), "--warmup-steps", "3", "--eval-every", "0", "--save-every", "0",
                "--seed", rl_seed, *threads]

    stage("rl", ["rl", "--model", str(sft), *rl_args(rl_steps), "--out", str(work / "rl")], work / "rl" / "final")
    rl_m = evaluate("rl", work / "rl" / "final")

    sampled = f"pass@1_sampled_mean@{K}"
    result = {"task": spec, "n": n_eval, "before": sft_m[sampled]["value"], "after": rl_m[sampled]["value"],
              "metric": f"pass@1 = mean correctness of {K} samples (temperature 0.6, top-p 0.95) per test problem",
              "before_greedy": sft_m["pass@1_greedy"]["value"], "after_greedy": rl_m["pass@1_greedy"]["value"],
              "sft_metrics": sft_m, "rl_metrics": rl_m, "cold_start_traces": args.cold_start,
              "sft_steps": args.sft_steps, "rl_steps": rl_steps, "rl_lr": args.rl_lr, "seed": args.seed,
              "threads": args.threads}

    # 4. the control: more SFT on the same cold-start traces, for as much compute as GRPO used
    prompt_len = sum(len(prompt_ids(tok, q)) for q in task.problems("train", 200, args.seed + 100)) / 200
    rl_tokens, rl_seconds = rl_cost(work / "rl", prompt_len)
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
                          "--out", str(work / "control")], work / "control" / "final")
        result["control_metrics"] = evaluate("control", work / "control" / "final")
        result["control"] = result["control_metrics"][sampled]["value"]

    # 5. distillation into a dense student vs the same student trained by cold-start SFT + GRPO
    if args.distill:
        cfg = dense_student_config(get_preset("test", vocab_size=json.loads((sft / "config.json").read_text())[
            "vocab_size"]))
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
        s_rl_cost, _ = rl_cost(work / "student_rl", prompt_len)
        result.update(teacher_traces=sum(1 for _ in traces.open()), distill_steps=distill_steps,
                      student_rl_steps=s_rl_steps,
                      student_rl_sft_step_equivalents=round(s_rl_cost / sft_step_cost(work / "student_sft")[0], 1),
                      distill_metrics=evaluate("distill", work / "distill" / "final"),
                      student_sft_metrics=evaluate("student_sft", work / "student_sft" / "final"),
                      student_rl_metrics=evaluate("student_rl", work / "student_rl" / "final"))

    result["seconds"] = round(time.time() - t_start, 1)
    result["stage_seconds"] = times
    name = args.task if args.task in TASKS else "custom"
    suffix = "_quick" if args.quick else f"_{name}" + (f"_seed{args.seed}" if args.seed else "")
    out = ROOT / "benchmarks" / "results" / f"bench_reasoning{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
