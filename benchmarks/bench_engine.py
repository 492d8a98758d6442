"""Engine benchmark: nanoseek against transformers `generate` and llama.cpp, on the same weights and prompts.

    python benchmarks/bench_engine.py                         # runs/pretrain/final, 2 threads, ~6 min
    python benchmarks/bench_engine.py --quick                 # the same table with shorter runs: < 2 min
    python benchmarks/bench_engine.py --model DIR --threads 1 --only nanoseek

Engines (each configuration in its own long-lived subprocess, all with --threads threads; all are loaded first, then
measured round-robin, one at a time, --repeats times, so a slow spell on a shared machine hits every engine alike):
  nanoseek      Engine.from_pretrained: fp32, bf16, int8, int4 (weight-only, quant.py), each with and without MTP
                speculative decoding (speculative=True); and fp32 with compile=True ("compiled": the decode step as
                torch.compile'd graphs; their compile time, in the warm-up, is the "compile s" column)
  transformers  DeepseekV3ForCausalLM.generate, fp32 and bf16 (its expanded-KV DynamicCache)
  llama.cpp     llama-cpp-python's C API on the GGUF that nanoseek.export.export_gguf writes from the same
                checkpoint: f32 (f32 KV cache), f16 and q8_0 (f16 KV cache, llama.cpp's default); batch 16 runs
                16 sequences in one llama_batch per step (n_seq_max = 16)

Prompts are token ids from the bundled corpus's val split (prepare_data with the checkpoint's tokenizer), fed as
ids to every engine; decoding is greedy and ignores EOS. Metrics, each the best of the --repeats runs (the least
disturbed), in wall-clock tokens/s and in tokens per CPU-second of the engine's process (steadier under load):
  decode b1     one prompt of --prompt-len tokens, --new tokens: (new - 1) / (time of the last token - time of the
                first); the prefill is not included
  decode b16    16 different prompts of --prompt-len tokens decoded together: 16 (new - 1) / the same interval
  prefill       one prompt of --prefill-len tokens to its last-position logits: tokens / seconds
  memory        RSS once loaded and warmed up, and the process's peak RSS (ru_maxrss) during the run, both minus
                the RSS after imports (measured in the subprocess before the weights are read)
  perplexity    nanoseek only, through the engine's own forward (Engine.perplexity): the first --ppl-tokens tokens
                of val.bin in windows of 256
  acceptance    MTP draft acceptance rate of the speculative runs (engine.stats())
  same tokens   whether the batch-1 greedy output equals nanoseek fp32's (first divergence otherwise)

Writes benchmarks/results/bench_engine.json and docs/bench_engine.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# as `import nanoseek` does (docs/LOG.md): spinning OpenMP threads wreck multi-threaded runs on a shared machine.
# Set here, before any worker imports torch, so every engine's process gets the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

B16 = 16
NANOSEEK = [(p, s, False) for p in ("fp32", "bf16", "int8", "int4") for s in (False, True)]
NANOSEEK += [("fp32", s, True) for s in (False, True)]  # compile=True
TRANSFORMERS = ["fp32", "bf16"]
LLAMA = ["f32", "f16", "q8_0"]
MATCH = {"fp32": ("fp32", "f32"), "bf16": ("bf16", "f16"), "int8": (None, "q8_0")}  # nanoseek -> (hf, llama.cpp)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


Rates = tuple[float, float]  # (tokens per wall second, tokens per CPU second of the whole process)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(tokens: int, start: tuple[float, float], end: tuple[float, float]) -> Rates:
    return tokens / (end[0] - start[0]), tokens / max(end[1] - start[1], 1e-9)


# --- workers: one long-lived subprocess per configuration -----------------------------------------------------------
# A session loads its engine and warms it up (then prints READY), runs one repeat of the three measurements per
# "run" command, and reports memory (and perplexity) on "final". The driver sends "run" to every session in turn,
# so a slow spell on a shared machine hits all configurations alike instead of one.
class NanoseekSession:
    def __init__(self, job: dict, data: dict):
        import torch

        from nanoseek.engine import Engine

        torch.set_num_threads(job["threads"])
        self.job, self.data, self.base = job, data, rss_mb()
        prec = job["prec"]
        self.engine = Engine.from_pretrained(job["model"], dtype=torch.bfloat16 if prec == "bf16" else torch.float32,
                                             quant=prec if prec in ("int8", "int4") else None,
                                             speculative=job["speculative"], max_batch_size=B16,
                                             max_seq_len=data["max_seq_len"], compile=job["compile"])
        self.generate(data["prompts"][:1], 8)  # warm-up (compile=True: the batch-1 graphs ...
        self.generate(data["prompts"][:2], 8)  # ... and the batch >= 2 ones)
        stats = self.engine.stats()
        self.info = dict(rss_loaded_mb=rss_mb() - self.base, weight_mb=stats["weight_bytes"] / 2**20)
        if job["compile"]:
            self.info["compile_s"] = stats["compile_seconds"]

    def generate(self, prompts: list[list[int]], new: int) -> tuple[Rates, list[int]]:
        from nanoseek.engine import SamplingParams

        times: list[tuple[float, float]] = []
        params = SamplingParams(new, stop_token_ids=[])
        reqs = [self.engine.submit(p, params, on_event=lambda ev: times.append(clocks())) for p in prompts]
        first = None
        while not all(r.finished for r in reqs):
            self.engine.step()
            if first is None and all(r.output_ids for r in reqs):
                first = times[len(prompts) - 1]  # when the last first token of the batch came out
        return rates(len(prompts) * (new - 1), first, times[-1]), reqs[0].output_ids

    def run_once(self) -> dict:
        b1, tokens = self.generate(self.data["prompts"][:1], self.data["new_b1"])
        b16, _ = self.generate(self.data["prompts"], self.data["new_b16"])
        t = clocks()
        self.engine.prefill([self.data["prefill_prompt"]])
        return dict(decode_b1=b1, decode_b16=b16, prefill=rates(len(self.data["prefill_prompt"]), t, clocks()),
                    tokens_b1=tokens)

    def final(self) -> dict:
        out = dict(peak_rss_mb=peak_rss_mb() - self.base)
        if self.job["speculative"]:
            out["acceptance"] = self.engine.stats()["acceptance_rate"]
        else:
            out["perplexity"] = self.engine.perplexity(self.data["val_tokens"], 256)
        return out


class TransformersSession:
    def __init__(self, job: dict, data: dict):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(job["threads"])
        self.torch, self.data, self.base = torch, data, rss_mb()
        dtype = torch.bfloat16 if job["prec"] == "bf16" else torch.float32
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(job["model"], dtype=dtype).eval()
        self.model.generation_config.eos_token_id = None  # never stop early
        self.generate(data["prompts"][:2], 8)
        self.info = dict(rss_loaded_mb=rss_mb() - self.base)

    def generate(self, prompts: list[list[int]], new: int) -> tuple[tuple[float, float], list[int]]:
        ids = self.torch.tensor(prompts)
        t = clocks()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        end = clocks()
        return (end[0] - t[0], end[1] - t[1]), out[0, ids.shape[1]:].tolist()

    def rate(self, prompts: list[list[int]], new: int) -> tuple[Rates, list[int]]:
        t1, _ = self.generate(prompts, 1)  # the prefill and first token alone, subtracted below
        tn, tokens = self.generate(prompts, new)
        return rates(len(prompts) * (new - 1), t1, tn), tokens

    def run_once(self) -> dict:
        b1, tokens = self.rate(self.data["prompts"][:1], self.data["new_b1"])
        b16, _ = self.rate(self.data["prompts"], self.data["new_b16"])
        ids = self.torch.tensor([self.data["prefill_prompt"]])
        t = clocks()
        with self.torch.inference_mode():
            self.model(ids, logits_to_keep=1)
        return dict(decode_b1=b1, decode_b16=b16, prefill=rates(ids.shape[1], t, clocks()), tokens_b1=tokens)

    def final(self) -> dict:
        return dict(peak_rss_mb=peak_rss_mb() - self.base)


class LlamaSession:
    """llama.cpp through llama-cpp-python's C API: batch 1 and batch 16 each in their own context (n_seq_max 1 / 16;
    batch 16 decodes one llama_batch of 16 tokens, one per sequence, per step); greedy = argmax of the logits."""

    def __init__(self, job: dict, data: dict):
        import llama_cpp as lc

        self.lc, self.job, self.data, self.base = lc, job, data, rss_mb()
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(job["gguf"].encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {job['gguf']}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        plen, pre = len(data["prompts"][0]), len(data["prefill_prompt"])
        self.n_batch = max(B16 * plen, pre)
        self.ctx1 = self.context(1, max(plen + data["new_b1"], pre) + 8)
        self.ctx16 = self.context(B16, plen + max(data["new_b1"], data["new_b16"]) + 8)
        self.batch = lc.llama_batch_init(self.n_batch, 0, B16)
        self.generate(self.ctx1, data["prompts"][:1], 8)
        self.generate(self.ctx16, data["prompts"], 4)
        self.info = dict(rss_loaded_mb=rss_mb() - self.base, gguf_mb=os.path.getsize(job["gguf"]) / 2**20)

    def context(self, n_seq: int, n_ctx_per_seq: int):  # noqa: ANN201
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_seq * n_ctx_per_seq, self.n_batch, self.n_batch, n_seq
        p.n_threads = p.n_threads_batch = self.job["threads"]
        p.type_k = p.type_v = 0 if self.job["prec"] == "f32" else 1  # GGML_TYPE_F32 / GGML_TYPE_F16
        p.no_perf = True
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError("llama.cpp: llama_init_from_model failed")
        return ctx

    def decode(self, ctx, items: list[tuple[int, int, int, bool]]):  # noqa: ANN001, ANN201
        """items: (token, position, sequence, want logits) -> logits [n_wanted, V] in order (a numpy view)."""
        import ctypes

        import numpy as np

        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, want
        if self.lc.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama.cpp: llama_decode failed")
        ptr = ctypes.cast(self.lc.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(sum(1 for it in items if it[3]), self.n_vocab))

    def generate(self, ctx, prompts: list[list[int]], new: int) -> tuple[Rates, list[int]]:  # noqa: ANN001
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        tokens = self.decode(ctx, [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts)
                                   for j, t in enumerate(p)]).argmax(-1)
        first = clocks()
        out = [[int(t)] for t in tokens]
        for k in range(new - 1):
            tokens = self.decode(ctx, [(int(t), len(p) + k, s, True)
                                       for s, (t, p) in enumerate(zip(tokens, prompts, strict=True))]).argmax(-1)
            for o, t in zip(out, tokens, strict=True):
                o.append(int(t))
        return rates(len(prompts) * (new - 1), first, clocks()), out[0]

    def run_once(self) -> dict:
        b1, tokens = self.generate(self.ctx1, self.data["prompts"][:1], self.data["new_b1"])
        b16, _ = self.generate(self.ctx16, self.data["prompts"], self.data["new_b16"])
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx1), True)
        p = self.data["prefill_prompt"]
        t = clocks()
        self.decode(self.ctx1, [(tok, j, 0, j == len(p) - 1) for j, tok in enumerate(p)])
        return dict(decode_b1=b1, decode_b16=b16, prefill=rates(len(p), t, clocks()), tokens_b1=tokens)

    def final(self) -> dict:
        return dict(peak_rss_mb=peak_rss_mb() - self.base)


SESSIONS = {"nanoseek": NanoseekSession, "transformers": TransformersSession, "llama.cpp": LlamaSession}


def worker_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    data = json.loads(Path(job["data"]).read_text())
    session = SESSIONS[job["engine"]](job, data)
    print("READY " + json.dumps(session.info), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print("RESULT " + json.dumps(session.run_once()), flush=True)
        elif line.strip() == "final":
            print("FINAL " + json.dumps(session.final()), flush=True)
            return


# --- the driver ----------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Prompts and val tokens from the bundled corpus, tokenised with the checkpoint's tokenizer."""
    import numpy as np

    from nanoseek.data import default_corpus_files, prepare_data
    from nanoseek.tokenizer import Tokenizer

    meta = prepare_data(default_corpus_files(), Tokenizer.from_dir(args.model), work / "data")
    val = np.memmap(work / "data" / "val.bin", dtype=meta["dtype"], mode="r")
    need = B16 * args.prompt_len + args.prefill_len
    if len(val) < max(need, args.ppl_tokens + 1):
        raise SystemExit(f"val split too small: {len(val)} tokens")
    # prompts from evenly spaced places of the val split, so they are different texts
    stride = (len(val) - args.prompt_len) // B16
    prompts = [val[i * stride:i * stride + args.prompt_len].tolist() for i in range(B16)]
    prefill = val[len(val) - args.prefill_len:].tolist()
    return dict(prompts=prompts, prefill_prompt=prefill, val_tokens=val[:args.ppl_tokens + 1].tolist(),
                new_b1=args.new_b1, new_b16=args.new_b16,
                max_seq_len=max(args.prompt_len + max(args.new_b1, args.new_b16) + 2, args.prefill_len + 1, 256),
                val_tokens_total=len(val))


