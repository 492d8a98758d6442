"""Constrained decoding: grammars that the engine enforces token by token, compiled with llguidance.

llguidance (MIT, Microsoft; a Rust Earley parser over a regex-derivative lexer, no Python dependencies) computes, for
the text generated so far, the set of tokens that keep the output a prefix of a sentence of the grammar. The engine
(engine.py) masks every other token's logit with -inf before sampling (greedy too), and ends the request with
finish_reason "stop" when the grammar is complete. Why llguidance and not xgrammar or outlines-core, with the
measured per-token overhead: docs/engine.md, "Sampling parameters and constrained decoding"; the numbers:
docs/bench_grammar.md.

Constraints (each a `Constraint`, put in SamplingParams.constraint):
- json_object(tokenizer): any JSON object (OpenAI's response_format {"type": "json_object"});
- json_schema(tokenizer, schema): JSON valid against the schema (response_format json_schema); a schema feature
  llguidance does not implement (e.g. "not", "if") is refused with a NanoseekError naming it;
- tool_calls(tokenizer, tools, choice): DeepSeek's tool-call syntax with each call's arguments valid against its
  function's `parameters` schema; choice "required", "auto" (free text, or text followed by tool calls: the grammar
  only constrains from the calls' first marker on) or a function name (exactly one call of it).
Every constraint takes `start_after=token_id`: the output is free until that token has been generated (e.g.
</think>, id 6, with the R1 template's reasoning), and the grammar applies to what follows; the output's stop tokens
are held back until then. A few leading whitespace characters are allowed before the constrained text (R1 writes
"</think>\\n\\n" before its answer).

The tokenizer side (llguidance's view of the vocabulary) is prepared once per tokenizer object and cached; compiled
grammars are cached by their text (LRU), and each request takes a copy of a compiled matcher in its initial state.
DeepSeek's tool-call markers are special tokens in tokenizers that have them (ids 7..15, tokenizer.py) and plain
text in older ones: the grammars use whichever the tokenizer has.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import (
    SPECIAL_TOKENS,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    TOOL_TOKENS,
)

if TYPE_CHECKING:
    import llguidance

    from nanoseek.tokenizer import Tokenizer

# How one call is written, between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜>, and what separates two calls:
#   "v3.1": NAME<｜tool▁sep｜>ARGS                            calls back to back (DeepSeek-V3.1; what
#           tokenizer.CHAT_TEMPLATE writes for an assistant turn's tool_calls: the default)
#   "v3":   function<｜tool▁sep｜>NAME\n```json\nARGS\n```   calls separated by "\n" (DeepSeek-V3 / R1)
# ARGS is one JSON object. The chat template, the grammar and the server's parser must use the same style.
TOOL_CALL_STYLES = ("v3.1", "v3")
DEFAULT_TOOL_CALL_STYLE = "v3.1"
LEADING_WHITESPACE = r"/[ \t\r\n]{0,4}/"  # allowed before the constrained text (a lexeme of up to 4 characters)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's function names (and dots)
_CACHE_SIZE = 128


# --- the tokenizer side, once per tokenizer ----------------------------------------------------------------------
class _VocabView:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the special ids, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        ids = (tokenizer.token_to_id(s) for s in SPECIAL_TOKENS + TOOL_TOKENS)
        self.special_token_ids = sorted(i for i in ids if i is not None)

    def __call__(self, text: str | bytes) -> list[int]:
        return self._tok.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class Prepared:
    """llguidance's tokenizer for one nanoseek Tokenizer, and an LRU of compiled grammars (pristine matchers)."""

    def __init__(self, tokenizer: Tokenizer):
        import llguidance

        self.llg = llguidance
        view = _VocabView(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.special = frozenset(view.special_token_ids)
        self.ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self.vocab_size,
                                                   eos_token=tokenizer.eos_id)
        self.marker_ids = {s: tokenizer.token_to_id(s) for s in TOOL_TOKENS}
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def marker(self, s: str) -> str:
        """A tool-call marker in lark: the special token where the tokenizer has one, else its text."""
        i = self.marker_ids.get(s)
        return f"<[{i}]>" if i is not None and i in self.special else json.dumps(s, ensure_ascii=False)

    def compile(self, lark: str, what: str) -> llguidance.LLMatcher:
        with self._lock:
            if lark in self._compiled:
                self._compiled.move_to_end(lark)
                return self._compiled[lark]
        m = self.llg.LLMatcher(self.ll_tokenizer, self.llg.LLMatcher.grammar_from_lark(lark), log_level=0)
        if m.is_error():
            raise NanoseekError(f"{what}: {_first_line(m.get_error())}")
        with self._lock:
            self._compiled[lark] = m
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return m


