"""The HTTP server (nanoseek serve) and the terminal chat, over real HTTP on loopback.

Two tiny checkpoints are made once per module:
- `random_dir`: a random `test`-preset model and a small trained tokenizer (arbitrary text, for load and fuzzing);
- `scripted_dir`: the same architecture with weights set so that greedy decoding writes a fixed text: every block's
  output projections are zero (each block adds nothing to the residual stream), so the logits depend only on the
  current token's embedding, and lm_head maps each token of a chain to the next. The chain is
  prompt-end -> SCRIPT_REASONING -> </think> -> SCRIPT_ANSWER -> <eos>, so reasoning/content splitting, stop
  strings and the web chat can be checked against known text through the real engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import io
import json
import math
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint import load_model, save_pretrained
from nanoseek.engine import Engine
from nanoseek.serving import TextSplitter, create_app, http_protocol
from nanoseek.tokenizer import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    Tokenizer,
    train_tokenizer,
)

SCRIPT_REASONING = "Thinking about colours"
SCRIPT_ANSWER = "The sky is blue."
http = httpx.Client(timeout=60)  # shared: creating a client (its TLS context) costs ~80 ms
CORPUS = Path(__file__).resolve().parents[1] / "nanoseek" / "corpus" / "tinyshakespeare" / "input.txt"


# --- checkpoints ----------------------------------------------------------------------------------------------------
def _texts() -> list[str]:
    return [CORPUS.read_text(encoding="utf-8")[:30000]] + [f"{SCRIPT_REASONING}. {SCRIPT_ANSWER}"] * 20


def make_random_model(path: Path, max_position_embeddings: int | None = None) -> Path:
    torch.manual_seed(0)
    cfg = get_preset("test")
    if max_position_embeddings is not None:  # room for a tools system prompt in the tiny vocabulary
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_position_embeddings)
    save_pretrained(Transformer(cfg), path)
    train_tokenizer(_texts(), vocab_size=cfg.vocab_size, out_dir=path)
    return path


def make_scripted_model(path: Path, reasoning: str = SCRIPT_REASONING, answer: str = SCRIPT_ANSWER,
                        extra_tokens: tuple[str, ...] = (), max_position_embeddings: int | None = None,
                        thinking: bool = True) -> Path:
    """A checkpoint whose greedy chat output is `reasoning</think>answer<eos>` for any prompt (thinking=False:
    `answer<eos>` after the thinking-off prompt). `extra_tokens` are added to the vocabulary as whole tokens, so text
    that repeats characters (HTML) can still be one chain."""
    cfg = get_preset("test")
    if max_position_embeddings is not None:
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_position_embeddings)
    tok = train_tokenizer(_texts(), vocab_size=cfg.vocab_size - len(extra_tokens), out_dir=path / "tokenizer")
    if extra_tokens:
        hf = tok._tok
        hf.add_tokens(list(extra_tokens))
        tok = Tokenizer(hf)
    prompt_end = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                         thinking=thinking)[-1]
    chain = [prompt_end, *tok.encode(reasoning), tok.think_end_id] if thinking else [prompt_end]
    chain += [*tok.encode(answer), tok.eos_id]
    assert len(set(chain)) == len(chain), "the scripted text must use every token once"
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.zero_()  # attention and FFN add nothing: hidden state = embedding of the current token
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        emb = model.embed_tokens.weight
        emb.normal_()
        model.lm_head.weight.zero_()
        for src, dst in zip(chain, chain[1:], strict=False):
            # logit(dst | src) = 10 * |rmsnorm(e_src)| ~ 80; any other chain logit ~ N(0, 10)
            model.lm_head.weight[dst] = 10 * emb[src] / emb[src].norm()
    save_pretrained(model, path)  # replaces the directory, so the tokenizer is saved after it
    tok.save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny matmuls: one thread is ~50x faster than two on a busy 2-core machine (no OpenMP barrier spinning)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory) -> Path:
    return make_scripted_model(tmp_path_factory.mktemp("scripted"))


# --- a server on loopback -------------------------------------------------------------------------------------------
@contextmanager
def serving(model_dir: Path, max_batch_size: int = 4, max_seq_len: int | None = None, engine_kw: dict | None = None,
            protocol_kw: dict | None = None, **kwargs):
    """Start uvicorn in a thread on a free loopback port, with `nanoseek serve`'s HTTP protocol (connection limits:
    `protocol_kw`); yields (base_url, app)."""
    engine = Engine(load_model(model_dir), max_batch_size=max_batch_size, max_seq_len=max_seq_len, **(engine_kw or {}))
    app = create_app(engine, Tokenizer.from_dir(model_dir), model_name="tiny", **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           http=http_protocol(**(protocol_kw or {}))))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        sock.close()


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    with serving(scripted_dir, price_per_hour=0.5) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def fuzz_server(random_dir):
    with serving(random_dir, max_seq_len=40) as (url, app):
        yield url, app


def chat(content: str = "hello", **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def sse(response: httpx.Response) -> list[dict]:
    """The JSON events of a streamed response; asserts it ends with [DONE]."""
    data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def metric(url: str, name: str) -> float:
    text = http.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# --- the text splitter ----------------------------------------------------------------------------------------------
def test_splitter_reasoning_content_and_stop(scripted_dir):
    tok = Tokenizer.from_dir(scripted_dir)
    ids = tok.encode("first line\n") + [tok.think_end_id] + tok.encode("\n\nThe answer is 42. Done")
    s = TextSplitter(tok, reasoning=True, stop=["42."])
    parts = [s.feed(t) for t in ids] + [s.finish()]
    assert "".join(r for r, _ in parts) == "first line"  # trailing newline before </think> dropped
    assert "".join(c for _, c in parts) == "The answer is "  # leading blank lines dropped, cut at the stop string
    assert s.stopped and s.reasoning_tokens == len(tok.encode("first line\n")) + 1
    # a stop string that never completes is released at the end; raw mode keeps specials' neighbours and spaces
    s = TextSplitter(tok, reasoning=False, stop=["Dx"])
    out = [s.feed(t) for t in tok.encode("  The sky D")] + [s.finish()]
    assert [c for _, c in out][-1] == "D" and "".join(c for _, c in out) == "  The sky D"


def test_splitter_holds_back_partial_utf8(scripted_dir):
    tok = Tokenizer.from_dir(scripted_dir)
    s = TextSplitter(tok, reasoning=False)
    byte_ids = [tok.token_to_id(c) for c in ("ä", "¸", "Ń")]  # "中" = e4 b8 ad as three byte-level symbols
    assert None not in byte_ids
    assert [s.feed(t)[1] for t in byte_ids] == ["", "", "中"]


# --- API over HTTP --------------------------------------------------------------------------------------------------
def test_models_health_index(scripted):
    url, _ = scripted
    models = http.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert http.get(f"{url}/health").json() == {"status": "ok"}
    page = http.get(f"{url}/")
    assert page.status_code == 200 and "<title>nanoseek chat</title>" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_openai_client_chat_reasoning_content(scripted):
    url, _ = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What colour is the sky?"}],
                                       temperature=0, max_tokens=50)
    msg = r.choices[0].message
    assert msg.content == SCRIPT_ANSWER
    assert msg.reasoning_content == SCRIPT_REASONING
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    tok = scripted[1].state.server.tokenizer
    n_reason, n_answer = len(tok.encode(SCRIPT_REASONING)) + 1, len(tok.encode(SCRIPT_ANSWER))  # +1: </think>
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}], True)
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(prompt), n_reason + n_answer,
                                                                      len(prompt) + n_reason + n_answer)
    assert u.completion_tokens_details.reasoning_tokens == n_reason


def test_openai_client_streaming_order(scripted):
    url, _ = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    kinds, reasoning, content, finish, usage = [], "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        r = getattr(d, "reasoning_content", None)
        if r:
            kinds.append("r")
            reasoning += r
        if d.content:
            kinds.append("c")
            content += d.content
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == (SCRIPT_REASONING, SCRIPT_ANSWER, "stop")
    assert kinds.count("r") > 1 and kinds.count("c") > 1  # streamed piece by piece
    assert kinds == sorted(kinds, reverse=True)  # every reasoning delta before the first content delta
    tok = scripted[1].state.server.tokenizer
    assert usage.completion_tokens_details.reasoning_tokens == len(tok.encode(SCRIPT_REASONING)) + 1


def test_stop_strings_seed_and_n(scripted, random_dir):
    url, _ = scripted
    r = http.post(f"{url}/v1/chat/completions", json=chat(stop=["blue", "never"])).json()
    assert r["choices"][0]["message"]["content"] == "The sky is "
    assert r["choices"][0]["finish_reason"] == "stop"
    r = http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=3)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    with serving(random_dir) as (url2, _):
        body = chat(temperature=1.0, seed=7, n=2, max_tokens=12, ignore_eos=True)
        a = http.post(f"{url2}/v1/chat/completions", json=body).json()
        b = http.post(f"{url2}/v1/chat/completions", json=body).json()
        texts = [c["message"]["reasoning_content"] + c["message"]["content"] for c in a["choices"]]
        assert texts == [c["message"]["reasoning_content"] + c["message"]["content"] for c in b["choices"]]
        assert len(a["choices"]) == 2 and texts[0] != texts[1]  # n choices use seeds seed, seed+1
        assert a["usage"]["completion_tokens"] == 2 * 12


@pytest.mark.parametrize("speculate", [0, 2])
def test_completions_match_engine(random_dir, speculate):
    """Also with MTP speculative decoding (serve --speculate 2): several tokens a step reach the stream in order."""
    tok = Tokenizer.from_dir(random_dir)
    engine = Engine(load_model(random_dir), max_batch_size=2)
    prompt = "To be, or not to be"
    direct = engine.generate([tok.encode(prompt)], max_new_tokens=16)[0]
    spec = dict(speculative=True, num_speculative_tokens=speculate) if speculate else {}
    with serving(random_dir, engine_kw=spec) as (url, _):
        r = http.post(f"{url}/v1/completions", json={"prompt": prompt, "temperature": 0}).json()
        assert r["object"] == "text_completion" and r["usage"]["completion_tokens"] == len(direct)
        splitter = TextSplitter(tok, reasoning=False)
        expected = "".join(splitter.feed(t)[1] for t in direct) + splitter.finish()[1]
        assert r["choices"][0]["text"] == expected
        r = http.post(f"{url}/v1/completions", json={"prompt": tok.encode(prompt), "temperature": 0,
                                                     "max_tokens": 16, "stream": True})
        events = sse(r)
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        if speculate:  # MTP drafting samples without logits processors: the fields that need them are refused
            refused(url, {"prompt": "x", "logprobs": 1}, "logprobs", "/v1/completions")
            refused(url, {"prompt": "x", "presence_penalty": 1.0}, "presence_penalty", "/v1/completions")
            refused(url, chat(response_format={"type": "json_object"}), "response_format")


def test_reasoning_content_in_input_is_400(scripted):
    url, _ = scripted
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "Hello", "reasoning_content": "the user greets"},
                         {"role": "user", "content": "again"}]}
    r = http.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[1].reasoning_content"
    body["messages"][1].pop("reasoning_content")
    assert http.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200


BAD_REQUESTS = [
    ("malformed json", b'{"messages": [', "json_invalid"),
    ("not an object", [1, 2], None),
    ("no messages", {"model": "tiny"}, None),
    ("empty messages", {"messages": []}, None),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, None),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, None),
    ("message not object", {"messages": ["hi"]}, None),
    ("max_tokens string", chat(max_tokens="10"), None),
    ("max_tokens bool", chat(max_tokens=True), None),
    ("max_tokens negative", chat(max_tokens=-1), None),
    ("max_tokens zero", chat(max_tokens=0), None),
    ("max_tokens huge", chat(max_tokens=10**12), "context_length_exceeded"),
    ("max_tokens astronomic", chat(max_tokens=10**40), "context_length_exceeded"),
    ("temperature high", chat(temperature=2.5), None),
    ("temperature negative", chat(temperature=-0.1), None),
    ("top_p high", chat(top_p=1.5), None),
    ("top_p negative", chat(top_p=-1), None),
    ("n zero", chat(n=0), None),
    ("too many stops", chat(stop=[f"s{i}" for i in range(17)]), None),
    ("empty stop", chat(stop=""), None),
    ("seed huge", chat(seed=2**80), None),
    ("stream not bool", chat(stream="yes"), None),
    ("prompt too long", chat("the " * 400), "context_length_exceeded"),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=21), None),
    ("top_logprobs without logprobs", chat(top_logprobs=2), None),
]


@pytest.mark.parametrize("name,body,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_openai_style_400(scripted, name, body, code):
    url, _ = scripted
    if isinstance(body, bytes):
        r = http.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]
    if code:
        assert err["code"] == code


def test_bad_completions_and_routes(scripted):
    url, _ = scripted
    for body in ({"prompt": ""}, {"prompt": []}, {"prompt": [10**6]}, {"prompt": [-1]}, {"prompt": 5},
                 {"prompt": "x", "max_tokens": -5}):
        r = http.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    r = http.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert http.get(f"{url}/v1/chat/completions").status_code == 405


# --- fuzzing: no input gives a 5xx -----------------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
_plausible = {
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", ""]),
         "content": st.text(max_size=40) | _json}), max_size=3),
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 600), max_size=6),
    "max_tokens": st.integers(-3, 50), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 10), "seed": st.integers(-(2**65), 2**65), "stop": st.text(max_size=3) | st.lists(
        st.text(max_size=3), max_size=6), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
}


@pytest.fixture(scope="module")
def fuzz_client(fuzz_server):
    with httpx.Client(base_url=fuzz_server[0], timeout=30) as client:  # one client: TLS setup per client is slow
        yield client, fuzz_server[1].openapi()["components"]["schemas"]


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_openapi_schema_never_5xx(fuzz_client, data):
    """Start from a valid body and give up to 3 of the schema's fields (from the OpenAPI document) a plausible or
    arbitrary JSON value, or drop them; now and then send a body that is not even an object."""
    client, schemas = fuzz_client
    path, schema, body = data.draw(st.sampled_from([
        ("/v1/chat/completions", "ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", "CompletionRequest", {"prompt": "To be"})]))
    body = {**body, "max_tokens": 4}
    for field in data.draw(st.lists(st.sampled_from(sorted(schemas[schema]["properties"])), max_size=3, unique=True)):
        how = data.draw(st.sampled_from(["plausible", "arbitrary", "drop"]))
        if how == "drop":
            body.pop(field, None)
        else:
            body[field] = data.draw(_plausible.get(field, _json) if how == "plausible" else _json)
    if data.draw(st.integers(0, 19)) == 0:
        body = data.draw(_json)
    r = client.post(path, json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        assert len(r.json()["choices"]) == body.get("n", 1)


def test_fuzz_raw_bytes_never_5xx(fuzz_server):
    url, _ = fuzz_server
    bodies = [b"", b"\x00\xff", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
              b'{"messages": NaN}', b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
              b"[" * 5000, b'{"prompt": "\\udfff", "max_tokens": 2}', "é".encode("latin-1")]
    for body in bodies:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = http.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (body[:40], r.text)


# --- authentication, overload, concurrency, disconnects -------------------------------------------------------------
def test_api_key(scripted_dir):
    with serving(scripted_dir, api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = http.request(method, f"{url}{path}", headers=headers, json=chat(max_tokens=2))
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = {"Authorization": "Bearer s3cret"}
        assert http.post(f"{url}/v1/chat/completions", headers=ok, json=chat(max_tokens=2)).status_code == 200
        # unauthorised and malformed: still 401 (the key is checked before the body)
        assert http.post(f"{url}/v1/chat/completions", content=b"{", headers={}).status_code == 401
        assert http.get(f"{url}/health").status_code == 200


def test_queue_full_is_429_and_server_recovers(random_dir):
    with serving(random_dir, max_batch_size=1, max_queue=1) as (url, _):
        long = chat(max_tokens=200, ignore_eos=True, stream=True)
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2, \
                c1.stream("POST", f"{url}/v1/chat/completions", json=long) as s1, \
                c2.stream("POST", f"{url}/v1/chat/completions", json=long) as s2:
            assert s1.status_code == 200 and s2.status_code == 200  # one in the slot, one in the queue
            r = http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=2))
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=2, n=3)).status_code == 429
            assert len(sse(s1)) > 1 and len(sse(s2)) > 1  # both finish normally
        assert http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        assert metric(url, 'nanoseek_rejected_requests_total{status="429"}') == 2


def test_64_concurrent_streams_match_engine(random_dir):
    tok = Tokenizer.from_dir(random_dir)
    prompts = [f"Question {i}: what light through yonder window breaks?" for i in range(64)]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    direct = Engine(load_model(random_dir), max_batch_size=8).generate(ids, max_new_tokens=10)
    expected = []
    for out in direct:
        s = TextSplitter(tok)
        parts = [s.feed(t) for t in out] + [s.finish()]
        expected.append(("".join(r for r, _ in parts), "".join(c for _, c in parts)))

    async def one(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[str, str, int]:
        body = chat(prompt, max_tokens=10, stream=True, stream_options={"include_usage": True})
        reasoning, content, usage = "", "", None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for ch in event["choices"]:
                    reasoning += ch["delta"].get("reasoning_content") or ""
                    content += ch["delta"].get("content") or ""
        return reasoning, content, usage["completion_tokens"]

    async def main(url: str):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, url, p) for p in prompts))

    with serving(random_dir, max_batch_size=8, max_queue=64) as (url, _):
        results = asyncio.run(main(url))
        assert [(r, c) for r, c, _ in results] == expected
        assert [n for _, _, n in results] == [len(o) for o in direct]
        assert metric(url, 'nanoseek_requests_total{finish_reason="length"}') + metric(
            url, 'nanoseek_requests_total{finish_reason="stop"}') == 64
        assert metric(url, "nanoseek_active_slots") == 0 and metric(url, "nanoseek_requests_in_flight") == 0


def test_disconnect_frees_slot_within_one_step(random_dir):
    with serving(random_dir, max_batch_size=2) as (url, app):
        engine = app.state.server.engine
        seen = {}
        submit, step = engine.submit, engine.step

        def spy_submit(*args, **kwargs):
            req = submit(*args, **kwargs)
            cancel = req.cancel

            def spy_cancel():
                seen.setdefault("tokens_at_cancel", len(req.output_ids))
                cancel()
            req.cancel = spy_cancel
            seen["request"] = req
            return req

        def slow_step():  # ~20 ms per step, so the request is still running when the client leaves
            time.sleep(0.02)
            return step()

        engine.submit, engine.step = spy_submit, slow_step
        body = chat(max_tokens=200, ignore_eos=True, stream=True)
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = sum(1 for _, line in zip(range(6), lines, strict=False) if line.startswith("data:"))
            assert got >= 3 and metric(url, "nanoseek_active_slots") == 1
        # the client is gone; the server cancels, and the engine frees the slot at its next step
        deadline = time.monotonic() + 10
        while metric(url, "nanoseek_active_slots") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        req = seen["request"]
        assert req.finish_reason == "cancelled" and len(req.output_ids) < 100
        assert len(req.output_ids) - seen["tokens_at_cancel"] <= 1  # at most one decode step after the cancel
        assert metric(url, 'nanoseek_requests_total{finish_reason="cancelled"}') == 1
        assert app.state.server.pending == 0


def test_non_streaming_disconnect_cancels(random_dir):
    with serving(random_dir, max_batch_size=2) as (url, app):
        engine = app.state.server.engine
        step = engine.step

        def slow_step():
            time.sleep(0.02)
            return step()

        engine.step = slow_step
        assert math.isnan(metric(url, "nanoseek_cost_per_million_output_tokens_usd"))  # no token measured yet
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s of a ~5 s generation
            httpx.Client(timeout=0.5).post(f"{url}/v1/chat/completions", json=chat(max_tokens=200, ignore_eos=True))
        deadline = time.monotonic() + 10
        while metric(url, 'nanoseek_requests_total{finish_reason="cancelled"}') != 1 or metric(
                url, "nanoseek_active_slots") != 0:
            assert time.monotonic() < deadline, "the abandoned request kept its slot"
            time.sleep(0.05)
        assert metric(url, "nanoseek_generation_tokens_total") < 150


def test_metrics_prometheus_text(scripted):
    url, _ = scripted
    before = metric(url, "nanoseek_generation_tokens_total")
    used = sum(http.post(f"{url}/v1/chat/completions", json=chat()).json()["usage"]["completion_tokens"]
               for _ in range(2))
    assert metric(url, "nanoseek_generation_tokens_total") - before == used
    text = http.get(f"{url}/metrics").text
    for name in ("nanoseek_time_to_first_token_seconds", "nanoseek_inter_token_latency_seconds",
                 "nanoseek_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert metric(url, f"{name}_count") >= 2
        assert metric(url, f'{name}_bucket{{le="+Inf"}}') == metric(url, f"{name}_count")
    tps = metric(url, "nanoseek_generation_tokens_per_second")
    cost = metric(url, "nanoseek_cost_per_million_output_tokens_usd")
    assert tps > 0 and cost == pytest.approx(0.5 / (tps * 3600) * 1e6, rel=0.05)
    for line in text.splitlines():  # every sample line is "name{labels} number"
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[a-z_]+=\"[^\"]*\"\})? \S+", line), line



# --- the streaming path: pre-built chunk templates, one write per wake-up --------------------------------------------
@pytest.mark.parametrize("chat_mode", [True, False])
@pytest.mark.parametrize("usage", [True, False])
def test_chunk_templates_match_json_dumps(chat_mode, usage):
    from nanoseek.serving.server import _ChunkTemplates, _sse

    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": 'm "q" \\ ü'}
    tpl = _ChunkTemplates(head, n=3, chat=chat_mode, usage=usage)
    for text in ("moon", ' "quoted" \\ back', "line\nbreak\ttab\x00", "中文 🌙", "</script><img src=x>", "\u2028"):
        for i in range(3):
            for key, prefixes in (("reasoning_content", getattr(tpl, "reasoning", None)), ("content", tpl.content)):
                if prefixes is None:
                    continue
                choice = {"index": i, "delta": {key: text}} if chat_mode else {"index": i, "text": text}
                obj = {**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]}
                assert tpl.token(prefixes, i, text) == _sse({**obj, "usage": None} if usage else obj)



def test_response_ids_unique(scripted):
    url, _ = scripted
    ids = [http.post(f"{url}/v1/chat/completions", json=chat(max_tokens=1)).json()["id"] for _ in range(3)]
    ids.append(http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["id"])
    assert len(set(ids)) == 4 and all(re.fullmatch(r"(chatcmpl|cmpl)-[0-9a-f]{32}", i) for i in ids), ids

def test_stream_coalesces_one_write_per_wakeup(scripted_dir):
    """Tokens of several engine steps that arrive before the stream wakes go out in one write, still one SSE event
    per token (reasoning events before content events), then the finish chunk, the usage chunk and [DONE]."""
    from nanoseek.serving.generation import Generation, Output
    from nanoseek.serving.protocol import ChatCompletionRequest
    from nanoseek.serving.server import Server

    tok = Tokenizer.from_dir(scripted_dir)
    engine = Engine(load_model(scripted_dir), max_batch_size=2)  # no loop thread: the test steps it
    server = Server(engine, tok, "tiny", api_key=None, max_queue=4, price_per_hour=0.0)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

    async def main() -> list[bytes]:
        server.loop = asyncio.get_running_loop()
        params = server.sampling(ChatCompletionRequest.model_validate(chat()), 50, len(ids), "messages")
        out = Output(chat=True, reasoning=True)
        gen = Generation(server, ids, params, reasoning=True, stop=[], output=out)
        stream = server._stream(gen, {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                                      "model": "tiny"}, out, usage=True)
        writes = [await stream.__anext__()]  # the role chunk
        for _ in range(4):  # four engine steps before the loop runs: their events wait in the server's inbox
            engine.step()
        while gen.finish[0] is None or not writes[-1].endswith(b"[DONE]\n\n"):
            nxt = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)  # let the drain and the stream run
            if not nxt.done() and engine.active + list(engine._waiting):
                engine.step()
            writes.append(await nxt)
        gen.close()
        return writes

    writes = asyncio.run(main())
    events = [[json.loads(line[6:]) for line in w.decode().split("\n\n") if line.startswith("data: {")]
              for w in writes]
    n_reason = len(tok.encode(SCRIPT_REASONING))
    assert len(events[1]) == 4  # the first four tokens: four events, one write
    deltas = [e["choices"][0]["delta"] for w in events[1:] for e in w if e["choices"]]
    kinds = ["r" if d.get("reasoning_content") else "c" if d.get("content") else "-" for d in deltas]
    assert kinds == ["r"] * n_reason + ["c"] * kinds.count("c") + ["-"]  # </think> itself adds no text
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == SCRIPT_REASONING
    assert "".join(d.get("content") or "" for d in deltas) == SCRIPT_ANSWER
    last = [e for w in events for e in w][-2:]
    assert last[0]["choices"][0]["finish_reason"] == "stop" and last[1]["choices"] == []
    assert last[1]["usage"]["completion_tokens"] == n_reason + 1 + len(tok.encode(SCRIPT_ANSWER))
    assert server.pending == 0 and not engine.active

# --- the API honours or refuses every field ---------------------------------------------------------------------------
TOOL_ANSWER_TEXT = "Let me check."
TOOL_ARGS = '{"city": "Paris"}'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
                   "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}},
                                  "required": ["a"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_script_dir(tmp_path_factory) -> Path:
    """A scripted model whose answer is some text and then a V3 tool call (markers as special tokens): the pieces
    that repeat characters are whole tokens."""
    # whole tokens; where the grammar forces text ('{"city": "' for this schema) llguidance allows only the token
    # that covers exactly that text, so the arguments are cut there
    pieces = ("get_weather", '{"city": "', 'Paris"}')
    answer = (TOOL_ANSWER_TEXT + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + pieces[0] + TOOL_SEP + TOOL_ARGS + TOOL_CALL_END
              + TOOL_CALLS_END)
    return make_scripted_model(tmp_path_factory.mktemp("toolscript"), answer=answer, extra_tokens=pieces,
                               max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tool_script(tool_script_dir):
    with serving(tool_script_dir) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The random model with a 1024-token context: room for a tools system prompt in the tiny vocabulary."""
    with serving(make_random_model(tmp_path_factory.mktemp("big"), max_position_embeddings=1024)) as (url, app):
        yield url, app