def export_ggufs(model: Path, work: Path) -> dict[str, Path]:
    from nanoseek.export import export_gguf

    out = {}
    stamp = max(p.stat().st_mtime for p in model.iterdir())
    for dtype in LLAMA:
        path = work / f"model-{dtype}.gguf"
        if not path.exists() or path.stat().st_mtime < stamp:
            export_gguf(model, path, dtype=dtype)
        out[dtype] = path
    return out


class Worker:
    """One configuration's subprocess: READY / RESULT / FINAL lines on its stdout, its stderr in a log file."""

    def __init__(self, name: str, job: dict, work: Path, index: int):
        path = work / f"job-{index}.json"
        path.write_text(json.dumps(job))
        self.name, self.runs, self.error = name, [], None
        self.log_path = work / f"worker-{index}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        self.info = self.read("READY")

    def read(self, tag: str) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.proc.wait()
        lines = self.log_path.read_text().strip().splitlines()
        self.error = lines[-1] if lines else f"exited with code {self.proc.returncode}"
        return None

    def ask(self, command: str, tag: str) -> dict | None:
        if self.error:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.read(tag)

    def summary(self, final: dict | None) -> dict:
        """Best of the repeats, wall-clock and CPU-time rates separately (the least disturbed runs)."""
        if self.error or not self.runs or final is None:
            return {"error": self.error or "no result"}
        out = {**self.info, **final, "tokens_b1": self.runs[0]["tokens_b1"]}
        for key in ("decode_b1", "decode_b16", "prefill"):
            out[key] = max(r[key][0] for r in self.runs)
            out[key + "_cpu"] = max(r[key][1] for r in self.runs)
        return out


