"""Where a GRPO step's time goes: building the engine, generating the rollouts, scoring them, the policy update.

A freshly initialised model of a preset (default `cpu`) runs `--steps` GRPO steps (grpo.grpo_step) on a task; each
step's t_engine / t_generate / t_score / t_train come from the step's own metrics (the same numbers `nanoseek rl`
logs to rl_log.jsonl). An untrained model never emits the end-of-sentence token, so every rollout runs to
--max-new-tokens: the worst case for generation, and the same work in every run. It would also never be right, every
group would be all-wrong and no update would run: so the task's real scorer runs on every completion, and then its
accuracy is replaced by the parity of the completion's length (mixed rewards in every group: the update trains on
the full batch, its worst case too). The first step is a warm-up and is not counted; the table gives the median of
the others.

    python benchmarks/bench_rl_step.py                       # cpu preset, B=8, G=8, 64 new tokens, 5 steps
    python benchmarks/bench_rl_step.py --quick               # test preset, seconds
    python benchmarks/bench_rl_step.py --json benchmarks/results/bench_rl_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.config import get_preset  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.osutil import cpu_model  # noqa: E402
from nanoseek.tasks import Reward, Task, format_completion, load_task  # noqa: E402
from nanoseek.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, grpo_step  # noqa: E402

PARTS = ("t_engine", "t_generate", "t_score", "t_train")


class ParityReward(Task):
    """task's problems and scorer, with accuracy = the completion text's length is even (see the docstring)."""

    def __init__(self, task: Task):
        self.task, self.name = task, task.name

    def problems(self, split: str, n: int | None, seed: int = 0) -> list:
        return self.task.problems(split, n, seed)

    def score(self, problem, completion: str) -> Reward:
        r = self.task.score(problem, completion)
        return Reward(float(len(completion) % 2 == 0), r.format, r.parsed, r.key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("-B", type=int, default=8)
    p.add_argument("-G", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="steps timed after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="test preset, B=2, G=4, 16 tokens, 2 steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.preset, args.B, args.G, args.max_new_tokens, args.steps = "test", 2, 4, 16, 2
    torch.set_num_threads(args.threads)
    task = load_task(args.task)
    traces = [format_completion(*task.solution_trace(q)) for q in task.problems("train", 300, seed=0)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer([q.prompt for q in task.problems("train", 300, seed=0)] + traces, 1024, tmp)
    torch.manual_seed(0)
    # the preset's vocabulary (cpu: 4096, as a pre-trained cpu model has) unless the tokenizer needs more rows
    vocab = max(get_preset(args.preset).vocab_size, tok.vocab_size)
    model = Transformer(get_preset(args.preset, vocab_size=vocab)).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfg = GRPOConfig(group_size=args.G, prompts_per_step=args.B, max_new_tokens=args.max_new_tokens)
    rows = []
    for step in range(args.steps + 1):
        problems = task.problems("train", args.B, seed=step)
        t0 = time.perf_counter()
        stats = grpo_step(model, opt, tok, ParityReward(task), problems, cfg, seed=step)
        row = {k: stats.get(k, 0.0) for k in PARTS}
        row.update(step=step, t_step=time.perf_counter() - t0,
                   tokens_generated=round(stats["response_len_mean"] * stats["rollouts"]))
        rows.append(row)
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: "
              + " ".join(f"{k} {row[k]:.3f}s" for k in (*PARTS, "t_step")), flush=True)
    timed = rows[1:]
    median = {k: statistics.median(r[k] for r in timed) for k in (*PARTS, "t_step")}
    gen_tps = statistics.median(r["tokens_generated"] / r["t_generate"] for r in timed)
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "threads": args.threads,
              "load_average": os.getloadavg(), "preset": args.preset, "params": model.num_params()["total"],
              "task": args.task, "B": args.B, "G": args.G, "max_new_tokens": args.max_new_tokens,
              "median_seconds": median, "generated_tokens_per_s": gen_tps, "steps": rows}
    print(f"{cpu_model()}, {args.threads} threads, load {os.getloadavg()[0]:.1f}; {args.preset} preset, B={args.B} "
          f"G={args.G} {args.max_new_tokens} new tokens; median of {len(timed)} steps:")
    for k in (*PARTS, "t_step"):
        print(f"  {k:<11} {median[k]:7.3f} s  ({100 * median[k] / median['t_step']:.0f}%)")
    print(f"  generation {gen_tps:.0f} tokens/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