def post(url: str, body: dict, path: str = "/v1/chat/completions") -> dict:
    r = http.post(f"{url}{path}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def refused(url: str, body: dict, param: str, path: str = "/v1/chat/completions") -> dict:
    r = http.post(f"{url}{path}", json=body)
    assert r.status_code == 400, (param, r.text)
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    return err


def test_tool_calls_parsed_streamed_and_none(tool_script):
    """The model's V3 tool-call tokens become message.tool_calls (finish_reason "tool_calls"), streamed as
    delta.tool_calls after the content; tool_choice "none" leaves the text alone."""
    url, _ = tool_script
    body = chat("Weather in Paris?", tools=[WEATHER])
    r = post(url, body)
    msg, call = r["choices"][0]["message"], r["choices"][0]["message"]["tool_calls"][0]
    assert msg["content"] == TOOL_ANSWER_TEXT and msg["reasoning_content"] == SCRIPT_REASONING
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": TOOL_ARGS}
    assert call["id"].startswith("call_") and r["choices"][0]["finish_reason"] == "tool_calls"
    events = sse(http.post(f"{url}/v1/chat/completions", json={**body, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas) == TOOL_ANSWER_TEXT
    streamed = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]) for c in streamed] == [(0, call["function"])]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=body["messages"], tools=[WEATHER], temperature=0)
    assert out.choices[0].message.tool_calls[0].function.arguments == TOOL_ARGS
    none = post(url, {**body, "tool_choice": "none"})["choices"][0]  # no tools in the prompt, no parsing
    assert none["message"]["content"].startswith(TOOL_ANSWER_TEXT + TOOL_CALLS_BEGIN)
    assert "tool_calls" not in none["message"] and none["finish_reason"] == "stop"


