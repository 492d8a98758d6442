"""MTP speculative decoding against plain decoding: speed-up, draft acceptance and tokens per verify step, for k = 1..K
drafts a step (draft 1 from the MTP module, drafts 2..k chaining it on its own output), at batch 1 and 4.

    python benchmarks/bench_speculative.py            # the speedrun's reasoning model and the pretrained text model
    python benchmarks/bench_speculative.py --reasoning-model DIR --task SPEC --text-model DIR --batch 1 4
    python benchmarks/bench_speculative.py --compile  # + compile=True rows (about a minute of compiling per graph)
    python benchmarks/bench_speculative.py --quick    # 2 prompts, 1 repeat: a smoke run
    python benchmarks/bench_speculative.py --reasoning-model DIR --task SPEC --profile  # where a step's time goes

Workloads (each skipped, with a note, when its checkpoint is missing):
  reasoning  --reasoning-model (default runs/speedrun/rl/final, `nanoseek speedrun`): test-split prompts of --task
             (default the speedrun's, 2-digit +/-) in the chat template; each completion runs to the end-of-sentence
             token (its <think> trace and answer, at most 200 tokens)
  text       --text-model (default runs/pretrain/final, `nanoseek pretrain`): 64-token prompts from the bundled
             corpus's val split, 128 new tokens each, EOS ignored
A model with random or untrained MTP weights makes acceptance meaningless: use trained checkpoints.

Modes, each on the engine's default decode path (the native kernels where the CPU runs them; `decode path` in the
JSON): fp32; fp32 with an int8 draft (draft_quant="int8": only the MTP module quantised, the main model fp32); int8
(quant="int8": both); with --compile, fp32 compiled. Batch b: the prompts in groups of b decoded together
(Engine.generate). Greedy decoding: every k produces the same tokens as plain decoding (checked here too). Timing is
the engine's CPU time (time.thread_time, one thread: torch's and the kernels'), prefill included, the configurations
interleaved --repeats times and the best kept: steadier than wall clock on a shared machine (wall clock is in the
JSON too). Writes benchmarks/results/bench_speculative.json and docs/bench_speculative.md.

--profile: on the reasoning workload, batch 1, fp32 and int8-draft, k = 0..--max-k: CPU milliseconds per decode step
in the native calls (the main model's decode or verify forward; the MTP module) and in everything else
(Engine.step's Python: scheduling, verification, drafting's argmax, sampling), as a markdown table.
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
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.kernels import status as kernels_status  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

WORKLOADS = {"reasoning": ROOT / "runs" / "speedrun" / "rl" / "final", "text": ROOT / "runs" / "pretrain" / "final"}
REASONING_TASK = "arithmetic:min_digits=2,max_digits=2,ops=+-"  # the speedrun's default task
# mode -> (Engine keywords, the extra keywords of its speculative engines)
MODES = {"fp32": ({}, {}), "fp32, int8 draft": ({}, {"draft_quant": "int8"}), "int8": ({"quant": "int8"}, {})}


def reasoning_prompts(model_dir: Path, n: int, task: str) -> tuple[list[list[int]], dict]:
    from nanoseek.tasks import load_task
    from nanoseek.train.rollout import prompt_ids

    tok = Tokenizer.from_dir(model_dir)
    problems = load_task(task).problems("test", n, seed=3)
    return [prompt_ids(tok, p) for p in problems], dict(max_new_tokens=200, stop_token_ids=None)


def text_prompts(model_dir: Path, n: int, workdir: Path) -> tuple[list[list[int]], dict]:
    import numpy as np

    from nanoseek.data import default_corpus_files, prepare_data

    meta = prepare_data(default_corpus_files(), Tokenizer.from_dir(model_dir), workdir)
    val = np.memmap(workdir / "val.bin", dtype=meta["dtype"], mode="r")
    stride = (len(val) - 64) // n
    return [val[i * stride:i * stride + 64].tolist() for i in range(n)], dict(max_new_tokens=128, stop_token_ids=[])


def run_config(engine: Engine, prompts: list[list[int]], gen: dict, batch: int
               ) -> tuple[float, float, list[list[int]], dict]:
    """CPU and wall seconds to decode the prompts in groups of `batch`, the outputs, and the speculative counters."""
    engine.counters.update(draft_tokens=0, accepted_draft_tokens=0, generated_tokens=0, decode_steps=0)
    t0, w0 = time.thread_time(), time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i:i + batch], gen["max_new_tokens"], stop_token_ids=gen["stop_token_ids"])
    seconds, wall = time.thread_time() - t0, time.perf_counter() - w0
    s = engine.stats()
    return seconds, wall, outs, {k: s[k] for k in ("acceptance_rate", "tokens_per_verify_step", "decode_steps")}


def bench_workload(name: str, model_dir: Path, args: argparse.Namespace) -> list[dict]:
    n = 2 * max(args.batch) if args.quick else args.prompts
    prompts, gen = (reasoning_prompts(model_dir, n, args.task) if name == "reasoning"
                    else text_prompts(model_dir, n, args.workdir / "data"))
    model = load_model(model_dir).eval()
    modes = {m: MODES[m] for m in args.modes}
    if args.compile:
        modes["fp32 compiled"] = ({"compile": True}, {})
    ks = list(range(args.max_k + 1))
    engines, paths = {}, {}
    for mode, (kw, spec_kw) in modes.items():
        for k in ks:
            if k == 0 and spec_kw:  # plain decoding has no draft: the same engine as the mode without it
                continue
            engine = Engine(model, max_batch_size=max(args.batch), speculative=k > 0,
                            num_speculative_tokens=max(k, 1), **kw, **(spec_kw if k else {}))
            engine.generate(prompts[:max(args.batch)], 8)  # warm-up (and the compile of the first graphs)
            engines[mode, k] = engine
            paths[mode] = engine.stats()["decode_path"]
    best: dict[tuple[str, int, int], tuple[float, float, list, dict]] = {}
    for rep in range(1 if args.quick else args.repeats):
        for (mode, k), engine in engines.items():
            for b in args.batch:
                seconds, wall, outs, stats = run_config(engine, prompts, gen, b)
                key = (mode, k, b)
                if key not in best or seconds < best[key][0]:
                    best[key] = (seconds, min(wall, best.get(key, (0, wall))[1]), outs, stats)
                print(f"[{name}] repeat {rep + 1}: {mode} k={k} batch {b}: {seconds:.2f} s", flush=True)
    rows = []
    for (mode, k, b), (seconds, wall, outs, stats) in best.items():
        base = mode if (mode, 0, b) in best else next(m for m in modes if not modes[m][1] and
                                                      modes[m][0] == modes[mode][0])
        plain_s, plain_wall, plain_outs, _ = best[base, 0, b]
        tokens = sum(len(o) for o in outs)
        speedup = plain_s / seconds
        shown = model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir
        rows.append({"workload": name, "model": str(shown), "mode": mode, "decode_path": paths[mode], "k": k,
                     "batch": b, "tokens": tokens, "cpu_seconds": seconds, "wall_seconds": wall,
                     "tokens_per_cpu_s": tokens / seconds, "speedup": speedup, "speedup_wall": plain_wall / wall,
                     "same_tokens_as_plain": outs == plain_outs,
                     "acceptance_rate": stats["acceptance_rate"] if k else None,
                     "tokens_per_verify_step": stats["tokens_per_verify_step"] if k else 1.0,
                     # what one speculative step costs in plain steps: (tokens a step) / speed-up
                     "step_cost_vs_plain": (stats["tokens_per_verify_step"] if k else 1.0) / speedup})
    rows.sort(key=lambda r: (r["batch"], list(modes).index(r["mode"]), r["k"]))
    return rows


def timed(fn, spent: dict[str, float], key: str):  # noqa: ANN001, ANN201
    """fn, adding the CPU seconds of each call to spent[key]."""
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.thread_time() - t
    return wrapper


def profile(model_dir: Path, args: argparse.Namespace) -> None:
    """CPU ms per decode step, split into the native calls and the rest (module docstring)."""
    prompts, gen = reasoning_prompts(model_dir, args.prompts, args.task)
    model = load_model(model_dir).eval()
    print("| mode | k | steps | tokens / step | ms / step | main model (decode / verify) | MTP module | rest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, (kw, spec_kw) in MODES.items():
        for k in range(0 if not spec_kw else 1, args.max_k + 1):
            engine = Engine(model, max_batch_size=1, speculative=k > 0, num_speculative_tokens=max(k, 1), **kw,
                            **(spec_kw if k else {}))
            native = engine.runner.native
            if native is None:
                raise SystemExit(f"--profile times the native calls; this engine runs {engine.runner.decode_path}")
            spent = {"main": 0.0, "mtp": 0.0}
            engine.generate(prompts[:1], 8)  # warm-up
            native.decode, native.forward = timed(native.decode, spent, "main"), timed(native.forward, spent, "main")
            native.mtp = timed(native.mtp, spent, "mtp")
            best = None
            for _ in range(args.repeats):
                spent.update(main=0.0, mtp=0.0)
                engine.counters.update(generated_tokens=0, decode_steps=0)
                params = SamplingParams(gen["max_new_tokens"], stop_token_ids=gen["stop_token_ids"])
                reqs = [engine.submit(p, params) for p in prompts]
                engine.step()  # the first prefill (and its MTP pass), not a decode step: not counted
                spent.update(main=0.0, mtp=0.0)
                t0 = time.thread_time()
                while not all(r.finished for r in reqs):
                    engine.step()
                total = time.thread_time() - t0
                st = engine.stats()
                steps = st["decode_steps"]
                if best is None or total < best[0]:
                    best = (total, steps, st["generated_tokens"], dict(spent))
            total, steps, tokens, sp = best
            ms = [1e3 * x / steps for x in (total, sp["main"], sp["mtp"], total - sp["main"] - sp["mtp"])]
            print(f"| {mode} | {k} | {steps} | {tokens / steps:.2f} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | "
                  f"{ms[3]:.3f} |", flush=True)


def cpu_model() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")


def markdown(result: dict) -> str:
    lines = ["# MTP speculative decoding: speed-up against plain decoding", "",
             f"Run {result['date']}, `{result['command']}`. Generated by `benchmarks/bench_speculative.py` (its "
             "docstring defines every column); analysis in "
             "[engine.md](engine.md#mtp-speculative-decoding-speculativetrue).",
             "", f"- **Machine:** {result['machine']}; one thread; load average {result['load'][0]:.1f} at the "
             f"start and {result['load'][1]:.1f} at the end (a shared machine).",
             "- **Timing:** CPU time of the engine, prefill included, best of the interleaved repeats; batch b: "
             "the prompts in groups of b decoded together. Speed-up against plain decoding (k = 0) in the same mode "
             "and batch (an int8 draft's: against plain fp32).", ""]
    for note in result["skipped"]:
        lines += [f"- {note}"]
    for name in dict.fromkeys(r["workload"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["workload"] == name]
        paths = ", ".join(f"{m}: {p}" for m, p in dict.fromkeys((r["mode"], r["decode_path"]) for r in rows))
        lines += ["", f"## {name}: `{rows[0]['model']}`", "", f"Decode paths: {paths}.", "",
                  "| batch | mode | k | tokens / CPU s | speed-up | acceptance | tokens / verify step "
                  "| step cost (plain steps) | same tokens |", "|---:|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in rows:
            acc = "—" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.1f}%"
            lines.append(f"| {r['batch']} | {r['mode']} | {r['k']} | {r['tokens_per_cpu_s']:,.0f} | "
                         f"**{r['speedup']:.2f}x** | {acc} | {r['tokens_per_verify_step']:.2f} | "
                         f"{r['step_cost_vs_plain']:.2f} | {'yes' if r['same_tokens_as_plain'] else 'NO'} |")
    lines += ["", "*k* drafts a step (0 = plain decoding). *acceptance*: accepted drafts / drafts verified. "
              "*tokens / verify step* = 1 + k x acceptance. *step cost* = tokens per step / speed-up: a speculative "
              "step's cost in plain steps, so the speed-up is (tokens per step) / (step cost).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reasoning-model", type=Path, default=WORKLOADS["reasoning"], help="reasoning checkpoint "
                    "(default runs/speedrun/rl/final)")
    ap.add_argument("--task", default=REASONING_TASK, help=f"its task (default {REASONING_TASK})")
    ap.add_argument("--text-model", type=Path, default=WORKLOADS["text"], help="text checkpoint (default "
                    "runs/pretrain/final)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="modes (default all)")
    ap.add_argument("--max-k", type=int, default=3, help="largest number of drafts a step (default 3)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats, best kept (default 3)")
    ap.add_argument("--compile", action="store_true", help="also fp32 with compile=True")
    ap.add_argument("--profile", action="store_true", help="only print where a batch-1 step's time goes")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 1 repeat, no files written")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nanoseek_bench_speculative"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_speculative.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_speculative.md")
    args = ap.parse_args()
    if not 1 <= args.max_k <= 8:
        raise SystemExit("--max-k must be in [1, 8]")
    if args.prompts % max(args.batch):
        raise SystemExit("--prompts must be a multiple of the largest --batch")
    torch.set_num_threads(1)
    if args.profile:
        return profile(args.reasoning_model, args)
    load0 = os.getloadavg()[0]
    rows, skipped = [], []
    for name, model_dir in (("reasoning", args.reasoning_model), ("text", args.text_model)):
        if not (model_dir / "config.json").exists():
            cmd = "nanoseek speedrun" if name == "reasoning" else "nanoseek pretrain"
            skipped.append(f"**{name}** skipped: no checkpoint at `{model_dir}` (run `{cmd}` first)")
            print(skipped[-1])
            continue
        rows += bench_workload(name, model_dir, args)
    result = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
              "command": "python benchmarks/bench_speculative.py " + " ".join(sys.argv[1:]),
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()}), torch "
                         f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; native kernels: "
                         f"{kernels_status()}",
              "load": [load0, os.getloadavg()[0]], "rows": rows, "skipped": skipped}
    print(markdown(result))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.report.write_text(markdown(result))
        print(f"wrote {args.out} and {args.report}")


if __name__ == "__main__":
    main()
