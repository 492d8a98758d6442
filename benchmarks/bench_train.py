"""Training throughput: nanoseek vs transformers.DeepseekV3ForCausalLM, same config, weights, batch and precision.

One training step = forward + cross-entropy + backward + AdamW step (+ zero_grad), timed after warmup; the two models
alternate step by step so background load on a shared machine hits both alike. Reported: median step time,
tokens/s, and MFU against this machine's own measured matmul peak (large square matmuls, best of a few seconds).

    python benchmarks/bench_train.py               # full run (minutes): benchmarks/results/ json + docs/bench_train.md
    python benchmarks/bench_train.py --quick       # smoke run in seconds: benchmarks/results/bench_train_quick.json
    python benchmarks/bench_train.py --threads 1,2 # one table for each thread count

Fairness choices (also written into the report):
  - MTP off for both (num_nextn_predict_layers=0): transformers has no MTP training path.
  - transformers in its defaults: attn_implementation="sdpa", experts_implementation="grouped_mm"; called with
    use_cache=False (as for training) and the same fp32 cross-entropy on its logits as nanoseek's compute_loss.
  - nanoseek writes its weights with save_pretrained and transformers loads them: identical parameters; the first
    step's losses are compared as a check that both run the same model.
  - bf16 = both models under the same torch.autocast("cpu", dtype=torch.bfloat16) with fp32 master weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.checkpoint import save_pretrained  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


# --- machine peak -------------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int, seconds: float) -> float:
    """Best FLOP/s of n x n @ n x n matmuls over `seconds` (the best 0.25 s window, so a busy neighbour costs less)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b  # warm up the BLAS / oneDNN kernels
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.25:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


