"""Engine benchmark: nanoseek's decode paths (native kernels, PyTorch, compiled) against llama.cpp, same weights.

    python benchmarks/bench_engine.py --model runs/pretrain/final               # a checkpoint (`nanoseek pretrain`)
    python benchmarks/bench_engine.py --config benchmarks/configs/v3_0p5b.json --new-b1 16 --new-b16 16
    python benchmarks/bench_engine.py --quick                                   # cpu preset, random weights: ~2 min
    python benchmarks/bench_engine.py --model DIR --overhead | --profile        # call overhead / native step profile
    python benchmarks/bench_engine.py --model DIR --compile-startup             # compile=True start-up, cold and warm

Configurations, each in its own long-lived subprocess with --threads threads (torch threads = native threads;
llama.cpp n_threads and n_threads_batch), loaded one at a time, then measured round-robin --repeats times, best run
kept (a slow spell on the shared machine hits every configuration alike); each thread count is a separate round:
  nanoseek fp32 / int8 / int4   Engine.from_pretrained (int8/int4: quant.py's weight-only modes), measured on its two
                                decode paths in turn, the same engine and cache: `native` (the default: the native
                                kernels, nanoseek/kernels) and `pytorch` (the PyTorch path, what native=False runs:
                                the runner's NativeDecoder detached)
  nanoseek fp32 compiled        Engine(compile=True): the decode step as torch.compile'd graphs (inductor); its
                                "compile s" is its graphs' first calls in the warm-up (cached on disk across runs:
                                nanoseek/engine/compile_cache.py)
  llama.cpp f32 / q8_0 / q4_0   llama-cpp-python's C API on the GGUF nanoseek.export.export_gguf writes (f32), and
                                llama_model_quantize's q8_0 / q4_0 of it (pure: every weight quantised, lm_head too,
                                as nanoseek's int8/int4); f32 KV cache (as nanoseek's fp32 latent cache); batch 16 is
                                one llama_batch of 16 sequences per step. Every model loads with
                                use_extra_bufts=False: llama.cpp's "extra" buffer types repack the weights at load
                                time into CPU-specific layouts (a different kernel set from the GGUF's type, and the
                                0.3.36 wheel aborts with GGML_ASSERT(*cur_backend_id != -1) on the quantised deepseek2
                                GGUFs with them), so every llama.cpp row runs the GGUF's own types
  transformers fp32             (--engines ... transformers) DeepseekV3ForCausalLM.generate, its expanded-KV cache
Models: --model, a checkpoint directory with its tokenizer; or --config (default: the cpu preset) with random
weights (seed 0) and a 1,024-token BPE trained on the bundled tinyshakespeare (GGUF needs a tokenizer), saved in
--workdir.

Workload (prompts are token ids from the bundled corpus's val split, tokenised with the model's tokenizer, fed as ids
to every engine; greedy; EOS ignored). Rates in wall-clock tokens/s and in tokens per CPU-second of the worker
process (all its threads: steadier than wall clock when other jobs share the machine):
  decode b1     one --prompt-len-token prompt, --new-b1 tokens through Engine.generate (scheduler and sampling
                included): (new - 1) / (time of the last token - time of the first), prefill excluded
  decode b16    16 different prompts decoded together, --new-b16 tokens each: 16 (new - 1) / the same interval
  prefill       one --prefill-len-token prompt to its last-position logits (nanoseek prefills with PyTorch on
                every path)
  memory        RSS once loaded and warmed up, peak RSS (ru_maxrss), both minus the RSS after imports
  perplexity    nanoseek, through the engine's own forward (Engine.perplexity), first --ppl-tokens of val.bin
  same tokens   whether a configuration's batch-1 greedy tokens equal nanoseek fp32 native's (first divergence)
Targets (issue 19, nanoseek v2): native batch 1 >= 1.0x llama.cpp at equal precision (fp32/f32, int8/q8_0,
int4/q4_0), batch 16 >= 2.0x.

--overhead: microseconds per call from Python of a no-op C function through ctypes (how NativeDecoder calls the
library), of the same call as a torch.library.custom_op, and of a C++ op through PyTorch's dispatcher
(torch.ops.aten.add.out on 1-element tensors: the least a C++ torch.library op would cost). --profile: where a
native step's time goes (NativeDecoder.profile, seconds per phase over --new-b1 steps, --threads[0] threads).
--compile-startup: a compile=True engine's start-up in fresh processes (--threads[0] threads): "cold" with an empty
compile cache (NANOSEEK_COMPILE_CACHE pointed at a new directory), then "warm" twice with the cache the cold run
filled; each process loads the checkpoint and generates 8 tokens at batch 1 and at batch 2 (the two graphs plain
decoding compiles); seconds from the start of the process to each point. Writes
benchmarks/results/compile_startup.json.

Writes benchmarks/results/bench_engine_<name>.json and rebuilds docs/bench_engine.md from every such file (its
hand-written "## Notes" section is kept).
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
PRECISIONS = ["fp32", "int8", "int4"]
PAIR = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # nanoseek -> llama.cpp at equal (weight) precision
PATHS = ["native", "pytorch", "compiled"]
ENGINES = ["nanoseek", "llama.cpp", "transformers"]
CPU_FLAGS = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
             "amx_bf16"]


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
# A session loads its engine and warms it up (then prints READY), runs one repeat of its measurements per "run"
# command, and reports memory (and perplexity) on "final".
class NanoseekSession:
    def __init__(self, job: dict, data: dict):
        import torch

        from nanoseek.engine import Engine

        torch.set_num_threads(job["threads"])
        self.job, self.data, self.base = job, data, rss_mb()
        prec = job["prec"]
        self.engine = Engine.from_pretrained(job["model"], quant=None if prec == "fp32" else prec,
                                             max_batch_size=B16, max_seq_len=data["max_seq_len"],
                                             compile=job["compiled"])
        runner = self.engine.runner
        self.info = dict(decode_path=runner.decode_path)
        # the paths measured, each as the runner's decoder (None: PyTorch)
        if job["compiled"]:
            self.paths = {"compiled": None}
        else:
            self.paths = {p: d for p, d in (("native", runner.native), ("pytorch", None))
                          if p in job["paths"] and (p == "pytorch" or d is not None)}
        for path in self.paths:  # warm-up (compile=True: the batch-1 graphs, then the batch >= 2 ones)
            runner.native = self.paths[path]
            self.generate(data["prompts"][:1], 8)
            self.generate(data["prompts"][:2], 8)
        stats = self.engine.stats()
        self.info.update(rss_loaded_mb=rss_mb() - self.base, weight_mb=stats["weight_bytes"] / 2**20)
        if job["compiled"]:
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
        out = {}
        for path, decoder in self.paths.items():
            self.engine.runner.native = decoder
            out[f"{path} b1"], out[f"{path} tokens"] = self.generate(self.data["prompts"][:1], self.data["new_b1"])
            out[f"{path} b16"], _ = self.generate(self.data["prompts"], self.data["new_b16"])
        t = clocks()
        self.engine.prefill([self.data["prefill_prompt"]])
        out["prefill"] = rates(len(self.data["prefill_prompt"]), t, clocks())
        return out

    def final(self) -> dict:
        out = dict(peak_rss_mb=peak_rss_mb() - self.base)
        if self.data["val_tokens"] and not self.job["compiled"]:
            out["perplexity"] = self.engine.perplexity(self.data["val_tokens"], 256)
        return out


class LlamaSession:
    """llama.cpp through llama-cpp-python's C API: batch 1 and batch 16 each in their own context (n_seq_max 1 /
    16; batch 16 decodes one llama_batch of 16 tokens, one per sequence, per step); greedy = argmax of the logits."""

    def __init__(self, job: dict, data: dict):
        import llama_cpp as lc

        self.lc, self.job, self.data, self.base = lc, job, data, rss_mb()
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        # no "extra" buffer types: they repack the weights at load into other layouts and kernels than the GGUF's
        # (and this 0.3.36 build asserts, GGML_ASSERT(*cur_backend_id != -1), on quantised deepseek2 GGUFs with them)
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(job["gguf"].encode(), mp)
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
        self.info = dict(rss_loaded_mb=rss_mb() - self.base, weight_mb=os.path.getsize(job["gguf"]) / 2**20,
                         extra_bufts=bool(mp.use_extra_bufts))

    def context(self, n_seq: int, n_ctx_per_seq: int):  # noqa: ANN201
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_seq * n_ctx_per_seq, self.n_batch, self.n_batch, n_seq
        p.n_threads = p.n_threads_batch = self.job["threads"]
        p.type_k = p.type_v = 0  # GGML_TYPE_F32: an f32 KV cache, as nanoseek's fp32 latent cache
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
        return {"b1": b1, "b16": b16, "tokens": tokens, "prefill": rates(len(p), t, clocks())}

    def final(self) -> dict:
        return dict(peak_rss_mb=peak_rss_mb() - self.base)


class TransformersSession:
    def __init__(self, job: dict, data: dict):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(job["threads"])
        self.torch, self.data, self.base = torch, data, rss_mb()
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
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
        n = len(prompts) * (new - 1)
        return (n / (tn[0] - t1[0]), n / max(tn[1] - t1[1], 1e-9)), tokens

    def run_once(self) -> dict:
        b1, tokens = self.rate(self.data["prompts"][:1], self.data["new_b1"])
        b16, _ = self.rate(self.data["prompts"], self.data["new_b16"])
        ids = self.torch.tensor([self.data["prefill_prompt"]])
        t = clocks()
        with self.torch.inference_mode():
            self.model(ids, logits_to_keep=1)
        return {"b1": b1, "b16": b16, "tokens": tokens, "prefill": rates(ids.shape[1], t, clocks())}

    def final(self) -> dict:
        return dict(peak_rss_mb=peak_rss_mb() - self.base)


SESSIONS = {"nanoseek": NanoseekSession, "llama.cpp": LlamaSession, "transformers": TransformersSession}


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


class Worker:
    """One configuration's subprocess: READY / RESULT / FINAL lines on its stdout, its stderr in a log file."""

    def __init__(self, name: str, job: dict, work: Path):
        slug = name.replace(" ", "_").replace(".", "")
        path = work / f"job-{slug}.json"
        path.write_text(json.dumps(job))
        self.name, self.runs, self.error = name, [], None
        self.log_path = work / f"worker-{slug}.log"
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
        self.error = next((ln for ln in reversed(lines) if "Error" in ln or "ASSERT" in ln),
                          lines[-1] if lines else f"exited with code {self.proc.returncode}")
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
        out = {**(self.info or {}), **final}
        for key, value in self.runs[0].items():
            if key.endswith("tokens"):
                out[key] = value
            else:
                out[key] = [max(r[key][0] for r in self.runs), max(r[key][1] for r in self.runs)]
        return out