_prepared: weakref.WeakKeyDictionary[Tokenizer, Prepared] = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def prepare(tokenizer: Tokenizer) -> Prepared:
    """The tokenizer side of every grammar for this tokenizer (built on first use, ~10-50 ms, then cached)."""
    with _prepared_lock:
        p = _prepared.get(tokenizer)
        if p is None:
            p = _prepared[tokenizer] = Prepared(tokenizer)
        return p


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid grammar"


# --- constraints --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    """A compiled grammar for a request's output (or for the part after `start_after`). Immutable and shareable:
    every request gets its own state from new_state()."""

    kind: str  # "json_object" | "json_schema" | "tool_calls" | "lark"
    lark: str  # the grammar, in llguidance's lark syntax
    prepared: Prepared
    start_after: int | None = None  # None: constrained from the first token

    def after(self, token_id: int | None) -> Constraint:
        """The same grammar, applied from just after `token_id` is generated (None: from the first token)."""
        return replace(self, start_after=token_id)

    @property
    def vocab_size(self) -> int:
        return self.prepared.vocab_size

    def new_state(self) -> GrammarState:
        return GrammarState(self)


class GrammarState:
    """One request's position in its grammar. The engine calls allowed() before sampling each token, then advance()
    with the token it sampled."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.matcher = constraint.prepared.compile(constraint.lark, constraint.kind).deep_copy()
        self.active = constraint.start_after is None  # False while the output is still free (e.g. reasoning)
        self.dead: str | None = None  # set by the engine when no token is allowed: why
        self._words = np.zeros((constraint.vocab_size + 31) // 32, dtype=np.int32)  # llguidance's bitmask

    def allowed(self, size: int | None = None) -> torch.Tensor:
        """[size] bool (default: the tokenizer's vocabulary): the tokens that keep the output inside the grammar (the
        tokenizer's EOS where the grammar is complete); ids past the tokenizer's vocabulary (a model's padded rows)
        are False. Only while active. A new CPU tensor each call."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        n = self.constraint.vocab_size
        out = np.zeros(max(size or n, n), dtype=bool)
        # bit j of int32 word w is token 32 w + j: little-endian words, so the bytes' bits in little order
        out[:n] = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:n]
        return torch.from_numpy(out[:size or n])

    def advance(self, token: int) -> None:
        if not self.active:
            self.active = token == self.constraint.start_after
            return
        self.matcher.consume_token(token)  # a forbidden token leaves the matcher in its error state

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (it may end here)."""
        return self.active and self.matcher.is_accepting()

    @property
    def done(self) -> bool:
        """Complete, and no token can follow: the request ends here."""
        return self.active and self.matcher.is_stopped() and self.matcher.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the grammar cannot continue (None while it can)."""
        if not self.active:
            return None
        if self.matcher.is_error():
            return _first_line(self.matcher.get_error())
        if self.matcher.is_stopped() and not self.matcher.is_accepting():
            return f"the grammar cannot continue ({self.matcher.stop_reason()})"
        return None


# JSON is written as json.dumps writes it: ", " and ": " between items, no other whitespace. Free whitespace
# ([ \t\n\r]* between any two tokens) lets a model pad forever - a failure other servers met with flexible JSON
# grammars (and random-weight models here, in the tests).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_lark(schema: dict) -> str:
    """A %json block: llguidance's JSON-schema compiler inside a lark grammar (its options in "x-guidance")."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_FORMAT}, ensure_ascii=False)


def _build(tokenizer: Tokenizer, kind: str, body: str, start_after: int | None, what: str) -> Constraint:
    prepared = prepare(tokenizer)
    lark = f"start: {LEADING_WHITESPACE} answer\nanswer: {body}\n"
    constraint = Constraint(kind, lark, prepared, start_after)
    prepared.compile(lark, what)  # compile now: a bad grammar is refused when the request is built
    return constraint


def json_object(tokenizer: Tokenizer, *, start_after: int | None = None) -> Constraint:
    """Any JSON object."""
    return _build(tokenizer, "json_object", _json_lark({"type": "object"}), start_after, "response_format")


def json_schema(tokenizer: Tokenizer, schema: dict[str, Any], *, start_after: int | None = None) -> Constraint:
    """JSON valid against `schema` (draft 2020-12 subset that llguidance implements). Raises NanoseekError for a
    schema that is not an object or that uses an unsupported feature."""
    if not isinstance(schema, dict):
        raise NanoseekError(f"response_format: the JSON schema must be an object, got {type(schema).__name__}")
    return _build(tokenizer, "json_schema", _json_lark(schema), start_after, "response_format: unsupported JSON schema")


def tool_calls(tokenizer: Tokenizer, tools: list[dict[str, Any]], choice: str = "auto", *,
               parallel: bool = True, style: str = DEFAULT_TOOL_CALL_STYLE, start_after: int | None = None
               ) -> Constraint:
    """DeepSeek tool calls for OpenAI-style `tools` ([{"type": "function", "function": {"name", "parameters"}}]).

    choice "required": one or more calls (exactly one if not `parallel`), nothing else; "auto": free text, which may
    end with tool calls (the grammar binds from the first <｜tool▁calls▁begin｜> on); a function name: exactly one
    call of that function. `style`: TOOL_CALL_STYLES. After <｜tool▁calls▁end｜> the grammar is complete."""
    if style not in TOOL_CALL_STYLES:
        raise NanoseekError(f"tools: style must be one of {', '.join(TOOL_CALL_STYLES)}, got {style!r}")
    if not isinstance(tools, list) or not tools:
        raise NanoseekError("tools: a non-empty list of tools is needed")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise NanoseekError(f"tools: tool {i} must be {{'type': 'function', 'function': {{'name': NAME, ...}}}} "
                                f"with NAME of 1-64 letters, digits, '_', '-' or '.'")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise NanoseekError(f"tools: the parameters of {fn['name']!r} must be a JSON schema object")
        if fn["name"] in functions:
            raise NanoseekError(f"tools: two tools are named {fn['name']!r}")
        functions[fn["name"]] = params or {"type": "object"}
    if choice not in ("auto", "required") and choice not in functions:
        raise NanoseekError(f"tool_choice: no tool is named {choice!r}")
    p = prepare(tokenizer)
    names = [choice] if choice in functions else list(functions)
    rules = []
    for i, name in enumerate(names):
        head = f'"function" {p.marker(TOOL_SEP)} {json.dumps(name + chr(10) + "```json" + chr(10))}' if style == "v3" \
            else f"{json.dumps(name)} {p.marker(TOOL_SEP)}"
        tail = ' "\\n```"' if style == "v3" else ""
        rules.append(f"call_{i}: {p.marker(TOOL_CALL_BEGIN)} {head} args_{i}{tail} {p.marker(TOOL_CALL_END)}\n"
                     f"args_{i}: {_json_lark(functions[name])}")
    sep = ' "\\n"' if style == "v3" else ""
    many = parallel and choice in ("auto", "required")
    calls = f"call ({sep} call)*" if many else "call"
    body = (f"{calls} {p.marker(TOOL_CALLS_END)}\ncall: {' | '.join(f'call_{i}' for i in range(len(names)))}\n"
            + "\n".join(rules) + "\n")
    begin = p.marker(TOOL_CALLS_BEGIN)
    if choice != "auto":
        lark = f"start: {LEADING_WHITESPACE} {begin} {body}"
    elif begin.startswith("<["):  # a special token ends the free text by itself
        lark = f"start: TEXT | TEXT {begin} {body}TEXT: /(.|\\n)*/\n"
    else:  # plain text: a lazy lexeme ends the free text at the first occurrence of the marker
        lark = f"start: TEXT | text_then_begin {body}text_then_begin[lazy]: TEXT {begin}\nTEXT: /(.|\\n)*/\n"
    constraint = Constraint("tool_calls", lark, p, start_after)
    p.compile(lark, "tools: unsupported parameters schema")
    return constraint


def lark(tokenizer: Tokenizer, grammar: str, *, start_after: int | None = None) -> Constraint:
    """Any llguidance lark grammar (docs: llguidance's syntax.md), e.g. for tests or a custom format."""
    p = prepare(tokenizer)
    p.compile(grammar, "grammar")
    return Constraint("lark", grammar, p, start_after)


# --- reading tool calls back --------------------------------------------------------------------------------------
def parse_tool_calls(text: str, style: str = DEFAULT_TOOL_CALL_STYLE) -> tuple[str, list[dict[str, str]]]:
    """Text with the markers as text (decode without skipping special tokens) -> (the content before the calls,
    [{"name", "arguments"}] with arguments as JSON text). No calls: (text, []). Raises NanoseekError for calls that
    do not follow the syntax (which a tool_calls constraint never lets through)."""
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return text, []
    end = text.find(TOOL_CALLS_END, start)
    body = text[start + len(TOOL_CALLS_BEGIN):end if end >= 0 else len(text)]
    calls = []
    if style == "v3":
        pattern = re.compile(re.escape(TOOL_CALL_BEGIN) + r"function" + re.escape(TOOL_SEP)
                             + r"(.+?)\n```json\n(.*?)\n```" + re.escape(TOOL_CALL_END), re.S)
        sep = "\n"
    else:
        pattern = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.+?)" + re.escape(TOOL_SEP) + r"(.*?)"
                             + re.escape(TOOL_CALL_END), re.S)
        sep = ""
    pos = 0
    while pos < len(body):
        if calls and sep and body.startswith(sep, pos):
            pos += len(sep)
        m = pattern.match(body, pos)
        if m is None:
            raise NanoseekError(f"tool calls: cannot parse {body[pos:pos + 60]!r}")
        calls.append({"name": m.group(1), "arguments": m.group(2)})
        pos = m.end()
    if end < 0:
        raise NanoseekError("tool calls: the output ends before <｜tool▁calls▁end｜>")
    return text[:start], calls