def same_tokens(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "n/a"
    n = min(len(a), len(b))
    diff = next((i for i in range(n) if a[i] != b[i]), None)
    return "yes" if diff is None else f"from token {diff}"


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import llama_cpp
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = "?"
    return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__, llama_cpp=llama_cpp.__version__,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), git_commit=commit,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "pretrain" / "final",
                    help="checkpoint directory with tokenizer (default runs/pretrain/final, from `nanoseek pretrain`)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    ap.add_argument("--quick", action="store_true", help="short runs: < 2 minutes on an idle 2-core machine")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 5; quick 1)")
    ap.add_argument("--prompt-len", type=int, default=64, help="decode prompt length (default 64)")
    ap.add_argument("--new-b1", type=int, default=None, help="new tokens at batch 1 (default 128; quick 32)")
    ap.add_argument("--new-b16", type=int, default=None, help="new tokens per sequence at batch 16 (default 64; "
                                                              "quick 16)")
    ap.add_argument("--prefill-len", type=int, default=None, help="prefill prompt length (default 512; quick 128)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="val tokens for perplexity (default 32768; "
                                                                 "quick 4096)")
    ap.add_argument("--only", nargs="+", choices=list(SESSIONS), default=list(SESSIONS), help="engines to run")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nanoseek_bench_engine"),
                    help="tokenised data and GGUF files (reused between runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_engine.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_engine.md")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 5)
    args.new_b1 = args.new_b1 or (32 if q else 128)
    args.new_b16 = args.new_b16 or (16 if q else 64)
    args.prefill_len = args.prefill_len or (128 if q else 512)
    args.ppl_tokens = args.ppl_tokens or (4096 if q else 32768)
    if not (args.model / "config.json").is_file() or not (args.model / "tokenizer.json").is_file():
        raise SystemExit(f"{args.model}: not a checkpoint directory with config.json and tokenizer.json; train one "
                         f"with `nanoseek pretrain --out runs/pretrain` or pass --model")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    data = prepare(args, args.workdir)
    (args.workdir / "data.json").write_text(json.dumps(data))
    ggufs = export_ggufs(args.model, args.workdir) if "llama.cpp" in args.only else {}
    base = dict(model=str(args.model.resolve()), threads=args.threads, repeats=args.repeats,
                data=str(args.workdir / "data.json"))
    jobs = []
    if "nanoseek" in args.only:
        jobs += [dict(engine="nanoseek", prec=p, speculative=s, compile=c) for p, s, c in NANOSEEK]
    if "transformers" in args.only:
        jobs += [dict(engine="transformers", prec=p) for p in TRANSFORMERS]
    if "llama.cpp" in args.only:
        jobs += [dict(engine="llama.cpp", prec=p, gguf=str(ggufs[p])) for p in LLAMA]
    workers = []
    for i, job in enumerate(jobs):  # all loaded first, then measured round-robin (see the worker sessions)
        name = (f"{job['engine']} {job['prec']}" + (" compiled" if job.get("compile") else "")
                + (" +MTP" if job.get("speculative") else ""))
        workers.append(Worker(name, {**base, **job}, args.workdir, i))
        print(f"loaded {name}" + (f": error: {workers[-1].error}" if workers[-1].error else ""), flush=True)
    for rep in range(args.repeats):
        for w in workers:
            r = w.ask("run", "RESULT")
            if r is not None:
                w.runs.append(r)
                print(f"run {rep + 1}/{args.repeats} {w.name:22s} b1 {r['decode_b1'][0]:7.1f} tok/s, b16 "
                      f"{r['decode_b16'][0]:7.1f} tok/s, prefill {r['prefill'][0]:6.0f} tok/s", flush=True)
    results = [{"name": w.name, **job, **w.summary(w.ask("final", "FINAL"))}
               for w, job in zip(workers, jobs, strict=True)]
    res = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), command="python " + " ".join(
        [os.path.relpath(__file__, ROOT)] + sys.argv[1:]), settings=dict(
        threads=args.threads, repeats=args.repeats, prompt_len=args.prompt_len, new_b1=args.new_b1,
        new_b16=args.new_b16, prefill_len=args.prefill_len, ppl_tokens=args.ppl_tokens, quick=q,
        model=str(args.model), val_tokens_total=data["val_tokens_total"]),
        machine={**machine(), "load_average_start": load_start, "load_average_end": os.getloadavg()[0]},
        wall_seconds=time.perf_counter() - t_start, results=results)
    res["targets"] = targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    write_report(res, args.report)
    print(f"wrote {args.out} and {args.report} ({res['wall_seconds']:.0f} s)")


