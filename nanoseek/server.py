"""`nanoseek serve`: an OpenAI / DeepSeek-compatible HTTP API over one continuous-batching engine, and a web chat.

    GET  /v1/models             the served model
    POST /v1/chat/completions   R1 chat template; the reasoning (text before </think>) is `reasoning_content`;
                                tools, JSON output, prefix completion, a thinking switch, logprobs
    POST /v1/completions        a raw prompt (text or token ids), no template
    POST /tokenize, /detokenize vLLM's shapes: text or messages -> token ids, and back
    GET  /health                {"status": "ok"} while the engine loop runs
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, queue, slots, latency histograms, $/1M
    GET  /                      the web chat (static/index.html)

Every request field of OpenAI's chat-completions and completions schemas and DeepSeek's extensions is either applied
or refused with HTTP 400 naming it (`param`); unknown fields are refused too. docs/serving.md has the table.

Every request becomes one engine request per choice (`engine.submit`); the engine's loop thread reports each token
through `on_event` into a server-wide inbox, and one `call_soon_threadsafe` per engine step wakes the asyncio loop to
hand the events to their HTTP requests; each request then turns everything that has arrived for it into one socket
write (token chunks from pre-built JSON templates). A client that disconnects has its requests cancelled, and the
engine frees their slots at its next step. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}; see docs/serving.md.

Hardening (docs/serving.md, "Limits"): an ASGI middleware checks the API key on the headers before any body is read,
caps the body size (413) and the time to receive it (408); a uvicorn protocol subclass gives each connection a time
limit to send its request headers (slowloris), caps the header size (431) and the number of open connections (503).
The prompt's length is bounded before it is tokenized (a text longer than max_seq_len x the longest token's bytes
cannot fit), and the chat template and tokenizer run in a worker thread, so /health answers while a big request is
prepared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import hashlib
import hmac
import itertools
import json
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from nanoseek.chat import TextSplitter
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import (
    TOOL_CALL_END,
    TOOL_CALL_STYLE,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    Tokenizer,
)

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
READ_TIMEOUT = 15.0  # seconds a client has to send a request's headers, and again its body
MAX_CONNECTIONS = 512  # open HTTP connections; more are answered 503 at once
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; more is answered 431
MIN_BODY_BYTES = 1 << 20  # the default body limit is max(1 MiB, BODY_BYTES_PER_TOKEN x max_seq_len)
BODY_BYTES_PER_TOKEN = 256
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # entries
MAX_TOP_LOGPROBS = 20


# --- request bodies (strict: "1" is not an int, true is not a number; unknown fields are refused) --------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ContentPart(BaseModel):
    # other part types (image_url, input_audio, file) carry fields of their own: the type is checked by the server
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str  # system | developer (= system) | user | assistant | tool; checked by the server
    content: str | list[ContentPart] | None = None
    reasoning_content: Any = None  # DeepSeek: only on a last assistant message with prefix (else 400)
    prefix: bool = False  # DeepSeek's chat prefix completion: the last assistant message is continued
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    name: Any = None  # refused
    refusal: Any = None  # refused
    audio: Any = None  # refused
    function_call: Any = None  # refused


class FunctionDef(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; the call's arguments are constrained to it
    strict: bool | None = None  # arguments always follow the schema (constrained decoding): true and false alike


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema: true and false alike


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Thinking(_Body):
    type: Literal["enabled", "disabled"]


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI pads chunks with random text when true; nanoseek never does (400)


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class _Sampling(_Body):
    model: str | None = None  # any name is accepted; responses carry the served model's name
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 (or < 1e-5) = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: -1, 0 or None = no cut
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (decimal string) -> bias
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (for benchmarks)
    user: str | None = None  # informational (an end-user id for abuse monitoring): nanoseek keeps no logs of it


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens; wins if both are set
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None  # DeepSeek's switch
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: {"thinking": bool} or {"enable_thinking": bool}
    modalities: list[str] | None = None  # ["text"] only
    store: bool | None = None  # false only: nanoseek stores nothing
    service_tier: str | None = None  # "auto" / "default" only: there is one tier
    safety_identifier: str | None = None  # informational, like `user`
    prompt_cache_key: str | None = None  # a caching hint; nanoseek has no prompt cache yet
    audio: Any = None  # refused (REFUSED)
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[Any]  # text, or token ids (lists of texts or of id lists, i.e. batches, are refused)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)  # only equal to n
    suffix: Any = None  # refused


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt (as /v1/completions reads it) or messages (as /v1/chat/completions renders them)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True  # nanoseek's tokenizer adds no special tokens to a prompt either way
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False
    continue_final_message: Any = None  # refused: mark the last assistant message with prefix: true


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# Fields declared only to refuse them with a reason (HTTP 400, param = the field, code "unsupported_parameter") when
# they hold anything but null. docs/serving.md's table lists these with every other field.
REFUSED = {
    "audio": "audio output is not supported: nanoseek generates text",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated 'functions' is not supported: send 'tools'",
    "function_call": "the deprecated 'function_call' is not supported: send 'tool_choice'",
    "metadata": "nanoseek stores no completions, so there is nothing to attach metadata to",
    "reasoning_effort": "reasoning effort levels are not supported; thinking: {\"type\": \"disabled\"} turns the "
                        "reasoning off",
    "verbosity": "verbosity levels are not supported",
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "continue_final_message": "mark the last assistant message with \"prefix\": true instead",
    "name": "participant names are not supported by the chat template",
    "refusal": "assistant refusals cannot be sent back",
    "moderation": "no moderation model runs here",
    "prompt_cache_options": "nanoseek has no prompt cache yet",
    "prompt_cache_retention": "nanoseek has no prompt cache yet",
}
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})  # no API key needed
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


# --- errors ---------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    # ensure_ascii: messages may quote client input, which can hold lone surrogates that UTF-8 cannot encode
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message, type, param, code), status, headers=headers, media_type="application/json")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _loc(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[ContentPart]', 1) -> 'messages[0].content[1]': pydantic's union-member tags
    ('str', 'list[...]', 'NamedToolChoice', "literal['none',...]") are not fields and are left out."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part[:1].isupper() or part in _TYPE_TAGS):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    param = _loc(tuple(err.get("loc", ())))
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"{param}: unknown field (nanoseek refuses every field it does not implement; "
                        "docs/serving.md lists them)", param, "unsupported_parameter")
    return APIError(400, f"{param or 'body'}: {err.get('msg')}", param or None, err.get("type"))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}", None, "json_invalid") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", None, "invalid_type")
    return data


def _check_sizes(data: dict[str, Any], limits: dict[str, int]) -> None:
    """Cheap bounds on the lists a body may hold, before pydantic walks them (its validation holds the GIL: ~5 us a
    message, so 100k tiny messages in a 4 MiB body would stall every request for half a second)."""
    for key, limit in limits.items():
        v = data.get(key)
        if isinstance(v, (list, dict)) and len(v) > limit:
            raise APIError(400, f"{key} has {len(v)} entries; at most {limit} can fit this model's context or this "
                           "server's limits", key, "too_many_entries")
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = sum(len(m[k]) for m in messages if isinstance(m, dict) for k in ("content", "tool_calls")
                    if isinstance(m.get(k), list))
        if parts > limits["messages"]:
            raise APIError(400, f"the messages hold {parts} content parts and tool calls; at most "
                           f"{limits['messages']}", "messages", "too_many_entries")


def _text_length(x: Any) -> int:
    """Characters in every string of x (dict keys too)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return sum(_text_length(k) + _text_length(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return sum(_text_length(v) for v in x)
    return 0


def _speculative(param: str) -> APIError:
    # MTP drafting samples without logits processors, so the engine refuses them on a speculative engine
    return APIError(400, f"{param}: not supported by this server (it runs MTP speculative decoding: serve "
                    "--speculate)", param, "unsupported_parameter")


def _refuse(body: BaseModel, fields: tuple[str, ...], where: str = "") -> None:
    for name in fields:
        if getattr(body, name, None) is not None:
            raise APIError(400, f"{where}{name}: {REFUSED[name]}", where + name, "unsupported_parameter")


# --- metrics --------------------------------------------------------------------------------------------------------
class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= upper (none: only +Inf)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for upper, c in zip(self.buckets, self.counts, strict=True):
            total += c
            lines.append(f'{self.name}_bucket{{le="{upper}"}} {total}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Counters for /metrics, updated on the event loop only (no locks needed)."""

    def __init__(self, price_per_hour: float):
        self.price_per_hour = price_per_hour
        self.finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)  # finish reason -> requests
        self.errors: dict[int, int] = {}  # HTTP status -> rejected requests
        self.prompt_tokens = self.output_tokens = 0
        fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "Time from request to its first token.", fast)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "Time between two tokens of one choice.", fast)
        self.latency = Histogram("nanoseek_request_latency_seconds", "Time from request to its last token.",
                                 (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))
        # throughput is measured over the time at least one request is in flight (idle time costs nothing here)
        self.in_flight, self.busy_seconds, self.busy_since = 0, 0.0, 0.0

    def begin(self) -> None:
        if self.in_flight == 0:
            self.busy_since = time.perf_counter()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_seconds += time.perf_counter() - self.busy_since

    def tokens_per_second(self) -> float:
        busy = self.busy_seconds + (time.perf_counter() - self.busy_since if self.in_flight else 0.0)
        return self.output_tokens / busy if busy > 0 else 0.0

    def cost_per_million(self) -> float:
        """USD per 1M output tokens = price_per_hour / (output tokens per hour at the measured rate) * 1e6."""
        tps = self.tokens_per_second()
        return self.price_per_hour / (tps * 3600) * 1e6 if tps > 0 else math.nan

    def render(self, stats: dict[str, Any]) -> str:
        def one(name: str, kind: str, help: str, value: float) -> list[str]:
            text = "NaN" if math.isnan(value) else repr(value)  # Prometheus spells it NaN
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {text}"]

        lines = ["# HELP nanoseek_requests_total Finished generation requests (one per choice), by finish reason.",
                 "# TYPE nanoseek_requests_total counter"]
        lines += [f'nanoseek_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
        lines += ["# HELP nanoseek_rejected_requests_total Requests answered with an HTTP error, by status.",
                  "# TYPE nanoseek_rejected_requests_total counter"]
        lines += [f'nanoseek_rejected_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.errors.items())]
        lines += one("nanoseek_prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens)
        lines += one("nanoseek_generation_tokens_total", "counter", "Output tokens generated.", self.output_tokens)
        lines += one("nanoseek_generation_tokens_per_second", "gauge",
                     "Output tokens per second over the time requests were in flight.", self.tokens_per_second())
        lines += one("nanoseek_requests_in_flight", "gauge", "HTTP generation requests being served.", self.in_flight)
        lines += one("nanoseek_queue_depth", "gauge", "Engine requests waiting for a batch slot.", stats["waiting"])
        lines += one("nanoseek_active_slots", "gauge", "Batch slots holding a request.", stats["active_slots"])
        lines += one("nanoseek_max_batch_size", "gauge", "Batch slots.", stats["max_batch_size"])
        # the engine's own clock: tokens / decode steps is the mean batch occupancy, seconds / steps the step time
        lines += one("nanoseek_decode_steps_total", "counter", "Engine decode steps (one per batch of tokens).",
                     stats["decode_steps"])
        lines += one("nanoseek_engine_seconds_total", "counter", "Seconds the engine spent in prefill and decode.",
                     stats["prefill_seconds"] + stats["decode_seconds"])
        lines += self.ttft.render() + self.itl.render() + self.latency.render()
        lines += one("nanoseek_price_per_hour_usd", "gauge", "Configured machine price (--price-per-hour).",
                     self.price_per_hour)
        lines += one("nanoseek_cost_per_million_output_tokens_usd", "gauge",
                     "price_per_hour / (output tokens per hour at the measured rate) * 1e6.", self.cost_per_million())
        return "\n".join(lines) + "\n"


# --- one generation: n engine requests, their events on the asyncio loop ---------------------------------------------
@dataclass
class Output:
    """How a request's tokens become its response."""
    chat: bool
    reasoning: bool = False  # the prompt leaves the reasoning open: text before </think> is reasoning_content
    strip: bool = False  # drop the answer's leading whitespace (a chat answer, unless it continues a prefix)
    tools: bool = False  # read tool calls out of the content
    parallel_calls: bool = True  # false: the first complete call ends the choice
    logprobs: int | None = None  # alternatives per token (0..20); None: no log-probabilities
    echo: str = ""  # completions: the prompt's text, returned before the output


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
        from nanoseek.grammar import parse_tool_calls

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


class Delta(NamedTuple):
    """What one event of one choice adds to the response."""
    i: int  # choice index
    reasoning: str
    content: str
    finish: str | None
    calls: list[dict[str, Any]]  # tool calls completed by this event, OpenAI-shaped
    logprob: tuple[int, float, list[tuple[int, float]], bool] | None  # (token, logprob, top, in reasoning)


class Generation:
    """The n choices of one HTTP request. Token events arrive from the engine thread (via Server._drain) in `inbox`;
    `batches()` turns them into Deltas, `close()` cancels what is still running (idempotent)."""

    def __init__(self, server: Server, prompt_ids: list[int], params: list[SamplingParams], reasoning: bool,
                 stop: list[str], output: Output | None = None):
        self.server, self.n = server, len(params)
        self.output = output or Output(chat=reasoning, reasoning=reasoning)
        # (choice, token id or None, finish reason or None, logprob, top), appended on the event loop by
        # Server._drain, which resolves `waiter` (if batches() is waiting): one task wake-up per engine step, however
        # many tokens arrived
        self.inbox: deque[tuple[int, int | None, str | None, float | None, Any]] = deque()
        self.waiter: asyncio.Future | None = None
        self.splitters = [TextSplitter(server.tokenizer, reasoning, stop, self.output.strip or reasoning)
                          for _ in params]
        self.calls = [ToolCallStream() if self.output.tools else None for _ in params]
        self.n_calls = [0] * self.n
        self.finish: list[str | None] = [None] * self.n
        self.completion_tokens = [0] * self.n
        self.prompt_tokens = len(prompt_ids)
        self.t0 = time.perf_counter()
        self.last_token: list[float | None] = [None] * self.n
        self.closed = False
        server.admit(self.n)
        server.metrics.begin()
        self.requests = []
        try:
            for i, p in enumerate(params):
                self.requests.append(server.engine.submit(prompt_ids, p, on_event=partial(server.post, self, i)))
        except NanoseekError as e:
            self.close()
            raise APIError(400, str(e)) from None
        server.metrics.prompt_tokens += self.prompt_tokens * self.n

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """Yield, per wake-up, the Deltas of every event that has arrived, in order, until every choice is done."""
        m = self.server.metrics
        while None in self.finish:
            if not self.inbox:
                self.waiter = self.server.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            now = time.perf_counter()  # the events of one wake-up arrived together
            out = []
            while self.inbox:
                i, token, reason, logprob, top = self.inbox.popleft()
                if self.finish[i] is not None:  # a choice already ended by a stop string: late tokens are dropped
                    continue
                reasoning = content = ""
                calls: list[dict[str, Any]] = []
                lp = None
                splitter, parser = self.splitters[i], self.calls[i]
                if token is not None:
                    last = self.last_token[i]
                    if last is None:
                        m.ttft.observe(now - self.t0)
                    else:
                        m.itl.observe(now - last)
                    self.last_token[i] = now
                    self.completion_tokens[i] += 1
                    m.output_tokens += 1
                    if logprob is not None:
                        lp = (token, logprob, top or [], splitter.in_reasoning)
                    reasoning, content = splitter.feed(token)
                    if parser is not None and content:
                        content, calls = parser.feed(content)
                    if splitter.stopped or (calls and not self.output.parallel_calls):
                        reason = "stop"
                        self.requests[i].cancel()
                if reason is not None:
                    r, c = splitter.finish()
                    if parser is not None:
                        c, more = parser.feed(c, final=True)
                        calls += more
                    reasoning, content = reasoning + r, content + c
                    m.finished[reason] = m.finished.get(reason, 0) + 1
                if calls:
                    calls = [self.server.tool_call(self.n_calls[i] + k, call) for k, call in enumerate(calls)]
                    self.n_calls[i] += len(calls)
                if reason == "stop" and self.n_calls[i]:
                    reason = "tool_calls"
                if reason is not None:
                    self.finish[i] = reason
                if reasoning or content or reason or calls or lp:
                    out.append(Delta(i, reasoning, content, reason, calls, lp))
            if out:
                yield out
        m.latency.observe(time.perf_counter() - self.t0)

    def cached_tokens(self) -> int:
        """Prompt tokens served from a prefix cache: the engine's to fill (Request.cached_tokens), 0 until it has one.
        The one place usage's cache fields come from."""
        return getattr(self.requests[0], "cached_tokens", 0) if self.requests else 0

    def usage(self, reasoning: bool) -> dict[str, Any]:
        done = sum(self.completion_tokens)
        cached = self.cached_tokens()
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                                 "total_tokens": self.prompt_tokens + done,
                                 "prompt_tokens_details": {"cached_tokens": cached},
                                 "prompt_cache_hit_tokens": cached,  # DeepSeek's names for the same split
                                 "prompt_cache_miss_tokens": self.prompt_tokens - cached}
        if reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(s.reasoning_tokens for s in self.splitters)
                                                  if self.output.reasoning else 0}
        return usage

    def engine_error(self) -> str | None:
        """Why a choice ended with "error": the request's own reason (its grammar's dead end), or the engine's."""
        for i, req in enumerate(self.requests):
            if self.finish[i] == "error":
                return getattr(req, "error", None) or "the engine failed while generating"
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.server.metrics
        for i, req in enumerate(self.requests):
            if self.finish[i] is None:  # the client went away (or an error): free the slot
                req.cancel()
                m.finished["cancelled"] = m.finished.get("cancelled", 0) + 1
        self.server.release(self.n)
        m.end()


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that always closes its Generation, even when the client leaves before the first chunk
    (an async generator that never started would never run its `finally`)."""

    def __init__(self, content: AsyncIterator[bytes], generation: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


_json_str = json.JSONEncoder(ensure_ascii=False).encode  # str -> its JSON literal, as json.dumps writes it


class _ChunkTemplates:
    """The SSE event of one streamed token, pre-built around the one JSON string that changes: per token, this
    costs one string encode instead of building and serialising the whole chunk dict (the same bytes as
    `_sse(chunk dict)`, checked by the tests)."""

    def __init__(self, head: dict[str, Any], n: int, chat: bool, usage: bool):
        # the end of a token chunk: close the delta (chat), the choice, the choices list, then usage and the object
        self.tail = ("}" if chat else "") + ', "logprobs": null, "finish_reason": null}]' + (
            ', "usage": null}\n\n' if usage else "}\n\n")
        starts = [_sse({**head, "choices": [{"index": i}]}).removesuffix("}]}\n\n") for i in range(n)]
        if chat:
            self.reasoning = [f"{s}, \"delta\": {{\"reasoning_content\": " for s in starts]
            self.content = [f"{s}, \"delta\": {{\"content\": " for s in starts]
        else:
            self.content = [f"{s}, \"text\": " for s in starts]

    def token(self, prefixes: list[str], i: int, text: str) -> str:
        return prefixes[i] + _json_str(text) + self.tail


# --- the server -----------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None, max_queue: int,
                 price_per_hour: float):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key = api_key.encode() if api_key else None
        self.capacity = engine.max_batch_size + max_queue  # engine requests admitted at once
        self.pending = 0
        self.metrics = Metrics(price_per_hour)
        self.created = int(time.time())
        # response ids: a random per-process prefix and a counter (32 hex digits, like a uuid4); a uuid4 per request
        # would read os.urandom, a syscall that releases the GIL and then waits to win it back from the engine thread
        self.id_prefix, self.id_counter = uuid.uuid4().hex[:20], itertools.count()
        # engine thread -> event loop: events wait in `inbox`; one wake-up of the loop drains all the events of an
        # engine step (one per active request) instead of one cross-thread call per token
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inbox: deque[tuple[Generation, int, Any]] = deque()
        self.drain_scheduled = False
        # chat templates and tokenization run here, off the event loop (tokenizers releases the GIL on long text)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanoseek-tokenize")
        # a text longer than this many characters cannot fit the context (each token is at most max_token_bytes)
        self.max_chars = engine.max_seq_len * tokenizer.max_token_bytes
        n = engine.max_seq_len
        # each message renders to at least one token, tools and stop strings are few
        self.limits = {"messages": n + 1, "tools": n, "prompt": n, "stop": MAX_STOP, "logit_bias": MAX_LOGIT_BIAS,
                       "modalities": 4, "tokens": n}

    def post(self, gen: Generation, i: int, event: Any) -> None:  # engine thread (Request.on_event)
        self.inbox.append((gen, i, event))
        if not self.drain_scheduled:
            self.drain_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                pass

    def _drain(self) -> None:
        self.drain_scheduled = False  # before draining: an event appended from now on schedules another drain
        while self.inbox:
            gen, i, ev = self.inbox.popleft()
            gen.inbox.append((i, ev.token_id, ev.finish_reason, getattr(ev, "logprob", None),
                              getattr(ev, "top_logprobs", None)))
            if gen.waiter is not None and not gen.waiter.done():
                gen.waiter.set_result(None)

    def admit(self, n: int) -> None:
        if self.pending + n > self.capacity:
            raise APIError(429, f"the server is busy ({self.pending} requests in flight, room for {self.capacity}); "
                           "retry later", code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
        self.pending += n

    def release(self, n: int) -> None:
        self.pending -= n

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.api_key is None:
            return True
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def tool_call(self, index: int, call: dict[str, str]) -> dict[str, Any]:
        return {"index": index, "id": f"call_{self.id_prefix}{next(self.id_counter):012x}", "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's JSON body (already read and size-checked by the middleware), bounded and validated."""
        if self.pending >= self.capacity:  # full: say so before parsing anything
            self.admit(1)  # raises 429
        data = _parse_json(await request.body())
        _check_sizes(data, self.limits)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def _check_length(self, text_chars: int, param: str) -> None:
        if text_chars > self.max_chars:
            raise APIError(400, f"the prompt has {text_chars} characters; this model's context of "
                           f"{self.engine.max_seq_len} tokens holds at most {self.max_chars} (tokens of at most "
                           f"{self.tokenizer.max_token_bytes} bytes)", param, "context_length_exceeded")

    # --- chat: messages -> template inputs --------------------------------------------------------------------------
    def _messages(self, body: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
        """Checked messages in the template's shape; raises APIError naming the field."""
        out: list[dict[str, Any]] = []
        call_ids: set[str] = set()
        last = len(body.messages) - 1
        for i, m in enumerate(body.messages):
            where = f"messages[{i}]."
            role = "system" if m.role == "developer" else m.role
            if role == "function":
                raise APIError(400, f"{where}role: the deprecated role 'function' is not supported: send role 'tool' "
                               "with tool_call_id", where + "role", "unsupported_value")
            if role not in ("system", "user", "assistant", "tool"):
                raise APIError(400, f"{where}role: must be system, developer, user, assistant or tool, got "
                               f"{m.role!r}", where + "role", "invalid_value")
            _refuse(m, ("name", "refusal", "audio", "function_call"), where)
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"{where}content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                       f"...}}) are supported, got type {part.type!r}", f"{where}content[{j}].type",
                                       "unsupported_value")
                    extra = next(iter(part.model_extra or {}), None)  # e.g. cache_control, prompt_cache_breakpoint
                    if extra is not None:
                        raise APIError(400, f"{where}content[{j}].{extra}: unknown field of a text part",
                                       f"{where}content[{j}].{extra}", "unsupported_parameter")
                content = "".join(p.text for p in content)
            if content is None and not (role == "assistant" and (m.tool_calls or m.prefix)):
                raise APIError(400, f"{where}content: required", where + "content", "missing")
            msg: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
            if m.reasoning_content is not None or "reasoning_content" in m.model_fields_set:
                if not (m.prefix and i == last):
                    raise APIError(400, f"{where}reasoning_content: send earlier answers back with their content only "
                                   "(as the DeepSeek API requires); reasoning_content is accepted only on a last "
                                   "assistant message with prefix: true", where + "reasoning_content")
                if not isinstance(m.reasoning_content, str):
                    raise APIError(400, f"{where}reasoning_content: must be a string", where + "reasoning_content")
                msg["reasoning_content"] = m.reasoning_content
            if m.prefix:
                if role != "assistant" or i != last:
                    raise APIError(400, f"{where}prefix: only the last message may be a prefix, and it must be an "
                                   "assistant message", where + "prefix")
                if m.tool_calls:
                    raise APIError(400, f"{where}prefix: a prefix message cannot carry tool_calls", where + "prefix")
                msg["prefix"] = True
            if m.tool_calls is not None:
                if role != "assistant":
                    raise APIError(400, f"{where}tool_calls: only assistant messages carry tool calls",
                                   where + "tool_calls")
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
                call_ids |= {c.id for c in m.tool_calls if c.id is not None}
            if role == "tool":
                if m.tool_call_id is None:
                    raise APIError(400, f"{where}tool_call_id: required on a tool message", where + "tool_call_id",
                                   "missing")
                if m.tool_call_id not in call_ids:
                    raise APIError(400, f"{where}tool_call_id: {m.tool_call_id!r} answers no earlier assistant tool "
                                   "call", where + "tool_call_id", "invalid_value")
                msg["tool_call_id"] = m.tool_call_id
            elif m.tool_call_id is not None:
                raise APIError(400, f"{where}tool_call_id: only tool messages carry it", where + "tool_call_id")
            out.append(msg)
        return out

    @staticmethod
    def _thinking(body: ChatCompletionRequest | TokenizeRequest) -> bool:
        """thinking: {"type"} (DeepSeek) and chat_template_kwargs {"thinking"} / {"enable_thinking"} (vLLM)."""
        choices = []
        if body.thinking is not None:
            choices.append(("thinking", body.thinking.type == "enabled"))
        for key, value in (body.chat_template_kwargs or {}).items():
            param = f"chat_template_kwargs.{key}"
            if key not in ("thinking", "enable_thinking"):
                raise APIError(400, f"{param}: nanoseek's chat template takes only 'thinking' / 'enable_thinking'",
                               param, "unsupported_parameter")
            if not isinstance(value, bool):
                raise APIError(400, f"{param}: must be true or false", param, "bool_type")
            choices.append((param, value))
        if len({v for _, v in choices}) > 1:
            raise APIError(400, f"{choices[1][0]} contradicts {choices[0][0]}", choices[1][0], "invalid_value")
        return choices[0][1] if choices else True

    def _chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, think: bool,
                  add_generation_prompt: bool = True) -> list[int]:  # worker thread
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tools=tools, thinking=think)
        except Exception as e:  # NanoseekError, or text the tokenizer cannot take (lone surrogates)
            raise APIError(400, f"cannot tokenize the messages: {str(e)[:200]}", "messages") from None

    def _prompt_ids(self, text: str) -> list[int]:  # worker thread
        try:
            return self.tokenizer.encode(text)
        except Exception as e:
            raise APIError(400, f"cannot tokenize the prompt: {str(e)[:200]}", "prompt") from None

    def _constraint(self, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None, choice: str,
                    reasoning: bool, prefix: bool) -> Any:
        """The grammar for response_format / tool_choice (nanoseek.grammar), applied after </think> when the
        reasoning is open; None when the output is free."""
        fmt = body.response_format.type if body.response_format is not None else "text"
        if fmt != "text" and tools:
            raise APIError(400, "response_format: JSON output together with tools is not supported (send one)",
                           "response_format", "unsupported_value")
        if fmt == "text" and not tools:
            if body.response_format is not None and body.response_format.json_schema is not None:
                raise APIError(400, "response_format.json_schema: only with type json_schema",
                               "response_format.json_schema")
            return None
        param = "response_format" if fmt != "text" else "tool_choice"
        if prefix and not reasoning:
            raise APIError(400, f"{param}: constrained output cannot continue a prefix message's answer",
                           param, "unsupported_value")
        if self.engine.speculative:
            raise _speculative(param)
        from nanoseek import grammar

        after = {"start_after": self.tokenizer.think_end_id if reasoning else None}
        try:
            if fmt == "json_object":
                return grammar.json_object(self.tokenizer, **after)
            if fmt == "json_schema":
                spec = body.response_format.json_schema
                if spec is None or spec.schema_ is None:
                    raise APIError(400, "response_format.json_schema.schema: required for type json_schema",
                                   "response_format.json_schema", "missing")
                return grammar.json_schema(self.tokenizer, spec.schema_, **after)
            return grammar.tool_calls(self.tokenizer, tools, choice, parallel=body.parallel_tool_calls is not False,
                                      style=TOOL_CALL_STYLE, **after)
        except NanoseekError as e:
            raise APIError(400, str(e), param, "invalid_value") from None

    def _chat_options(self, body: ChatCompletionRequest) -> None:
        """Refusals and value checks of chat-only fields (the field table in docs/serving.md)."""
        _refuse(body, ("audio", "prediction", "web_search_options", "functions", "function_call", "metadata",
                       "reasoning_effort", "verbosity", "moderation", "prompt_cache_options",
                       "prompt_cache_retention"))
        if body.modalities is not None and body.modalities != ["text"]:
            raise APIError(400, f"modalities: nanoseek generates text only; send [\"text\"] or leave it out, got "
                           f"{body.modalities}", "modalities", "unsupported_value")
        if body.store:
            raise APIError(400, "store: nanoseek stores no completions (send false or leave it out)", "store",
                           "unsupported_value")
        if body.service_tier not in (None, "auto", "default"):
            raise APIError(400, f"service_tier: one tier is served (\"auto\" / \"default\"), got {body.service_tier!r}",
                           "service_tier", "unsupported_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._chat_options(body)
        messages = self._messages(body)
        think = self._thinking(body)
        choice = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else \
            body.tool_choice or "auto"
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools] if body.tools else None
        if tools is None and choice not in ("none", "auto"):
            raise APIError(400, f"tool_choice: {choice!r} needs tools", "tool_choice")
        if tools is not None and len({t["function"]["name"] for t in tools}) < len(tools):
            raise APIError(400, "tools: two tools have the same name", "tools")
        calls_on = tools is not None and choice != "none"
        last = messages[-1]
        prefix = bool(last.get("prefix"))
        # the prompt leaves the reasoning open: R1's generation prompt, or a prefix that continues its reasoning
        reasoning = (think and not prefix) or (prefix and "reasoning_content" in last and not last["content"])
        self._check_length(_text_length(messages) + _text_length(tools), "messages")
        constraint = self._constraint(body, tools if calls_on else None, choice, reasoning, prefix)
        ids = await self._in_thread(partial(self._chat_ids, messages, tools if calls_on else None, think))
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), "messages",
                               logprobs=k, constraint=constraint)
        out = Output(chat=True, reasoning=reasoning, strip=not prefix, tools=calls_on,
                     parallel_calls=body.parallel_tool_calls is not False, logprobs=k)
        return await self._respond(body, request, ids, params, out)

    async def complete(self, body: CompletionRequest, request: Request) -> Response:
        _refuse(body, ("suffix",))
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of: only best_of = n is supported (every generated choice is returned), got "
                           f"best_of = {body.best_of}, n = {body.n}", "best_of", "unsupported_value")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo: with logprobs it needs the prompt's log-probabilities, which nanoseek does not "
                           "compute", "echo", "unsupported_value")
        if isinstance(body.prompt, str):
            self._check_length(len(body.prompt), "prompt")
            ids = await self._in_thread(partial(self._prompt_ids, body.prompt))
            echo = body.prompt
        else:
            if body.prompt and all(isinstance(p, (str, list)) for p in body.prompt):
                raise APIError(400, "prompt: one prompt per request (lists of prompts are not supported)", "prompt",
                               "unsupported_value")
            bad = next((p for p in body.prompt if not isinstance(p, int) or isinstance(p, bool) or p < 0), None)
            if bad is not None:
                raise APIError(400, f"prompt: must be a string or a list of token ids (integers >= 0), found {bad!r}",
                               "prompt", "invalid_type")
            ids = list(body.prompt)
            echo = self.tokenizer.decode(ids) if body.echo else ""
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if max(ids) >= self.engine.config.vocab_size:
            raise APIError(400, f"token id {max(ids)} is outside the vocabulary [0, {self.engine.config.vocab_size})",
                           "prompt")
        params = self.sampling(body, body.max_tokens, len(ids), "prompt", logprobs=body.logprobs)
        out = Output(chat=False, logprobs=body.logprobs, echo=echo if body.echo else "")
        return await self._respond(body, request, ids, params, out)

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        _refuse(body, ("continue_final_message",))
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", "prompt" if body.prompt is None else "messages")
        if body.prompt is not None:
            self._check_length(len(body.prompt), "prompt")
            ids = await self._in_thread(partial(self._prompt_ids, body.prompt))
        else:
            if not body.messages:
                raise APIError(400, "messages: at least one message", "messages")
            messages = self._messages(body)
            tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools] if body.tools else None
            self._check_length(_text_length(messages) + _text_length(tools), "messages")
            ids = await self._in_thread(partial(self._chat_ids, messages, tools, self._thinking(body),
                                                body.add_generation_prompt))
        strs = [self.tokenizer.token_bytes(i).decode("utf-8", "replace") for i in ids] if body.return_token_strs \
            else None
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        bad = next((t for t in body.tokens if t >= self.tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the vocabulary [0, {self.tokenizer.vocab_size})",
                           "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def sampling(self, body: _Sampling, max_tokens: int | None, n_prompt: int, param: str,
                 logprobs: int | None = None, constraint: Any = None) -> list[SamplingParams]:
        room = self.engine.max_seq_len - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context holds "
                           f"{self.engine.max_seq_len} (prompt + output)", param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens = {max_tokens} plus the {n_prompt} prompt tokens exceeds this model's "
                           f"context of {self.engine.max_seq_len} tokens", "max_tokens", "context_length_exceeded")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() else -1
            if not 0 <= token < self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: keys are token ids in [0, {self.tokenizer.vocab_size}) written as "
                               f"strings, got {key[:20]!r}", "logit_bias", "invalid_value")
            bias[token] = value
        # greedy: temperature 0 (the engine also samples temperatures below 1e-5 greedily) or top_p 0
        greedy = body.temperature == 0 or body.top_p == 0
        stop_ids = [] if body.ignore_eos else None
        seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]  # n choices, n different seeds
        params = [SamplingParams(max_new_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                                 top_p=1.0 if greedy else body.top_p, top_k=max(body.top_k or 0, 0),
                                 stop_token_ids=stop_ids, seed=None if s is None else (s + 2**63) % 2**64 - 2**63,
                                 presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                 logit_bias=bias or None, logprobs=logprobs, constraint=constraint)
                  for s in seeds]
        features = [f for f in params[0].features() if f != "constraint"]  # _constraint refuses that one
        if self.engine.speculative and features:
            raise _speculative(features[0])
        return params

    # --- responses --------------------------------------------------------------------------------------------------
    async def _respond(self, body: _Sampling, request: Request, ids: list[int], params: list[SamplingParams],
                       out: Output) -> Response:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        gen = Generation(self, ids, params, reasoning=out.reasoning, stop=stop, output=out)
        rid = f"{'chatcmpl' if out.chat else 'cmpl'}-{self.id_prefix}{next(self.id_counter):012x}"
        head = {"id": rid, "object": "chat.completion.chunk" if out.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            if body.stream_options is not None and body.stream_options.include_obfuscation:
                gen.close()
                raise APIError(400, "stream_options.include_obfuscation: nanoseek never pads its chunks (send false)",
                               "stream_options.include_obfuscation", "unsupported_value")
            return _ClosingStream(self._stream(gen, head, out, usage), gen)
        try:
            choices = await self._until_disconnect(request, self._collect(gen, out))
        finally:
            gen.close()
        if choices is None:  # the client left; nobody will read this
            return Response(status_code=499)
        error = gen.engine_error()
        if error is not None:
            raise APIError(500, error, type="server_error", code="engine_error")
        head["object"] = "chat.completion" if out.chat else "text_completion"
        return JSONResponse({**head, "choices": choices, "usage": gen.usage(out.chat)})

    def _logprob_entry(self, token: int, logprob: float) -> dict[str, Any]:
        b = self.tokenizer.token_bytes(token)
        return {"token": b.decode("utf-8", "replace"), "logprob": max(logprob, -9999.0), "bytes": list(b)}

    def _chat_logprobs(self, lp: tuple[int, float, list[tuple[int, float]], bool]) -> dict[str, Any]:
        token, logprob, top, _ = lp
        return {**self._logprob_entry(token, logprob),
                "top_logprobs": [self._logprob_entry(t, v) for t, v in top]}

    def _completion_logprobs(self, lps: list[tuple[int, float, list[tuple[int, float]], bool]], offset: int
                             ) -> dict[str, Any]:
        """OpenAI's legacy format; text_offset counts characters from the start of the returned text."""
        tokens, offsets = [], []
        for token, _, _, _ in lps:
            tokens.append(self.tokenizer.token_bytes(token).decode("utf-8", "replace"))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [max(v, -9999.0) for _, v, _, _ in lps],
                "top_logprobs": [{self.tokenizer.token_bytes(t).decode("utf-8", "replace"): max(v, -9999.0)
                                  for t, v in top} for _, _, top, _ in lps],
                "text_offset": offsets}

    async def _collect(self, gen: Generation, out: Output) -> list[dict[str, Any]]:
        n = gen.n
        reasoning, content = [[] for _ in range(n)], [[] for _ in range(n)]
        calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        lps: list[list[Any]] = [[] for _ in range(n)]
        async for batch in gen.batches():
            for d in batch:
                reasoning[d.i].append(d.reasoning)
                content[d.i].append(d.content)
                calls[d.i] += d.calls
                if d.logprob is not None:
                    lps[d.i].append(d.logprob)
        choices = []
        for i in range(n):
            text = "".join(content[i])
            if out.chat:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if out.reasoning:
                    msg["reasoning_content"] = "".join(reasoning[i])
                if calls[i]:
                    msg["content"] = text or None
                    msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls[i]]
                logprobs = None
                if out.logprobs is not None:
                    logprobs = {"content": [self._chat_logprobs(lp) for lp in lps[i] if not lp[3]]}
                    if out.reasoning:
                        logprobs["reasoning_content"] = [self._chat_logprobs(lp) for lp in lps[i] if lp[3]]
                choices.append({"index": i, "message": msg, "logprobs": logprobs, "finish_reason": gen.finish[i]})
            else:
                logprobs = self._completion_logprobs(lps[i], len(out.echo)) if out.logprobs is not None else None
                choices.append({"index": i, "text": out.echo + text, "logprobs": logprobs,
                                "finish_reason": gen.finish[i]})
        return choices

    @staticmethod
    async def _until_disconnect(request: Request, coro) -> Any:
        """Await coro; cancel it (and return None) if the client disconnects first."""
        task = asyncio.ensure_future(coro)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None

    async def _stream(self, gen: Generation, head: dict[str, Any], out: Output, usage: bool
                      ) -> AsyncIterator[bytes]:
        chat = out.chat

        def chunk(i: int, delta: dict[str, Any] | str, finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": i, "delta": delta} if chat else {"index": i, "text": delta}
            obj = {**head, "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish}]}
            return _sse({**obj, "usage": None} if usage else obj)

        tpl = _ChunkTemplates(head, gen.n, chat, usage)
        if chat:  # DeepSeek's first chunk: the role (with empty reasoning when the reasoning is open)
            first = {"role": "assistant", "content": None, "reasoning_content": ""} if out.reasoning else \
                {"role": "assistant", "content": ""}
            yield "".join(chunk(i, first) for i in range(gen.n)).encode()
        elif out.echo:
            yield "".join(chunk(i, out.echo) for i in range(gen.n)).encode()
        offsets = [len(out.echo)] * gen.n
        parts: list[str] = []  # one engine step's chunks (one event per token, in order) go out in one write
        async for batch in gen.batches():
            for d in batch:
                i, r, c, reason = d.i, d.reasoning, d.content, d.finish
                if reason == "error":
                    parts.append(_sse({"error": {"message": gen.engine_error(), "type": "server_error",
                                                 "param": None, "code": "engine_error"}}))
                    yield "".join(parts).encode()
                    return
                if d.logprob is not None:  # the slow path: a chunk with this token's log-probabilities
                    if chat:
                        key = "reasoning_content" if d.logprob[3] else "content"
                        delta = {k: v for k, v in (("reasoning_content", r), ("content", c), ("tool_calls", d.calls))
                                 if v} or {key: ""}  # a token whose text is held back still has its logprob
                        parts.append(chunk(i, delta, None, {key: [self._chat_logprobs(d.logprob)]}))
                    else:
                        lp = self._completion_logprobs([d.logprob], offsets[i])
                        offsets[i] += len(lp["tokens"][0])
                        parts.append(chunk(i, c, None, lp))
                    if reason:
                        parts.append(chunk(i, {} if chat else "", reason))
                    continue
                if chat:
                    if r:
                        parts.append(tpl.token(tpl.reasoning, i, r))
                    if c:
                        parts.append(tpl.token(tpl.content, i, c))
                    if d.calls:
                        parts.append(chunk(i, {"tool_calls": d.calls}))
                    if reason:
                        parts.append(chunk(i, {}, reason))
                elif reason:
                    parts.append(chunk(i, c, reason))
                elif c:
                    parts.append(tpl.token(tpl.content, i, c))
            if parts:
                yield "".join(parts).encode()
                parts = []
        if usage:
            parts.append(_sse({**head, "choices": [], "usage": gen.usage(chat)}))
        yield ("".join(parts) + "data: [DONE]\n\n").encode()


def _csp(html: str) -> str:
    """Content-Security-Policy allowing only the page's own inline script (by hash): injected markup could run
    nothing even if the page had a rendering bug (the page itself only ever uses textContent)."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'none'; base-uri 'none'; form-action 'none'")


# --- HTTP hardening: an ASGI middleware (headers first) and a uvicorn protocol (connection level) ---------------------
class Guard:
    """Pure ASGI middleware in front of the app: the API key is checked on the headers, before any of the body is
    read (401 whatever the body or the path); the body is read here, at most `max_body_bytes` (413 from the
    Content-Length header, or as soon as a chunked body grows past it) within `read_timeout` seconds (408), and
    handed to the app in one piece. Every refusal closes the connection, so an unread body is never read."""

    def __init__(self, app: Any, server: Server, max_body_bytes: int, read_timeout: float, open_paths: frozenset[str]):
        self.app, self.server = app, server
        self.max_body_bytes, self.read_timeout, self.open_paths = max_body_bytes, read_timeout, open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if scope["path"] not in self.open_paths and not self.server.authorized(headers):
            await self._refuse(send, 401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               "authentication_error", "invalid_api_key")
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._refuse(send, 413, f"the body is larger than this server's limit of {self.max_body_bytes} "
                               "bytes (serve --max-body-bytes)", "invalid_request_error", "body_too_large")
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.read_timeout)
        except asyncio.TimeoutError:
            await self._refuse(send, 408, f"the body did not arrive within {self.read_timeout:g} s",
                               "invalid_request_error", "request_timeout")
            return
        except ConnectionError:  # the client left while sending
            return
        if body is None:
            await self._refuse(send, 413, f"the body is larger than this server's limit of {self.max_body_bytes} "
                               "bytes (serve --max-body-bytes)", "invalid_request_error", "body_too_large")
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    async def _read(self, receive: Callable) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Callable, status: int, message: str, type: str, code: str) -> None:
        self.server.metrics.errors[status] = self.server.metrics.errors.get(status, 0) + 1
        body = error_body(message, type, None, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", None, code)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{'retry-after: 1' + chr(13) + chr(10) if status == 503 else ''}connection: close\r\n\r\n").encode() + body


def http_protocol(read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                  max_header_bytes: int = MAX_HEADER_BYTES) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with connection-level limits it lacks: uvicorn arms no timer on
    a new connection and cancels its keep-alive timer on every byte received, so a client that sends its headers a
    byte at a time (or never) holds the connection forever. Here a connection must deliver complete request headers
    within `read_timeout` seconds of opening or of its previous response (else it is closed, with 408 if it had
    started a request), at most `max_header_bytes` of them (431), and a connection beyond `max_connections` open
    ones gets 503 at once. The body's own limits are Guard's."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _in_headers = True  # between requests: bytes received are request line and headers
        _header_bytes = 0
        _tail = b""  # the last 3 bytes scanned, for a CRLF CRLF split across two reads

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_response(503, "Service Unavailable", f"more than {max_connections} open "
                                              "connections (serve --max-connections); retry later",
                                              "too_many_connections"))
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._in_headers, self._header_bytes, self._tail = True, 0, b""
            self._timer = self.loop.call_later(read_timeout, self._headers_timed_out)

        def _headers_timed_out(self) -> None:
            self._timer = None
            # no request whose headers are complete is being served: close (408 if one had started to arrive)
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                if self._header_bytes:
                    self.transport.write(_raw_response(408, "Request Timeout", "the request headers did not arrive "
                                                       f"within {read_timeout:g} s", "request_timeout"))
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._in_headers:  # count up to the blank line that ends the headers (what follows is the body)
                k = (self._tail + data).find(b"\r\n\r\n")
                size = self._header_bytes + (len(data) if k < 0 else k + 4 - len(self._tail))
                if size > max_header_bytes:
                    self.transport.write(_raw_response(431, "Request Header Fields Too Large", "the request line "
                                                       f"and headers exceed {max_header_bytes} bytes",
                                                       "headers_too_large"))
                    self.transport.close()
                    return
                self._header_bytes, self._in_headers = size, k < 0
                self._tail = (self._tail + data)[-3:]
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

    return GuardedHTTP


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str = "nanoseek", api_key: str | None = None,
               max_queue: int = 256, price_per_hour: float = 0.0, max_body_bytes: int | None = None,
               read_timeout: float = READ_TIMEOUT, allow_origins: list[str] | tuple[str, ...] = (),
               docs: bool = False) -> FastAPI:
    """The ASGI app. Starts the engine's loop thread if it is not running (the caller stops it).
    max_body_bytes None: max(1 MiB, 256 bytes per token of context). allow_origins: CORS origins (none: no CORS
    headers at all). docs: serve /docs, /redoc and /openapi.json."""
    if tokenizer.vocab_size > engine.config.vocab_size:
        raise NanoseekError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                            f"{engine.config.vocab_size} (vocab_size in config.json)")
    if api_key is not None:
        check_api_key(api_key, "api_key")
    if max_body_bytes is None:
        max_body_bytes = max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * engine.max_seq_len)
    if max_body_bytes < 1 or not read_timeout > 0:
        raise NanoseekError(f"max_body_bytes must be >= 1 and read_timeout > 0, got {max_body_bytes}, {read_timeout}")
    server = Server(engine, tokenizer, model_name, api_key, max_queue, price_per_hour)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop = asyncio.get_running_loop()
        engine.start()
        yield
        server.pool.shutdown(wait=False)

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        server.metrics.errors[e.status] = server.metrics.errors.get(e.status, 0) + 1
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, None, None, getattr(e, "headers", None))

    def body_schema(model: type[BaseModel]) -> dict[str, Any]:  # the request body in /openapi.json (--docs)
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await server.chat(await server._body(request, ChatCompletionRequest), request)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await server.complete(await server._body(request, CompletionRequest), request)

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        return await server.tokenize(await server._body(request, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        return server.detokenize(await server._body(request, DetokenizeRequest))

    @app.get("/health")
    async def health() -> Response:
        if not engine.running:
            return JSONResponse({"status": "engine not running"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    html = INDEX_HTML.read_text(encoding="utf-8")
    csp = _csp(html)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(s.pop("$defs", {}))
                components[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(Guard, server=server, max_body_bytes=max_body_bytes, read_timeout=read_timeout,
                       open_paths=OPEN_PATHS | (DOCS_PATHS if docs else frozenset()))
    if allow_origins:  # outermost: browsers' preflight requests carry no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    return app


def check_api_key(key: str, name: str) -> str:
    """An API key must be non-empty printable ASCII without spaces (what a Bearer header can carry): an empty one,
    from an unset shell variable, would otherwise turn authentication off without a word."""
    if not key:
        raise NanoseekError(f"{name} is empty (an unset variable?); leave it out to serve without a key")
    if not all("!" <= c <= "~" for c in key):
        raise NanoseekError(f"{name} must be printable ASCII without spaces")
    return key


# --- `nanoseek serve` -----------------------------------------------------------------------------------------------
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
    if args.threads is not None:
        if args.threads < 1:
            raise NanoseekError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not 0 <= args.speculate <= 8:
        raise NanoseekError(f"--speculate takes 1 to 8 draft tokens, got {args.speculate}")
    engine = Engine.from_pretrained(args.model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                                    compile=args.compile, speculative=args.speculate > 0,
                                    num_speculative_tokens=max(args.speculate, 1))
    tokenizer = Tokenizer.from_dir(args.model)
    app = create_app(engine, tokenizer, model_name=args.model.resolve().name, api_key=api_key,
                     max_queue=args.max_queue, price_per_hour=args.price_per_hour,
                     max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                     allow_origins=args.allow_origin, docs=args.docs)
    print(f"nanoseek serve: {args.model} on http://{args.host}:{args.port}/ (web chat at /, API at /v1"
          f"{', key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            http=http_protocol(args.read_timeout, args.max_connections))
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