# --- the driver ----------------------------------------------------------------------------------------------------
def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """The checkpoint to run: --model as it is, or --config / the cpu preset with random weights saved to work/
    (with a small BPE trained on the bundled corpus: GGUF and the prompts need a tokenizer)."""
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


def prepare_data(args: argparse.Namespace, model: Path, work: Path) -> dict:
    """Prompts and val tokens from the bundled corpus, tokenised with the model's tokenizer."""
    import numpy as np

    from nanoseek.data import default_corpus_files, prepare_data
    from nanoseek.tokenizer import Tokenizer

    meta = prepare_data(default_corpus_files(), Tokenizer.from_dir(model), work / "data")
    val = np.memmap(work / "data" / "val.bin", dtype=meta["dtype"], mode="r")
    if len(val) < max(B16 * args.prompt_len + args.prefill_len, args.ppl_tokens + 1):
        raise SystemExit(f"val split too small: {len(val)} tokens")
    stride = (len(val) - args.prompt_len) // B16  # prompts from evenly spaced places: different texts
    return dict(prompts=[val[i * stride:i * stride + args.prompt_len].tolist() for i in range(B16)],
                prefill_prompt=val[len(val) - args.prefill_len:].tolist(),
                val_tokens=val[:args.ppl_tokens + 1].tolist() if args.ppl_tokens else [],
                new_b1=args.new_b1, new_b16=args.new_b16,
                max_seq_len=max(args.prompt_len + max(args.new_b1, args.new_b16) + 2, args.prefill_len + 1, 256))


