"""`nanoseek chat`: a terminal chat with a checkpoint, streaming the reasoning (dimmed) and then the answer.

The R1 chat template's generation prompt opens the reasoning; `nanoseek.serving.TextSplitter` (the server's
`reasoning_content` / `content` split) turns the token stream into reasoning text and answer text.

Commands: `/reset` forgets the conversation, `/exit` (or end of input) quits. Works with stdin piped, e.g.
`printf 'hi\\n/exit\\n' | nanoseek chat --model out/sft`; then the reasoning is printed between <think> tags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nanoseek.commands._flags import add_device_argument, engine_placement
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nanoseek.engine import Engine, SamplingParams

DIM, RESET = "\033[2m", "\033[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--system", default=None, help="a system prompt (R1's advice is to use none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer, reasoning included")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, R1's evaluation value)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's, <= 4096)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    add_device_argument(p)


def run(args: argparse.Namespace) -> None:
    import torch

    from nanoseek.engine import Engine, SamplingParams

    if args.threads is not None:
        if args.threads < 1:
            raise NanoseekError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device, dtype = engine_placement(args.device)
    engine = Engine.from_pretrained(args.model, dtype=dtype, device=device, max_batch_size=1,
                                    max_seq_len=args.max_seq_len)
    tok = Tokenizer.from_dir(args.model)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    params.validate()
    tty_in, tty_out = sys.stdin.isatty(), sys.stdout.isatty()
    out = sys.stdout
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    if tty_in:
        print(f"nanoseek chat: {args.model} ({engine.max_seq_len} tokens of context; "
              f"{engine.stats()['decode_path']}). /reset, /exit.")
    else:  # piped: the replies alone on stdout, the decode path on stderr
        print(f"nanoseek chat: {engine.stats()['decode_path']}", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if tty_in else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # end of input
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        messages = system + history + [{"role": "user", "content": line}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) >= engine.max_seq_len:
            print(f"(the conversation has {len(ids)} tokens, the context holds {engine.max_seq_len}: /reset)",
                  flush=True)
            continue
        answer = _answer(engine, tok, ids, params, out, tty_out)
        history = messages[len(system):] + [{"role": "assistant", "content": answer}]  # no reasoning sent back


def _answer(engine: Engine, tok: Tokenizer, ids: list[int], params: SamplingParams, out: TextIO, tty: bool) -> str:
    """Stream one answer to `out`; returns its content (the reasoning is shown, never kept). Ctrl-C stops it."""
    from nanoseek.serving import TextSplitter

    splitter = TextSplitter(tok)
    content: list[str] = []
    state = {"thinking": False}

    def show(reasoning: str, text: str) -> None:
        if reasoning:
            if not state["thinking"]:
                out.write(DIM if tty else "<think>\n")
                state["thinking"] = True
            out.write(reasoning)
        if text or (not splitter.in_reasoning and state["thinking"]):
            if state["thinking"]:
                out.write(RESET + "\n\n" if tty else "\n</think>\n\n")
                state["thinking"] = False
            out.write(text)
            content.append(text)
        out.flush()

    stream = engine.stream(ids, params)
    try:
        for token in stream:
            show(*splitter.feed(token))
    except KeyboardInterrupt:
        out.write(RESET if tty else "")
        out.write("\n(stopped)")
    finally:
        stream.close()  # cancels the request if it is still running
    show(*splitter.finish())
    if state["thinking"]:  # ended inside the reasoning: close the dimmed block
        out.write(RESET if tty else "\n</think>")
    out.write("\n")
    out.flush()
    return "".join(content)

