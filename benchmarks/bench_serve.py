"""Serving benchmark: `nanoseek serve` over loopback HTTP at 1, 8 and 32 concurrent streaming clients.

    python benchmarks/bench_serve.py                      # random `cpu` model, ~2 min (more on a busy machine)
    python benchmarks/bench_serve.py --pin --compile      # + rows with the engine pinned to a core, and compiled
    python benchmarks/bench_serve.py --model out/sft      # a real checkpoint
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model out/sft   # a server already running

Each client is a closed loop: it sends a streaming /v1/chat/completions request (greedy, `ignore_eos`, a fixed
max_tokens, usage included), reads it to the end, and sends the next. Per level: output tokens/s over the wall time,
time to first token (first chunk carrying text), inter-token latency (gaps between text chunks) p50/p99 and request
latency. Server overhead = 1 - (tokens/s through HTTP at 8 clients) / (tokens/s of the same engine driven directly by
8 threads with the same prompts and lengths, in this process), from alternating rounds (ABBA order), reported as the
ratio of the medians and per round (median, min, max), with the load average. The engine's own clock (decode steps
and busy seconds, from /metrics and from the direct engine's counters) splits any difference into batch occupancy,
step time and idle time; CPU time per token is reported for the server, its event-loop thread, the benchmark's HTTP
client and the direct engine. Cost per 1M output tokens = price_per_hour / (tokens per hour at the measured rate),
next to DeepSeek's published API prices. The server and the direct engine run with one torch thread by default
(`--threads`).

Writes benchmarks/results/bench_serve.json and docs/bench_serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.checkpoint import save_pretrained  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

# USD per 1M tokens (docs/../shared reference facts sheet, section 3: the R1-launch table and the 2025-09-05 one)
DEEPSEEK_PRICES = [
    {"model": "deepseek-reasoner (R1 launch)", "input_cache_hit": 0.14, "input_cache_miss": 0.55, "output": 2.19},
    {"model": "deepseek-chat (V3, same period)", "input_cache_hit": 0.07, "input_cache_miss": 0.27, "output": 1.10},
    {"model": "deepseek-chat / -reasoner (V3.1, from 2025-09-05)", "input_cache_hit": 0.07, "input_cache_miss": 0.56,
     "output": 1.68},
]
PROMPT = ("Thou art a scholar of the stars. Tell me, in the manner of the old plays, why the moon doth wax and wane, "
          "and what the sailors make of it.")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def make_model(path: Path, preset: str) -> Path:
    """A random checkpoint of `preset` plus a BPE tokenizer trained on a slice of the bundled corpus."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    save_pretrained(Transformer(cfg), path)
    text = (ROOT / "nanoseek" / "corpus" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    train_tokenizer([text[:300_000]], vocab_size=cfg.vocab_size, out_dir=path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the HTTP client side -------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, body: dict, rec: dict) -> None:
    t0 = time.perf_counter()
    last, first = None, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                rec["tokens"] += event["usage"]["completion_tokens"]
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            if delta.get("reasoning_content") or delta.get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now
                    rec["ttft"].append(now - t0)
                else:
                    rec["itl"].append(now - last)
                last = now
    rec["latency"].append(time.perf_counter() - t0)


async def engine_clock(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The server engine's decode steps and busy seconds so far (from /metrics)."""
    out = {}
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("nanoseek_decode_steps_total", "nanoseek_engine_seconds_total"):
            out["steps" if "steps" in name else "seconds"] = float(value)
    return out


async def run_level(url: str, clients: int, requests: int, max_tokens: int, clock: bool = False) -> dict:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    rec = {"tokens": 0, "ttft": [], "itl": [], "latency": []}
    todo = list(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            todo.pop()
            await one_request(client, url, body, rec)

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, {**body, "max_tokens": 2}, {"tokens": 0, "ttft": [], "itl": [], "latency": []})
        c0 = await engine_clock(client, url) if clock else {}
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
        c1 = await engine_clock(client, url) if clock else {}
    out = {"clients": clients, "requests": requests, "output_tokens": rec["tokens"], "wall_s": wall,
           "tokens_per_s": rec["tokens"] / wall,
           "ttft_p50_s": percentile(rec["ttft"], 50), "ttft_p99_s": percentile(rec["ttft"], 99),
           "itl_p50_s": percentile(rec["itl"], 50), "itl_p99_s": percentile(rec["itl"], 99),
           "latency_p50_s": percentile(rec["latency"], 50)}
    if c0 and c1:
        out.update(steps=c1["steps"] - c0["steps"], engine_s=c1["seconds"] - c0["seconds"])
    return out


# --- the engine alone -----------------------------------------------------------------------------------------------
class Direct:
    """The same workload through Engine.submit from client threads (no HTTP, no JSON, no asyncio)."""

    def __init__(self, model_dir: Path, max_batch_size: int, compile: bool = False):
        tok = Tokenizer.from_dir(model_dir)
        self.ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        self.engine = Engine.from_pretrained(model_dir, max_batch_size=max_batch_size, compile=compile).start()
        self.engine.submit(self.ids, SamplingParams(max_new_tokens=2)).wait()  # batch 1 (compiles its graph)
        if compile:
            self.run(8, 8, 4)  # batch > 1

    def run(self, clients: int, requests: int, max_tokens: int) -> dict:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=[])
        todo, lock, tokens = list(range(requests)), threading.Lock(), [0]

        def client_loop() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                n = len(self.engine.submit(self.ids, params).wait())
                with lock:
                    tokens[0] += n

        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        c = self.engine.counters
        s0, e0 = c["decode_steps"], c["decode_seconds"] + c["prefill_seconds"]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {"clients": clients, "requests": requests, "output_tokens": tokens[0], "wall_s": wall,
                "tokens_per_s": tokens[0] / wall, "steps": c["decode_steps"] - s0,
                "engine_s": c["decode_seconds"] + c["prefill_seconds"] - e0}


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(proc: subprocess.Popen | None) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a server child process: (all threads, its main thread = the
    event loop); the rest is the engine thread. Linux /proc; zeros elsewhere."""
    try:
        return _cpu(Path(f"/proc/{proc.pid}/stat")), _cpu(Path(f"/proc/{proc.pid}/task/{proc.pid}/stat"))
    except (AttributeError, OSError, ValueError):
        return 0.0, 0.0


def pin(server: subprocess.Popen | None, direct: Direct | None, engine_cpu: int = 0) -> None:
    """Engine threads (the server's and the direct one) on CPU `engine_cpu`, every other thread (the server's event
    loop, the benchmark's HTTP client and the direct engine's client threads) on the other CPUs: the engine thread
    keeps a core to itself, as it would with the clients on other machines."""
    rest = set(os.sched_getaffinity(0)) - {engine_cpu}
    os.sched_setaffinity(0, rest)  # this thread: the HTTP client (threads started from now on inherit it)
    if direct is not None:
        os.sched_setaffinity(direct.engine._thread.native_id, {engine_cpu})
    if server is not None:
        # the engine thread: the server's busiest thread other than its main thread (the event loop)
        tids = [int(t) for t in os.listdir(f"/proc/{server.pid}/task")]
        engine = max((t for t in tids if t != server.pid),
                     key=lambda t: _cpu(Path(f"/proc/{server.pid}/task/{t}/stat")))
        for t in tids:
            os.sched_setaffinity(t, {engine_cpu} if t == engine else rest)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


# --- report ---------------------------------------------------------------------------------------------------------
def cost_per_million(price_per_hour: float, tokens_per_s: float) -> float:
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def write_report(res: dict, path: Path) -> None:
    price = res["price_per_hour_usd"]
    lines = [
        "# Serving benchmark (`nanoseek serve`)", "",
        f"Run {res['date']} on {res['machine']} ({res['cpus']} CPUs, load average {res['load_average']:.2f} at the "
        f"start, {res.get('load_average_end', float('nan')):.2f} at the end: the machine is shared, so absolute "
        f"numbers vary between runs). Model: {res['model']} "
        f"({res['params_m']:.1f}M parameters), max_batch_size {res['max_batch_size']}, prompt {res['prompt_tokens']} "
        f"tokens, {res['max_tokens']} output tokens per request (greedy, `ignore_eos`), {res['torch_threads']} torch "
        f"thread(s) in the server and the direct engine. Command: "
        f"`{res['command']}`.", "",
        "| clients | requests | output tok/s | TTFT p50 | TTFT p99 | inter-token p50 | inter-token p99 | "
        "request p50 | $ / 1M output tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in res["levels"]:
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['tokens_per_s']:.0f} | "
                     f"{lv['ttft_p50_s'] * 1e3:.0f} ms | {lv['ttft_p99_s'] * 1e3:.0f} ms | "
                     f"{lv['itl_p50_s'] * 1e3:.1f} ms | {lv['itl_p99_s'] * 1e3:.1f} ms | {lv['latency_p50_s']:.2f} s | "
                     f"{cost_per_million(price, lv['tokens_per_s']):.3f} |")
    rows = res.get("overhead_rows") or []
    if rows:
        o = rows[0][1]
        lines += ["", f"## Server overhead at {o['clients']} clients", "",
                  f"The engine driven directly by {o['clients']} threads (in the benchmark process, no HTTP, no JSON, "
                  f"no asyncio) against the same engine behind `nanoseek serve`, {o['clients']} streaming HTTP clients "
                  f"(same prompt, lengths and batch size), in alternating rounds of {o['requests']} requests (ABBA "
                  "order). Overhead = 1 - (HTTP tok/s) / (direct tok/s), from the medians; the per-round column pairs "
                  "each HTTP run with the direct run next to it. Target (issue #3): <= 15%.", "",
                  "| engine | rounds | direct tok/s (min-max) | HTTP tok/s (min-max) | overhead | per round: median "
                  "(min, max) | load average |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, o in rows:
            d, h, p = o["direct_runs"], o["http_runs"], o["paired_fractions"]
            lines.append(f"| {name} | {len(p)} | {o['direct_tokens_per_s']:.0f} ({min(d):.0f}-{max(d):.0f}) | "
                         f"{o['http_tokens_per_s']:.0f} ({min(h):.0f}-{max(h):.0f}) | **{o['fraction'] * 100:.1f}%** | "
                         f"{o['paired_median'] * 100:.1f}% ({min(p) * 100:.1f}%, {max(p) * 100:.1f}%) | "
                         f"{min(o['load_averages']):.2f}-{max(o['load_averages']):.2f} |")
        lines += ["", "Where the difference comes from: the engine's own clock (`nanoseek_decode_steps_total`, "
                  "`nanoseek_engine_seconds_total` in `/metrics`; the same counters in the direct engine) splits "
                  "throughput into tokens per decode step (batch occupancy: requests arriving late or ending early "
                  "leave slots empty), milliseconds per step (the engine thread slowed by the event loop holding the "
                  "GIL, or by other processes on the cores) and the share of the wall time the engine was busy at "
                  "all (idle between a request's end and the next one's arrival). CPU per output token: the server "
                  "process, its event-loop thread alone, the benchmark's HTTP client (another process on the same "
                  "2 cores), and the direct engine.", "",
                  "| engine | side | tokens / step | ms / step | engine busy | CPU ms / token | event loop ms / token "
                  "| client ms / token |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, o in rows:
            ms, clock = o["cpu_ms_per_token"], o["engine_clock"]
            for side in ("direct", "http"):
                c = clock.get(side)
                if c is None:
                    continue
                cpu = (f"{ms['direct']:.3f} | | " if side == "direct" else
                       f"{ms['server']:.3f} | {ms['loop']:.3f} | {ms['client']:.3f}")
                lines.append(f"| {name} | {'engine direct' if side == 'direct' else 'HTTP'} | "
                             f"{c['tokens_per_step']:.2f} | {c['ms_per_step']:.2f} | {c['busy_fraction'] * 100:.1f}% | "
                             f"{cpu} |")
        lines += ["", f"The HTTP stack: uvicorn with {res['http_stack']} (uvicorn picks uvloop and httptools up when "
                  "they are installed; they halve the event loop's CPU per token against asyncio + h11)."]
    lines += ["", f"## Cost per million output tokens at ${price:.2f}/hour", "",
              f"The machine price is an assumption (`--price-per-hour`; ${price:.2f}/h is about what a 2-vCPU cloud "
              "VM costs on demand). Cost = price per hour / (output tokens per hour at the measured rate). "
              f"The server's own `/metrics` gauge after the run read ${res['metrics_cost_per_million']:.3f} "
              "(measured over the time requests were in flight, all levels together).", "",
              "| | input (cache hit) | input (cache miss) | output |", "|---|---:|---:|---:|"]
    best = max(res["levels"], key=lambda lv: lv["tokens_per_s"])
    lines.append(f"| nanoseek on this machine, {best['clients']} clients ({res['params_m']:.0f}M params) | | | "
                 f"${cost_per_million(price, best['tokens_per_s']):.3f} |")
    for p in DEEPSEEK_PRICES:
        lines.append(f"| {p['model']} (671B, 37B active) | ${p['input_cache_hit']:.2f} | ${p['input_cache_miss']:.2f} "
                     f"| ${p['output']:.2f} |")
    lines += ["", "The rows are not like for like: DeepSeek serves a 671B-parameter model (37B active per token) on "
              "H800 clusters, this is a small model on 2 CPU cores. What the comparison shows is the unit: cost per "
              "token falls with batch size on any hardware, because one decode step serves every sequence in the "
              "batch for nearly the price of one.", ""]
    path.write_text("\n".join(lines))


def start_server(model_dir: Path, args: argparse.Namespace, log_path: Path,
                 extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`nanoseek serve` in a child process on a free port; returns once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
           "--price-per-hour", str(args.price_per_hour), *extra]
    log = open(log_path, "w+b")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(cmd + (["--threads", str(args.threads)] if args.threads else []), cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            server.kill()
            sys.exit(f"bench_serve: the server did not start: {log.read().decode()[-2000:]}")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen | None) -> None:
    if server is not None:
        server.terminate()
        server.wait(30)


def measure_overhead(url: str, server: subprocess.Popen | None, direct: Direct, rounds: int, requests: int,
                     max_tokens: int) -> dict:
    """Alternate HTTP and direct rounds of 8 closed-loop clients (ABBA order, so that a drift in background load
    hits both alike). Per side: tokens/s per round, CPU per token, and the engine's own clock, which splits
    throughput = (tokens / step) * (steps / engine second) * (engine seconds / wall second):
    batch occupancy, step speed, and how much of the wall time the engine was busy."""
    runs: dict[str, list[dict]] = {"http": [], "direct": []}
    cpu = dict.fromkeys(("server", "loop", "client", "direct"), 0.0)
    loads = []
    for r in range(rounds):
        for side in ("http", "direct") if r % 2 == 0 else ("direct", "http"):
            if side == "http":
                (s0, l0), c0 = process_cpu(server), time.process_time()
                lv = asyncio.run(run_level(url, 8, requests, max_tokens, clock=True))
                (s1, l1), c1 = process_cpu(server), time.process_time()
                cpu["server"] += s1 - s0
                cpu["loop"] += l1 - l0
                cpu["client"] += c1 - c0
            else:
                c0 = time.process_time()
                lv = direct.run(8, requests, max_tokens)
                cpu["direct"] += time.process_time() - c0
            runs[side].append(lv)
        loads.append(os.getloadavg()[0])
    tps = {k: [lv["tokens_per_s"] for lv in v] for k, v in runs.items()}
    h, d = statistics.median(tps["http"]), statistics.median(tps["direct"])
    paired = [1 - a / b for a, b in zip(tps["http"], tps["direct"], strict=True)]  # the two runs of one round
    tokens = {k: sum(lv["output_tokens"] for lv in v) for k, v in runs.items()}
    ms = {k: 1e3 * cpu[k] / tokens["direct" if k == "direct" else "http"] for k in cpu}
    clock = {}
    for k, v in runs.items():
        steps, busy, wall = (sum(lv.get(f, 0.0) for lv in v) for f in ("steps", "engine_s", "wall_s"))
        if steps:
            clock[k] = {"tokens_per_step": tokens[k] / steps, "ms_per_step": 1e3 * busy / steps,
                        "busy_fraction": busy / wall}
    return {"clients": 8, "requests": requests, "http_tokens_per_s": h, "direct_tokens_per_s": d,
            "http_runs": tps["http"], "direct_runs": tps["direct"], "fraction": 1 - h / d,
            "paired_fractions": paired, "paired_median": statistics.median(paired), "load_averages": loads,
            "cpu_ms_per_token": ms, "cpu_fraction": ms["server"] / ms["direct"] - 1 if server is not None else None,
            "engine_clock": clock}


def print_overhead(name: str, o: dict) -> None:
    ms, p = o["cpu_ms_per_token"], o["paired_fractions"]
    print(f"{name}: 8 clients, {len(p)} rounds: HTTP {o['http_tokens_per_s']:.1f} tok/s, engine direct "
          f"{o['direct_tokens_per_s']:.1f} tok/s (medians) -> overhead {o['fraction'] * 100:.1f}%; per round "
          f"{', '.join(f'{x * 100:.1f}' for x in p)} (median {o['paired_median'] * 100:.1f}%); CPU ms/token: "
          f"server {ms['server']:.3f} (event loop {ms['loop']:.3f}), client {ms['client']:.3f}, direct "
          f"{ms['direct']:.3f}; load {min(o['load_averages']):.2f}-{max(o['load_averages']):.2f}", flush=True)
    for k, c in o["engine_clock"].items():
        print(f"  {k:6s}: {c['tokens_per_step']:.2f} tokens/step, {c['ms_per_step']:.2f} ms/step, engine busy "
              f"{c['busy_fraction'] * 100:.1f}% of the wall time", flush=True)


def overhead_rows(name: str, url: str, server: subprocess.Popen | None, direct: Direct, args: argparse.Namespace,
                  requests: int) -> list[tuple[str, dict]]:
    rows = [(name, measure_overhead(url, server, direct, args.overhead_rounds, requests, args.max_tokens))]
    print_overhead(*rows[-1])
    if args.pin:
        cpus = os.sched_getaffinity(0)
        pin(server, direct)
        rows.append((f"{name}, engine pinned", measure_overhead(url, server, direct, args.overhead_rounds, requests,
                                                                args.max_tokens)))
        print_overhead(*rows[-1])
        os.sched_setaffinity(0, cpus)
    direct.engine.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: a random model of --preset)")
    ap.add_argument("--preset", default="cpu", help="preset for the random model (default cpu)")
    ap.add_argument("--url", help="benchmark a server that is already running instead of starting one")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients per level (default 1,8,32)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96, help="output tokens per request (default 96)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--overhead-rounds", type=int, default=8, help="alternating HTTP/direct rounds at 8 clients")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the overhead with a compiled engine on both sides (`serve --compile`, "
                    "Engine(compile=True)); compiling adds a few minutes")
    ap.add_argument("--pin", action="store_true",
                    help="also measure the overhead with the engine threads pinned to CPU 0 and everything else (event "
                    "loop, HTTP client) on the other CPUs, as with clients on other machines (Linux)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the server and the direct engine (default 1: on a shared 2-core machine it "
                    "is faster for small models and its CPU time is steadier; 0 = torch's default)")
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="machine price in USD (default 0.10)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_serve.md")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(Path(tmp) / "model", args.preset)
        server, url = None, args.url
        if url is None:
            server, url = start_server(model_dir, args, Path(tmp) / "server.log", [])
        rows: list[tuple[str, dict]] = []
        try:
            results = []
            for c in levels:
                lv = asyncio.run(run_level(url, c, max(4, c * args.requests_per_client), args.max_tokens))
                print(f"{c:3d} clients: {lv['tokens_per_s']:7.1f} tok/s  TTFT p50 {lv['ttft_p50_s'] * 1e3:6.0f} ms  "
                      f"ITL p50 {lv['itl_p50_s'] * 1e3:5.1f} ms p99 {lv['itl_p99_s'] * 1e3:6.1f} ms", flush=True)
                results.append(lv)
            metrics_cost = metric(url, "nanoseek_cost_per_million_output_tokens_usd")
            n = 8 * args.requests_per_client
            if args.overhead_rounds and (args.url is None or args.model):
                rows += overhead_rows("eager", url, server, Direct(Path(model_dir), args.max_batch_size), args, n)
            if args.compile and args.overhead_rounds and server is not None:
                stop_server(server)
                server, url = start_server(model_dir, args, Path(tmp) / "server-compile.log", ["--compile"])
                t0 = time.perf_counter()
                for c in (1, 8):  # compile the batch-1 and the batch>1 graphs before measuring
                    asyncio.run(run_level(url, c, c, 4))
                direct = Direct(Path(model_dir), args.max_batch_size, compile=True)
                print(f"compiled both engines in {time.perf_counter() - t0:.0f} s", flush=True)
                rows += overhead_rows("compiled (`--compile`)", url, server, direct, args, n)
        finally:
            stop_server(server)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        tok = Tokenizer.from_dir(model_dir)
        res = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": load, "load_average_end": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(),
            "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
            "model": str(args.model) if args.model else f"random `{args.preset}` preset",
            "params_m": _params(cfg) / 1e6,
            "max_batch_size": args.max_batch_size, "max_tokens": args.max_tokens,
            "prompt_tokens": len(tok.apply_chat_template([{"role": "user", "content": PROMPT}], True)),
            "price_per_hour_usd": args.price_per_hour, "levels": results, "metrics_cost_per_million": metrics_cost,
            "deepseek_prices_per_million": DEEPSEEK_PRICES, "http_stack": _http_stack(),
            "overhead": rows[0][1] if rows else None, "overhead_rows": rows,
        }
    res["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    write_report(res, args.report)
    print(f"wrote {args.out} and {args.report} ({res['seconds']:.0f} s)")


def _http_stack() -> str:
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{loop} + {'httptools' if importlib.util.find_spec('httptools') else 'h11'}"


def _params(cfg: dict) -> int:
    from nanoseek.config import ModelConfig

    return ModelConfig.from_hf_dict(cfg).num_params()["total"]


if __name__ == "__main__":
    main()