def ggufs(model: Path, work: Path, types: list[str]) -> dict[str, Path]:
    """The f32 GGUF export_gguf writes, and llama_model_quantize's q8_0 / q4_0 of it (pure: every weight)."""
    import llama_cpp as lc

    from nanoseek.export import export_gguf

    f32 = work / "model-f32.gguf"
    stamp = max(p.stat().st_mtime for p in model.iterdir())
    if not f32.exists() or f32.stat().st_mtime < stamp:
        export_gguf(model, f32, dtype="f32")
        for t in ("q8_0", "q4_0"):
            (work / f"model-{t}.gguf").unlink(missing_ok=True)
    out = {"f32": f32}
    for name, ftype in (("q8_0", lc.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", lc.LLAMA_FTYPE_MOSTLY_Q4_0)):
        path = work / f"model-{name}.gguf"
        if name in types and not path.exists():
            p = lc.llama_model_quantize_default_params()
            p.ftype, p.pure, p.nthread = ftype, True, 2
            if lc.llama_model_quantize(str(f32).encode(), str(path).encode(), p) != 0:
                raise SystemExit(f"llama_model_quantize failed for {name}")
        out[name] = path
    return out


def machine() -> dict:
    import llama_cpp
    import torch

    from nanoseek.kernels import status
    from nanoseek.osutil import cpu_flags, cpu_model

    flags = cpu_flags()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = "?"
    return dict(cpu=cpu_model(), flags=[f for f in CPU_FLAGS if f in flags], cores=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                llama_cpp=llama_cpp.__version__, kernels=status(), git_commit=commit,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


def jobs_for(args: argparse.Namespace, model: Path, files: dict[str, Path], threads: int, work: Path
             ) -> list[tuple[str, dict]]:
    base = dict(model=str(model), threads=threads, data=str(work / "data.json"))
    jobs = []
    if "nanoseek" in args.engines:
        eager = [p for p in args.paths if p != "compiled"]
        if eager:
            jobs += [(f"nanoseek {p}", dict(base, engine="nanoseek", prec=p, compiled=False, paths=eager))
                     for p in args.precisions]
        if "compiled" in args.paths and "fp32" in args.precisions:
            jobs.append(("nanoseek fp32 compiled", dict(base, engine="nanoseek", prec="fp32", compiled=True,
                                                        paths=["compiled"])))
    if "llama.cpp" in args.engines:
        jobs += [(f"llama.cpp {PAIR[p]}", dict(base, engine="llama.cpp", prec=PAIR[p], gguf=str(files[PAIR[p]])))
                 for p in args.precisions]
    if "transformers" in args.engines:
        jobs.append(("transformers fp32", dict(base, engine="transformers", prec="fp32")))
    return jobs


def rows_of(name: str, result: dict) -> dict[str, dict]:
    """A worker's result -> one row per measured path: {"nanoseek fp32 native": {b1, b16, tokens}, ...}."""
    if "error" in result:
        return {name: result}
    if not name.startswith("nanoseek"):
        return {name: result}
    out = {}
    for path in PATHS:
        if f"{path} b1" in result:
            label = name if name.endswith("compiled") else f"{name} {path}"
            out[label] = {**result, "b1": result[f"{path} b1"], "b16": result[f"{path} b16"],
                          "tokens": result[f"{path} tokens"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a checkpoint directory with its tokenizer")
    src.add_argument("--config", type=Path, help="a config.json: random weights (default: the cpu preset)")
    ap.add_argument("--name", help="results name (default: the checkpoint's run directory, the config's name, or "
                                   "'cpu_random')")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each its own round "
                                                                           "(default 1 2)")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement, best kept (default 5; quick 1)")
    ap.add_argument("--prompt-len", type=int, default=64, help="decode prompt length (default 64)")
    ap.add_argument("--new-b1", type=int, default=None, help="new tokens at batch 1 (default 128; quick 32)")
    ap.add_argument("--new-b16", type=int, default=None, help="new tokens per sequence at batch 16 (default 64; "
                                                              "quick 16)")
    ap.add_argument("--prefill-len", type=int, default=None, help="prefill prompt length (default 512; quick 128)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="val tokens for perplexity (default 8192 with "
                                                                 "--model, else 0: none)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=["nanoseek", "llama.cpp"])
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS,
                    help="nanoseek precisions (and the matching llama.cpp types)")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS, help="nanoseek decode paths")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch: model, data, GGUFs (default "
                                                               "/tmp/nanoseek_bench_engine_NAME)")
    ap.add_argument("--overhead", action="store_true", help="only measure the call overhead, print it and exit")
    ap.add_argument("--profile", action="store_true", help="only print the per-phase profile of native steps")
    ap.add_argument("--compile-startup", action="store_true", help="only measure compile=True's start-up, cold and "
                                                                   "warm")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.overhead:
        for k, v in call_overhead().items():
            print(f"{v:8.2f} us  {k}")
        return None
    q = args.quick
    args.repeats = args.repeats or (1 if q else 5)
    args.new_b1 = args.new_b1 or (32 if q else 128)
    args.new_b16 = args.new_b16 or (16 if q else 64)
    args.prefill_len = args.prefill_len or (128 if q else 512)
    if args.ppl_tokens is None:
        args.ppl_tokens = (2048 if q else 8192) if args.model else 0
    if args.model and not ((args.model / "config.json").is_file() and (args.model / "tokenizer.json").is_file()):
        raise SystemExit(f"{args.model}: not a checkpoint directory with config.json and tokenizer.json")
    name = args.name or (args.model.parent.name if args.model and args.model.name == "final" else
                         args.model.name if args.model else args.config.stem if args.config else "cpu_random")
    work = args.workdir or Path(f"/tmp/nanoseek_bench_engine_{name}")
    work.mkdir(parents=True, exist_ok=True)
    t_start, load = time.perf_counter(), [os.getloadavg()[0]]
    model = prepare_model(args, work)
    if args.profile:
        return profile(model, args.threads[0], args.new_b1, args.prompt_len, args.precisions)
    if args.compile_startup:
        return compile_startup(model, args.threads[0], work)
    data = prepare_data(args, model, work)
    (work / "data.json").write_text(json.dumps(data))
    files = ggufs(model, work, [PAIR[p] for p in args.precisions]) if "llama.cpp" in args.engines else {}
    results: dict[str, dict[str, dict]] = {}  # threads -> row name -> result
    for threads in args.threads:
        workers = []
        for wname, job in jobs_for(args, model, files, threads, work):
            workers.append(Worker(wname, job, work))
            print(f"loaded {wname} ({threads} threads): {workers[-1].info or workers[-1].error}", flush=True)
        for rep in range(args.repeats):
            for w in workers:
                r = w.ask("run", "RESULT")
                if r is not None:
                    w.runs.append(r)
                shown = "  ".join(f"{k} {v[0]:.0f}" for k, v in (r or {}).items() if not k.endswith("tokens"))
                print(f"run {rep + 1}/{args.repeats} {threads}t {w.name:24s} {shown or w.error}", flush=True)
            load.append(os.getloadavg()[0])
        results[str(threads)] = {}
        for w in workers:
            results[str(threads)].update(rows_of(w.name, w.summary(w.ask("final", "FINAL"))))
    from nanoseek.config import ModelConfig

    cfg = ModelConfig.load(model)
    record = dict(
        name=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]),
        seconds=round(time.perf_counter() - t_start), model=str(model), params=cfg.num_params(),
        machine=machine(), load=[round(x, 1) for x in load],
        settings=dict(threads=args.threads, repeats=args.repeats, prompt_len=args.prompt_len, new_b1=args.new_b1,
                      new_b16=args.new_b16, prefill_len=args.prefill_len, ppl_tokens=args.ppl_tokens),
        results=results)
    record["targets"] = targets(results)
    out = ROOT / "benchmarks" / "results" / f"bench_engine_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    report()
    print(f"wrote {out.relative_to(ROOT)} and docs/bench_engine.md ({record['seconds']} s)")


def targets(results: dict[str, dict[str, dict]]) -> list[dict]:
    """Issue 19's targets for the default (native) path at each thread count: ratios (wall, CPU) to llama.cpp."""
    out = []
    for threads, rows in results.items():
        for prec, llama in PAIR.items():
            a, b = rows.get(f"nanoseek {prec} native"), rows.get(f"llama.cpp {llama}")
            for batch, goal in (("b1", 1.0), ("b16", 2.0)):
                ratio = None
                if a and b and batch in a and batch in b:
                    ratio = [a[batch][0] / b[batch][0], a[batch][1] / b[batch][1]]
                out.append(dict(threads=int(threads), target=f"{batch}: nanoseek {prec} native / llama.cpp {llama}",
                                goal=goal, ratio=ratio, met=None if ratio is None else [r >= goal for r in ratio]))
    return out


# --- the report ------------------------------------------------------------------------------------------------------
def report() -> None:
    """docs/bench_engine.md from every benchmarks/results/bench_engine_*.json (hand-written notes kept)."""
    doc = ROOT / "docs" / "bench_engine.md"
    notes = ""
    if doc.exists() and "\n## Notes" in doc.read_text():
        notes = doc.read_text()[doc.read_text().index("\n## Notes"):]
    parts = ["# Engine benchmark: nanoseek (native, PyTorch, compiled) vs llama.cpp\n",
             "Generated by `benchmarks/bench_engine.py` (its docstring defines every column) from "
             "`benchmarks/results/bench_engine_*.json`. Engine design: [engine.md](engine.md); the native kernels: "
             "[kernels.md](kernels.md) (their own earlier benchmark, before they were the engine's default: "
             "[bench_kernels.md](bench_kernels.md)). The summary (issue 19's table and which targets are met) is "
             "in the hand-written notes at the end.\n"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("bench_engine_*.json")):
        parts += section(json.loads(path.read_text()))
    doc.write_text("".join(parts) + notes)


def section(r: dict) -> list[str]:
    m, s, p = r["machine"], r["settings"], r["params"]
    threads = [int(t) for t in r["results"]]
    cols = [(b, t) for t in threads for b in ("b1", "b16")]
    head = " | ".join(f"{b} {t}t" for b, t in cols)
    parts = [f"\n## `{r['name']}`: {p['total'] / 1e6:.1f}M parameters "
             f"({(p['active'] - p['embedding']) / 1e6:.1f}M read per token)\n\n",
             f"- Run {r['date']}, `{r['command']}` ({r['seconds']} s); {s['repeats']} interleaved repeats, best kept. "
             f"Batch 1: a {s['prompt_len']}-token prompt, {s['new_b1']} new tokens; batch 16: 16 different "
             f"{s['prompt_len']}-token prompts, {s['new_b16']} new tokens each; greedy, through Engine.generate.\n",
             f"- **CPU:** {m['cpu']}, {m['cores']} cores; flags {', '.join(m['flags'])}. Load average during the run: "
             f"{min(r['load'])}–{max(r['load'])} (shared machine). Native path: {m['kernels']}.\n",
             f"- {m['platform']}; Python {m['python']}, torch {m['torch']}, llama-cpp-python {m['llama_cpp']}; git "
             f"{m['git_commit']}; OMP_WAIT_POLICY={m['omp_wait_policy']}. Model: `{r['model']}`.\n",
             f"\nDecode tok/s, wall clock (CPU-time rate in brackets):\n\n| engine | {head} |\n|---|"
             + "---:|" * len(cols) + "\n"]
    names = list(dict.fromkeys(n for rows in r["results"].values() for n in rows))
    order = [f"nanoseek {p} native" for p in PRECISIONS] + [f"nanoseek {p} pytorch" for p in PRECISIONS] + [
        "nanoseek fp32 compiled"] + [f"llama.cpp {PAIR[p]}" for p in PRECISIONS] + ["transformers fp32"]
    names = [n for n in order if n in names] + [n for n in names if n not in order]

    def cell(name: str, batch: str, t: int) -> str:
        v = r["results"][str(t)].get(name, {})
        if "error" in v:
            return "error"
        v = v.get(batch)
        return f"{v[0]:,.0f} ({v[1]:,.0f})" if v else "—"

    for name in names:
        parts.append(f"| {name} | " + " | ".join(cell(name, b, t) for b, t in cols) + " |\n")
    ref = r["results"][str(threads[0])].get("nanoseek fp32 native", {}).get("tokens")
    parts.append(f"\nAt {threads[0]} thread{'s' if threads[0] > 1 else ''}: prefill, memory, quality:\n\n| engine | "
                 "prefill tok/s | RSS loaded MB | peak RSS MB | weights MB | perplexity | b1 tokens = nanoseek fp32 "
                 "native | compile s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for name in names:
        v = r["results"][str(threads[0])].get(name, {})
        if "error" in v:
            parts.append(f"| {name} | error: {v['error']} |||||||\n")
            continue
        pre = v.get("prefill")
        parts.append(f"| {name} | {fmt(pre and pre[0])} | {fmt(v.get('rss_loaded_mb'))} | "
                     f"{fmt(v.get('peak_rss_mb'))} | {fmt(v.get('weight_mb'), '.1f')} | "
                     f"{fmt(v.get('perplexity'), '.3f')} | {same_tokens(ref, v.get('tokens'))} | "
                     f"{fmt(v.get('compile_s'))} |\n")
    parts.append("\nTargets (issue 19, the default native path against llama.cpp at equal precision; wall clock, "
                 "CPU time in brackets):\n\n| target | goal | " + " | ".join(f"{t}t" for t in threads)
                 + " |\n|---|---:|" + "---:|" * len(threads) + "\n")
    for what in dict.fromkeys(t["target"] for t in r["targets"]):
        cells, goal = [], None
        for t in threads:
            hit = next((x for x in r["targets"] if x["target"] == what and x["threads"] == t), None)
            goal = hit["goal"] if hit else goal
            if hit is None or hit["ratio"] is None:
                cells.append("—")
                continue
            (w, c), mw = hit["ratio"], hit["met"][0]
            cells.append(f"{'**' if mw else ''}{w:.2f}×{'**' if mw else ''} ({c:.2f}×){'' if mw else ' missed'}")
        parts.append(f"| {what} | ≥ {goal:.1f}× | " + " | ".join(cells) + " |\n")
    return parts


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None or v != v else format(v, spec)


def same_tokens(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "—"
    n = min(len(a), len(b))
    diff = next((i for i in range(n) if a[i] != b[i]), None)
    return "yes" if diff is None else f"from token {diff}"


# --- call overhead and the native step's profile --------------------------------------------------------------------
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
                             schema="(Tensor tokens, Tensor(a!) out) -> ()")
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


def profile(model: Path, threads: int, steps: int, prompt_len: int, precisions: list[str]) -> None:
    """Per-phase share of a native step for each precision at batch 1 and 16, as a markdown table."""
    import torch

    from nanoseek.engine import Engine
    from nanoseek.kernels import NativeDecoder

    torch.set_num_threads(threads)
    rows = []
    for prec in precisions:
        engine = Engine.from_pretrained(model, quant=None if prec == "fp32" else prec, max_batch_size=B16,
                                        max_seq_len=prompt_len + steps + 8)
        native = engine.runner.native
        g = torch.Generator().manual_seed(0)
        for b in (1, B16):
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
    print(f"| step ({threads} thread{'s' if threads > 1 else ''}) | ms | " + " | ".join(NativeDecoder.PHASES) + " |")
    print("|---|---:|" + "---:|" * len(NativeDecoder.PHASES))
    for name, ms, share in rows:
        print(f"| {name} | {ms:.2f} | " + " | ".join(f"{100 * share[k]:.0f}%" for k in NativeDecoder.PHASES) + " |")


STARTUP = """
import sys, time
t0 = time.perf_counter()
import torch
from nanoseek.engine import Engine
torch.set_num_threads(int(sys.argv[2]))
t = {"import": time.perf_counter() - t0}
engine = Engine.from_pretrained(sys.argv[1], max_batch_size=2, compile=True)
t["load"] = time.perf_counter() - t0
engine.generate([[5, 6, 7]], 8, stop_token_ids=[])
t["first token batch 1"] = time.perf_counter() - t0
engine.generate([[5, 6, 7], [8, 9]], 8, stop_token_ids=[])
t["first tokens batch 2"] = time.perf_counter() - t0
t["compile_seconds"] = engine.stats()["compile_seconds"]
print("STARTUP", t, engine.stats()["compile_cache"])
"""


def compile_startup(model: Path, threads: int, work: Path) -> None:
    """compile=True's start-up in fresh processes: cold (an empty cache), then warm twice (module docstring)."""
    import ast
    import shutil

    cache = work / "compile_cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, NANOSEEK_COMPILE_CACHE=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = []
    for label in ("cold", "warm", "warm"):
        proc = subprocess.run([sys.executable, "-c", STARTUP, str(model), str(threads)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the {label} start-up failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("STARTUP "))
        times = ast.literal_eval(line.split(" ", 1)[1].rsplit(" ", 1)[0])
        runs.append(dict(run=label, loadavg=round(os.getloadavg()[0], 1), **{k: round(v, 1) for k, v in times.items()}))
        print(runs[-1], flush=True)
    record = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), model=str(model), threads=threads,
                  command="python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]), machine=machine(),
                  runs=runs)
    out = ROOT / "benchmarks" / "results" / "compile_startup.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
