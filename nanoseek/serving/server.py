"""The server behind the routes: admission, the engine bridge, each endpoint's request -> engine inputs, and the
responses (one JSON body, or Server-Sent Events).

Every request becomes one engine request per choice (`engine.submit`, through a Generation); a streamed response
turns everything that has arrived for it into one socket write (token chunks from pre-built JSON templates). A client
that disconnects has its requests cancelled, and the engine frees their slots at its next step. The chat template and
the tokenizer run in a worker thread, after a bound on the text's length, so /health answers while a big request is
prepared.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError
from nanoseek.serving.generation import Generation, Output
from nanoseek.serving.messages import chat_messages, check_chat_options, thinking
from nanoseek.serving.metrics import Metrics
from nanoseek.serving.protocol import (
    MAX_LOGIT_BIAS,
    MAX_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    SamplingFields,
    TokenizeRequest,
    check_sizes,
    parse_json,
    refuse,
    text_length,
    validation_error,
)
from nanoseek.tokenizer import TOOL_CALL_STYLE, Tokenizer


# --- streamed responses: Server-Sent Events -------------------------------------------------------------------------
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
def _speculative(param: str) -> APIError:
    # MTP drafting samples without logits processors, so the engine refuses them on a speculative engine
    return APIError(400, f"{param}: not supported by this server (it runs MTP speculative decoding: serve "
                    "--speculate)", param, "unsupported_parameter")


class Server:
    """One engine's HTTP front: what create_app's routes call (app.state.server)."""

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

    async def read_body(self, request: Request, model: type[BaseModel]) -> Any:
        """The request's JSON body (already read and size-checked by the middleware), bounded and validated."""
        if self.pending >= self.capacity:  # full: say so before parsing anything
            self.admit(1)  # raises 429
        data = parse_json(await request.body())
        check_sizes(data, self.limits)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def _check_length(self, text_chars: int, param: str) -> None:
        if text_chars > self.max_chars:
            raise APIError(400, f"the prompt has {text_chars} characters; this model's context of "
                           f"{self.engine.max_seq_len} tokens holds at most {self.max_chars} (tokens of at most "
                           f"{self.tokenizer.max_token_bytes} bytes)", param, "context_length_exceeded")

    # --- a request -> engine inputs: token ids (in the worker thread), the grammar ----------------------------------
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

    # --- the endpoints ----------------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        check_chat_options(body)
        messages = chat_messages(body)
        think = thinking(body)
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
        self._check_length(text_length(messages) + text_length(tools), "messages")
        constraint = self._constraint(body, tools if calls_on else None, choice, reasoning, prefix)
        ids = await self._in_thread(partial(self._chat_ids, messages, tools if calls_on else None, think))
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, body.max_completion_tokens or body.max_tokens, len(ids), "messages",
                               logprobs=k, constraint=constraint)
        out = Output(chat=True, reasoning=reasoning, strip=not prefix, tools=calls_on,
                     parallel_calls=body.parallel_tool_calls is not False, logprobs=k)
        return await self._respond(body, request, ids, params, out)

    async def complete(self, body: CompletionRequest, request: Request) -> Response:
        refuse(body, ("suffix",))
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
        refuse(body, ("continue_final_message",))
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", "prompt" if body.prompt is None else "messages")
        if body.prompt is not None:
            self._check_length(len(body.prompt), "prompt")
            ids = await self._in_thread(partial(self._prompt_ids, body.prompt))
        else:
            if not body.messages:
                raise APIError(400, "messages: at least one message", "messages")
            messages = chat_messages(body)
            tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools] if body.tools else None
            self._check_length(text_length(messages) + text_length(tools), "messages")
            ids = await self._in_thread(partial(self._chat_ids, messages, tools, thinking(body),
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

    def sampling(self, body: SamplingFields, max_tokens: int | None, n_prompt: int, param: str,
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
    async def _respond(self, body: SamplingFields, request: Request, ids: list[int], params: list[SamplingParams],
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
