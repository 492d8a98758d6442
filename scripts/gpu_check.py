"""The GPU check (issue 20): every stage on one CUDA device in a few minutes, as a pass/fail table.

    scripts/gpu_check.sh                 # on a machine with a CUDA GPU: the checks on cuda, nccl for torchrun
    scripts/gpu_check.sh --device cpu    # the same steps on the CPU with gloo: the dry run before GPU time is spent

Needs torch and nanoseek's runtime packages (numpy, safetensors, tokenizers, jinja2, tqdm, matplotlib; fastapi,
pydantic and uvicorn for `serve`, which is skipped without them); no network and no native kernel build (nanoseek is
imported from this checkout through PYTHONPATH). Each check runs the real command line (`python -m nanoseek ...`, or
`torchrun`) or the engine in this process, with a time limit; the table goes to stdout and, as markdown and JSON, to
--out (default $OUT when set, else runs/gpu_check). docs/gpu.md describes every row and what passes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "arithmetic:min_digits=1,max_digits=1,ops=+"
PROMPTS = ["ROMEO:", "JULIET: O", "What is 3 + 4?", "First Citizen:\nBefore we proceed", "KING", "3 + 5 =", "Hark",
           "The"]


class Skip(Exception):
    """A check that cannot run here (a missing package): reported as 'skip' with the reason."""


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, args.device
        self.work = Path(args.work)
        self.rows: list[dict] = []
        self.section = ""  # the ep/fp8 section's own table (markdown)
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "NANOSEEK_KERNELS": "off"}

    # --- running things -------------------------------------------------------------------------------------------
    def run(self, name: str, fn: Callable[[], str]) -> None:
        t0 = time.time()
        try:
            detail, result = fn(), "pass"
        except Skip as e:
            detail, result = str(e), "skip"
        except Exception as e:  # a failed check is a row, never the end of the script
            detail, result = f"{type(e).__name__}: {e}".strip(), "FAIL"
            with open(self.work / "failures.log", "a") as f:
                f.write(f"=== {name}\n{traceback.format_exc()}\n")
        row = {"check": name, "result": result, "seconds": round(time.time() - t0, 1),
               "detail": " ".join(detail.split())[:300]}
        self.rows.append(row)
        print(f"[{row['result']:>4}] {name} ({row['seconds']} s): {row['detail']}", flush=True)

    def sh(self, *argv: object, timeout: float = 240, log: str | None = None) -> str:
        """Run a command with nanoseek on PYTHONPATH; its output goes to work/<log>.log; raises on failure."""
        cmd = [str(a) for a in argv]
        log_file = self.work / f"{log or cmd[2]}.log"
        with open(log_file, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, timeout=timeout,
                                      cwd=self.work)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"timed out after {timeout:.0f} s (log: {log_file})") from None
        text = log_file.read_text()
        if done.returncode != 0:
            tail = [line for line in text.splitlines() if line.strip()][-3:]
            raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)} (log: {log_file})")
        return text

    def nanoseek(self, *argv: object, timeout: float = 240, log: str | None = None) -> str:
        return self.sh(sys.executable, "-m", "nanoseek", *argv, timeout=timeout, log=log or str(argv[0]))

    def torchrun(self, *argv: object, timeout: float = 240, log: str = "torchrun") -> str:
        return self.sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                       "nanoseek", *argv, timeout=timeout, log=log)

    # --- the checks -----------------------------------------------------------------------------------------------
    def environment(self) -> str:
        import torch

        from nanoseek import moe

        parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device (run with --device cpu for the dry run)")
            cap = torch.cuda.get_device_capability()
            parts.append(f"{torch.cuda.get_device_name()} (sm {cap[0]}.{cap[1]}, "
                         f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
            w = torch.zeros(4, 64, 64, device="cuda", dtype=torch.bfloat16)
            parts.append("grouped_mm: " + ("CUTLASS, no host sync" if moe.grouped_mm_ok(w[0], w) else
                                           "none (the engine gathers, training loops)"))
        missing = [m for m in ("numpy", "safetensors", "tokenizers", "jinja2", "tqdm", "matplotlib")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"missing packages: {', '.join(missing)} (carry wheels: docs/gpu.md)")
        serve = [m for m in ("fastapi", "pydantic", "uvicorn") if importlib.util.find_spec(m) is None]
        parts.append("serve: " + (f"skipped, no {', '.join(serve)}" if serve else "packages present"))
        return ", ".join(parts)

    def corpus(self) -> Path:
        """A small training text: the start of the bundled tinyshakespeare plus one-digit additions with traces."""
        from nanoseek.data import corpus_dir
        from nanoseek.tasks import format_completion, load_task

        path = self.work / "corpus.txt"
        if not path.is_file():
            text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:150_000]
            task = load_task(TASK)
            traces = [f"{p.prompt}\n{format_completion(*task.solution_trace(p))}" for p in task.problems("train", 400)]
            path.write_text(text + "\n\n" + "\n\n".join(traces), encoding="utf-8")
        return path

    def pretrain(self) -> str:
        """bf16 pre-training (autocast, fp32 master weights), a checkpoint at step 15, the run resumed from it."""
        common = ["--preset", "test", "--data", self.corpus(), "--vocab-size", "512", "--batch-size", "8",
                  "--seq-len", "128", "--warmup-steps", "5", "--eval-every", "15", "--eval-iters", "2",
                  "--sample-every", "0", "--save-every", "15", "--dtype", "bf16", "--device", self.device,
                  "--threads", str(self.args.threads)]
        self.nanoseek("pretrain", *common, "--steps", "30", "--out", "pre")
        run = json.loads((self.work / "pre" / "run.json").read_text())
        if run["dtype"] != "bfloat16" or not run["device"].startswith(self.device):
            raise RuntimeError(f"ran in {run['dtype']} on {run['device']}")
        history = json.loads((self.work / "pre/checkpoints/step_000030/trainer_state.json").read_text())["history"]
        first, last = history["train"][0]["loss"], history["train"][-1]["loss"]
        if not last < first:
            raise RuntimeError(f"the loss did not fall: {first:.3f} -> {last:.3f}")
        shutil.copytree(self.work / "pre", self.work / "pre_resumed")
        resumed = self.work / "pre_resumed"
        shutil.rmtree(resumed / "final")
        shutil.rmtree(resumed / "checkpoints" / "step_000030")
        (resumed / "checkpoints" / "latest").write_text("step_000015\n")
        text = self.nanoseek("pretrain", *common, "--steps", "30", "--out", "pre_resumed", "--resume",
                             log="pretrain_resume")
        if "resumed from" not in text:
            raise RuntimeError("the second run did not resume")
        again = json.loads((resumed / "checkpoints/step_000030/trainer_state.json").read_text())["history"]
        gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(history["train"], again["train"], strict=True))
        # GPU kernels (atomic adds in the MoE's index_add_) are not bitwise deterministic: close, not equal
        if gap > 0.05:
            raise RuntimeError(f"the resumed run's losses differ from the uninterrupted run's by up to {gap:.4f}")
        return (f"bf16 on {run['device']}: loss {first:.3f} -> {last:.3f} in 30 steps, "
                f"{run['tokens'] / max(run['train_seconds'], 1e-9):.0f} tok/s; resumed at 15, losses within {gap:.1e}")

    def torchrun_mode(self, mode: str) -> str:
        """torchrun with one process (nccl on CUDA, gloo on the CPU): DDP or FSDP2 (+ async sharded checkpoints),
        then the sharded checkpoint resumed by a plain process."""
        out = f"tr_{mode}"
        common = ["--preset", "test", "--data", self.corpus(), "--vocab-size", "512", "--batch-size", "8",
                  "--seq-len", "128", "--eval-every", "10", "--eval-iters", "1", "--sample-every", "0",
                  "--save-every", "5", "--device", self.device, "--threads", str(self.args.threads)]
        shutil.copytree(self.work / "pre" / "tokenizer", self.work / out / "tokenizer", dirs_exist_ok=True)
        extra = ["--async-save"] if mode == "fsdp" else []
        text = self.torchrun("pretrain", *common, "--steps", "10", "--parallel", mode, *extra, "--out", out,
                             log=f"torchrun_{mode}")
        backend = "nccl" if self.device == "cuda" else "gloo"
        if f"({mode}, {backend})" not in text:
            raise RuntimeError(f"no '({mode}, {backend})' in the output: not a {backend} process group")
        dcp = self.work / out / "checkpoints" / "step_000010" / "dcp"
        if not (dcp / ".metadata").is_file():
            raise RuntimeError(f"no sharded checkpoint in {dcp}")
        (self.work / out / "checkpoints" / "latest").write_text("step_000005\n")
        shutil.rmtree(self.work / out / "final")
        text = self.nanoseek("pretrain", *common, "--steps", "10", "--out", out, "--resume",
                             log=f"torchrun_{mode}_resume")
        if "resumed from" not in text:
            raise RuntimeError("the plain process did not resume the sharded checkpoint")
        return f"1 {backend} process, {mode}{' + async save' if extra else ''}: 10 steps, sharded checkpoints; " \
               f"step 5 resumed without torchrun"

    def engine(self) -> str:
        """The engine on the device against the CPU on the same weights: fp32 greedy tokens equal (and prefill logits
        close), bf16 greedy mostly equal; a decode step with torch.cuda's sync debug mode set to error."""
        import torch

        from nanoseek.checkpoint import load_model
        from nanoseek.engine import Engine
        from nanoseek.tokenizer import Tokenizer

        final = self.work / "pre" / "final"
        tok = Tokenizer.from_dir(final)
        prompts = [tok.encode(p) for p in PROMPTS]
        n_new = 24

        def greedy(device: str, dtype: torch.dtype) -> tuple[list[list[int]], torch.Tensor, Engine]:
            engine = Engine(load_model(final, dtype=dtype, device=device), max_batch_size=8, max_seq_len=128)
            logits = engine.prefill(prompts).float().cpu()
            engine = Engine(engine.model, max_batch_size=8, max_seq_len=128)
            return engine.generate(prompts, n_new, stop_token_ids=[]), logits, engine

        ref, ref_logits, _ = greedy("cpu", torch.float32)
        if self.device == "cpu":
            out, logits, engine = greedy("cpu", torch.bfloat16)
            same = sum(a == b for a, b in zip(ref, out, strict=True))
            return f"cpu dry run: bf16 engine {same}/8 sequences equal to fp32 (no device to compare)"
        out32, logits32, engine32 = greedy(self.device, torch.float32)
        gap = (logits32 - ref_logits).abs().max().item()
        if out32 != ref or gap > 1e-3:
            diff = sum(a != b for a, b in zip(out32, ref, strict=True))
            raise RuntimeError(f"fp32 on {self.device}: {diff}/8 sequences differ from the CPU's, prefill logits "
                               f"differ by up to {gap:.2e}")
        out16, logits16, engine16 = greedy(self.device, torch.bfloat16)
        gap16 = (logits16 - ref_logits).abs().max().item()
        tokens16 = sum(x == y for a, b in zip(out16, ref, strict=True) for x, y in zip(a, b, strict=True))
        if tokens16 < 0.5 * 8 * n_new:
            raise RuntimeError(f"bf16 on {self.device}: only {tokens16}/{8 * n_new} tokens equal to the CPU's fp32")
        # a decode step of 8 slots must queue its kernels without waiting: any synchronising call raises here
        syncs = []
        for engine in (engine16, engine32):
            runner = engine.runner
            runner.prefill(prompts)
            tokens = torch.tensor([p[-1] for p in prompts], device=self.device)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.inference_mode():
                    runner.decode(tokens)
            except RuntimeError as e:
                syncs.append(f"{engine.dtype}: {e}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if syncs:
            raise RuntimeError(f"the decode step synchronised with the host ({'; '.join(syncs)})")
        return (f"fp32: 8/8 greedy sequences of {n_new} tokens equal to the CPU's, prefill logits within {gap:.1e}; "
                f"bf16: {tokens16}/{8 * n_new} tokens equal, logits within {gap16:.2f}; decode steps (bf16 grouped_mm, "
                f"fp32 gathered) without a host sync")

    def compiled(self) -> str:
        """The torch.compile'd decode step on the device: the same greedy tokens as the eager engine."""
        import torch

        from nanoseek.checkpoint import load_model
        from nanoseek.distributed import inference_dtype
        from nanoseek.engine import Engine
        from nanoseek.tokenizer import Tokenizer

        final = self.work / "pre" / "final"
        tok = Tokenizer.from_dir(final)
        prompts = [tok.encode(p) for p in PROMPTS[:4]]
        model = load_model(final, dtype=inference_dtype(torch.device(self.device)), device=self.device)
        eager = Engine(model, max_batch_size=4, max_seq_len=128).generate(prompts, 16, stop_token_ids=[])
        engine = Engine(model, max_batch_size=4, max_seq_len=128, compile=True)
        t0 = time.time()
        out = engine.generate(prompts, 16, stop_token_ids=[])
        first = time.time() - t0
        one = engine.generate(prompts[:1], 16, stop_token_ids=[])  # the batch-1 graph
        same = sum(x == y for a, b in zip(out, eager, strict=True) for x, y in zip(a, b, strict=True))
        if same < 0.9 * 4 * 16 or one[0] != out[0]:
            raise RuntimeError(f"compiled decoding gave {same}/64 of the eager tokens (batch 1 "
                               f"{'equal' if one[0] == out[0] else 'differs'})")
        stats = engine.stats()
        return (f"{stats['compiled_graphs']} graphs compiled in {stats['compile_seconds']:.0f} s (first generate "
                f"{first:.0f} s); {same}/64 tokens equal to eager, batch 1 equal to batch 4")

    def sft(self) -> str:
        text = self.nanoseek("sft", "--model", self.work / "pre" / "final", "--task", TASK, "--n", "400", "--steps",
                             "20", "--batch-size", "16", "--seq-len", "128", "--eval-every", "20", "--save-every", "10",
                             "--device", self.device, "--threads", self.args.threads, "--out", "sft")
        run = json.loads((self.work / "sft" / "run.json").read_text())
        if not run["device"].startswith(self.device):
            raise RuntimeError(f"ran on {run['device']}")
        line = next((ln for ln in text.splitlines() if ln.startswith("done:")), "")
        return f"20 steps on {run['device']} ({run['dtype']}): {line[6:].split(';')[0]}"

    def rl(self) -> str:
        model = self.work / "sft" / "final"
        if not model.is_dir():
            raise Skip("needs the sft check's model")
        self.nanoseek("rl", "--model", model, "--task", TASK, "--steps", "2", "-B", "4", "-G", "4",
                      "--max-new-tokens", "48", "--eval-every", "2", "--eval-n", "8", "--save-every", "1",
                      "--device", self.device, "--threads", self.args.threads, "--out", "rl")
        rows = [json.loads(line) for line in (self.work / "rl" / "rl_log.jsonl").read_text().splitlines()]
        run = json.loads((self.work / "rl" / "run.json").read_text())
        if [r["step"] for r in rows] != [1, 2] or not run["device"].startswith(self.device):
            raise RuntimeError(f"steps {[r['step'] for r in rows]} on {run['device']}")
        return (f"2 GRPO steps on {run['device']} ({run['dtype']}): reward {rows[0]['reward']:.2f} -> "
                f"{rows[1]['reward']:.2f}, rollouts {rows[0]['rollouts']} a step, sample {rows[0]['t_sample']:.1f} s, "
                f"train {rows[0]['t_train']:.1f} s")

    def ep_fp8(self) -> str:
        """Issue 22's section, scripts/gpu_check_ep_fp8.sh (FP8 tensor-core GEMMs, pretrain --fp8 vs bf16, --ep 2 on
        2+ GPUs; on the CPU the kernel row is skipped and the rest runs on gloo at toy size): its table is kept for
        the report, and a FAIL in it fails this row."""
        out = self.work / "ep_fp8"
        env = {**self.env, "PYTHON": sys.executable, "DEVICE": self.device, "DATA": str(self.corpus())}
        with open(self.work / "ep_fp8.log", "w") as log:
            done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check_ep_fp8.sh"), str(out)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=300, cwd=self.work)
        text = (self.work / "ep_fp8.log").read_text()
        rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| check")]
        self.section = "\n".join(line for line in text.splitlines() if line.startswith("|")) + "\n"
        summary = "; ".join(" ".join(c.strip() for c in r.strip("|").split("|")[:2]) for r in rows)
        if done.returncode != 0 or not rows:
            raise RuntimeError(f"exit {done.returncode}: {summary or text[-300:]} (log: {self.work / 'ep_fp8.log'})")
        return summary

    def serve(self) -> str:
        missing = [m for m in ("fastapi", "pydantic", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"no {', '.join(missing)} here (carry wheels: docs/gpu.md)")
        model = self.work / "sft" / "final"
        if not model.is_dir():
            raise Skip("needs the sft check's model")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(self.work / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
                                 "--device", self.device, "--threads", str(self.args.threads)], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.work, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} (log: {self.work / 'serve.log'})")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                if time.time() > deadline:
                    raise RuntimeError("the server did not answer /health within 120 s")
                time.sleep(0.5)
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "What is 3 + 4?"}],
                               "max_tokens": 32, "temperature": 0}).encode()
            req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read())
            usage = answer["usage"]
            text = answer["choices"][0]["message"]
            return (f"200 from /v1/chat/completions on {self.device}: {usage['completion_tokens']} tokens, "
                    f"reasoning {len(text.get('reasoning_content') or '')} chars, content "
                    f"{(text.get('content') or '')[:40]!r}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default; torchrun on nccl) or cpu (the dry run: the same steps with gloo)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                   help="where gpu_check.md / .json go (default $OUT, else runs/gpu_check)")
    p.add_argument("--work", default=None, help="scratch directory (default: <out>/work)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per process (default 2)")
    p.add_argument("--only", nargs="*", help="run only these checks (pretrain first: the others use its model)")
    args = p.parse_args()
    out = Path(args.out)
    args.work = args.work or str(out / "work")
    shutil.rmtree(args.work, ignore_errors=True)
    Path(args.work).mkdir(parents=True)
    check = Check(args)
    t0 = time.time()
    steps = [("environment", check.environment), ("pretrain bf16 + resume", check.pretrain),
             ("torchrun 1 process, DDP", lambda: check.torchrun_mode("ddp")),
             ("torchrun 1 process, FSDP2", lambda: check.torchrun_mode("fsdp")),
             ("engine greedy: device vs CPU", check.engine), ("compiled decode", check.compiled),
             ("sft", check.sft), ("rl: 2 GRPO steps", check.rl), ("serve: one request", check.serve),
             ("ep/fp8 section (scripts/gpu_check_ep_fp8.sh)", check.ep_fp8)]
    for name, fn in steps:
        if args.only and not any(o in name for o in args.only):
            continue
        check.run(name, fn)
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    title = (f"gpu_check on {device}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{time.time() - t0:.0f} s in all")
    md = table(check.rows, title)
    if check.section:
        md += "\n#### ep/fp8 section (scripts/gpu_check_ep_fp8.sh)\n\n" + check.section
    print("\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps({"title": title, "rows": check.rows}, indent=1) + "\n")
    failures = out / "work" / "failures.log"
    if failures.is_file() and Path(args.work) != out / "work":
        shutil.copy(failures, out / "failures.log")
    return 1 if any(r["result"] == "FAIL" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
