"""Reasoning end to end: SFT a tiny model from scratch on arithmetic traces (deliberately under-trained), then GRPO;
pass@1 on held-out (test split) problems before and after, and an SFT control trained for as many extra steps.

    python benchmarks/bench_reasoning.py --quick   # <= 10 min on 2 cores: SFT, eval, GRPO (30 steps), eval
    python benchmarks/bench_reasoning.py           # the docs/reasoning.md run: GRPO 60 steps + the SFT control

pass@1 is R1's: the mean correctness of k=4 samples at temperature 0.6, top-p 0.95, over 200 test problems
(greedy pass@1, pass@4 and maj@4 are reported too).

Every stage runs through the `nanoseek` CLI (the same commands docs/reasoning.md lists), in a work directory
(default: a temporary one). The tokenizer is trained on the task's train traces. The LAST line printed is a JSON
object: {"task", "n", "before", "after", ...} with pass@1 fractions; results also go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.cli import main as nanoseek  # noqa: E402
from nanoseek.tasks import format_completion, load_task  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402

TASK = "arithmetic:min_digits=2,max_digits=2,ops=+-"


def metrics(path: Path) -> dict[str, float]:
    """The point estimates of an `nanoseek eval --json` file."""
    return {k: v["value"] for k, v in json.loads(path.read_text())["metrics"].items() if isinstance(v, dict)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the reduced run (<= 10 min on 2 cores)")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per stage (default 1: the matrices are tiny, and on a shared 2-core machine a "
                        "second thread mostly adds contention)")
    p.add_argument("--task", default=TASK)
    p.add_argument("--sft-steps", type=int, default=900, help="from-scratch SFT steps (batch 32; default 900)")
    p.add_argument("--rl-steps", type=int, help="GRPO steps (default 30 quick, 60 full)")
    p.add_argument("--rl-lr", type=float, default=3e-5)
    p.add_argument("-n", type=int, default=200, help="held-out problems for the before/after eval (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rl_steps = args.rl_steps or (30 if args.quick else 60)
    n_eval = args.n
    k = 4
    t_start = time.time()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_reasoning_")
        args.workdir = Path(tmp.name)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    times: dict[str, float] = {}

    def stage(name: str, argv: list[str]) -> None:
        print(f"\n$ nanoseek {' '.join(argv)}", flush=True)
        t0 = time.time()
        nanoseek(argv)
        times[name] = round(time.time() - t0, 1)

    # 1. a tokenizer for the task: BPE on 2000 train traces (prompt + completion)
    t0 = time.time()
    task = load_task(args.task)
    texts = [q.prompt + "\n" + format_completion(*task.solution_trace(q)) for q in task.problems("train", 2000, 1)]
    tok = train_tokenizer(texts, vocab_size=512, out_dir=work / "tokenizer")
    times["tokenizer"] = round(time.time() - t0, 1)
    print(f"tokenizer: {tok.vocab_size} tokens")

    # 2. SFT from scratch, stopped early (accuracy climbs steeply after ~600 steps: we want it part-way)
    stage("sft", ["sft", "--preset", "test", "--tokenizer", str(work / "tokenizer"), "--task", args.task,
                  "--n", "10000", "--steps", str(args.sft_steps), "--batch-size", "32", "--lr", "3e-3",
                  "--warmup-steps", "20", "--mtp-lambda", "0", "--save-every", "0", "--seed", str(args.seed),
                  "--out", str(work / "sft"), *threads])
    sft = work / "sft" / "final"
    evaluate = ["--task", args.task, "-n", str(n_eval), "--k", str(k), "--max-new-tokens", "160", "--batch-size",
                "100", "--seed", str(args.seed), *threads]
    stage("eval_sft", ["eval", "--model", str(sft), *evaluate, "--json", str(work / "eval_sft.json")])

    # 3. GRPO from the SFT model
    rl_args = ["--task", args.task, "--steps", str(rl_steps), "-B", "16", "-G", "8", "--max-new-tokens", "160",
               "--lr", str(args.rl_lr), "--warmup-steps", "3", "--eval-every", "0", "--save-every", "0",
               "--seed", str(args.seed)]
    stage("rl", ["rl", "--model", str(sft), *rl_args, "--out", str(work / "rl"), *threads])
    stage("eval_rl", ["eval", "--model", str(work / "rl" / "final"), *evaluate, "--json", str(work / "eval_rl.json")])

    sft_m, rl_m = metrics(work / "eval_sft.json"), metrics(work / "eval_rl.json")
    sampled = f"pass@1_sampled_mean@{k}"
    result = {"task": args.task, "n": n_eval, "before": sft_m[sampled], "after": rl_m[sampled],
              "metric": f"pass@1 = mean correctness of {k} samples (temperature 0.6, top-p 0.95) per test problem",
              "before_greedy": sft_m["pass@1_greedy"], "after_greedy": rl_m["pass@1_greedy"],
              "sft_metrics": sft_m, "rl_metrics": rl_m, "sft_steps": args.sft_steps, "rl_steps": rl_steps,
              "rl_lr": args.rl_lr, "threads": args.threads}

    # 4. the control: as many more SFT steps as GRPO took, from the same SFT checkpoint, one trace per GRPO prompt
    #    (batch 16), at the GRPO learning rate, on traces the first SFT did not see (another seed)
    if not args.quick:
        stage("sft_control", ["sft", "--model", str(sft), "--task", args.task, "--n", "5000", "--steps",
                              str(rl_steps), "--batch-size", "16", "--lr", str(args.rl_lr), "--warmup-steps", "3",
                              "--decay-frac", "0", "--mtp-lambda", "0", "--save-every", "0",
                              "--seed", str(args.seed + 1), "--out", str(work / "sft_control"), *threads])
        stage("eval_control", ["eval", "--model", str(work / "sft_control" / "final"), *evaluate, "--json",
                               str(work / "eval_control.json")])
        result["control_metrics"] = metrics(work / "eval_control.json")
        result["control"] = result["control_metrics"][sampled]
    result["seconds"] = round(time.time() - t_start, 1)
    result["stage_seconds"] = times
    out = ROOT / "benchmarks" / "results" / f"bench_reasoning{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
