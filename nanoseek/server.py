"""`nanoseek serve`: an OpenAI / DeepSeek-compatible HTTP API over one continuous-batching engine, and a web chat.

    GET  /v1/models             the served model
    POST /v1/chat/completions   R1 chat template; the reasoning (text before </think>) is `reasoning_content`
    POST /v1/completions        a raw prompt (text or token ids), no template
    GET  /health                {"status": "ok"} while the engine loop runs
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, queue, slots, latency histograms, $/1M
    GET  /                      the web chat (static/index.html)

Every request becomes one engine request per choice (`engine.submit`); the engine's loop thread reports each token
through `on_event` into a server-wide inbox, and one `call_soon_threadsafe` per engine step wakes the asyncio loop to
hand the events to their HTTP requests; each request then turns everything that has arrived for it into one socket
write (token chunks from pre-built JSON templates). A client that disconnects has its requests cancelled, and the
engine frees their slots at its next step. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}; see docs/serving.md.
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
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanoseek.chat import TextSplitter
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer

INDEX_HTML = Path(__file__).parent / "static" / "index.html"


# --- request bodies (strict: "1" is not an int, true is not a number) ------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for system
    content: str | list[TextPart]
    reasoning_content: Any = None  # declared only to reject it with HTTP 400, as DeepSeek does


class StreamOptions(_Body):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class _Sampling(_Body):
    model: str | None = None  # any name is accepted; responses carry the served model's name
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (for benchmarks)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens; wins if both are set
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # text, or token ids
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions


# --- errors ---------------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    # ensure_ascii: messages may quote client input, which can hold lone surrogates that UTF-8 cannot encode
    body = json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})
    return Response(body, status, headers=headers, media_type="application/json")


def _loc(loc: tuple) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'"""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


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
class Generation:
    """The n choices of one HTTP request. Token events arrive from the engine thread (via Server._drain) in `inbox`;
    `batches()` turns them into text deltas, `close()` cancels what is still running (idempotent)."""

    def __init__(self, server: Server, prompt_ids: list[int], params: list[SamplingParams], reasoning: bool,
                 stop: list[str]):
        self.server, self.n = server, len(params)
        # (choice, token id or None, finish reason or None), appended on the event loop by Server._drain, which
        # resolves `waiter` (if batches() is waiting): one task wake-up per engine step, however many tokens arrived
        self.inbox: deque[tuple[int, int | None, str | None]] = deque()
        self.waiter: asyncio.Future | None = None
        self.splitters = [TextSplitter(server.tokenizer, reasoning, stop) for _ in params]
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

    async def batches(self) -> AsyncIterator[list[tuple[int, str, str, str | None]]]:
        """Yield, per wake-up, the list of (choice index, reasoning delta, content delta, finish reason or None) for
        every event that has arrived, in order, until every choice is done."""
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
                i, token, reason = self.inbox.popleft()
                if self.finish[i] is not None:  # a choice already ended by a stop string: late tokens are dropped
                    continue
                reasoning = content = ""
                if token is not None:
                    last = self.last_token[i]
                    if last is None:
                        m.ttft.observe(now - self.t0)
                    else:
                        m.itl.observe(now - last)
                    self.last_token[i] = now
                    self.completion_tokens[i] += 1
                    m.output_tokens += 1
                    splitter = self.splitters[i]
                    reasoning, content = splitter.feed(token)
                    if splitter.stopped:
                        reason = "stop"
                        self.requests[i].cancel()
                if reason is not None:
                    r, c = self.splitters[i].finish()
                    reasoning, content = reasoning + r, content + c
                    self.finish[i] = reason
                    m.finished[reason] = m.finished.get(reason, 0) + 1
                if reasoning or content or reason:
                    out.append((i, reasoning, content, reason))
            if out:
                yield out
        m.latency.observe(time.perf_counter() - self.t0)

    def usage(self, reasoning: bool) -> dict[str, Any]:
        done = sum(self.completion_tokens)
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                                 "total_tokens": self.prompt_tokens + done}
        if reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(s.reasoning_tokens for s in self.splitters)}
        return usage

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
        self.inbox: deque[tuple[Generation, int, int | None, str | None]] = deque()
        self.drain_scheduled = False

    def post(self, gen: Generation, i: int, event: Any) -> None:  # engine thread (Request.on_event)
        self.inbox.append((gen, i, event.token_id, event.finish_reason))
        if not self.drain_scheduled:
            self.drain_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                pass

    def _drain(self) -> None:
        self.drain_scheduled = False  # before draining: an event appended from now on schedules another drain
        while self.inbox:
            gen, i, token, reason = self.inbox.popleft()
            gen.inbox.append((i, token, reason))
            if gen.waiter is not None and not gen.waiter.done():
                gen.waiter.set_result(None)

    def admit(self, n: int) -> None:
        if self.pending + n > self.capacity:
            raise APIError(429, f"the server is busy ({self.pending} requests in flight, room for {self.capacity}); "
                           "retry later", code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
        self.pending += n

    def release(self, n: int) -> None:
        self.pending -= n

    async def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", type="authentication_error")

    def sampling(self, body: _Sampling, max_tokens: int | None, n_prompt: int, param: str) -> list[SamplingParams]:
        room = self.engine.max_seq_len - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context holds "
                           f"{self.engine.max_seq_len} (prompt + output)", param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens = {max_tokens} plus the {n_prompt} prompt tokens exceeds this model's "
                           f"context of {self.engine.max_seq_len} tokens", "max_tokens", "context_length_exceeded")
        greedy = body.temperature == 0 or body.top_p == 0
        stop_ids = [] if body.ignore_eos else None
        seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]  # n choices, n different seeds
        return [SamplingParams(max_new_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                               top_p=1.0 if greedy else body.top_p, stop_token_ids=stop_ids,
                               seed=None if s is None else (s + 2**63) % 2**64 - 2**63) for s in seeds]

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        for i, m in enumerate(body.messages):
            if "reasoning_content" in m.model_fields_set:
                raise APIError(400, f"messages[{i}] has 'reasoning_content': send earlier answers back with their "
                               "content only (as the DeepSeek API requires)", f"messages[{i}].reasoning_content",
                               "invalid_request_error")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # NanoseekError, or text the tokenizer cannot take (lone surrogates)
            raise APIError(400, f"cannot tokenize the messages: {e}", "messages") from None
        params = self.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), "messages")
        return await self._respond(body, request, ids, params, chat=True)

    async def complete(self, body: CompletionRequest, request: Request) -> Response:
        if isinstance(body.prompt, str):
            try:
                ids = self.tokenizer.encode(body.prompt)
            except Exception as e:
                raise APIError(400, f"cannot tokenize the prompt: {e}", "prompt") from None
        else:
            ids = body.prompt
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if max(ids) >= self.engine.config.vocab_size:
            raise APIError(400, f"token id {max(ids)} is outside the vocabulary [0, {self.engine.config.vocab_size})",
                           "prompt")
        params = self.sampling(body, body.max_tokens, len(ids), "prompt")
        return await self._respond(body, request, ids, params, chat=False)

    async def _respond(self, body: _Sampling, request: Request, ids: list[int], params: list[SamplingParams],
                       chat: bool) -> Response:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        gen = Generation(self, ids, params, reasoning=chat, stop=stop)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.id_prefix}{next(self.id_counter):012x}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _ClosingStream(self._stream(gen, head, chat, usage), gen)
        try:
            choices = await self._until_disconnect(request, self._collect(gen, chat))
        finally:
            gen.close()
        if choices is None:  # the client left; nobody will read this
            return Response(status_code=499)
        if "error" in gen.finish:
            raise APIError(500, "the engine failed while generating", type="server_error", code="engine_error")
        head["object"] = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "choices": choices, "usage": gen.usage(chat)})

    async def _collect(self, gen: Generation, chat: bool) -> list[dict[str, Any]]:
        reasoning, content = [[] for _ in range(gen.n)], [[] for _ in range(gen.n)]
        async for batch in gen.batches():
            for i, r, c, _ in batch:
                reasoning[i].append(r)
                content[i].append(c)
        if chat:
            return [{"index": i, "message": {"role": "assistant", "content": "".join(content[i]),
                                             "reasoning_content": "".join(reasoning[i])},
                     "logprobs": None, "finish_reason": gen.finish[i]} for i in range(gen.n)]
        return [{"index": i, "text": "".join(content[i]), "logprobs": None, "finish_reason": gen.finish[i]}
                for i in range(gen.n)]

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

    async def _stream(self, gen: Generation, head: dict[str, Any], chat: bool, usage: bool) -> AsyncIterator[bytes]:
        def chunk(i: int, delta: dict[str, Any] | str, finish: str | None = None) -> str:
            choice = {"index": i, "delta": delta} if chat else {"index": i, "text": delta}
            out = {**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}
            return _sse({**out, "usage": None} if usage else out)

        tpl = _ChunkTemplates(head, gen.n, chat, usage)
        if chat:  # DeepSeek's first chunk: the role, with empty reasoning
            yield "".join(chunk(i, {"role": "assistant", "content": None, "reasoning_content": ""})
                          for i in range(gen.n)).encode()
        out: list[str] = []  # one engine step's chunks (one event per token, in order) go out in one write
        async for batch in gen.batches():
            for i, r, c, reason in batch:
                if reason == "error":
                    out.append(_sse({"error": {"message": "the engine failed while generating",
                                               "type": "server_error", "param": None, "code": "engine_error"}}))
                    yield "".join(out).encode()
                    return
                if chat:
                    if r:
                        out.append(tpl.token(tpl.reasoning, i, r))
                    if c:
                        out.append(tpl.token(tpl.content, i, c))
                    if reason:
                        out.append(chunk(i, {}, reason))
                elif reason:
                    out.append(chunk(i, c, reason))
                elif c:
                    out.append(tpl.token(tpl.content, i, c))
            if out:
                yield "".join(out).encode()
                out = []
        if usage:
            out.append(_sse({**head, "choices": [], "usage": gen.usage(chat)}))
        yield ("".join(out) + "data: [DONE]\n\n").encode()