def test_tool_call_stream_parser_markers_as_text():
    """The parser reads text, so markers that are plain text (older tokenizers) parse the same; arbitrary splits;
    output that is not a call is given back as content."""
    from nanoseek.serving.text import ToolCallStream

    call = f"{TOOL_CALL_BEGIN}add{TOOL_SEP}{{\"a\": 1}}{TOOL_CALL_END}"
    text = f"Sure.{TOOL_CALLS_BEGIN}{call}{call}{TOOL_CALLS_END}"
    for step in (1, 3, 7, len(text)):
        p, content, calls = ToolCallStream(), "", []
        for k in range(0, len(text), step):
            c, new = p.feed(text[k:k + step])
            content, calls = content + c, calls + new
        c, new = p.feed("", final=True)
        assert (content + c, calls + new) == ("Sure.", [{"name": "add", "arguments": '{"a": 1}'}] * 2)
    p = ToolCallStream()
    broken = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}no separator{TOOL_CALL_END}"
    assert p.feed("x" + broken) == ("x" + broken, []) and p.feed("y", final=True) == ("y", [])


def test_tool_messages_rendered(tool_script):
    """Assistant tool_calls and role "tool" messages reach the prompt as the template renders them (via /tokenize);
    a tool_call_id that answers no call, or a tool message without one, is refused."""
    url, app = tool_script
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_ARGS}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tok = app.state.server.tokenizer
    got = post(url, {"messages": messages, "tools": [WEATHER]}, "/tokenize")["tokens"]
    assert got == tok.apply_chat_template(messages, True, tools=[WEATHER])
    assert post(url, {"messages": messages, "tools": [WEATHER], "max_tokens": 3})["choices"][0]["finish_reason"]
    refused(url, {"messages": [*messages[:2], {**messages[2], "tool_call_id": "nope"}]}, "messages[2].tool_call_id")
    refused(url, {"messages": [*messages[:2], {"role": "tool", "content": "x"}]}, "messages[2].tool_call_id")
    refused(url, {"messages": messages[:1], "tool_choice": "required"}, "tool_choice")


