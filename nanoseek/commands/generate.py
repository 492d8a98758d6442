"""`nanoseek generate`: stream a completion for one prompt from a checkpoint directory, then a line of stats.

The generated text goes to stdout as it is produced (the stop token is not printed); the stats line goes to stderr,
so `nanoseek generate ... > out.txt` keeps only the text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nanoseek.commands._flags import add_device_argument, check_speculate, engine_placement, set_threads
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json, *.safetensors, "
                                                             "tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the R1 chat template as a user turn "
                                                       "(the reply opens with <think>)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy; default 0.6 (DeepSeek-R1's advice)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]; default 0.95")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights and cache dtype (default: float32 "
                                                                       "on the CPU, the fastest on most CPUs for "
                                                                       "small models; bfloat16 on CUDA)")
    add_device_argument(p)
    p.add_argument("--quant", choices=["int8", "int4"], default=None,
                   help="weight-only quantisation for the CPU: int8 per output channel, int4 in groups of 32 "
                        "(default: none; see docs/engine.md)")
    p.add_argument("--speculate", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="MTP speculative decoding: the checkpoint's MTP module drafts K tokens (default 1; 2.. chain "
                        "the module on its own output), the model verifies them in one forward (same output; faster "
                        "when drafts are accepted; docs/engine.md)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core; 1 is often "
                                                            "faster for small models or on a busy machine)")


def run(args: argparse.Namespace) -> None:
    from nanoseek.tokenizer import IncrementalDecoder, Tokenizer

    set_threads(args.threads)
    if not args.model.is_dir():
        raise NanoseekError(f"checkpoint directory not found: {args.model}")
    check_speculate(args.speculate, args.model)
    tokenizer = Tokenizer.from_dir(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=[tokenizer.eos_id])
    params.validate()
    device, dtype = engine_placement(args.device, args.dtype)
    engine = Engine.from_pretrained(args.model, dtype=dtype, device=device, max_batch_size=1, quant=args.quant,
                                    speculative=args.speculate > 0,
                                    num_speculative_tokens=max(args.speculate, 1))
    if tokenizer.vocab_size > engine.config.vocab_size:
        raise NanoseekError(f"{args.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {engine.config.vocab_size}")
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise NanoseekError("--prompt is empty")
    decoder = IncrementalDecoder(tokenizer)
    t0 = time.perf_counter()
    first = None
    n = 0
    for token in engine.stream(ids, params):
        first = first or time.perf_counter()
        n += 1
        sys.stdout.write(decoder.feed(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    t1 = time.perf_counter()
    decode_rate = (n - 1) / (t1 - first) if n > 1 else 0.0
    stats = engine.stats()
    spec = (f", draft acceptance {stats['acceptance_rate']:.0%}, {stats['tokens_per_verify_step']:.2f} tokens per "
            f"verify step" if args.speculate else "")
    print(f"[{len(ids)} prompt tokens, {n} new tokens in {t1 - t0:.2f} s: first token after {(first or t1) - t0:.3f} "
          f"s, then {decode_rate:.1f} tok/s{spec}; {stats['decode_path']}]", file=sys.stderr)
