"""The HTTP API library: an OpenAI / DeepSeek-compatible API over one continuous-batching engine, and a web chat.

    from nanoseek.serving import create_app, http_protocol
    app = create_app(engine, tokenizer, api_key="...")     # an ASGI app; `nanoseek serve` runs it under uvicorn
    uvicorn.run(app, http=http_protocol())                 # with the connection-level limits

    GET  /v1/models             the served model
    POST /v1/chat/completions   R1 chat template; the reasoning (text before </think>) is `reasoning_content`;
                                tools, JSON output, prefix completion, a thinking switch, logprobs
    POST /v1/completions        a raw prompt (text or token ids), no template
    POST /tokenize, /detokenize vLLM's shapes: text or messages -> token ids, and back
    GET  /health                {"status": "ok"} while the engine loop runs
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, queue, slots, latency histograms, $/1M
    GET  /                      the web chat (static/index.html)

Modules, in the order a request meets them (docs/serving.md has the details):
    limits.py      the API key, body and connection limits in front of the app (Guard, http_protocol)
    app.py         create_app: the routes, error handlers and the web chat page
    protocol.py    the request bodies, the fields refused with a reason, the error body, body checks
    messages.py    a chat request's checks: its chat-only fields, its messages, the thinking switch
    server.py      Server: admission, the engine bridge, request -> engine inputs, JSON and streamed responses
    generation.py  Generation: one request's engine requests and their token events on the asyncio loop
    text.py        TextSplitter (tokens -> reasoning / content), ToolCallStream (content -> tool calls)
    metrics.py     /metrics
"""

from nanoseek.serving.app import check_api_key, create_app
from nanoseek.serving.limits import MAX_CONNECTIONS, READ_TIMEOUT, http_protocol
from nanoseek.serving.protocol import APIError
from nanoseek.serving.server import Server
from nanoseek.serving.text import TextSplitter

__all__ = ["create_app", "check_api_key", "http_protocol", "READ_TIMEOUT", "MAX_CONNECTIONS", "Server", "APIError",
           "TextSplitter"]