def find(results: list[dict], name: str) -> dict | None:
    r = next((r for r in results if r["name"] == name), None)
    return r if r is not None and "error" not in r else None


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each measured on wall-clock and on CPU-time rates (None when an engine did not run)."""
    out = []

    def ratio(a: str, b: str, key: str) -> float | None:
        ra, rb = find(results, a), find(results, b)
        return ra[key] / rb[key] if ra and rb and ra.get(key) is not None and rb.get(key) else None

    def add(what: str, a: str, b: str, key: str, goal: float) -> None:
        wall = ratio(a, b, key)
        cpu = ratio(a, b, key + "_cpu") if key != "perplexity" else None
        if key == "perplexity":  # goal: relative increase <= goal
            wall = None if wall is None else wall - 1
            met = None if wall is None else wall <= goal
            out.append(dict(target=what, wall=wall, cpu=None, goal=goal, met_wall=met, met_cpu=None))
            return
        out.append(dict(target=what, wall=wall, cpu=cpu, goal=goal,
                        met_wall=None if wall is None else (wall > goal if goal == 1 else wall >= goal),
                        met_cpu=None if cpu is None else (cpu > goal if goal == 1 else cpu >= goal)))

    for prec, (hf, llama) in [*MATCH.items(), ("fp32 compiled", MATCH["fp32"])]:
        ns = f"nanoseek {prec}"
        if hf:
            add(f"decode b1: {ns} / transformers {hf} >= 4x", ns, f"transformers {hf}", "decode_b1", 4)
            add(f"decode b16: {ns} / transformers {hf} >= 5x", ns, f"transformers {hf}", "decode_b16", 5)
        add(f"decode b1: {ns} / llama.cpp {llama} >= 0.7x", ns, f"llama.cpp {llama}", "decode_b1", 0.7)
        add(f"decode b16: {ns} / llama.cpp {llama} > 1x", ns, f"llama.cpp {llama}", "decode_b16", 1)
    add("decode b1: nanoseek int8 / nanoseek fp32 >= 1.5x", "nanoseek int8", "nanoseek fp32", "decode_b1", 1.5)
    add("perplexity: int8 / fp32 - 1 <= 1%", "nanoseek int8", "nanoseek fp32", "perplexity", 0.01)
    for prec in ("fp32", "int8", "fp32 compiled"):
        add(f"decode b1: nanoseek {prec} +MTP / nanoseek {prec} >= 1.5x", f"nanoseek {prec} +MTP",
            f"nanoseek {prec}", "decode_b1", 1.5)
    add("decode b1: nanoseek fp32 compiled / nanoseek fp32 (eager) > 1x", "nanoseek fp32 compiled", "nanoseek fp32",
        "decode_b1", 1)
    add("decode b16: nanoseek fp32 compiled / nanoseek fp32 (eager) > 1x", "nanoseek fp32 compiled", "nanoseek fp32",
        "decode_b16", 1)
    return out


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None or v != v else format(v, spec)


def write_report(res: dict, path: Path) -> None:
    s, m, results = res["settings"], res["machine"], res["results"]
    ref = find(results, "nanoseek fp32")
    ref_tokens = ref["tokens_b1"] if ref else None
    lines = [
        "# Engine benchmark: nanoseek vs transformers vs llama.cpp",
        "",
        f"Run {res['date']}, `{res['command']}` ({res['wall_seconds']:.0f} s). Generated by "
        "`benchmarks/bench_engine.py`; the definitions of every column are in its docstring. Engine design and the "
        "analysis of these numbers: [engine.md](engine.md).",
        "",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['torch_cpu_capability']}), {m['platform']}; Python "
        f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, llama-cpp-python {m['llama_cpp']}; "
        f"git {m['git_commit']}. Load average {m['load_average_start']:.1f} at the start and "
        f"{m['load_average_end']:.1f} at the end"
        + (" (the machine was shared: absolute numbers are noisy, ratios less so)." if max(
            m['load_average_start'], m['load_average_end']) > 1.5 else "."),
        f"- **Model:** `{s['model']}`. **Threads:** {s['threads']} for every engine (torch threads; llama.cpp "
        f"n_threads and n_threads_batch); OMP_WAIT_POLICY={m.get('omp_wait_policy')}.",
        f"- **Workload:** greedy, EOS ignored; batch 1: a {s['prompt_len']}-token prompt, {s['new_b1']} new tokens; "
        f"batch 16: 16 different {s['prompt_len']}-token prompts, {s['new_b16']} new tokens each; prefill: one "
        f"{s['prefill_len']}-token prompt. Best of {s['repeats']} runs. Perplexity: first {s['ppl_tokens']:,} "
        f"tokens of the val split ({s['val_tokens_total']:,} tokens), windows of 256.",
        "- **Memory:** RSS after loading and a warm-up, and peak RSS (ru_maxrss) over the run, both minus the RSS "
        "after imports, each engine in its own process; nanoseek's engine holds a 16-slot latent cache sized for "
        "the run. *weights* is what the engine keeps (nanoseek: `stats()['weight_bytes']`; llama.cpp: the GGUF).",
        "",
        "| engine | decode b1 tok/s | b1 CPU | decode b16 tok/s | b16 CPU | prefill tok/s | prefill CPU | RSS loaded "
        "MB | peak RSS MB | weights MB | perplexity | MTP acceptance | b1 tokens = nanoseek fp32 | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |||||||||||||")
            continue
        weights = r.get("weight_mb", r.get("gguf_mb"))
        lines.append(f"| {r['name']} | {fmt(r['decode_b1'], '.1f')} | {fmt(r['decode_b1_cpu'], '.1f')} | "
                     f"{fmt(r['decode_b16'], '.1f')} | {fmt(r['decode_b16_cpu'], '.1f')} | {fmt(r['prefill'])} | "
                     f"{fmt(r['prefill_cpu'])} | {fmt(r['rss_loaded_mb'])} | {fmt(r['peak_rss_mb'])} | "
                     f"{fmt(weights, '.1f')} | {fmt(r.get('perplexity'), '.3f')} | "
                     f"{fmt(r.get('acceptance'), '.1%')} | {same_tokens(ref_tokens, r.get('tokens_b1'))} | "
                     f"{fmt(r.get('compile_s'))} |")
    lines += ["", "*tok/s* columns are wall clock; *CPU* columns are tokens per CPU-second of the engine's process "
              "(all its threads): steadier than wall clock when other jobs share the machine, and equal to it for "
              "one thread on an idle machine.", "", "## Targets", "",
              "| target | wall clock | CPU time | met (wall) | met (CPU) |", "|---|---:|---:|:---:|:---:|"]

    def yes(v: bool | None) -> str:
        return "—" if v is None else ("yes" if v else "no")

    for t in res["targets"]:
        if "perplexity" in t["target"]:
            shown = "—" if t["wall"] is None else f"{t['wall']:+.3%}"
            lines.append(f"| {t['target']} | {shown} | | {yes(t['met_wall'])} | |")
        else:
            lines.append(f"| {t['target']} | {fmt(t['wall'], '.2f')}x | {fmt(t['cpu'], '.2f')}x | "
                         f"{yes(t['met_wall'])} | {yes(t['met_cpu'])} |")
    lines += ["", "Precision pairs: nanoseek fp32 ~ llama.cpp f32 (f32 KV cache); nanoseek bf16 ~ llama.cpp f16 "
              "(the nearest 16-bit type; f16 KV cache); nanoseek int8 (per-channel int8 weights, bf16 kernel "
              "activations, fp32 cache) ~ llama.cpp q8_0 (blocks of 32 int8 weights, q8 activations, f16 KV cache).",
              "", "For a model this small, two threads can be slower than one for every engine (each op is too small "
              "to split; docs/engine.md has a `--threads 1` run next to this one): compare engines at the same "
              "setting.",
              ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
