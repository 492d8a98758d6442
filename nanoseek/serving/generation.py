"""One generation: the n engine requests of one HTTP request, and their token events on the asyncio loop.

The engine's loop thread reports each token through `on_event` into the server's inbox (Server.post); one
`call_soon_threadsafe` per engine step wakes the event loop, which hands the events to their Generation
(Server._drain). `Generation.batches()` turns everything that has arrived into Deltas: reasoning and content text
(TextSplitter), tool calls (ToolCallStream), log-probabilities, finish reasons, and the latency metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from nanoseek.errors import NanoseekError
from nanoseek.serving.protocol import APIError
from nanoseek.serving.text import TextSplitter, ToolCallStream

if TYPE_CHECKING:
    from nanoseek.engine import SamplingParams
    from nanoseek.serving.server import Server


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
        """Prompt tokens read from the engine's prefix cache instead of prefilled (Request.cached_tokens, set when the
        request got its slot; 0 without prefix_cache). The prompt is counted once for the n choices, so is its hit:
        the first choice's. The one place usage's cache fields come from."""
        return self.requests[0].cached_tokens if self.requests else 0

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
