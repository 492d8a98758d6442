"""`create_app`: the ASGI app (FastAPI) of one engine: the routes, the error handlers, the web chat page, and the
HTTP limits around them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.serving.limits import BODY_BYTES_PER_TOKEN, MIN_BODY_BYTES, READ_TIMEOUT, Guard
from nanoseek.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_response,
)
from nanoseek.serving.server import Server
from nanoseek.tokenizer import Tokenizer

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})  # no API key needed
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


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
        return await server.chat(await server.read_body(request, ChatCompletionRequest), request)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await server.complete(await server.read_body(request, CompletionRequest), request)

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        return await server.tokenize(await server.read_body(request, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        return server.detokenize(await server.read_body(request, DetokenizeRequest))

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


def _csp(html: str) -> str:
    """Content-Security-Policy allowing only the page's own inline script (by hash): injected markup could run
    nothing even if the page had a rendering bug (the page itself only ever uses textContent)."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'none'; base-uri 'none'; form-action 'none'")
