"""`nanoseek serve`: serve a checkpoint over HTTP (an OpenAI / DeepSeek-compatible API and a web chat).

The options become an Engine, a Tokenizer and `nanoseek.serving.create_app(...)`, run by uvicorn with the
connection-level limits of `nanoseek.serving.http_protocol`. docs/serving.md describes the API.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nanoseek.commands._flags import add_device_argument, check_speculate, engine_placement, set_threads
from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.serving import MAX_CONNECTIONS, READ_TIMEOUT, check_api_key, create_app, http_protocol
from nanoseek.tokenizer import Tokenizer

PREFILL_CHUNK = 256  # serve's default: docs/bench_prefix_cache.md (inter-token latency while a 4k prompt arrives)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $NANOSEEK_API_KEY if set)")
    p.add_argument("--max-batch-size", type=int, default=8, help="engine batch slots (default 8)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; beyond that the server answers 429 (default 256)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's, <= 4096)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; larger gets 413 (default: max(1 MiB, 256 bytes per context token))")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                   help=f"seconds a client has to send a request's headers, and again its body (default "
                        f"{READ_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"open HTTP connections; more get 503 at once (default {MAX_CONNECTIONS})")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://app.example) to call the API (CORS); "
                        "repeatable, '*' for any. Default: no CORS headers")
    p.add_argument("--docs", action="store_true", help="serve the OpenAPI page at /docs, /redoc and /openapi.json")
    p.add_argument("--price-per-hour", type=float, default=0.0,
                   help="machine price in USD/hour, for the cost per 1M output tokens in /metrics")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: one per core; 1 is often faster for small models on a busy machine)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's decode step: ~1.5-2x faster decoding after a one-off compile of "
                        "20-90 s on the first requests (docs/engine.md)")
    p.add_argument("--speculate", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="MTP speculative decoding with K draft tokens a step (default 1): the same output, faster "
                        "when the checkpoint's MTP module drafts well (docs/bench_speculative.md)")
    # the prefix cache and chunked prefill (docs/engine.md, "Prefix cache and chunked prefill")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the cached latents of earlier prompts' prefixes (on by default: a chat's "
                        "history, a shared system prompt are read from the cache instead of prefilled again)")
    p.add_argument("--prefix-cache-mb", type=float, default=None, metavar="MB",
                   help="memory for cached prefixes beyond the batch slots' own (default: as much as the slots'; "
                        "idle slots hold cached prefixes too)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="also keep cached prefixes in files under DIR, read back on a hit, across restarts")
    p.add_argument("--cache-disk-mb", type=float, default=1024, metavar="MB",
                   help="largest size of --cache-dir; the least recently used files go first (default 1024)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"while requests are decoding, prefill at most N prompt tokens a step, so a long prompt does "
                        f"not stall them (default {PREFILL_CHUNK}; 0: whole prompts)")
    add_device_argument(p)


def cache_options(args: argparse.Namespace) -> dict:
    """The Engine's prefix cache and chunked prefill options from serve's flags."""
    if args.prefix_cache_mb is not None and not args.prefix_cache_mb >= 0:
        raise NanoseekError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if not args.cache_disk_mb > 0:
        raise NanoseekError(f"--cache-disk-mb must be > 0, got {args.cache_disk_mb}")
    if args.prefill_chunk < 0:
        raise NanoseekError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.no_prefix_cache and (args.cache_dir is not None or args.prefix_cache_mb is not None):
        raise NanoseekError("--no-prefix-cache contradicts --cache-dir / --prefix-cache-mb")
    opts: dict = dict(prefill_chunk=args.prefill_chunk or None, prefix_cache=not args.no_prefix_cache)
    if opts["prefix_cache"]:
        opts.update(cache_dir=args.cache_dir, cache_disk_bytes=int(args.cache_disk_mb * 2**20),
                    cache_budget_bytes=None if args.prefix_cache_mb is None else int(args.prefix_cache_mb * 2**20))
    return opts


def describe_cache(engine: Engine) -> str:
    """One line on the prefix cache: its memory and disk, in bytes and in tokens of latents."""
    s = engine.stats()
    if not s["prefix_cache"]:
        return "prefix cache off"
    per = s["prefix_cache_bytes_per_token"]
    line = (f"prefix cache: {s['prefix_cache_budget_bytes'] / 2**20:.0f} MB beyond the slots "
            f"({s['prefix_cache_budget_bytes'] // per:,} tokens at {per:,} B/token)")
    disk = engine.tree.disk if engine.tree is not None else None
    if disk is not None:
        line += (f"; files in {disk.path} up to {disk.budget / 2**20:.0f} MB "
                 f"({disk.budget * disk.bs // (disk.payload_bytes or 1):,} tokens)")
    return line




def run(args: argparse.Namespace) -> None:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise NanoseekError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise NanoseekError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.price_per_hour >= 0:
        raise NanoseekError(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise NanoseekError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if not args.read_timeout > 0:
        raise NanoseekError(f"--read-timeout must be > 0, got {args.read_timeout}")
    if args.max_connections < 1:
        raise NanoseekError(f"--max-connections must be >= 1, got {args.max_connections}")
    api_key = args.api_key
    if api_key is not None:
        check_api_key(api_key, "--api-key")
    elif "NANOSEEK_API_KEY" in os.environ:
        api_key = check_api_key(os.environ["NANOSEEK_API_KEY"], "NANOSEEK_API_KEY")
    set_threads(args.threads)
    check_speculate(args.speculate, args.model)
    device, dtype = engine_placement(args.device)
    engine = Engine.from_pretrained(args.model, dtype=dtype, device=device, max_batch_size=args.max_batch_size,
                                    max_seq_len=args.max_seq_len,
                                    compile=args.compile, speculative=args.speculate > 0,
                                    num_speculative_tokens=max(args.speculate, 1), **cache_options(args))
    tokenizer = Tokenizer.from_dir(args.model)
    app = create_app(engine, tokenizer, model_name=args.model.resolve().name, api_key=api_key,
                     max_queue=args.max_queue, price_per_hour=args.price_per_hour,
                     max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                     allow_origins=args.allow_origin, docs=args.docs)
    print(f"nanoseek serve: {args.model} on http://{args.host}:{args.port}/ (web chat at /, API at /v1"
          f"{', key required' if api_key else ''}); {engine.stats()['decode_path']}; {describe_cache(engine)}",
          flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            http=http_protocol(args.read_timeout, args.max_connections))
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
