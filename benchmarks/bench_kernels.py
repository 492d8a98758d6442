"""Native decode kernels (nanoseek/kernels) against the engine's PyTorch decode and llama.cpp, on the same weights.

    python benchmarks/bench_kernels.py                                          # cpu preset, random init, ~3 min
    python benchmarks/bench_kernels.py --model /tmp/ns_cpu/final                # a checkpoint (nanoseek pretrain)
    python benchmarks/bench_kernels.py --config benchmarks/configs/v3_0p5b.json --new 16 --repeats 3   # 0.54B

Workers, each in its own long-lived subprocess with --threads threads (torch threads = native threads; llama.cpp
n_threads), loaded first and then measured round-robin --repeats times, best run kept (a slow spell on the shared
machine hits every configuration alike):
  nanoseek fp32 / int8 / int4   one Engine (weight-only quant.py modes for int8/int4) measured three ways in turn:
                                `native` (NativeDecoder.decode, one C call a step), `pytorch` (Engine.decode, the
                                eager path `generate` uses today) and `native step` (Engine.step, the scheduler and
                                sampling included, with NativeDecoder wired in as Engine.decode)
  llama.cpp f32 / q8_0 / q4_0   llama-cpp-python's C API on the GGUF nanoseek.export.export_gguf writes (f32), and
                                llama_model_quantize's q8_0 / q4_0 of it (pure: every weight, lm_head included, as
                                nanoseek's int8/int4); KV cache f32
Workload: greedy decode of --new tokens after --prompt-len-token prompts (random ids, seed 0), batch 1 and 16 (16
different prompts decoded together); tok/s = b * new / the decode loop's time (prefill excluded), in wall clock and
per CPU-second of the worker process (all its threads; steadier under load). `same` = the batch-1 greedy tokens of
native equal pytorch's at that precision.

Call overhead (`--overhead`, also part of every run): microseconds per call from Python of a no-op C function
through ctypes (how NativeDecoder calls the library), of the same call wrapped as a torch.library.custom_op, and of
a C++ op through PyTorch's dispatcher (torch.ops.aten.add.out on 1-element tensors: what a C++ torch.library op
would cost at least; building one needs torch's headers and a C++ compile of minutes, which the install rules out).

Profile (`--profile`): where a native step's time goes (NativeDecoder.profile: seconds per phase, summed over
--new steps at each batch and precision, in this process with --threads[0] threads), printed as a table.

Writes benchmarks/results/bench_kernels_<name>.json and rebuilds docs/bench_kernels.md from every such file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import nanoseek` does

NANOSEEK = ["fp32", "int8", "int4"]
LLAMA = ["f32", "q8_0", "q4_0"]
PAIR = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # equal precision (weights)
BATCHES = (1, 16)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(tokens: int, t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clocks()
    return tokens / (t1[0] - t0[0]), tokens / max(t1[1] - t0[1], 1e-9)


# --- workers ---------------------------------------------------------------------------------------------------------
class NanoseekSession:
    def __init__(self, job: dict, data: dict):
        import torch

        from nanoseek.engine import Engine
        from nanoseek.kernels import native_decoder

        torch.set_num_threads(job["threads"])
        self.torch, self.data, prec = torch, data, job["prec"]
        self.engine = Engine.from_pretrained(job["model"], quant=None if prec == "fp32" else prec,
                                             max_batch_size=max(BATCHES), max_seq_len=data["max_seq_len"])
        self.native, why = native_decoder(self.engine)
        if self.native is None:
            raise RuntimeError(why)
        self.first = {}
        for b in BATCHES:  # prefill once; every run rewinds the lengths to the prompts (the prompt rows stay)
            prompts = data["prompts"][:b]
            self.first[b] = self.engine.prefill(prompts).argmax(-1)
            self.engine._set_lengths(0, [len(p) for p in prompts])
            self.loop(b, "native", 4)
            self.loop(b, "pytorch", 2)
        self.info = dict(isa=self.native.isa, status=why, weight_mb=self.engine.stats()["weight_bytes"] / 2**20)

    def loop(self, b: int, path: str, new: int) -> tuple[tuple[float, float], list[int]]:
        eng, native = self.engine, self.native
        lens = [len(p) for p in self.data["prompts"][:b]]
        eng._set_lengths(0, lens)
        tok, out = self.first[b], []
        t0 = clocks()
        for _ in range(new):
            if path == "native":
                logits = native.decode(tok, eng.slot_lengths[:b])
                eng._set_lengths(0, [m + 1 for m in eng.slot_lengths[:b]])
            else:
                logits = eng.decode(tok)
            tok = logits.argmax(-1)
            out.append(int(tok[0]))
        return rates(b * new, t0), out

    def step_loop(self, b: int, new: int) -> tuple[float, float]:
        """Engine.step with the native decode wired in: scheduler, sampling and bookkeeping included."""
        from nanoseek.engine import SamplingParams

        eng, native = self.engine, self.native

        def decode(tokens):
            logits = native.decode(tokens, eng.slot_lengths[:len(tokens)])
            eng._set_lengths(0, [m + 1 for m in eng.slot_lengths[:len(tokens)]])
            return logits

        eng.decode = decode
        try:
            reqs = [eng.submit(p, SamplingParams(new + 1, stop_token_ids=[])) for p in self.data["prompts"][:b]]
            eng.step()  # prefill + the first decode step
            t0 = clocks()
            while not all(r.finished for r in reqs):
                eng.step()
            return rates(b * (new - 1), t0)
        finally:
            del eng.decode

    def run_once(self) -> dict:
        out, new = {}, self.data["new"]
        for b in BATCHES:
            out[f"native b{b}"], tok_native = self.loop(b, "native", new)
            out[f"pytorch b{b}"], tok_torch = self.loop(b, "pytorch", new)
            out[f"native step b{b}"] = self.step_loop(b, new)
            if b == 1:
                out["same"] = tok_native == tok_torch
        return out


class LlamaSession:
    def __init__(self, job: dict, data: dict):
        import llama_cpp as lc

        self.lc, self.data = lc, data
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        # this build of llama.cpp (0.3.36 wheel) asserts in its scheduler (GGML_ASSERT(*cur_backend_id != -1)) on
        # the quantised deepseek2 GGUFs with its "extra" (repacked) weight buffers; without them it runs
        mp.use_extra_bufts = job["prec"] == "f32"
        self.model = lc.llama_model_load_from_file(job["gguf"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {job['gguf']}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        plen = len(data["prompts"][0])
        self.ctx = {b: self.context(job, b, plen + data["new"] + 8) for b in BATCHES}
        self.batch = lc.llama_batch_init(max(BATCHES) * plen, 0, max(BATCHES))
        for b in BATCHES:
            self.loop(b, 4)
        self.info = dict(gguf_mb=os.path.getsize(job["gguf"]) / 2**20, extra_bufts=bool(mp.use_extra_bufts))

    def context(self, job: dict, n_seq: int, per_seq: int):  # noqa: ANN201
        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_seq_max = n_seq * per_seq, n_seq
        p.n_batch = p.n_ubatch = max(BATCHES) * len(self.data["prompts"][0])
        p.n_threads = p.n_threads_batch = job["threads"]
        p.type_k = p.type_v = 0  # f32 KV cache, as nanoseek's latent cache
        p.no_perf = True
        return self.lc.llama_init_from_model(self.model, p)

    def decode(self, ctx, items):  # noqa: ANN001, ANN201
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

    def loop(self, b: int, new: int) -> tuple[tuple[float, float], list[int]]:
        ctx, prompts = self.ctx[b], self.data["prompts"][:b]
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        tok = self.decode(ctx, [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts)
                                for j, t in enumerate(p)]).argmax(-1)
        out = []
        t0 = clocks()
        for k in range(new):
            tok = self.decode(ctx, [(int(t), len(p) + k, s, True)
                                    for s, (t, p) in enumerate(zip(tok, prompts, strict=True))]).argmax(-1)
            out.append(int(tok[0]))
        return rates(b * new, t0), out

    def run_once(self) -> dict:
        return {f"llama.cpp b{b}": self.loop(b, self.data["new"])[0] for b in BATCHES}


def worker_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    data = json.loads(Path(job["data"]).read_text())
    session = (NanoseekSession if job["engine"] == "nanoseek" else LlamaSession)(job, data)
    print("READY " + json.dumps(session.info), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print("RESULT " + json.dumps(session.run_once()), flush=True)
        else:
            return


class Worker:
    def __init__(self, name: str, job: dict, work: Path):
        path = work / f"job-{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(job))
        self.name, self.runs, self.error = name, [], None
        self.log = work / f"worker-{name.replace(' ', '_')}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        self.info = self.read("READY")

    def read(self, tag: str) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.proc.wait()
        lines = self.log.read_text().strip().splitlines()
        self.error = next((ln for ln in reversed(lines) if "Error" in ln or "ASSERT" in ln), lines[-1] if lines else
                          f"exited with code {self.proc.returncode}")
        return None

    def run(self) -> None:
        if self.error:
            return
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self.read("RESULT")
        if r is not None:
            self.runs.append(r)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()

    def best(self) -> dict:
        """Best wall-clock and best CPU-time rate of each measurement over the repeats."""
        if not self.runs:
            return {"error": self.error or "no result"}
        out = {}
        for key in self.runs[0]:
            if key == "same":
                out[key] = all(r[key] for r in self.runs)
            else:
                out[key] = [max(r[key][0] for r in self.runs), max(r[key][1] for r in self.runs)]
        return out


def call_overhead() -> dict[str, float]:
    """Microseconds per call (best of 5 rounds) of the ways Python could call the kernels (module docstring)."""
    import ctypes

    import torch

    from nanoseek.kernels import library

    lib = library()
    if lib is None:
        return {}
    tok, out = torch.tensor([3]), torch.empty(1, 8)
    raw = ctypes.CDLL(lib._name).ns_noop  # no argtypes: plain ints

    def per_call(f, n: int = 20000) -> float:
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter() - t0) / n)
        return round(best * 1e6, 2)

    @torch.library.custom_op("nanoseek_bench::noop", mutates_args=("out",),
                             schema="(Tensor tokens, Tensor(a!) out) -> ()")  # (annotations are strings here)
    def noop(tokens, out) -> None:  # noqa: ANN001
        lib.ns_noop(None, tokens.shape[0], tokens.data_ptr(), out.data_ptr())

    a, b = torch.zeros(1), torch.zeros(1)
    return {"ctypes (argtypes declared, data_ptr() per call)": per_call(
                lambda: lib.ns_noop(None, 1, tok.data_ptr(), out.data_ptr())),
            "ctypes (plain ints)": per_call(lambda: raw(None, 1, 0, 0)),
            "torch.library.custom_op around the ctypes call": per_call(
                lambda: torch.ops.nanoseek_bench.noop(tok, out), 5000),
            "a C++ op through the dispatcher (torch.ops.aten.add.out)": per_call(
                lambda: torch.ops.aten.add.out(a, b, out=a))}


def profile(model: Path, threads: int, steps: int, prompt_len: int) -> None:
    """Per-phase share of a native step for each precision and batch (module docstring), as a markdown table."""
    import torch

    from nanoseek.engine import Engine
    from nanoseek.kernels import NativeDecoder

    torch.set_num_threads(threads)
    rows = []
    for prec in NANOSEEK:
        engine = Engine.from_pretrained(model, quant=None if prec == "fp32" else prec, max_batch_size=max(BATCHES),
                                        max_seq_len=prompt_len + steps + 8)
        native = NativeDecoder(engine)
        g = torch.Generator().manual_seed(0)
        for b in BATCHES:
            engine.prefill(torch.randint(10, 1000, (b, prompt_len), generator=g).tolist())
            tok = torch.randint(10, 1000, (b,), generator=g)
            lens = [prompt_len] * b
            native.decode(tok, lens)
            native.profile(True)
            t0 = time.perf_counter()
            for _ in range(steps):
                native.decode(tok, lens)
            ms = (time.perf_counter() - t0) / steps * 1e3
            phases = native.profile(False)
            total = sum(phases.values())
            rows.append((f"{prec} b{b}", ms, {k: v / total for k, v in phases.items()}))
        del native, engine
    print(f"| step ({threads} thread{'s' if threads > 1 else ''}) | ms | "
          + " | ".join(NativeDecoder.PHASES) + " |")
    print("|---|---:|" + "---:|" * len(NativeDecoder.PHASES))
    for name, ms, share in rows:
        print(f"| {name} | {ms:.2f} | " + " | ".join(f"{100 * share[k]:.0f}%" for k in NativeDecoder.PHASES) + " |")


# --- the driver ------------------------------------------------------------------------------------------------------
def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """The checkpoint to run: --model as it is, or --config / the cpu preset with random weights saved to work/
    (with a small BPE trained on the bundled corpus: GGUF needs a tokenizer)."""
    if args.model:
        return args.model
    import torch

    from nanoseek import Transformer, get_preset
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.config import ModelConfig
    from nanoseek.data import corpus_dir
    from nanoseek.tokenizer import train_tokenizer

    out = work / "model"
    if (out / "config.json").is_file():
        return out
    cfg = ModelConfig.load(args.config) if args.config else get_preset("cpu")
    tok_dir = work / "tokenizer"
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    train_tokenizer([text], min(cfg.vocab_size, 1024), tok_dir)
    torch.manual_seed(0)
    save_pretrained(Transformer(cfg), out, tokenizer_dir=tok_dir)
    return out


def ggufs(model: Path, work: Path) -> dict[str, Path]:
    import llama_cpp as lc

    from nanoseek.export import export_gguf

    f32 = work / "model-f32.gguf"
    if not f32.exists():
        export_gguf(model, f32, dtype="f32")
    out = {"f32": f32}
    for name, ftype in (("q8_0", lc.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", lc.LLAMA_FTYPE_MOSTLY_Q4_0)):
        path = work / f"model-{name}.gguf"
        if not path.exists():
            p = lc.llama_model_quantize_default_params()
            p.ftype, p.pure, p.nthread = ftype, True, 2
            if lc.llama_model_quantize(str(f32).encode(), str(path).encode(), p) != 0:
                raise SystemExit(f"llama_model_quantize failed for {name}")
        out[name] = path
    return out


def cpu_info() -> dict:
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in info:
            info[key.strip()] = value.strip()
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
              "amx_bf16"]
    return dict(cpu=info.get("model name", "?"), flags=[f for f in wanted if f in flags], cores=os.cpu_count())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a checkpoint directory with its tokenizer")
    src.add_argument("--config", type=Path, help="a config.json: random weights (default: the cpu preset)")
    ap.add_argument("--name", help="results name (default: the model directory's or config's name, or 'cpu')")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="greedy tokens per sequence (default 64)")
    ap.add_argument("--only", nargs="+", choices=["nanoseek", "llama.cpp"], default=["nanoseek", "llama.cpp"])
    ap.add_argument("--precisions", nargs="+", choices=NANOSEEK, default=NANOSEEK,
                    help="nanoseek precisions (and the matching llama.cpp types)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch: model, GGUFs (default /tmp/bench_kernels_NAME)")
    ap.add_argument("--overhead", action="store_true", help="only measure the call overhead, print it and exit")
    ap.add_argument("--profile", action="store_true", help="only print the per-phase profile of native steps")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.overhead:
        for k, v in call_overhead().items():
            print(f"{v:8.2f} us  {k}")
        return None
    name = args.name or (args.model.name if args.model else args.config.stem if args.config else "cpu")
    if args.model and args.model.name == "final":
        name = args.name or args.model.parent.name
    work = args.workdir or Path(f"/tmp/bench_kernels_{name}")
    work.mkdir(parents=True, exist_ok=True)
    t_start, load = time.perf_counter(), [os.getloadavg()[0]]
    model = prepare_model(args, work)
    if args.profile:
        return profile(model, args.threads[0], args.new, args.prompt_len)
    import random

    from nanoseek.config import ModelConfig

    cfg = ModelConfig.load(model)
    rng = random.Random(0)
    hi = min(cfg.vocab_size, 1000)
    data = dict(prompts=[[rng.randrange(10, hi) for _ in range(args.prompt_len)] for _ in range(max(BATCHES))],
                new=args.new, max_seq_len=args.prompt_len + args.new + 8)
    (work / "data.json").write_text(json.dumps(data))
    files = ggufs(model, work) if "llama.cpp" in args.only else {}
    results: dict[str, dict] = {}
    for threads in args.threads:
        base = dict(model=str(model), threads=threads, data=str(work / "data.json"))
        jobs = []
        if "nanoseek" in args.only:
            jobs += [(f"nanoseek {p}", dict(base, engine="nanoseek", prec=p)) for p in args.precisions]
        if "llama.cpp" in args.only:
            jobs += [(f"llama.cpp {PAIR[p]}", dict(base, engine="llama.cpp", prec=PAIR[p], gguf=str(files[PAIR[p]])))
                     for p in args.precisions]
        workers = []
        for wname, job in jobs:  # one at a time: loading is not measured, but keep the peak memory down
            workers.append(Worker(wname, job, work))
            print(f"loaded {wname} ({threads} threads): {workers[-1].info or workers[-1].error}", flush=True)
        for rep in range(args.repeats):
            for w in workers:
                w.run()
                last = w.runs[-1] if w.runs and len(w.runs) == rep + 1 else None
                shown = "  ".join(f"{k} {v[0]:.0f}" for k, v in (last or {}).items() if k != "same")
                print(f"run {rep + 1}/{args.repeats} {threads}t {w.name:15s} {shown or w.error}", flush=True)
            load.append(os.getloadavg()[0])
        for w in workers:
            w.close()
            results[f"{w.name} {threads}t"] = dict(w.best(), **(w.info or {}), error=w.error)
    record = dict(
        name=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:]),
        seconds=round(time.perf_counter() - t_start), model=str(model), config=cfg.to_hf_dict(),
        params=cfg.num_params(), machine=dict(cpu_info(), platform=platform.platform(),
                                              python=platform.python_version()),
        load=[round(x, 1) for x in load], threads=args.threads, repeats=args.repeats, new=args.new,
        prompt_len=args.prompt_len, kernels_env=os.environ.get("NANOSEEK_KERNELS", "auto"),
        call_overhead_us=call_overhead(), results=results)
    out = ROOT / "benchmarks" / "results" / f"bench_kernels_{name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    report()
    print(f"wrote {out.relative_to(ROOT)} and docs/bench_kernels.md ({record['seconds']} s)")


# --- the report ------------------------------------------------------------------------------------------------------
def report() -> None:
    """docs/bench_kernels.md from every benchmarks/results/bench_kernels_*.json (hand-written notes kept)."""
    doc = ROOT / "docs" / "bench_kernels.md"
    notes = ""
    if doc.exists() and "\n## Notes" in doc.read_text():
        notes = doc.read_text()[doc.read_text().index("\n## Notes"):]
    parts = ["# Native decode kernels: benchmark\n",
             "Generated by `benchmarks/bench_kernels.py` (its docstring defines every column) from "
             "`benchmarks/results/bench_kernels_*.json`. Design: [kernels.md](kernels.md).\n"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("bench_kernels_*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        p = r["params"]
        read = (p["active"] - p["embedding"]) / 1e6
        parts.append(f"\n## `{r['name']}`: {p['total'] / 1e6:.1f}M parameters ({read:.1f}M read per token)\n")
        parts.append(f"- Run {r['date']}, `{r['command']}` ({r['seconds']} s); {r['repeats']} interleaved repeats, "
                     f"best kept; {r['new']} greedy tokens after {r['prompt_len']}-token prompts.\n"
                     f"- **CPU:** {m['cpu']}, {m['cores']} cores; flags {', '.join(m['flags'])}. "
                     f"Load average during the run: {min(r['load'])}–{max(r['load'])} (shared machine).\n")
        res = r["results"]
        cols = [(b, t) for t in r["threads"] for b in BATCHES]
        head = " | ".join(f"b{b} {t}t" for b, t in cols)
        parts.append(f"\nDecode tok/s, wall clock (CPU-time rate in brackets):\n\n| engine | path | {head} |\n"
                     f"|---|---|{'---:|' * len(cols)}\n")

        def cell(key: str, path: str, b: int, t: int, res: dict = res) -> str:
            v = res.get(f"{key} {t}t", {}).get(f"{path} b{b}")
            return f"{v[0]:,.0f} ({v[1]:,.0f})" if v else "—"

        rows = []
        for prec in NANOSEEK:
            for path in ("native", "native step", "pytorch"):
                if f"nanoseek {prec} {r['threads'][0]}t" in res:
                    rows.append((f"nanoseek {prec}", path, f"nanoseek {prec}", path))
        for prec in LLAMA:
            if f"llama.cpp {prec} {r['threads'][0]}t" in res:
                rows.append((f"llama.cpp {prec}", "", f"llama.cpp {prec}", "llama.cpp"))
        for label, path, key, field in rows:
            parts.append(f"| {label} | {path} | " + " | ".join(cell(key, field, b, t) for b, t in cols) + " |\n")
        parts.append("\nNative against llama.cpp at equal precision (wall clock; CPU time in brackets) — targets "
                     "b1 ≥ 1.0×, b16 ≥ 2.0×:\n\n| native | vs | " + head + " |\n|---|---|" + "---:|" * len(cols)
                     + "\n")
        for prec in NANOSEEK:
            cells = []
            for b, t in cols:
                a = res.get(f"nanoseek {prec} {t}t", {}).get(f"native b{b}")
                ll = res.get(f"llama.cpp {PAIR[prec]} {t}t", {}).get(f"llama.cpp b{b}")
                cells.append(f"{a[0] / ll[0]:.2f}× ({a[1] / ll[1]:.2f}×)" if a and ll else "—")
            parts.append(f"| {prec} | {PAIR[prec]} | " + " | ".join(cells) + " |\n")
        same = {k: v.get("same") for k, v in res.items() if k.startswith("nanoseek")}
        errors = {k: v["error"] for k, v in res.items() if v.get("error")}
        isa = next((v.get("status") for k, v in res.items() if v.get("status")), "?")
        parts.append(f"\nNative path: {isa}. Batch-1 greedy tokens native = pytorch: "
                     + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in same.items()) + ".\n")
        if errors:
            parts.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items()) + "\n")
        if r.get("call_overhead_us"):
            parts.append("\nCall overhead from Python, µs per call: " + "; ".join(
                f"{k} {v}" for k, v in r["call_overhead_us"].items()) + ".\n")
    doc.write_text("".join(parts) + notes)


if __name__ == "__main__":
    main()
