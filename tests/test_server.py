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
from nanoseek.chat import TextSplitter
from nanoseek.checkpoint import load_model
from nanoseek.engine import Engine
from nanoseek.server import create_app
from nanoseek.tokenizer import Tokenizer, train_tokenizer

SCRIPT_REASONING = "Thinking about colours"
SCRIPT_ANSWER = "The sky is blue."
http = httpx.Client(timeout=60)  # shared: creating a client (its TLS context) costs ~80 ms
CORPUS = Path(__file__).resolve().parents[1] / "nanoseek" / "corpus" / "tinyshakespeare" / "input.txt"


# --- checkpoints ----------------------------------------------------------------------------------------------------
def _texts() -> list[str]:
    return [CORPUS.read_text(encoding="utf-8")[:30000]] + [f"{SCRIPT_REASONING}. {SCRIPT_ANSWER}"] * 20


def make_random_model(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = get_preset("test")
    Transformer(cfg).save_pretrained(path)
    train_tokenizer(_texts(), vocab_size=cfg.vocab_size, out_dir=path)
    return path


def make_scripted_model(path: Path, reasoning: str = SCRIPT_REASONING, answer: str = SCRIPT_ANSWER,
                        extra_tokens: tuple[str, ...] = ()) -> Path:
    """A checkpoint whose greedy chat output is `reasoning</think>answer<eos>` for any prompt. `extra_tokens` are
    added to the vocabulary as whole tokens, so text that repeats characters (HTML) can still be one chain."""
    cfg = get_preset("test")
    tok = train_tokenizer(_texts(), vocab_size=cfg.vocab_size - len(extra_tokens), out_dir=path / "tokenizer")
    if extra_tokens:
        hf = tok._tok
        hf.add_tokens(list(extra_tokens))
        tok = Tokenizer(hf)
    prompt_end = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)[-1]
    chain = [prompt_end, *tok.encode(reasoning), tok.think_end_id, *tok.encode(answer), tok.eos_id]
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
    model.save_pretrained(path)  # replaces the directory, so the tokenizer is saved after it
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
            **kwargs):
    """Start uvicorn in a thread on a free loopback port; yields (base_url, app)."""
    engine = Engine(load_model(model_dir), max_batch_size=max_batch_size, max_seq_len=max_seq_len, **(engine_kw or {}))
    app = create_app(engine, Tokenizer.from_dir(model_dir), model_name="tiny", **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
    ("too many stops", chat(stop=["a", "b", "c", "d", "e"]), None),
    ("empty stop", chat(stop=""), None),
    ("seed huge", chat(seed=2**80), None),
    ("stream not bool", chat(stream="yes"), None),
    ("prompt too long", chat("the " * 400), "context_length_exceeded"),
    ("logprobs", chat(logprobs=True), None),
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
    from nanoseek.server import _ChunkTemplates, _sse

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
    from nanoseek.server import ChatCompletionRequest, Generation, Server

    tok = Tokenizer.from_dir(scripted_dir)
    engine = Engine(load_model(scripted_dir), max_batch_size=2)  # no loop thread: the test steps it
    server = Server(engine, tok, "tiny", api_key=None, max_queue=4, price_per_hour=0.0)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

    async def main() -> list[bytes]:
        server.loop = asyncio.get_running_loop()
        params = server.sampling(ChatCompletionRequest.model_validate(chat()), 50, len(ids), "messages")
        gen = Generation(server, ids, params, reasoning=True, stop=[])
        stream = server._stream(gen, {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                                      "model": "tiny"}, chat=True, usage=True)
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

# --- nanoseek chat --------------------------------------------------------------------------------------------------
class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_chat(model_dir: Path, stdin: str, monkeypatch, tty: bool = False) -> tuple[str, list[list[int]]]:
    from nanoseek import chat as chat_cli
    from nanoseek.cli import build_parser

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