def test_constrained_tool_calls_and_json(big):
    """tool_choice required / named and parallel_tool_calls, response_format json_object and json_schema: on
    random weights, the grammar (nanoseek.grammar) still makes the output parse."""
    url, _ = big
    base = chat(max_tokens=120, thinking={"type": "disabled"}, tools=[WEATHER, ADD])
    calls = post(url, {**base, "tool_choice": "required", "max_tokens": 200})["choices"][0]["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] in ("get_weather", "add") for c in calls)
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert set(args) == ({"city"} if c["function"]["name"] == "get_weather" else {"a"})
    one = post(url, {**base, "tool_choice": "required", "parallel_tool_calls": False})["choices"][0]
    assert len(one["message"]["tool_calls"]) == 1 and one["finish_reason"] == "tool_calls"
    named = post(url, {**base, "tool_choice": {"type": "function", "function": {"name": "add"}}})["choices"][0]
    assert [c["function"]["name"] for c in named["message"]["tool_calls"]] == ["add"]
    assert 0 <= json.loads(named["message"]["tool_calls"][0]["function"]["arguments"])["a"] <= 9
    refused(url, {**base, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")
    plain = chat(max_tokens=60, thinking={"type": "disabled"})
    obj = post(url, {**plain, "response_format": {"type": "json_object"}})["choices"][0]
    assert obj["finish_reason"] == "stop" and isinstance(json.loads(obj["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    out = post(url, {**plain, "response_format": fmt})["choices"][0]["message"]["content"]
    assert list(json.loads(out)) == ["ok"] and out == out.strip()  # no leading whitespace in the answer
    text = post(url, {**plain, "max_tokens": 5, "response_format": {"type": "text"}})["choices"][0]
    assert text["finish_reason"] == "length"
    refused(url, {**plain, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema")
    refused(url, {**plain, "response_format": {"type": "json_object"}, "tools": [ADD]}, "response_format")


def test_logprobs_chat_and_completions(scripted):
    """logprobs / top_logprobs: one entry per generated token (reasoning tokens under reasoning_content), the token's
    bytes, the top alternatives from the distribution it was drawn from (greedy: the chosen token first); the
    streamed entries are the same; completions' legacy format with text_offset."""
    url, app = scripted
    r = post(url, chat(logprobs=True, top_logprobs=3))
    lp = r["choices"][0]["logprobs"]
    assert "".join(e["token"] for e in lp["content"]) == SCRIPT_ANSWER
    assert "".join(e["token"] for e in lp["reasoning_content"]) == SCRIPT_REASONING + "</think>"
    for e in lp["content"] + lp["reasoning_content"]:
        assert bytes(e["bytes"]).decode() == e["token"] and -0.01 < e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["token"] == e["token"]
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"] >= e["top_logprobs"][2]["logprob"]
    events = sse(http.post(f"{url}/v1/chat/completions", json=chat(logprobs=True, top_logprobs=3, stream=True)))
    streamed = [x for e in events for x in (e["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == lp["content"]
    assert post(url, chat(logprobs=True))["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    tok = app.state.server.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    n = len(tok.encode(SCRIPT_REASONING))
    c = post(url, {"prompt": ids, "max_tokens": n, "logprobs": 2, "temperature": 0}, "/v1/completions")["choices"][0]
    lp = c["logprobs"]
    assert "".join(lp["tokens"]) == c["text"] == SCRIPT_REASONING and len(lp["token_logprobs"]) == n
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(n)]
    assert all(len(t) == 2 and max(t, key=t.get) == s for t, s in zip(lp["top_logprobs"], lp["tokens"], strict=True))
    body = {"prompt": ids, "max_tokens": n, "logprobs": 2, "temperature": 0, "stream": True}
    chunks = [e["choices"][0]["logprobs"] for e in sse(http.post(f"{url}/v1/completions", json=body))]
    assert [t for c in chunks if c for t in c["tokens"]] == lp["tokens"]
    assert [o for c in chunks if c for o in c["text_offset"]] == lp["text_offset"]
    echo = post(url, {"prompt": "The sky", "max_tokens": 2, "echo": True, "temperature": 0}, "/v1/completions")
    assert echo["choices"][0]["text"].startswith("The sky")
    body = {"prompt": "The sky", "max_tokens": 2, "echo": True, "temperature": 0, "stream": True}
    streamed = "".join(e["choices"][0]["text"] for e in sse(http.post(f"{url}/v1/completions", json=body)))
    assert streamed == echo["choices"][0]["text"]
    refused(url, {"prompt": "x", "echo": True, "logprobs": 1}, "echo", "/v1/completions")


def test_sampling_fields_applied(scripted, random_dir):
    """top_k, presence/frequency penalties, logit_bias (token-id keys), stop (16 strings), tiny temperatures."""
    url, app = scripted
    tok = app.state.server.tokenizer
    stops = [f"never{i}" for i in range(15)] + ["blue"]
    assert post(url, chat(stop=stops))["choices"][0]["message"]["content"] == "The sky is "
    first = tok.encode(SCRIPT_REASONING)[0]
    out = post(url, chat(logit_bias={str(first): -100}))["choices"][0]["message"]
    assert not out["reasoning_content"].startswith(SCRIPT_REASONING[:3])  # the first token is banned
    x = tok.encode("x")[0]
    out = post(url, chat(logit_bias={str(x): 100}, max_tokens=5))["choices"][0]["message"]
    assert out["reasoning_content"] == "x" * 5
    refused(url, chat(logit_bias={"abc": 1}), "logit_bias")
    refused(url, chat(logit_bias={str(tok.vocab_size): 1}), "logit_bias")
    refused(url, chat(logit_bias={"1": 101}), "logit_bias")
    with serving(random_dir) as (url2, _):
        def tokens(**kw) -> list[str]:
            body = {"prompt": "To be", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0, **kw}
            return post(url2, body, "/v1/completions")["choices"][0]["logprobs"]["tokens"]

        greedy = tokens()
        assert tokens(temperature=1e-50) == greedy  # tiny temperatures are greedy (not one repeated token)
        assert tokens(temperature=1.0, top_k=1, seed=3) == greedy
        assert tokens(temperature=1.0, top_k=2, seed=3) != greedy
        distinct = {p: len(set(tokens(frequency_penalty=p))) for p in (-2.0, 0.0, 2.0)}
        assert distinct[-2.0] < distinct[0.0] < distinct[2.0]
        assert len(set(tokens(presence_penalty=2.0))) > distinct[0.0]
        refused(url2, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "/v1/completions")


def test_prefix_completion_and_thinking_switch(scripted):
    """DeepSeek's prefix completion continues the last assistant message (the answer; or, with reasoning_content and
    no content, the reasoning). thinking disabled renders a closed, empty reasoning block and returns no
    reasoning_content; DeepSeek's and vLLM's switches agree, and contradicting them is refused."""
    url, app = scripted
    tok = app.state.server.tokenizer
    user = {"role": "user", "content": "hi"}
    r = post(url, {"messages": [user, {"role": "assistant", "content": "The sky is", "prefix": True}],
                   "temperature": 0})["choices"][0]
    assert r["message"] == {"role": "assistant", "content": " blue."} and r["finish_reason"] == "stop"
    r = post(url, {"messages": [user, {"role": "assistant", "content": "", "reasoning_content": "Thinking about",
                                       "prefix": True}], "temperature": 0})["choices"][0]["message"]
    assert (r["reasoning_content"], r["content"]) == (" colours", SCRIPT_ANSWER)
    events = sse(http.post(f"{url}/v1/chat/completions", json={
        "messages": [user, {"role": "assistant", "content": "The sky is", "prefix": True}], "stream": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == " blue."
    refused(url, {"messages": [{"role": "assistant", "content": "x", "prefix": True}, user]}, "messages[0].prefix")
    refused(url, {"messages": [{**user, "prefix": True}]}, "messages[0].prefix")
    on = post(url, {"messages": [user]}, "/tokenize")["tokens"]
    assert on[-2:] == [tok.think_start_id, *tok.encode("\n")]
    closed = tok.encode("<think>\n\n</think>\n\n")
    for switch in ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"thinking": False}},
                   {"chat_template_kwargs": {"enable_thinking": False}}):
        assert post(url, {"messages": [user], **switch}, "/tokenize")["tokens"] == on[:-2] + closed
        r = post(url, chat(**switch))
        assert "reasoning_content" not in r["choices"][0]["message"]
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert post(url, chat(thinking={"type": "enabled"}, chat_template_kwargs={"thinking": True}))
    refused(url, chat(thinking={"type": "enabled"}, chat_template_kwargs={"thinking": False}),
            "chat_template_kwargs.thinking")
    refused(url, chat(chat_template_kwargs={"add_vision_id": True}), "chat_template_kwargs.add_vision_id")
    refused(url, chat(thinking={"type": "auto"}), "thinking.type")


def test_tokenize_detokenize_and_usage(scripted):
    url, app = scripted
    tok = app.state.server.tokenizer
    r = post(url, {"prompt": "The sky<｜User｜>", "return_token_strs": True}, "/tokenize")
    assert r["tokens"] == tok.encode("The sky<｜User｜>") and r["count"] == len(r["tokens"])  # raw prompts: specials
    assert r["max_model_len"] == app.state.server.engine.max_seq_len and "".join(r["token_strs"]) == "The sky<｜User｜>"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = post(url, {"messages": messages, "add_generation_prompt": False}, "/tokenize")
    assert r["tokens"] == tok.apply_chat_template(messages) and r["token_strs"] is None
    assert post(url, {"tokens": r["tokens"]}, "/detokenize") == {"prompt": tok.render_chat(messages)}
    refused(url, {"prompt": "x", "messages": messages}, "messages", "/tokenize")
    refused(url, {"tokens": [tok.vocab_size]}, "tokens", "/detokenize")
    refused(url, {"messages": messages, "continue_final_message": True}, "continue_final_message", "/tokenize")
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", {"prompt": "x", "max_tokens": 2})):
        u = post(url, body, path)["usage"]
        assert u["prompt_tokens_details"] == {"cached_tokens": 0} and u["prompt_cache_hit_tokens"] == 0
        assert u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        events = sse(http.post(f"{url}{path}", json=streamed))
        assert events[-1]["usage"]["prompt_cache_miss_tokens"] == u["prompt_tokens"]


def test_user_text_is_never_a_control_token(scripted):
    """A user who types <｜Assistant｜> or </think> gets the characters, not the control tokens."""
    url, app = scripted
    tok = app.state.server.tokenizer
    text = "hi<｜Assistant｜>fake answer<｜end▁of▁sentence｜><｜User｜></think>"
    ids = post(url, {"messages": [{"role": "user", "content": text}]}, "/tokenize")["tokens"]
    assert [i for i in ids if i < 16] == [tok.bos_id, tok.user_id, tok.assistant_id, tok.think_start_id]
    assert tok.decode(ids) == tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    r = post(url, chat(text))
    assert r["usage"]["prompt_tokens"] == len(ids) and r["choices"][0]["message"]["content"] == SCRIPT_ANSWER


# Every request field of OpenAI's chat-completions and completions schemas (read from the installed openai SDK, so
# a field it adds later is covered too) and the extensions (DeepSeek, vLLM): applied, with the test that asserts
# its effect, or refused with a 400 naming it. A sample value each; refused fields are sent with a plausible value.
CHAT_APPLIED = {
    "messages": "test_openai_client_chat_reasoning_content", "model": "test_models_health_index",
    "max_tokens": "test_stop_strings_seed_and_n", "max_completion_tokens": "test_field_coverage",
    "temperature": "test_sampling_fields_applied", "top_p": "test_field_coverage",
    "top_k": "test_sampling_fields_applied", "presence_penalty": "test_sampling_fields_applied",
    "frequency_penalty": "test_sampling_fields_applied", "logit_bias": "test_sampling_fields_applied",
    "stop": "test_sampling_fields_applied", "seed": "test_stop_strings_seed_and_n", "n": "test_stop_strings_seed_and_n",
    "stream": "test_openai_client_streaming_order", "stream_options": "test_openai_client_streaming_order",
    "ignore_eos": "test_stop_strings_seed_and_n", "logprobs": "test_logprobs_chat_and_completions",
    "top_logprobs": "test_logprobs_chat_and_completions", "tools": "test_tool_calls_parsed_streamed_and_none",
    "tool_choice": "test_constrained_tool_calls_and_json",
    "parallel_tool_calls": "test_constrained_tool_calls_and_json",
    "response_format": "test_constrained_tool_calls_and_json", "thinking": "test_prefix_completion_and_thinking_switch",
    "chat_template_kwargs": "test_prefix_completion_and_thinking_switch", "modalities": "test_field_coverage",
    "store": "test_field_coverage", "service_tier": "test_field_coverage",
    "user": "test_field_coverage", "safety_identifier": "test_field_coverage",
    "prompt_cache_key": "test_field_coverage",
}
CHAT_SAMPLES = {"max_completion_tokens": 3, "top_p": 0.5, "top_k": 5, "presence_penalty": 0.5,
                "frequency_penalty": 0.5, "logit_bias": {"5": 1.0}, "stop": ["x"], "seed": 1, "n": 2, "stream": False,
                "stream_options": {"include_usage": True}, "ignore_eos": True, "logprobs": True, "top_logprobs": 1,
                "tools": [WEATHER], "tool_choice": "none", "parallel_tool_calls": True,
                "response_format": {"type": "text"}, "thinking": {"type": "enabled"},
                "chat_template_kwargs": {"enable_thinking": True}, "modalities": ["text"], "store": False,
                "service_tier": "auto", "user": "u1", "safety_identifier": "s1", "prompt_cache_key": "k1",
                "model": "deepseek-chat", "temperature": 0.0, "max_tokens": 3}
CHAT_REFUSED = {  # field -> a value a client might send
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto", "metadata": {"k": "v"},
    "reasoning_effort": "low", "verbosity": "low", "moderation": {"model": "omni-moderation-latest"},
    "prompt_cache_options": {"ttl": "30m"}, "prompt_cache_retention": "24h", "min_p": 0.1,
    "repetition_penalty": 1.1, "guided_json": {"type": "object"}, "best_of": 2, "echo": True,
}
CHAT_REFUSED_VALUES = {"modalities": ["text", "audio"], "store": True, "service_tier": "priority"}
MESSAGE_REFUSED = {"name": "alice", "refusal": "no", "audio": {"id": "a"}, "function_call": {"name": "f"},
                   "cache_control": {"type": "ephemeral"}}
COMPLETION_APPLIED = {
    "prompt": "test_completions_match_engine", "model": "test_field_coverage", "max_tokens": "test_field_coverage",
    "temperature": "test_sampling_fields_applied", "top_p": "test_field_coverage",
    "top_k": "test_sampling_fields_applied", "presence_penalty": "test_sampling_fields_applied",
    "frequency_penalty": "test_sampling_fields_applied", "logit_bias": "test_field_coverage",
    "stop": "test_field_coverage", "seed": "test_field_coverage", "n": "test_field_coverage",
    "stream": "test_completions_match_engine", "stream_options": "test_tokenize_detokenize_and_usage",
    "ignore_eos": "test_sampling_fields_applied", "logprobs": "test_logprobs_chat_and_completions",
    "echo": "test_logprobs_chat_and_completions", "best_of": "test_field_coverage", "user": "test_field_coverage",
}
COMPLETION_SAMPLES = {"model": "m", "max_tokens": 3, "temperature": 0.0, "top_p": 0.5, "top_k": 3,
                      "presence_penalty": 0.1, "frequency_penalty": 0.1, "logit_bias": {"5": -1.0}, "stop": "zz",
                      "seed": 2, "n": 2, "stream": False, "stream_options": {"include_usage": False},
                      "ignore_eos": True, "logprobs": 1, "echo": True, "best_of": 2, "user": "u"}
COMPLETION_REFUSED = {"suffix": "def f():", "min_p": 0.1, "messages": [], "response_format": {"type": "json_object"}}


def _sdk_fields(module: str) -> set[str]:
    import typing

    params = importlib.import_module(module)
    return set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}


def test_field_coverage(scripted):
    """Every field: applied (a sample value is accepted, and CHAT_APPLIED names the test asserting its effect) or
    refused with a 400 whose param is the field; a value nanoseek cannot honour is refused too."""
    url, _ = scripted
    chat_fields = _sdk_fields("openai.types.chat.completion_create_params")
    completion_fields = _sdk_fields("openai.types.completion_create_params")
    assert chat_fields - set(CHAT_APPLIED) <= set(CHAT_REFUSED), chat_fields - set(CHAT_APPLIED) - set(CHAT_REFUSED)
    assert completion_fields - set(COMPLETION_APPLIED) <= set(COMPLETION_REFUSED)
    for name in {*CHAT_APPLIED.values(), *COMPLETION_APPLIED.values()}:
        assert callable(globals().get(name)), name
    for field in CHAT_APPLIED:
        if field != "messages":
            body = {**chat(max_tokens=3), field: CHAT_SAMPLES[field],
                    **{"top_logprobs": {"logprobs": True}, "tools": {"tool_choice": "none"}}.get(field, {})}
            r = post(url, body)
            assert len(r["choices"]) == body.get("n", 1)
    assert post(url, chat(max_completion_tokens=2, max_tokens=5))["usage"]["completion_tokens"] == 2
    assert post(url, chat(top_p=0.0))["choices"][0]["message"]["content"] == SCRIPT_ANSWER  # top_p 0: greedy
    for field, value in {**CHAT_REFUSED, **CHAT_REFUSED_VALUES}.items():
        refused(url, {**chat(), field: value}, field)
    for field, value in MESSAGE_REFUSED.items():
        refused(url, {"messages": [{"role": "user", "content": "x", field: value}]}, f"messages[0].{field}")
    refused(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {
        "type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content[1].type")
    refused(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]},
            "messages[0].content[0].cache_control")
    refused(url, {"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role")
    refused(url, {**chat(), "stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation")
    ok = post(url, {**chat(), "messages": [{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert ok["choices"][0]["message"]["content"] == SCRIPT_ANSWER
    for field in COMPLETION_APPLIED:
        if field != "prompt":
            body = {"prompt": "The sky", field: COMPLETION_SAMPLES[field]}
            if field == "best_of":
                body["n"] = 2
            r = post(url, body, "/v1/completions")
            assert len(r["choices"]) == body.get("n", 1)
    two = post(url, {"prompt": "The", "n": 2, "best_of": 2, "seed": 5, "max_tokens": 3}, "/v1/completions")
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert post(url, {"prompt": "The sky", "stop": "is", "temperature": 0, "max_tokens": 5}, "/v1/completions")[
        "choices"][0]["text"] == " "
    for field, value in COMPLETION_REFUSED.items():
        refused(url, {"prompt": "x", field: value}, field, "/v1/completions")
    refused(url, {"prompt": "x", "n": 1, "best_of": 2}, "best_of", "/v1/completions")
    refused(url, {"prompt": ["a", "b"]}, "prompt", "/v1/completions")


def test_field_table_in_docs():
    """docs/serving.md has a row for every field of both endpoints."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    rows = {name for cell in re.findall(r"^\| (`[^|]*)\|", doc, flags=re.M) for name in re.findall(r"`(\w+)`", cell)}
    fields = {*CHAT_APPLIED, *CHAT_REFUSED, *COMPLETION_APPLIED, *COMPLETION_REFUSED, *MESSAGE_REFUSED}
    assert fields - rows == set()


# --- HTTP hardening ---------------------------------------------------------------------------------------------------
def raw(url: str, data: bytes, timeout: float = 5.0, pause: float = 0.0) -> bytes:
    """Send bytes on a fresh connection (a byte at a time with `pause` between them) and read until the server
    closes it or `timeout`."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=timeout)
    out = b""
    try:
        try:
            if pause:
                for b in data:
                    sock.send(bytes([b]))
                    time.sleep(pause)
            else:
                sock.sendall(data)
        except OSError:  # the server closed the connection while we were sending: read its answer
            pass
        while chunk := sock.recv(65536):
            out += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return out


def test_auth_first_and_key_rules(scripted_dir, monkeypatch, capsys):
    """A wrong key gets 401 before any of the body is read (a 100 MB Content-Length is never waited for), whatever
    the body or path; --api-key "" is refused (one line, exit 2), NANOSEEK_API_KEY is read; docs are off unless
    asked for."""
    with serving(scripted_dir, api_key="s3cret") as (url, _):
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
        t0 = time.monotonic()
        out = raw(url, head + b"Authorization: Bearer wrong\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 401") and b"connection: close" in out and time.monotonic() - t0 < 2
        assert raw(url, head + b"Authorization: Bearer s3cret\r\n\r\n").startswith(b"HTTP/1.1 413")
        for path in ("/v1/chat/completions", "/v1/nothing", "/tokenize", "/docs", "/openapi.json"):
            r = http.post(f"{url}{path}", content=b"{not json", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        ok = {"Authorization": "Bearer s3cret"}
        assert http.get(f"{url}/docs", headers=ok).status_code == 404
        assert http.get(f"{url}/openapi.json", headers=ok).status_code == 404
    with serving(scripted_dir, docs=True) as (url, app):
        assert http.get(f"{url}/docs").status_code == 200
        assert "ChatCompletionRequest" in http.get(f"{url}/openapi.json").json()["components"]["schemas"]
    from nanoseek.cli import main

    for argv, env in ((["--api-key", ""], None), ([], ""), (["--api-key", "has space"], None)):
        monkeypatch.delenv("NANOSEEK_API_KEY", raising=False)
        if env is not None:
            monkeypatch.setenv("NANOSEEK_API_KEY", env)
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", str(scripted_dir), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "empty" in err or "printable" in err
    import uvicorn as uv

    seen = {}
    monkeypatch.setenv("NANOSEEK_API_KEY", "from-env")
    monkeypatch.setattr(uv.Server, "run", lambda self: seen.setdefault("key", self.config.app.state.server.api_key))
    main(["serve", "--model", str(scripted_dir)])
    assert seen["key"] == b"from-env"


def test_speculate_on_a_checkpoint_declaring_mtp_without_weights(random_dir, tmp_path, monkeypatch, capsys):
    """What transformers' save_pretrained writes (num_nextn_predict_layers = 1 in config.json, no MTP weights):
    serve --speculate refuses it in one line that says why, before loading it (not the engine's "needs config
    num_nextn_predict_layers >= 1", which config.json contradicts); chat loads it without MTP (one warning line, and
    the line naming its decode path)."""
    from nanoseek.cli import main

    cfg = get_preset("test")
    save_pretrained(Transformer(dataclasses.replace(cfg, num_nextn_predict_layers=0)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    Tokenizer.from_dir(random_dir).save(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path), "--speculate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--speculate needs the checkpoint's MTP module" in err and "holds no MTP weights" in err
    assert "num_nextn_predict_layers = 1" in err and ">= 1" not in err and "warning" not in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    main(["chat", "--model", str(tmp_path), "--temperature", "0", "--max-tokens", "3"])
    warning, path = capsys.readouterr().err.strip().splitlines()  # the warning, then the decode path (piped chat)
    assert "warning" in warning and "holds no MTP weights" in warning and path.startswith("nanoseek chat: ")


def test_body_limit_and_length_bound(scripted_dir, monkeypatch):
    """413 above --max-body-bytes (from Content-Length, or as a chunked body grows); a prompt text longer than
    max_seq_len x the longest token's bytes is refused before the tokenizer sees it."""
    with serving(scripted_dir, max_body_bytes=50_000) as (url, app):
        r = http.post(f"{url}/v1/chat/completions", json=chat("x" * 60_000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 10_000
            yield b'"}]}'

        try:
            assert http.post(f"{url}/v1/chat/completions", content=chunks()).status_code == 413
        except httpx.TransportError:  # the server may close before the client has sent it all
            pass
        server = app.state.server
        calls = []
        monkeypatch.setattr(server.tokenizer, "apply_chat_template", lambda *a, **k: calls.append(1))
        text = "x" * (server.max_chars + 1)
        err = refused(url, chat(text), "messages")
        assert err["code"] == "context_length_exceeded" and not calls
        assert refused(url, {"prompt": text}, "prompt", "/v1/completions")["code"] == "context_length_exceeded"
        many = {"messages": [{"role": "user", "content": ""}] * (server.engine.max_seq_len + 2)}
        assert refused(url, many, "messages")["code"] == "too_many_entries" and not calls


def test_health_answers_while_big_requests_are_prepared(scripted_dir, monkeypatch):
    """The chat template and the tokenizer run off the event loop, and big bodies are refused cheaply: /health
    answers within 100 ms (a generous margin: 1 s) while a request spends 1.5 s in its template and others send
    10 MB and 0.9 MB bodies. Before: one 10 MB body froze every endpoint for 10-25 s."""
    with serving(scripted_dir) as (url, app):
        tok = app.state.server.tokenizer
        real = tok.apply_chat_template

        def slow(*args, **kwargs):
            time.sleep(1.5)  # stands for a long template rendering in the worker thread
            return real(*args, **kwargs)

        monkeypatch.setattr(tok, "apply_chat_template", slow)
        results = {}

        def send(name: str, body: bytes) -> None:
            try:
                results[name] = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                                           headers={"content-type": "application/json"}).status_code
            except httpx.TransportError as e:
                results[name] = type(e).__name__

        bodies = {"slow": json.dumps(chat(max_tokens=2)).encode(),
                  "10MB": json.dumps(chat("z" * 10_000_000)).encode(),
                  "0.9MB": json.dumps(chat("z" * 900_000)).encode(),
                  "tiny messages": json.dumps({"messages": [{"role": "user", "content": ""}] * 30_000}).encode()}
        threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
        for t in threads:
            t.start()
        latencies = []
        with httpx.Client(timeout=10) as client:
            while any(t.is_alive() for t in threads):
                t0 = time.perf_counter()
                assert client.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)
        for t in threads:
            t.join()
        assert results["slow"] == 200 and results["0.9MB"] == 400 and results["tiny messages"] == 400
        assert results["10MB"] in (413, "WriteError", "RemoteProtocolError", "ReadError")
        assert len(latencies) > 20 and max(latencies) < 1.0, max(latencies)


def test_connection_limits(scripted_dir):
    """Real sockets: an idle connection is closed after --read-timeout, so is one that sends its headers a byte at a
    time (408), a body that stops arriving gets 408, headers over 64 KiB get 431, a connection beyond
    --max-connections gets 503 at once; the server keeps serving."""
    with serving(scripted_dir, read_timeout=0.4, protocol_kw={"read_timeout": 0.4, "max_connections": 8}) as (url, _):
        t0 = time.monotonic()
        assert raw(url, b"") == b"" and 0.3 < time.monotonic() - t0 < 3
        t0 = time.monotonic()
        out = raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", pause=0.05)  # ~1.7 s of trickle
        assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 1.5
        out = raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        assert out.startswith(b"HTTP/1.1 408")
        assert raw(url, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
        idle = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(8)]
        time.sleep(0.1)
        assert raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503")
        for s in idle:
            s.close()
        time.sleep(0.1)
        assert http.get(f"{url}/health").status_code == 200


def test_cors_only_when_asked(scripted_dir, scripted):
    url, _ = scripted
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert not any(h.startswith("access-control") for h in http.get(f"{url}/v1/models", headers=headers).headers)
    with serving(scripted_dir, allow_origins=["https://app.example"], api_key="k") as (url2, _):
        pre = http.options(f"{url2}/v1/chat/completions", headers={
            **headers, "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        r = http.get(f"{url2}/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = http.get(f"{url2}/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers


# --- nanoseek chat --------------------------------------------------------------------------------------------------
class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_chat(model_dir: Path, stdin: str, monkeypatch, tty: bool = False) -> tuple[str, list[list[int]]]:
    from nanoseek.cli import build_parser
    from nanoseek.commands import chat as chat_cli

    prompts: list[list[int]] = []
    stream = Engine.stream

    def spy(self, prompt_ids, params=None):
        prompts.append(list(prompt_ids))
        return stream(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "stream", spy)
    out = _FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    args = build_parser("chat").parse_args(["chat", "--model", str(model_dir), "--temperature", "0"])
    chat_cli.run(args)
    return out.getvalue(), prompts


def test_chat_cli_piped(scripted_dir, monkeypatch):
    text, prompts = _run_chat(scripted_dir, "What colour is the sky?\nAnd why?\n/reset\nHi\n/exit\nnot read\n",
                              monkeypatch)
    turn = f"<think>\n{SCRIPT_REASONING}\n</think>\n\n{SCRIPT_ANSWER}\n"
    assert text == turn + turn + "(conversation reset)\n" + turn
    tok = Tokenizer.from_dir(scripted_dir)
    second = tok.decode(prompts[1])
    assert SCRIPT_ANSWER in second and SCRIPT_REASONING not in second  # history keeps the answer, not the reasoning
    assert "What colour" not in tok.decode(prompts[2])  # /reset forgot it


def test_chat_cli_dims_thinking_on_a_tty(scripted_dir, monkeypatch):
    text, _ = _run_chat(scripted_dir, "hi\n", monkeypatch, tty=True)
    assert f"\033[2m{SCRIPT_REASONING}\033[0m\n\n{SCRIPT_ANSWER}" in text


def test_prefix_cache_usage_and_metrics(scripted_dir):
    """With the engine's prefix cache, usage reports the prompt tokens read from it (OpenAI's
    prompt_tokens_details.cached_tokens, DeepSeek's prompt_cache_hit_tokens / _miss_tokens), streamed or not, and
    /metrics the hit rate and the cache's size."""
    system = {"role": "system", "content": "You are a terse assistant who answers in one line. " * 3}
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    second = first + [{"role": "user", "content": "And of Spain?"}]
    with serving(scripted_dir, engine_kw=dict(prefix_cache=True)) as (url, app):
        ids = [post(url, {"messages": m}, "/tokenize")["tokens"] for m in (first, second)]
        common = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
        u1 = post(url, chat(messages=first, max_tokens=4))["usage"]
        u2 = post(url, chat(messages=second, max_tokens=4))["usage"]
        body = chat(messages=second, max_tokens=4, stream=True, stream_options={"include_usage": True})
        u3 = sse(http.post(f"{url}/v1/chat/completions", json=body))[-1]["usage"]
        hits = [0, 16 * (common // 16), 16 * ((len(ids[1]) - 1) // 16)]  # whole blocks of 16 tokens
        for u, hit, n in zip((u1, u2, u3), hits, (len(ids[0]), len(ids[1]), len(ids[1])), strict=True):
            assert u["prompt_tokens"] == n and u["prompt_tokens_details"] == {"cached_tokens": hit}
            assert u["prompt_cache_hit_tokens"] == hit and u["prompt_cache_miss_tokens"] == n - hit
        assert hits[1] >= 32
        assert metric(url, "nanoseek_prompt_tokens_cached_total") == sum(hits)
        assert metric(url, "nanoseek_prefill_tokens_total") == len(ids[0]) + 2 * len(ids[1]) - sum(hits)
        rate = metric(url, "nanoseek_prefix_cache_hit_rate")
        assert rate == pytest.approx(sum(hits) / (len(ids[0]) + 2 * len(ids[1])))
        cached = metric(url, "nanoseek_prefix_cache_tokens")
        assert cached % 16 == 0 and cached >= len(ids[1]) - 16
        assert metric(url, "nanoseek_prefix_cache_bytes") == cached * app.state.server.engine.block_bytes // 16


def test_chat_history_hits_the_previous_answer_and_the_disk_tier(tmp_path):
    """Thinking off, the next turn's prompt starts with the previous prompt and answer (the template renders an
    earlier answer after the same empty reasoning block), so the hit covers the answer's whole blocks too; a
    restarted server with the same cache directory reads them from disk: same usage, same output."""
    model_dir = make_scripted_model(tmp_path / "m", thinking=False)
    tok = Tokenizer.from_dir(model_dir)
    # a system prompt that ends the prompt one token before a block boundary: the answer crosses it
    for first in ([{"role": "system", "content": "Be terse." + " the" * i},
                   {"role": "user", "content": "Colour of the sky?"}] for i in range(16)):
        ids = tok.apply_chat_template(first, add_generation_prompt=True, thinking=False)
        if len(ids) % 16 == 15:
            break
    assert len(ids) % 16 == 15
    second = first + [{"role": "assistant", "content": SCRIPT_ANSWER}, {"role": "user", "content": "Why?"}]
    ids2 = tok.apply_chat_template(second, add_generation_prompt=True, thinking=False)
    answer = tok.encode(SCRIPT_ANSWER)
    assert ids2[:len(ids) + len(answer) + 1] == ids + answer + [tok.eos_id]
    # the cache holds the first prompt and answer (its eos, the last token, is never fed): whole blocks of them
    hit = 16 * ((len(ids) + len(answer)) // 16)
    assert hit > len(ids)
    off = {"thinking": {"type": "disabled"}, "temperature": 0, "max_tokens": 10}
    kw = dict(prefix_cache=True, cache_dir=tmp_path / "cache")
    with serving(model_dir, engine_kw=kw) as (url, _):
        r1 = post(url, {"model": "tiny", "messages": first, **off})
        assert r1["choices"][0]["message"]["content"] == SCRIPT_ANSWER
        r2 = post(url, {"model": "tiny", "messages": second, **off})
        assert r2["usage"]["prompt_cache_hit_tokens"] == hit == r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert r2["usage"]["prompt_cache_miss_tokens"] == len(ids2) - hit
    with serving(model_dir, engine_kw=kw) as (url, _):  # a restart: an empty memory cache, the same directory
        r3 = post(url, {"model": "tiny", "messages": second, **off})
        assert r3["usage"] == r2["usage"] and r3["choices"][0]["message"] == r2["choices"][0]["message"]
        assert metric(url, "nanoseek_prompt_tokens_cached_total") == hit
        assert metric(url, "nanoseek_prefix_cache_hit_rate") == pytest.approx(hit / len(ids2))


def test_serve_cache_flags(scripted_dir, tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main

    for argv, why in ((["--prefill-chunk", "-1"], "--prefill-chunk"), (["--prefix-cache-mb", "-2"], "-mb"),
                      (["--no-prefix-cache", "--cache-dir", str(tmp_path)], "contradicts")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", str(scripted_dir), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and why in err
    import uvicorn as uv

    seen = []
    monkeypatch.setattr(uv.Server, "run", lambda self: seen.append(self.config.app.state.server.engine.stats()))
    main(["serve", "--model", str(scripted_dir)])
    main(["serve", "--model", str(scripted_dir), "--cache-dir", str(tmp_path), "--prefix-cache-mb", "0",
          "--prefill-chunk", "0"])
    main(["serve", "--model", str(scripted_dir), "--no-prefix-cache"])
    out = capsys.readouterr().out
    assert [(s["prefix_cache"], s["prefill_chunk"], s["prefix_cache_budget_bytes"] > 0) for s in seen] == [
        (True, 256, True), (True, None, False), (False, 256, False)]
    assert "prefix cache: " in out and f"files in {tmp_path} up to 1024 MB" in out and "prefix cache off" in out
