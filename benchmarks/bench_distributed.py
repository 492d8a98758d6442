"""Scaling of every distributed stage: 2 gloo processes against 1 at the same global batch, on this machine's CPU.

    python benchmarks/bench_distributed.py            # -> benchmarks/results/bench_distributed.json + docs table
    python benchmarks/bench_distributed.py --rounds 2 --stages pretrain,rl

For each stage (pretrain, sft, distill, rl, eval, sample) the same `nanoseek <stage>` command line runs once as one
process and once as 2 ranks with torchrun's variables (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT,
gloo), every process with 1 thread. As in tests/test_distributed.py the ranks are forked from this process after torch
and nanoseek are imported, so the interpreter's start-up is not timed; what is timed is `main(argv)` on each rank,
process group set-up included. The inputs (tokenizer, token shards, the machine-peak cache, a teacher checkpoint and
its traces) are built once beforehand and copied into every run's directory, so only the stage itself is compared.

  speedup     T(1 process) / T(2 processes), T the slowest rank's wall time
  efficiency  speedup / 2 (1.0: two processes halve the time; 0.5: no faster than one)
  CPU ratio   CPU seconds of all processes, 2 processes / 1 (the price of the second rank: communication, duplicated
              work such as the engine's set-up, a second copy of the model)

Models: the `cpu` preset (11.8M parameters) for the training stages and as the policy / evaluated model. The machine
has 2 cores shared with other jobs: the load average is recorded before and after, and the numbers are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanoseek.cli import main  # noqa: E402

TASK = "arithmetic:min_digits=1,max_digits=2,ops=+-"
STAGES = ("pretrain", "sft", "distill", "rl", "eval", "sample")
TRAIN = ["--threads", "1", "--warmup-steps", "1", "--sample-every", "0", "--save-every", "0", "--dtype", "fp32"]


def stage_args(stage: str, work: Path) -> list[str]:
    """The command line of `stage` (its output directory added by the caller). Global batches divide by 2."""
    inputs = work / "inputs"
    if stage == "pretrain":
        return ["--preset", "cpu", "--data", str(inputs / "tiny.txt"), "--vocab-size", "300", "--batch-size", "8",
                "--seq-len", "128", "--steps", "10", "--eval-every", "10", "--eval-iters", "2", *TRAIN]
    if stage == "sft":
        return ["--preset", "cpu", "--tokenizer", str(inputs / "tokenizer"), "--task", TASK, "--n", "256",
                "--batch-size", "16", "--steps", "10", "--eval-every", "10", *TRAIN]
    if stage == "distill":
        return ["--teacher", str(inputs / "teacher"), "--teacher-data", str(inputs / "traces.jsonl"),
                "--student-preset", "cpu", "--batch-size", "16", "--steps", "10", "--eval-every", "10", *TRAIN]
    model = ["--model", str(inputs / "teacher"), "--task", TASK, "--threads", "1"]
    if stage == "rl":
        return [*model, "-G", "4", "-B", "4", "--steps", "3", "--max-new-tokens", "24", "--micro-batch", "8",
                "--eval-every", "0", "--save-every", "0", "--temperature", "1.0"]
    if stage == "eval":
        return [*model, "-n", "32", "--max-new-tokens", "24"]
    return [*model, "-n", "32", "-k", "2", "--max-new-tokens", "24"]  # sample


def out_args(stage: str, out: Path) -> list[str]:
    if stage == "eval":
        return ["--json", str(out / "eval.json")]
    if stage == "sample":
        return ["--out", str(out / "samples.jsonl")]
    return ["--out", str(out)]


def prepare(work: Path) -> None:
    """Untimed inputs: a text, its tokenizer and token shards (pretrain), a teacher checkpoint (the `cpu` preset,
    random weights, the task's tokenizer) with 256 verified traces, and each training stage's peak-FLOP cache."""
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.data import corpus_dir
    from nanoseek.tasks import format_completion, load_task
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.sft import init_model, task_conversations

    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60000]
    (inputs / "tiny.txt").write_text(text, encoding="utf-8")
    task = load_task(TASK)
    tok = train_tokenizer([p.prompt + "\n" + format_completion(*task.solution_trace(p))
                           for p in task.problems("train", 300)], vocab_size=300, out_dir=inputs / "tokenizer")
    torch.manual_seed(0)
    save_pretrained(init_model("cpu", None, tok.vocab_size), inputs / "teacher", tokenizer_dir=inputs / "tokenizer")
    (inputs / "traces.jsonl").write_text("".join(json.dumps({"messages": c.messages}) + "\n"
                                                 for c in task_conversations(task, 256, seed=1)))
    for stage in ("pretrain", "sft", "distill"):  # tokenizer/, data/ and peak_flops.json, reused by every timed run
        argv = [stage, *stage_args(stage, work), "--out", str(work / f"warm-{stage}")]
        argv[argv.index("--steps") + 1] = "1"
        child(argv, None, work / f"warm-{stage}.json")


def seed_dir(stage: str, work: Path, out: Path) -> None:
    """A run directory with the warm-up's cached inputs (nothing a run writes as its result)."""
    out.mkdir(parents=True)
    warm = work / f"warm-{stage}"
    for name in ("tokenizer", "data", "peak_flops.json"):
        if (warm / name).is_dir():
            shutil.copytree(warm / name, out / name)
        elif (warm / name).is_file():
            shutil.copy(warm / name, out / name)


def _rank(env: dict[str, str] | None, argv: list[str], result: str) -> None:
    """One forked process: torchrun's variables (if any), output to result.{out,err}, then the timed CLI."""
    os.environ.update(env or {})
    for fd, suffix in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{result}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    torch.set_num_threads(1)
    code, wall, cpu = 0, time.perf_counter(), time.process_time()
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    Path(result).write_text(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def child(argv: list[str], env: dict[str, str] | None, result: Path) -> multiprocessing.Process:
    p = multiprocessing.get_context("fork").Process(target=_rank, args=(env, argv, str(result)))
    p.start()
    p.join(timeout=600)
    if p.exitcode != 0:
        raise RuntimeError(f"{' '.join(argv[:1])} failed: {Path(f'{result}.err').read_text()[-3000:]}")
    return p


def timed(stage: str, world: int, work: Path, tag: str) -> dict:
    out = work / f"{stage}-{tag}-{world}"
    seed_dir(stage, work, out)
    argv = [stage, *stage_args(stage, work), *out_args(stage, out)]
    if world == 1:
        child(argv, None, out / "rank0.json")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world)}
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_rank, args=(env | {"RANK": str(r), "LOCAL_RANK": str(r)}, argv,
                                                 str(out / f"rank{r}.json"))) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{stage} x{world} failed: {(out / 'rank0.json.err').read_text()[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return {"wall": max(r["wall"] for r in ranks), "cpu": sum(r["cpu"] for r in ranks), "ranks": ranks}


def main_bench() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--rounds", type=int, default=1, help="1 and 2 processes alternate; the best time is reported")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/distributed.md")
    args = p.parse_args()
    from nanoseek.osutil import cpu_model

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)  # the forked ranks inherit no busy thread pool
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        for stage in args.stages.split(","):
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for i in range(args.rounds):
                for world in ((1, 2) if i % 2 == 0 else (2, 1)):
                    runs[world].append(timed(stage, world, work, str(i)))
            one, two = (min(runs[w], key=lambda r: r["wall"]) for w in (1, 2))
            speedup = one["wall"] / two["wall"]
            row = {"stage": stage, "one": one, "two": two, "all_runs": runs, "speedup": speedup,
                   "efficiency": speedup / 2, "cpu_ratio": two["cpu"] / one["cpu"], "load": os.getloadavg()}
            rows.append(row)
            print(f"{stage:>8}: 1 process {one['wall']:6.2f} s, 2 processes {two['wall']:6.2f} s | speedup "
                  f"{speedup:.2f}, efficiency {speedup / 2:.2f} | CPU s {one['cpu']:.1f} -> {two['cpu']:.1f} | "
                  f"load {row['load'][0]:.1f}", flush=True)
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "machine": platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "command": "python " + " ".join(sys.argv),
              "stage_args": {s: stage_args(s, Path("WORK")) for s in STAGES}, "rows": rows}
    out = ROOT / "benchmarks" / "results" / "bench_distributed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    table = markdown(result)
    print(table)
    if not args.no_docs:
        write_docs(table)


def markdown(result: dict) -> str:
    lines = ["| stage | 1 process (s) | 2 processes (s) | speedup | efficiency | CPU s, 1 -> 2 procs | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['one']['wall']:.2f} | {r['two']['wall']:.2f} | {r['speedup']:.2f} | "
                     f"{r['efficiency']:.2f} | {r['one']['cpu']:.1f} -> {r['two']['cpu']:.1f} | {r['load'][0]:.1f} |")
    return "\n".join(lines)


BEGIN, END = "<!-- bench_distributed: begin -->", "<!-- bench_distributed: end -->"


def write_docs(table: str) -> None:
    """Replace the table between the markers in docs/distributed.md (left alone when the markers are missing)."""
    doc = ROOT / "docs" / "distributed.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
        print(f"updated {doc}")


if __name__ == "__main__":
    main_bench()
