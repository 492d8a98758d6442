"""A completion's tokens -> the text an API returns: reasoning, content, tool calls.

The R1 chat template's generation prompt ends with `<think>\\n`, so the model's output starts inside its reasoning
and closes it with `</think>`; `TextSplitter` turns the token stream into reasoning text and answer text (the server's
`reasoning_content` / `content`, the terminal chat's dimmed thinking and answer). `ToolCallStream` reads tool calls
out of the answer text as they complete.
"""

from __future__ import annotations

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import (
    TOOL_CALL_END,
    TOOL_CALL_STYLE,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    IncrementalDecoder,
    Tokenizer,
)


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


class ToolCallStream:
    """A choice's content text -> (the text before the calls, each tool call as it completes). The markers arrive as
    text (IncrementalDecoder keeps tool-marker tokens as their strings), so this reads the output of tokenizers with
    and without them as special tokens alike; one call is parsed by nanoseek.grammar.parse_tool_calls, the same
    syntax the tool_calls grammar generates. Output that does not parse (possible only without a grammar) is
    returned as content from that point on: nothing the model wrote is dropped."""

    def __init__(self) -> None:
        self.buf = ""
        self.state = "text"  # text -> calls -> after (the calls block ended), or -> broken
        self.n_calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, str]]]:
        from nanoseek.grammar import parse_tool_calls  # not at the top: grammar imports torch (chat --help would wait)

        self.buf += text
        if self.state in ("after", "broken"):
            out, self.buf = self.buf, ""
            return out, []
        out = ""
        if self.state == "text":
            k = self.buf.find(TOOL_CALLS_BEGIN)
            if k < 0:
                keep = 0 if final else max((n for n in range(1, len(TOOL_CALLS_BEGIN))
                                            if self.buf.endswith(TOOL_CALLS_BEGIN[:n])), default=0)
                out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out, []
            out, self.buf, self.state = self.buf[:k], self.buf[k + len(TOOL_CALLS_BEGIN):], "calls"
        calls = []
        while self.state == "calls":
            rest = self.buf.lstrip("\n")
            if rest.startswith(TOOL_CALLS_END):
                self.state, self.buf = "after", rest[len(TOOL_CALLS_END):]
                break
            end = rest.find(TOOL_CALL_END)
            if end < 0:  # an unfinished call: wait for more text (at the end: it is not a call)
                if final:
                    self.state = "after" if not rest.strip() and self.n_calls else "broken"
                break
            one = rest[:end + len(TOOL_CALL_END)]
            try:
                _, parsed = parse_tool_calls(TOOL_CALLS_BEGIN + one + TOOL_CALLS_END, TOOL_CALL_STYLE)
            except NanoseekError:
                self.state = "broken"
                break
            calls += parsed
            self.n_calls += len(parsed)
            self.buf = rest[end + len(TOOL_CALL_END):]
        if self.state == "broken":  # give back the raw text that did not parse
            out, self.buf = out + (TOOL_CALLS_BEGIN if not self.n_calls else "") + self.buf, ""
        if self.state == "after":
            out, self.buf = out + self.buf.lstrip(), ""
        return out, calls
