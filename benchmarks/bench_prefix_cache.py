"""Prefix cache and chunked prefill benchmark: `nanoseek serve` over loopback HTTP (streaming), with and without the
prefix cache, side by side in one run.

    python benchmarks/bench_prefix_cache.py                  # `cpu` model (8k positions), ~8 min
    python benchmarks/bench_prefix_cache.py --turns 10 --shared 16 --price-per-hour 0.10

Three servers: `cache` (serve's defaults: the prefix cache on, `--prefill-chunk 256`), `no_cache`
(`--no-prefix-cache`, the same chunks) and `whole` (`--no-prefix-cache --prefill-chunk 0`: whole prompts, the fastest
way to prefill one prompt alone).

1. A 10-turn chat: each turn re-sends the whole history (system prompt, every user message and answer), as OpenAI
   clients do, to each server in turn (the order rotates), greedy, thinking off, fixed-length answers
   (`ignore_eos`); the next turn appends the answer (identical on all three).
   Per turn: prompt tokens, the usage's prompt_cache_hit_tokens, prefill tokens computed (/metrics), time to first
   token (the first streamed chunk with text).
2. 16 requests sharing a 1k-token system prompt (different questions), sent at once to a cold cache, in two rounds
   (two system prompts, the server order rotated): prefill tokens computed, time to first token (mean, max), wall
   time.
3. Chunked prefill: 8 streaming clients decode while one 4,096-token prompt arrives (/v1/completions, token ids),
   on `no_cache` (chunks of 256) and `whole`: inter-token latency of the 8 streams before and while it is
   prefilled, and its time to first token. Then the same through the engine directly for a sweep of chunk sizes.

Cost per 1M tokens (prompt + output) = price_per_hour x the seconds the server worked / 3600 / (tokens / 1e6), at
the stated machine price: the chat's sum of request latencies (sequential requests), the shared prompt's wall time.
Writes benchmarks/results/bench_prefix_cache.json and docs/bench_prefix_cache.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
from nanoseek.osutil import cpu_flags, cpu_model  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

CORPUS = ROOT / "nanoseek" / "corpus" / "tinyshakespeare" / "input.txt"
MAX_SEQ_LEN = 4608  # a 4,096-token prompt and its answer


def cpu_info() -> dict:
    flags = cpu_flags()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
              "amx_bf16"]
    return dict(cpu=cpu_model(), flags=[f for f in wanted if f in flags], cores=os.cpu_count())


def make_model(path: Path, train_steps: int) -> Path:
    """A `cpu`-preset checkpoint with 8,192 positions and a BPE tokenizer trained on the bundled corpus, trained for
    `train_steps` steps on the corpus (AdamW, 8 x 128 tokens). A random model emits token sequences that BPE would
    not write, so the text of its answer re-encodes to other tokens and the next turn's prompt parts from the cached
    answer within a few tokens; ~150 steps (a minute or two) make it write text that re-encodes to the tokens it
    emitted, as a trained model does."""
    torch.manual_seed(0)
    cfg = get_preset("cpu", max_position_embeddings=8192)
    text = CORPUS.read_text(encoding="utf-8")[:300_000]
    tok = train_tokenizer([text], vocab_size=cfg.vocab_size, out_dir=path.parent / "tokenizer")
    model = Transformer(cfg)
    if train_steps:
        data = torch.tensor(tok.encode(text))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(train_steps):
            starts = torch.randint(0, len(data) - 129, (8,)).tolist()
            x = torch.stack([data[i:i + 129] for i in starts])
            loss, _ = model.compute_loss(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"model: {train_steps} training steps, loss {loss.item():.2f}", flush=True)
    save_pretrained(model.eval(), path)  # replaces the directory: the tokenizer is saved after it
    tok.save(path)
    return path


def texts(tok: Tokenizer, n_tokens: int, start: int) -> str:
    """Corpus text of about n_tokens tokens, from character `start` on."""
    corpus = CORPUS.read_text(encoding="utf-8")
    chars = n_tokens * 3
    while len(tok.encode(corpus[start:start + chars])) < n_tokens:
        chars += 50
    return corpus[start:start + chars]


# --- servers ----------------------------------------------------------------------------------------------------------
class Server:
    """`nanoseek serve` in a child process on a free port."""

    def __init__(self, model: Path, flags: list[str], log: Path, args: argparse.Namespace):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.flags = f"http://127.0.0.1:{port}", flags
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
               "--max-batch-size", "16", "--max-seq-len", str(MAX_SEQ_LEN), "--threads", str(args.threads),
               "--price-per-hour", str(args.price_per_hour), *flags]
        self.log = open(log, "w+b")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                self.proc.kill()
                sys.exit(f"bench_prefix_cache: the server did not start: {self.log.read().decode()[-2000:]}")
            time.sleep(0.2)

    def startup_line(self) -> str:
        """serve's first line (the model, the decode path, the prefix cache's size)."""
        self.log.seek(0)
        return self.log.readline().decode().strip()

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return float(value)
        raise KeyError(name)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict) -> dict:
    """One streaming request: time to the first text chunk, the arrival time of every text chunk, its text, usage."""
    t0 = time.perf_counter()
    out = {"t0": t0, "times": [], "text": "", "usage": None}
    async with client.stream("POST", f"{url}{path}", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                out["usage"] = event["usage"]
            if not event.get("choices"):
                continue
            choice = event["choices"][0]
            piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if piece:
                out["times"].append(time.perf_counter())
                out["text"] += piece
    out["ttft"] = out["times"][0] - t0 if out["times"] else float("nan")
    out["latency"] = time.perf_counter() - t0
    return out


def stream_all(url: str, path: str, bodies: list[dict]) -> list[dict]:
    """Send the streaming requests at once; their results, in order."""
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*[stream(client, url, path, b) for b in bodies])

    return asyncio.run(run())


def cost(price_per_hour: float, seconds: float, tokens: int) -> float:
    """USD per 1M tokens processed (prompt + output) at price_per_hour for `seconds` of work."""
    return price_per_hour * seconds / 3600 / (tokens / 1e6)


# --- 1. the multi-turn chat -------------------------------------------------------------------------------------------
def chat_turns(servers: dict[str, Server], tok: Tokenizer, args: argparse.Namespace, conv: int) -> list[dict]:
    """One conversation (conv: which texts) on every server; a row per turn."""
    messages = [{"role": "system", "content": texts(tok, 150, 400_000 + 30_000 * conv)}]
    turns = []
    for t in range(args.turns):
        messages.append({"role": "user", "content": texts(tok, 80, 20_000 + 3_000 * t + 40_000 * conv)})
        body = {"model": "m", "messages": list(messages), "max_tokens": args.answer_tokens, "temperature": 0,
                "ignore_eos": True, "thinking": {"type": "disabled"}}
        row: dict = {"turn": t + 1}
        names = list(servers)[t % 3:] + list(servers)[:t % 3]  # rotate which server goes first
        for name in names:
            srv = servers[name]
            before = srv.metric("nanoseek_prefill_tokens_total")
            (r,) = stream_all(srv.url, "/v1/chat/completions", [body])
            u = r["usage"]
            row[name] = dict(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                             cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                             hit=u["prompt_cache_hit_tokens"], miss=u["prompt_cache_miss_tokens"],
                             prefill_tokens=int(srv.metric("nanoseek_prefill_tokens_total") - before),
                             ttft_s=r["ttft"], latency_s=r["latency"], text=r["text"])
        row["identical"] = len({row[name]["text"] for name in servers}) == 1
        c, n, w = row["cache"], row["no_cache"], row["whole"]
        print(f"chat {conv + 1} turn {t + 1:2d}: prompt {c['prompt_tokens']:5d}  hit {c['hit']:5d}  prefill "
              f"{c['prefill_tokens']:5d} vs {n['prefill_tokens']:5d}  TTFT {c['ttft_s'] * 1e3:4.0f} vs "
              f"{n['ttft_s'] * 1e3:4.0f} ms "
              f"({n['ttft_s'] / c['ttft_s']:4.1f}x), whole {w['ttft_s'] * 1e3:4.0f} ms "
              f"({w['ttft_s'] / c['ttft_s']:4.1f}x)", flush=True)
        messages.append({"role": "assistant", "content": row["cache"]["text"]})
        turns.append(row)
    # the last prompt again: all but its last block hit, so its time to first token is what a turn costs besides
    # prefilling what the cache misses (HTTP, chat template and tokenizer, a one-block prefill, the first token)
    (r,) = stream_all(servers["cache"].url, "/v1/chat/completions", [body])
    turns[-1]["cache"]["full_hit_ttft_s"] = r["ttft"]
    turns[-1]["cache"]["full_hit_miss"] = r["usage"]["prompt_cache_miss_tokens"]
    return turns


# --- 2. a shared system prompt ----------------------------------------------------------------------------------------
def median_turns(chats: list[list[dict]], names: list[str]) -> list[dict]:
    """Per turn, the median over the conversations of every number, per server."""
    rows = []
    for t, turn in enumerate(zip(*chats, strict=True)):
        row = {"turn": t + 1, "identical": all(r["identical"] for r in turn)}
        for name in names:
            row[name] = {k: statistics.median(r[name][k] for r in turn) for k, v in turn[0][name].items()
                         if not isinstance(v, str) and all(k in r[name] for r in turn)}
        rows.append(row)
    return rows


def shared_prompt(servers: dict[str, Server], tok: Tokenizer, args: argparse.Namespace) -> list[dict]:
    rounds = []
    for rnd in range(2):
        system = {"role": "system", "content": texts(tok, 1000, 100_000 + 60_000 * rnd)}
        bodies = [{"model": "m", "messages": [system, {"role": "user", "content": texts(tok, 20, 200_000 + 500 * i)}],
                   "max_tokens": args.shared_answer_tokens, "temperature": 0, "ignore_eos": True,
                   "thinking": {"type": "disabled"}} for i in range(args.shared)]
        row: dict = {"round": rnd + 1}
        for name in (list(servers) if rnd == 0 else list(servers)[::-1]):  # rotate the order
            srv = servers[name]
            before = srv.metric("nanoseek_prefill_tokens_total")
            t0 = time.perf_counter()
            rs = stream_all(srv.url, "/v1/chat/completions", bodies)
            wall = time.perf_counter() - t0
            ttfts = [r["ttft"] for r in rs]
            row[name] = dict(requests=len(rs), prompt_tokens=sum(r["usage"]["prompt_tokens"] for r in rs),
                             output_tokens=sum(r["usage"]["completion_tokens"] for r in rs),
                             hit=sum(r["usage"]["prompt_cache_hit_tokens"] for r in rs),
                             prefill_tokens=int(srv.metric("nanoseek_prefill_tokens_total") - before),
                             ttft_mean_s=statistics.mean(ttfts), ttft_p50_s=statistics.median(ttfts),
                             ttft_max_s=max(ttfts), wall_s=wall, texts=[r["text"] for r in rs])
        row["identical"] = all(row[name]["texts"] == row["cache"]["texts"] for name in servers)
        c, n = row["cache"], row["no_cache"]
        print(f"shared round {rnd + 1}: prefill {c['prefill_tokens']} vs {n['prefill_tokens']} tokens, TTFT mean "
              f"{c['ttft_mean_s'] * 1e3:.0f} vs {n['ttft_mean_s'] * 1e3:.0f} ms, wall {c['wall_s']:.1f} vs "
              f"{n['wall_s']:.1f} s", flush=True)
        rounds.append(row)
    return rounds


# --- 3. chunked prefill -----------------------------------------------------------------------------------------------
def itl_while_long_prompt(srv: Server, args: argparse.Namespace) -> dict:
    """8 streams decoding; after 1 s a 4,096-token prompt arrives. Gaps between the 8 streams' tokens before it and
    while it is prefilled (until its first token)."""
    g = torch.Generator().manual_seed(3)
    long = torch.randint(10, 4000, (4096,), generator=g).tolist()
    shorts = [torch.randint(10, 4000, (32,), generator=g).tolist() for _ in range(8)]

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            body = {"model": "m", "max_tokens": args.stream_tokens, "temperature": 0, "ignore_eos": True}
            streams = [asyncio.create_task(stream(client, srv.url, "/v1/completions", {**body, "prompt": p}))
                       for p in shorts]
            await asyncio.sleep(args.long_after)
            slow = await stream(client, srv.url, "/v1/completions", {**body, "prompt": long, "max_tokens": 4})
            return slow, await asyncio.gather(*streams)

    slow, streams = asyncio.run(run())
    t_in, t_first = slow["t0"], slow["times"][0]
    before, during = [], []
    for s in streams:  # "during": the gaps that overlap the long prompt's wait for its first token
        for a, b in zip(s["times"], s["times"][1:], strict=False):
            if b > t_in and a < t_first:
                during.append(b - a)
            elif b <= t_in:
                before.append(b - a)
    assert during and all(len(s["times"]) > 10 for s in streams), "the streams ended before the long prompt came"

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    return dict(flags=srv.flags, long_prompt_tokens=slow["usage"]["prompt_tokens"], long_ttft_s=slow["ttft"],
                itl_before_p50_s=statistics.median(before), itl_during_p50_s=statistics.median(during),
                itl_during_p99_s=pct(during, 99), itl_during_max_s=max(during), gaps_during=len(during))


def engine_turn(prompt: int, cached: int) -> dict:
    """Where the last turn's time to first token goes: the engine alone (CPU time, best of 5), prefilling the whole
    prompt against prefilling only what the cache misses (a suffix over `cached` cached positions)."""
    model = Transformer(get_preset("cpu", max_position_embeddings=8192)).eval()
    ids = torch.randint(2, 4096, (prompt,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = Engine(model, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)
    whole = suffix = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        engine.prefill([ids])
        whole = min(whole, time.thread_time() - t0)
        engine.prefill([ids[:cached]])
        t0 = time.thread_time()
        engine.runner.prefill_hidden([ids[cached:]], 0, [cached])
        suffix = min(suffix, time.thread_time() - t0)
    print(f"engine: {prompt} tokens whole {whole * 1e3:.0f} ms, the last {prompt - cached} over {cached} cached "
          f"{suffix * 1e3:.0f} ms", flush=True)
    return dict(prompt_tokens=prompt, cached_tokens=cached, whole_s=whole, suffix_s=suffix)


def engine_chunk_sweep(chunks: list[int | None]) -> list[dict]:
    """The same through the engine directly (no HTTP): 8 streams, then a 4,096-token prompt; step times."""
    model = Transformer(get_preset("cpu", max_position_embeddings=8192)).eval()
    g = torch.Generator().manual_seed(0)
    long = torch.randint(2, 4096, (4096,), generator=g).tolist()
    rows = []
    for chunk in chunks:
        engine = Engine(model, max_batch_size=9, max_seq_len=MAX_SEQ_LEN, prefill_chunk=chunk)
        for _ in range(8):
            engine.submit(torch.randint(2, 4096, (64,), generator=g).tolist(), SamplingParams(400, stop_token_ids=[]))
        for _ in range(5):
            engine.step()
        t0 = last = time.perf_counter()
        slow, gaps = engine.submit(long, SamplingParams(4, stop_token_ids=[])), []
        while not slow.output_ids:
            engine.step()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        rows.append(dict(prefill_chunk=chunk, steps=len(gaps), itl_p50_s=statistics.median(gaps),
                         itl_max_s=max(gaps), long_ttft_s=time.perf_counter() - t0))
        print(f"engine, prefill_chunk {chunk}: {len(gaps)} steps, ITL p50 {rows[-1]['itl_p50_s'] * 1e3:.0f} ms max "
              f"{rows[-1]['itl_max_s'] * 1e3:.0f} ms, 4k TTFT {rows[-1]['long_ttft_s']:.2f} s", flush=True)
    return rows


# --- the report -------------------------------------------------------------------------------------------------------
def write_report(res: dict, path: Path) -> None:
    m, p = res["machine"], res["price_per_hour_usd"]
    lines = ["# Prefix cache and chunked prefill benchmark", "",
             f"`{res['command']}`, {res['date']}. **CPU:** {m['cpu']}, {m['cores']} cores; flags "
             f"{', '.join(m['flags'])}. torch {res['torch']}, {res['threads']} thread(s) per server, load average "
             f"{res['load_average']:.1f} at the start, {res['load_average_end']:.1f} at the end. Model: "
             f"{res['model']}. Through `nanoseek serve` over loopback HTTP, streaming (usage from the last chunk); "
             f"{res['decode_path']}. Servers: `cache` = serve's default (prefix cache on, `--prefill-chunk 256`), "
             f"`no_cache` = `--no-prefix-cache` (the same chunks), `whole` = `--no-prefix-cache --prefill-chunk 0` "
             f"(whole prompts). Cost: ${p:.2f} per machine-hour. "
             f"Latent cache: {res['bytes_per_token']:,} bytes per cached token (every layer's "
             f"kv_lora_rank + qk_rope_head_dim floats, and the MTP module's).", "",
             f"## A {len(res['chat'])}-turn chat (each turn re-sends the history)", "",
             f"System prompt ~150 tokens, user messages ~80 tokens, answers of {res['answer_tokens']} tokens "
             "(greedy, `ignore_eos`, thinking off). Hit = the usage's `prompt_cache_hit_tokens`; prefill = tokens the "
             f"server computed (`nanoseek_prefill_tokens_total`). Medians over {res['chats']} conversations with "
             "different texts. An earlier answer renders after the thinking-off prompt's empty reasoning block, so the "
             "cached prompt + answer is the start of the next prompt; the hit ends where re-encoding the answer's text "
             "gives other tokens than the model emitted (a random model emits token sequences BPE would not write, a "
             "trained one seldom does) or at the last whole block of 16 tokens.", "",
             "| turn | prompt tokens | hit | prefill, cache | prefill, no cache | TTFT, cache | TTFT, no_cache | "
             "TTFT, whole | speed-up vs no_cache / whole | same output |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for t in res["chat"]:
        c, n, w = t["cache"], t["no_cache"], t["whole"]
        lines.append(f"| {t['turn']} | {c['prompt_tokens']:,.0f} | {c['hit']:,.0f} | {c['prefill_tokens']:,.0f} | "
                     f"{n['prefill_tokens']:,.0f} | {c['ttft_s'] * 1e3:.0f} ms | {n['ttft_s'] * 1e3:.0f} ms | "
                     f"{w['ttft_s'] * 1e3:.0f} ms | {n['ttft_s'] / c['ttft_s']:.1f}x / "
                     f"{w['ttft_s'] / c['ttft_s']:.1f}x | {'yes' if t['identical'] else 'NO'} |")
    s = res["chat_summary"]
    lines += ["", f"Per conversation: {s['cache']['prefill_tokens']:,.0f} prefill tokens with the cache against "
              f"{s['no_cache']['prefill_tokens']:,.0f} without ({s['prefill_ratio']:.1f}x fewer); "
              f"{s['cache']['tokens']:,.0f} tokens processed (prompt + output) in {s['cache']['seconds']:.1f} s "
              "against "
              f"{s['no_cache']['seconds']:.1f} s (whole prompts: {s['whole']['seconds']:.1f} s): "
              f"**${s['cache']['usd_per_m']:.4f} vs ${s['no_cache']['usd_per_m']:.4f} (whole prompts "
              f"${s['whole']['usd_per_m']:.4f}) per 1M tokens**. Time to first token at turn {len(res['chat'])}: "
              f"**{s['last_turn_speedup']:.1f}x lower** with the cache than `no_cache`, "
              f"{s['last_turn_speedup_whole']:.1f}x than `whole` (target >= 5x; the ratio of the medians above). Per "
              "conversation: " + ", ".join(f"{x:.1f}x" for x in s["last_turn_speedups"]) + " (median "
              f"{statistics.median(s['last_turn_speedups']):.1f}x). The last prompt re-sent at once (all "
              f"but {res['chat'][-1]['cache']['full_hit_miss']:.0f} tokens hit): "
              f"{res['chat'][-1]['cache']['full_hit_ttft_s'] * 1e3:.0f} ms to the first token, the part of a turn "
              "that is not prefill (HTTP, chat template and tokenizer, a one-block prefill, the first token).", "",
              f"Where the last turn's time goes, the engine alone (CPU time, best of 5): prefilling its "
              f"{res['engine_turn']['prompt_tokens']:,} tokens takes {res['engine_turn']['whole_s'] * 1e3:.0f} ms, "
              f"the {res['engine_turn']['prompt_tokens'] - res['engine_turn']['cached_tokens']:,} tokens the cache "
              f"misses {res['engine_turn']['suffix_s'] * 1e3:.0f} ms "
              f"({res['engine_turn']['whole_s'] / res['engine_turn']['suffix_s']:.1f}x): they attend to all "
              f"{res['engine_turn']['prompt_tokens']:,} positions, and the expanded keys and values of the cached ones "
              "are recomputed from their latents (docs/engine.md). The rest of a time to first token is HTTP, the "
              "chat template and tokenizer, and the first token's trip back (the same with and without the cache).",
              "",
              f"## {res['shared'][0]['cache']['requests']} requests sharing a 1k-token system prompt", "",
              f"Sent at once to a cold cache, questions of ~20 tokens, answers of {res['shared_answer_tokens']} "
              "tokens; two rounds with different system prompts.", "",
              "| round | server | prompt tokens | hit | prefill tokens | TTFT mean | TTFT max | wall | $/1M tokens | "
              "same output |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in res["shared"]:
        for name in ("cache", "no_cache", "whole"):
            x = r[name]
            lines.append(f"| {r['round']} | {name} | {x['prompt_tokens']:,} | {x['hit']:,} | {x['prefill_tokens']:,} "
                         f"| {x['ttft_mean_s'] * 1e3:.0f} ms | {x['ttft_max_s'] * 1e3:.0f} ms | {x['wall_s']:.1f} s | "
                         f"${x['usd_per_m']:.4f} | {'yes' if r['identical'] else 'NO'} |")
    lines += ["", "## Chunked prefill: 8 streams while a 4,096-token prompt arrives", "",
              f"8 streaming clients ({res['stream_tokens']} tokens each, 32-token prompts); after "
              f"{res['long_after_s']:.0f} s one request with a 4,096-token prompt. ITL = gaps between a stream's "
              "chunks; \"during\" = the gaps that overlap the time from the long request's arrival to its first "
              "token.", "",
              "| server | ITL p50 before | ITL p50 during | ITL p99 during | ITL max during | 4k prompt TTFT |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["chunked"]:
        lines.append(f"| `{' '.join(r['flags'])}` | {r['itl_before_p50_s'] * 1e3:.0f} ms | "
                     f"{r['itl_during_p50_s'] * 1e3:.0f} ms | {r['itl_during_p99_s'] * 1e3:.0f} ms | "
                     f"{r['itl_during_max_s'] * 1e3:.0f} ms | {r['long_ttft_s']:.2f} s |")
    lines += ["", "The same through the engine directly (`Engine(prefill_chunk=N)`, no HTTP; step times while the "
              "4k prompt is prefilled):", "", "| prefill_chunk | steps | ITL p50 | ITL max | 4k prompt TTFT |",
              "|---:|---:|---:|---:|---:|"]
    for r in res["engine_chunks"]:
        lines.append(f"| {r['prefill_chunk'] or 'none (whole prompt)'} | {r['steps']} | {r['itl_p50_s'] * 1e3:.0f} ms "
                     f"| {r['itl_max_s'] * 1e3:.0f} ms | {r['long_ttft_s']:.2f} s |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--chats", type=int, default=5, help="conversations (different texts); medians per turn")
    ap.add_argument("--answer-tokens", type=int, default=48, help="tokens per chat answer (default 48)")
    ap.add_argument("--shared", type=int, default=16, help="requests sharing the system prompt (default 16)")
    ap.add_argument("--shared-answer-tokens", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=2500,
                    help="tokens per stream in the ITL test (default 2500: they outlast the 4k prefill)")
    ap.add_argument("--long-after", type=float, default=1.0, help="seconds before the 4k prompt arrives")
    ap.add_argument("--chunks", default="0,128,256,512,1024", help="engine-direct sweep (0: whole prompts)")
    ap.add_argument("--train-steps", type=int, default=150,
                    help="training steps of the served model (default 150; 0: random weights)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1)")
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="machine price in USD (default 0.10)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_prefix_cache.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_prefix_cache.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load, t_start = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args.train_steps)
        tok = Tokenizer.from_dir(model)
        servers = {name: Server(model, flags, Path(tmp) / f"{name}.log", args) for name, flags in (
            ("cache", []), ("no_cache", ["--no-prefix-cache"]),
            ("whole", ["--no-prefix-cache", "--prefill-chunk", "0"]))}
        try:
            for srv in servers.values():  # warm up: the first requests of a process pay one-off costs
                for n in (5, 300):
                    httpx.post(f"{srv.url}/v1/chat/completions", timeout=600, json={
                        "model": "m", "messages": [{"role": "user", "content": texts(tok, n, 250_000)}],
                        "max_tokens": 4, "thinking": {"type": "disabled"}})
            chats = [chat_turns(servers, tok, args, conv) for conv in range(args.chats)]
            shared = shared_prompt(servers, tok, args)
            line = servers["cache"].startup_line()  # "...; native avx512 decode (...); prefix cache: ..."
            decode_path = next((part.strip() for part in line.split(";") if "decode" in part), "?")
            bytes_per_token = int(servers["cache"].metric("nanoseek_prefix_cache_bytes")
                                  / max(servers["cache"].metric("nanoseek_prefix_cache_tokens"), 1))
            servers["cache"].stop()
            chunked = [itl_while_long_prompt(servers[name], args) for name in ("no_cache", "whole")]
            for r in chunked:
                print(f"{' '.join(r['flags'])}: ITL p50 {r['itl_during_p50_s'] * 1e3:.0f} ms max "
                      f"{r['itl_during_max_s'] * 1e3:.0f} ms during the 4k prefill, its TTFT {r['long_ttft_s']:.2f} s",
                      flush=True)
        finally:
            for s in servers.values():
                if s.proc.poll() is None:
                    s.stop()
    engine_chunks = engine_chunk_sweep([int(c) or None for c in args.chunks.split(",")])
    last = median_turns(chats, ["cache"])[-1]["cache"]
    turn_profile = engine_turn(round(last["prompt_tokens"]), round(last["hit"]))
    chat, summary = median_turns(chats, ["cache", "no_cache", "whole"]), {}
    for name in ("cache", "no_cache", "whole"):  # per conversation, on average
        rows = [t for c in chats for t in c]
        tokens = sum(t[name]["prompt_tokens"] + t[name]["completion_tokens"] for t in rows) / len(chats)
        seconds = sum(t[name]["latency_s"] for t in rows) / len(chats)
        summary[name] = dict(prefill_tokens=sum(t[name]["prefill_tokens"] for t in rows) / len(chats),
                             tokens=tokens, seconds=seconds, usd_per_m=cost(args.price_per_hour, seconds, tokens))
    summary["prefill_ratio"] = summary["no_cache"]["prefill_tokens"] / summary["cache"]["prefill_tokens"]
    summary["last_turn_speedup"] = chat[-1]["no_cache"]["ttft_s"] / chat[-1]["cache"]["ttft_s"]
    summary["last_turn_speedups"] = [c[-1]["no_cache"]["ttft_s"] / c[-1]["cache"]["ttft_s"] for c in chats]
    summary["last_turn_speedup_whole"] = chat[-1]["whole"]["ttft_s"] / chat[-1]["cache"]["ttft_s"]
    for r in shared:
        for name in ("cache", "no_cache", "whole"):
            x = r[name]
            x["usd_per_m"] = cost(args.price_per_hour, x["wall_s"], x["prompt_tokens"] + x["output_tokens"])
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": cpu_info(),
           "torch": torch.__version__, "threads": args.threads, "load_average": load,
           "load_average_end": os.getloadavg()[0],
           "command": " ".join(["python", "benchmarks/bench_prefix_cache.py", *sys.argv[1:]]),
           "model": f"`cpu` preset (6 layers, d 256, kv_lora_rank 64, qk_rope_head_dim 16) with "
                    f"max_position_embeddings 8192, BPE tokenizer of 4096 tokens, trained {args.train_steps} steps on "
                    "tinyshakespeare (the served model; the engine-only measurements use random weights)",
           "price_per_hour_usd": args.price_per_hour, "decode_path": decode_path, "bytes_per_token": bytes_per_token,
           "answer_tokens": args.answer_tokens, "shared_answer_tokens": args.shared_answer_tokens,
           "stream_tokens": args.stream_tokens, "long_after_s": args.long_after, "chats": len(chats),
           "chat": chat, "chat_runs": chats,
           "chat_summary": summary, "shared": shared, "chunked": chunked, "engine_chunks": engine_chunks,
           "engine_turn": turn_profile,
           "seconds": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    write_report(res, args.report)
    print(f"wrote {args.out} and {args.report} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
