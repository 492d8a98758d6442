"""MTP speculative decoding against plain decoding: speed-up, draft acceptance and tokens per verify step, for k = 1..K
drafts a step (draft 1 from the MTP module, drafts 2..k chaining it on its own output), at batch 1.

    python benchmarks/bench_speculative.py            # the speedrun's reasoning model and the pretrained text model
    python benchmarks/bench_speculative.py --compile  # + compile=True rows (about a minute of compiling per graph)
    python benchmarks/bench_speculative.py --quick    # 2 prompts, 1 repeat: a smoke run

Workloads (each skipped, with a note, when its checkpoint is missing):
  reasoning  runs/speedrun/rl/final (`nanoseek speedrun`): test-split prompts of its task (2-digit +/-) in the chat
             template; each completion runs to the end-of-sentence token (~100 tokens of <think> trace and answer)
  text       runs/pretrain/final (`nanoseek pretrain`): 64-token prompts from the bundled corpus's val split,
             128 new tokens each, EOS ignored

Modes: the engine in fp32 eager, int8 (quant="int8") and, with --compile, fp32 compiled. Greedy decoding: every k
produces the same tokens as plain decoding (checked here too). Timing is the engine's CPU time (time.thread_time,
one torch thread), prefill included, the configurations interleaved --repeats times and the best kept: steadier
than wall clock on a shared machine. Writes benchmarks/results/bench_speculative.json and docs/bench_speculative.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanoseek.checkpoint import load_model  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

WORKLOADS = {"reasoning": ROOT / "runs" / "speedrun" / "rl" / "final", "text": ROOT / "runs" / "pretrain" / "final"}
REASONING_TASK = "arithmetic:min_digits=2,max_digits=2,ops=+-"  # the speedrun's default task


def reasoning_prompts(model_dir: Path, n: int) -> tuple[list[list[int]], dict]:
    from nanoseek.tasks import load_task
    from nanoseek.train.rollout import prompt_ids

    tok = Tokenizer.from_dir(model_dir)
    problems = load_task(REASONING_TASK).problems("test", n, seed=3)
    return [prompt_ids(tok, p) for p in problems], dict(max_new_tokens=200, stop_token_ids=None)


def text_prompts(model_dir: Path, n: int, workdir: Path) -> tuple[list[list[int]], dict]:
    import numpy as np

    from nanoseek.data import default_corpus_files, prepare_data

    meta = prepare_data(default_corpus_files(), Tokenizer.from_dir(model_dir), workdir)
    val = np.memmap(workdir / "val.bin", dtype=meta["dtype"], mode="r")
    stride = (len(val) - 64) // n
    return [val[i * stride:i * stride + 64].tolist() for i in range(n)], dict(max_new_tokens=128, stop_token_ids=[])


def run_config(engine: Engine, prompts: list[list[int]], gen: dict) -> tuple[float, list[list[int]], dict]:
    """CPU seconds to decode every prompt alone (batch 1), the outputs, and the engine's speculative counters."""
    engine.counters.update(draft_tokens=0, accepted_draft_tokens=0, generated_tokens=0, decode_steps=0)
    t0 = time.thread_time()
    outs = [engine.generate([p], gen["max_new_tokens"], stop_token_ids=gen["stop_token_ids"])[0] for p in prompts]
    seconds = time.thread_time() - t0
    s = engine.stats()
    return seconds, outs, {k: s[k] for k in ("acceptance_rate", "tokens_per_verify_step", "decode_steps")}