def _csp(html: str) -> str:
    """Content-Security-Policy allowing only the page's own inline script (by hash): injected markup could run
    nothing even if the page had a rendering bug (the page itself only ever uses textContent)."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'none'; base-uri 'none'; form-action 'none'")


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str = "nanoseek", api_key: str | None = None,
               max_queue: int = 256, price_per_hour: float = 0.0) -> FastAPI:
    """The ASGI app. Starts the engine's loop thread if it is not running (the caller stops it)."""
    if tokenizer.vocab_size > engine.config.vocab_size:
        raise NanoseekError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                            f"{engine.config.vocab_size} (vocab_size in config.json)")
    server = Server(engine, tokenizer, model_name, api_key, max_queue, price_per_hour)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop = asyncio.get_running_loop()
        engine.start()
        yield

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    auth = [Depends(server.authorize)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        server.metrics.errors[e.status] = server.metrics.errors.get(e.status, 0) + 1
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        server.metrics.errors[400] = server.metrics.errors.get(400, 0) + 1
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if err.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip(),
                                  "invalid_request_error", None, "json_invalid")
        param = _loc(tuple(err.get("loc", ())))
        return error_response(400, f"{param or 'body'}: {err.get('msg')}", "invalid_request_error", param or None,
                              err.get("type"))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, None, None, getattr(e, "headers", None))

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.complete(body, request)

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

    return app


# --- `nanoseek serve` -----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-batch-size", type=int, default=8, help="engine batch slots (default 8)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; beyond that the server answers 429 (default 256)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's, <= 4096)")
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
    app = create_app(engine, tokenizer, model_name=args.model.resolve().name, api_key=args.api_key,
                     max_queue=args.max_queue, price_per_hour=args.price_per_hour)
    print(f"nanoseek serve: {args.model} on http://{args.host}:{args.port}/ (web chat at /, API at /v1)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