# --- the two models ------------------------------------------------------------------------------------------------
def build_models(preset: str, ckpt_dir: str):
    """nanoseek Transformer and the transformers model loaded from its checkpoint (same weights, MTP off)."""
    try:
        import transformers
    except ImportError:
        raise NanoseekError("this benchmark needs transformers (a dev dependency: pip install -e '.[dev]')") from None

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = get_preset(preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    save_pretrained(ours, ckpt_dir)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    return cfg, ours.train(), hf.train()


def check_same_model(ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Same weights and batch: the fp32 losses before any step must agree; returns |difference|."""
    with torch.no_grad():
        loss_ours = ours.compute_loss(x, y)[0].item()
        loss_hf = F.cross_entropy(hf(input_ids=x, use_cache=False).logits.float().flatten(0, 1), y.flatten()).item()
    if abs(loss_ours - loss_hf) > 1e-3:
        raise NanoseekError(f"nanoseek and transformers disagree on the first loss ({loss_ours} vs {loss_hf}): "
                            f"not the same model")
    return abs(loss_ours - loss_hf)


def make_step(model: torch.nn.Module, is_hf: bool, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None,
              fused: bool) -> tuple[Callable[[], float], str]:
    """A closure running one full training step and returning the loss; and the optimizer kind used."""
    kind = "fused" if fused else "foreach"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8,
                            **{kind: True})

    def step() -> float:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            if is_hf:
                logits = model(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # = nanoseek's _cross_entropy
            else:
                loss, _ = model.compute_loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, kind


def fused_adamw_available() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def time_interleaved(steps: dict[str, Callable[[], float]], warmup: int,
                     iters: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every step up, then time them in alternating order (A B, B A, ...) so slow phases hit all alike.

    Returns wall seconds and process CPU seconds per step. With one thread, CPU time hardly moves when other jobs
    share the cores (wall time does), so it is the steadier comparison on a busy machine.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


# --- reporting -----------------------------------------------------------------------------------------------------
def machine_info(threads: list[int]) -> dict:
    from nanoseek.osutil import cpu_model

    cpu = cpu_model()
    import transformers

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def table(rows: list[dict]) -> str:
    head = "| threads | precision | model | step ms (median) | min–max ms | tokens/s | MFU | vs transformers |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['precision']} | {r['model']} | {r['step_ms_median']:.0f} | "
                     f"{r['step_ms_min']:.0f}–{r['step_ms_max']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu']:.1f}% | **{r['speedup_vs_hf']:.2f}x** |")
    return "\n".join(lines)


def write_markdown(path: Path, result: dict) -> None:
    m, s, load = result["machine"], result["setup"], result["load_average"]
    peaks = "; ".join(f"{t} thread(s): fp32 {p['fp32'] / 1e9:.0f}, bf16 {p['bf16'] / 1e9:.0f} GFLOP/s"
                      for t, p in result["peak_flops"].items())
    shared = ""
    if load["start"] is not None and max(load["start"], load["end"] or 0) > 0.5:
        shared = (f"\n**Measured on a shared machine**: the 1-minute load average was {load['start']:.1f} at the "
                  f"start and {load['end']:.1f} at the end: other jobs were running on its {m['logical_cpus']} cores. "
                  f"Absolute numbers are then low and noisy, worst with several threads per process (a thread that "
                  f"loses its core stalls the others at every parallel op). The two models alternate step by step, so "
                  f"the ratio is the more reliable figure; re-run on an idle machine for absolute numbers.\n")
        one = [r for r in result["rows"] if r["threads"] == 1 and r["model"] != "transformers"]
        if one:
            shared += ("With 1 thread, process CPU time per step is barely affected by the other jobs; median CPU time "
                       "vs transformers: " + ", ".join(f"{r['model']} {r['precision']} {r['cpu_speedup_vs_hf']:.2f}x"
                                                        for r in one) + ".\n")
    size_note = ", a --quick smoke size" if s["quick"] else ", the default micro-batch of `nanoseek pretrain`"
    text = f"""# Training throughput: nanoseek vs transformers

Generated by `benchmarks/bench_train.py` on {result['date']}. Raw numbers: `benchmarks/results/bench_train.json`.

```
{result['command']}
```

{table(result['rows'])}
{shared}
**What is timed.** One training step: forward, fp32 cross-entropy over the {s['vocab_size']}-token vocabulary,
backward, AdamW ({s['optimizer']}) and zero_grad, on a batch of {s['batch']} x {s['seq']} tokens
({s['batch'] * s['seq']:,} tokens/step{size_note}). {s['warmup']} warmup step(s) per model are discarded, then
{s['steps']} timed steps per model, the two models alternating step by step; the median is reported.

**Same model.** The `{s['preset']}` preset ({s['params_total'] / 1e6:.1f}M parameters, {s['params_active'] / 1e6:.1f}M
active per token) with multi-token prediction **off for both** (`num_nextn_predict_layers=0`): transformers has no MTP
training path. nanoseek writes its initial weights with `save_pretrained` and `transformers.DeepseekV3ForCausalLM`
loads them, so both start from identical parameters; their losses before the first step agree to
{s['loss_check_abs_diff']:.1e} (fp32). transformers runs in its defaults,
`attn_implementation="{s['hf_attn_implementation']}"` and `experts_implementation="{s['hf_experts_implementation']}"`,
called with `use_cache=False` and the same fp32 cross-entropy on its logits as nanoseek's `compute_loss`.

**Precision.** `fp32`: everything fp32. `bf16`: both models under the same
`torch.autocast("cpu", dtype=torch.bfloat16)`, with fp32 master weights and optimizer state. Under autocast
transformers runs its grouped_mm experts in fp32 (it casts their input to the weights' dtype); nanoseek runs them
in bf16, as autocast runs any linear layer, and its attention in fp32 (faster on CPU, see `nanoseek/model.py`).

**Where nanoseek's time goes differently** (`nanoseek/model.py`, same FLOPs as transformers): routed experts as one
`F.grouped_mm` per projection; SDPA's CPU flash kernel (v zero-padded to the q/k head dim) instead of the math path;
the fused `F.rms_norm` kernel; `lm_head` + cross-entropy fused in row chunks (`LinearCrossEntropy`), so the
[tokens, vocab] fp32 logits never go through memory.

**MFU** = tokens/s x {s['flops_per_token'] / 1e6:.1f} MFLOP/token (`ModelConfig.flops_per_token(seq,
include_mtp=False)`: 6 x activated non-embedding weights + causal attention; the optimizer is not counted) / this
machine's matmul peak for that precision and thread count, measured in the same run (best 0.25 s window of
{s['peak_n']} x {s['peak_n']} matmuls over {s['peak_seconds']:g} s): {peaks}.

**Machine.** {m['cpu']}, {m['logical_cpus']} logical CPUs, CPU capability {m['cpu_capability']};
Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; {m['platform']}.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pretrain_defaults() -> tuple[int, int, str]:
    """`nanoseek pretrain`'s default micro-batch (batch_size, seq_len), so the benchmark times the real workload."""
    try:
        from nanoseek.train.pretrain import PretrainConfig
    except ImportError:
        return 8, 128, "nanoseek.train.pretrain not importable: its documented defaults"
    d = PretrainConfig()
    return d.batch_size, d.seq_len, "as nanoseek pretrain"


# --- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    batch, seq, source = pretrain_defaults()
    p.add_argument("--batch", type=int, default=batch, help=f"sequences per step (default {batch}, {source})")
    p.add_argument("--seq", type=int, default=seq, help=f"tokens per sequence (default {seq}, {source})")
    p.add_argument("--threads", default="2", help="torch.set_num_threads; a comma list (1,2) runs each (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model and precision")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and precision")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="seconds of matmuls per precision for the peak")
    p.add_argument("--compile", action="store_true", help="also time nanoseek under torch.compile (slow to build)")
    p.add_argument("--quick", action="store_true", help="smoke run in seconds: batch 2 x 64, 1+2 steps, no docs")
    p.add_argument("--out", default=None, help="json path (default benchmarks/results/bench_train[_quick].json)")
    p.add_argument("--md", default=None, help="markdown path (default docs/bench_train.md; not written by --quick)")
    args = p.parse_args(argv)
    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.quick:
        args.batch, args.seq, args.warmup, args.steps, args.peak_seconds = 2, 64, 1, 2, 0.5
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    bad = [s for s in precisions if s not in PRECISIONS]
    if bad or not precisions:
        raise NanoseekError(f"--precision: unknown {bad or precisions}; choose from {', '.join(PRECISIONS)}")
    try:
        thread_counts = [int(t) for t in str(args.threads).split(",")]
    except ValueError:
        raise NanoseekError(f"--threads must be an integer or a comma list of integers, got {args.threads!r}") from None
    if min(args.batch, args.seq, args.steps, *thread_counts) < 1 or args.warmup < 0:
        raise NanoseekError("--batch, --seq, --threads and --steps must be >= 1, --warmup >= 0")
    cfg = get_preset(args.preset, num_nextn_predict_layers=0)
    if args.seq > cfg.max_position_embeddings:
        raise NanoseekError(f"--seq {args.seq} > max_position_embeddings {cfg.max_position_embeddings} of preset "
                            f"{args.preset!r}")
    load_start = load_average()
    command = "python benchmarks/bench_train.py" + "".join(f" {a}" for a in argv)
    print(f"$ {command}\n1-min load average at start: {load_start}")
    if load_start is not None and load_start > 0.5:
        print("warning: other processes are using the CPU; with several threads per process, busy cores slow "
              "every step a lot (threads wait for each other); numbers will be low and noisy")

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    fused = fused_adamw_available()
    flops_tok = cfg.flops_per_token(args.seq, include_mtp=False)
    tokens = args.batch * args.seq
    peak_n = 1024 if args.quick else 2048
    rows, raw, peaks, compile_s = [], {}, {}, {}
    loss_diff = 0.0
    for threads in thread_counts:
        torch.set_num_threads(threads)
        peak = {name: matmul_peak(dt or torch.float32, peak_n, args.peak_seconds) for name, dt in PRECISIONS.items()}
        peaks[threads] = peak
        print(f"[{threads} threads] matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
        for prec in precisions:
            amp = PRECISIONS[prec]
            # fresh models for every run, so one run's updates don't leak into the next
            with tempfile.TemporaryDirectory() as ckpt:
                cfg, m_ours, m_hf = build_models(args.preset, ckpt)
            loss_diff = max(loss_diff, check_same_model(m_ours, m_hf, x, y))
            step_ours, opt_kind = make_step(m_ours, False, x, y, amp, fused)
            step_hf, _ = make_step(m_hf, True, x, y, amp, fused)
            steps = {"nanoseek": step_ours, "transformers": step_hf}
            if args.compile:
                with tempfile.TemporaryDirectory() as ckpt:
                    _, m_c, _ = build_models(args.preset, ckpt)
                m_c.compute_loss = torch.compile(m_c.compute_loss)
                steps["nanoseek (compiled)"], _ = make_step(m_c, False, x, y, amp, fused)
                t0 = time.perf_counter()
                steps["nanoseek (compiled)"]()  # the first call builds the graphs
                compile_s[f"{threads}/{prec}"] = time.perf_counter() - t0
                print(f"[{threads} threads, {prec}] torch.compile first step: {time.perf_counter() - t0:.1f} s")
            times, cpu = time_interleaved(steps, args.warmup, args.steps)
            raw[f"{threads}/{prec}"] = {"wall": times, "cpu": cpu}
            med = {name: statistics.median(t) for name, t in times.items()}
            cpu_med = {name: statistics.median(t) for name, t in cpu.items()}
            for name, t in times.items():
                rows.append({"threads": threads, "precision": prec, "model": name,
                             "step_ms_median": 1e3 * med[name], "step_ms_min": 1e3 * min(t),
                             "step_ms_max": 1e3 * max(t), "tokens_per_s": tokens / med[name],
                             "mfu": flops_tok * tokens / med[name] / peak[prec],
                             "speedup_vs_hf": med["transformers"] / med[name],
                             "cpu_ms_median": 1e3 * cpu_med[name],
                             "cpu_speedup_vs_hf": cpu_med["transformers"] / cpu_med[name]})
            print(f"[{threads} threads, {prec}] " + ", ".join(f"{n} {1e3 * v:.0f} ms" for n, v in med.items()))

    n_params = cfg.num_params()
    result = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": command,
        "machine": machine_info(thread_counts),
        "load_average": {"start": load_start, "end": load_average()},
        "peak_flops": peaks,
        "setup": {"preset": args.preset, "quick": args.quick, "batch": args.batch, "seq": args.seq,
                  "warmup": args.warmup, "steps": args.steps, "vocab_size": cfg.vocab_size,
                  "num_nextn_predict_layers": 0,
                  "params_total": n_params["total"], "params_active": n_params["active"],
                  "flops_per_token": flops_tok, "optimizer": f"{opt_kind}, betas (0.9, 0.95), weight_decay 0.1",
                  "hf_attn_implementation": m_hf.config._attn_implementation,
                  "hf_experts_implementation": m_hf.config._experts_implementation, "hf_use_cache": False,
                  "loss_check_abs_diff": loss_diff, "peak_n": peak_n,
                  "peak_seconds": args.peak_seconds, "compile_first_step_s": compile_s or None},
        "rows": rows,
        "step_seconds": raw,
    }
    print()
    print(table(rows))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "bench_train_quick.json" if args.quick else "bench_train.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.quick or args.md:
        md = Path(args.md) if args.md else ROOT / "docs" / "bench_train.md"
        write_markdown(md, result)
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
