"""`nanoseek chat`: a terminal chat with a checkpoint, streaming the reasoning (dimmed) and then the answer.

The R1 chat template's generation prompt ends with `<think>\\n`, so the model's output starts inside its reasoning
and closes it with `</think>`; `TextSplitter` turns the token stream into reasoning text and answer text. The HTTP
server (server.py) uses the same splitter for `reasoning_content` / `content`.

Commands: `/reset` forgets the conversation, `/exit` (or end of input) quits. Works with stdin piped, e.g.
`printf 'hi\\n/exit\\n' | nanoseek chat --model out/sft`; then the reasoning is printed between <think> tags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from nanoseek.engine import Engine, SamplingParams

DIM, RESET = "\033[2m", "\033[0m"


class TextSplitter:
    """Token ids of one completion -> (reasoning, content) text deltas.

    - reasoning: everything before `</think>` (only when `reasoning=True`); its trailing newlines are held back and
      dropped at `</think>` (R1 writes "reasoning\\n</think>\\n\\nanswer").
    - content: the rest, with its leading whitespace dropped in reasoning mode (or when `strip_content` says so:
      a chat answer after a closed, empty reasoning block).
    - stop strings end the content: the text from the first match on is never returned and `stopped` is set. A tail
      that could be the start of a stop string is held back until the next token settles it.
    Special tokens (ids 0..6) produce no text.
    """

    def __init__(self, tokenizer: Tokenizer, reasoning: bool = True, stop: list[str] | None = None,
                 strip_content: bool | None = None):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.think_end_id = tokenizer.think_end_id
        self.in_reasoning = reasoning
        self.strip_content = reasoning if strip_content is None else strip_content
        self.stop = [s for s in (stop or []) if s]
        self.held = ""  # text decoded but not yet returned
        self.reasoning_tokens = 0  # tokens up to and including </think>
        self.stopped = False

    def feed(self, token_id: int) -> tuple[str, str]:
        if self.stopped:
            return "", ""
        if self.in_reasoning:
            self.reasoning_tokens += 1
            if token_id == self.think_end_id:
                text = (self.held + self.decoder.flush()).rstrip("\n")
                self.held, self.in_reasoning = "", False
                return text, ""
            text = self.held + self.decoder.feed(token_id)
            kept = text.rstrip("\n")
            self.held = text[len(kept):]
            return kept, ""
        return "", self._content(self.decoder.feed(token_id))

    def finish(self) -> tuple[str, str]:
        """The held-back tail at the end of the completion."""
        if self.stopped:
            return "", ""
        if self.in_reasoning:  # the output ended inside the reasoning (length limit, or no </think> at all)
            text, self.held = self.held + self.decoder.flush(), ""
            return text, ""
        text = self._content(self.decoder.flush(), final=True)
        return "", text

    def _content(self, text: str, final: bool = False) -> str:
        if self.strip_content:
            text = text.lstrip()
            if not text:
                return ""
            self.strip_content = False
        buf = self.held + text
        cuts = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return buf[:min(cuts)]
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]


# --- the terminal chat ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--system", default=None, help="a system prompt (R1's advice is to use none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer, reasoning included")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, R1's evaluation value)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's, <= 4096)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")


def run(args: argparse.Namespace) -> None:
    import torch

    from nanoseek.engine import Engine, SamplingParams

    if args.threads is not None:
        if args.threads < 1:
            raise NanoseekError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, max_batch_size=1, max_seq_len=args.max_seq_len)
    tok = Tokenizer.from_dir(args.model)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    params.validate()
    tty_in, tty_out = sys.stdin.isatty(), sys.stdout.isatty()
    out = sys.stdout
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    if tty_in:
        print(f"nanoseek chat: {args.model} ({engine.max_seq_len} tokens of context). /reset, /exit.")
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