def bench_workload(name: str, model_dir: Path, args: argparse.Namespace) -> list[dict]:
    n = 2 if args.quick else args.prompts
    prompts, gen = (reasoning_prompts(model_dir, n) if name == "reasoning"
                    else text_prompts(model_dir, n, args.workdir / "data"))
    model = load_model(model_dir).eval()
    modes = {"fp32": {}, "int8": {"quant": "int8"}, **({"fp32 compiled": {"compile": True}} if args.compile else {})}
    ks = list(range(args.max_k + 1))
    engines = {}
    for mode, kw in modes.items():
        for k in ks:
            engines[mode, k] = Engine(model, max_batch_size=1, speculative=k > 0, num_speculative_tokens=max(k, 1),
                                      **kw)
            engines[mode, k].generate(prompts[:1], 8)  # warm-up (and the compile of the first graphs)
    best: dict[tuple[str, int], tuple[float, list, dict]] = {}
    for rep in range(1 if args.quick else args.repeats):
        for key, engine in engines.items():
            seconds, outs, stats = run_config(engine, prompts, gen)
            if key not in best or seconds < best[key][0]:
                best[key] = (seconds, outs, stats)
            print(f"[{name}] repeat {rep + 1}: {key[0]} k={key[1]}: {seconds:.2f} s", flush=True)
    rows = []
    for (mode, k), (seconds, outs, stats) in best.items():
        plain_s, plain_outs, _ = best[mode, 0]
        tokens = sum(len(o) for o in outs)
        speedup = plain_s / seconds
        shown = model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir
        rows.append({"workload": name, "model": str(shown), "mode": mode, "k": k, "tokens": tokens,
                     "cpu_seconds": seconds, "tokens_per_cpu_s": tokens / seconds,
                     "speedup": speedup, "same_tokens_as_plain": outs == plain_outs,
                     "acceptance_rate": stats["acceptance_rate"] if k else None,
                     "tokens_per_verify_step": stats["tokens_per_verify_step"] if k else 1.0,
                     # what one speculative step costs in plain steps: (tokens a step) / speed-up
                     "step_cost_vs_plain": (stats["tokens_per_verify_step"] if k else 1.0) / speedup})
    return rows


def markdown(result: dict) -> str:
    lines = ["# MTP speculative decoding: speed-up against plain decoding", "",
             f"Run {result['date']}, `{result['command']}`. Generated by `benchmarks/bench_speculative.py` (its "
             "docstring defines every column); analysis in "
             "[engine.md](engine.md#mtp-speculative-decoding-speculativetrue).",
             "", f"- **Machine:** {result['machine']}; one torch thread; load average {result['load'][0]:.1f} at the "
             f"start and {result['load'][1]:.1f} at the end.",
             "- **Timing:** CPU time of the engine, batch 1, prefill included, best of the interleaved repeats.", ""]
    for note in result["skipped"]:
        lines += [f"- {note}"]
    for name in dict.fromkeys(r["workload"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["workload"] == name]
        lines += ["", f"## {name}: `{rows[0]['model']}`", "",
                  "| mode | k | tokens / CPU s | speed-up | acceptance | tokens / verify step "
                  "| step cost (plain steps) | same tokens |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in rows:
            acc = "—" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.1f}%"
            lines.append(f"| {r['mode']} | {r['k']} | {r['tokens_per_cpu_s']:,.0f} | **{r['speedup']:.2f}x** | {acc} "
                         f"| {r['tokens_per_verify_step']:.2f} | {r['step_cost_vs_plain']:.2f} | "
                         f"{'yes' if r['same_tokens_as_plain'] else 'NO'} |")
    lines += ["", "*k* drafts a step (0 = plain decoding). *acceptance*: accepted drafts / drafts verified. "
              "*tokens / verify step* = 1 + k x acceptance. *step cost* = tokens per step / speed-up: a speculative "
              "step's cost in plain steps, so the speed-up is (tokens per step) / (step cost).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-k", type=int, default=3, help="largest number of drafts a step (default 3)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats, best kept (default 3)")
    ap.add_argument("--compile", action="store_true", help="also fp32 with compile=True")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 1 repeat, no files written")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nanoseek_bench_speculative"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_speculative.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_speculative.md")
    args = ap.parse_args()
    if not 1 <= args.max_k <= 8:
        raise SystemExit("--max-k must be in [1, 8]")
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    rows, skipped = [], []
    for name, model_dir in WORKLOADS.items():
        if not (model_dir / "config.json").exists():
            cmd = "nanoseek speedrun" if name == "reasoning" else "nanoseek pretrain"
            skipped.append(f"**{name}** skipped: no checkpoint at `{model_dir.relative_to(ROOT)}` (run `{cmd}` first)")
            print(skipped[-1])
            continue
        rows += bench_workload(name, model_dir, args)
    result = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
              "command": "python benchmarks/bench_speculative.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{torch.backends.cpu.get_cpu_capability()}",
              "load": [load0, os.getloadavg()[0]], "rows": rows, "skipped": skipped}
    print(markdown(result))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.report.write_text(markdown(result))
        print(f"wrote {args.out} and {args.report}")


if __name__ == "__main__":
    main()
