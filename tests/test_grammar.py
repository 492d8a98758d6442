"""Constrained decoding (grammar.py + the engine's mask): on the test preset with random weights, greedy and sampled
outputs parse as JSON / validate against their schema / parse as DeepSeek tool calls with valid arguments; the mask
forbids what it should; reasoning stays free until </think>; a complete grammar ends the request with "stop"; a dead
end ends it cleanly; with tokenizers that have the tool-call markers as special tokens and ones that do not."""

import json

import pytest
import torch

from nanoseek import NanoseekError, Transformer, get_preset
from nanoseek import grammar as G
from nanoseek.data import corpus_dir
from nanoseek.engine import Engine, SamplingParams
from nanoseek.tokenizer import SPECIAL_TOKENS, Tokenizer

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 2}},
    "required": ["name", "age", "ok", "tags"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                              "unit": {"enum": ["C", "F"]}},
             "required": ["city", "unit"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": False}}}]
PROMPTS = [[(13 * i + 7 * j) % 300 + 20 for j in range(n)] for i, n in enumerate([4, 9, 2, 15, 6, 11])]
THINK_END = 6


def _tokenizer(with_tool_tokens: bool) -> Tokenizer:
    """A 400-token byte-level BPE like train_tokenizer's, with DeepSeek's tool-call markers as special tokens (ids
    7..15) or without them (a tokenizer trained before they existed: the markers are plain text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20000]
    text += json.dumps({"name": "Ada", "age": 36, "ok": True, "tags": ["red", "green"], "city": "Oslo"}) * 50
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS + (G.TOOL_TOKENS if with_tool_tokens else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Tokenizer(hf)


@pytest.fixture(scope="module")
def toks():
    """{"special": markers as special tokens, "text": markers as text}; grammar.prepare() caches each once."""
    return {"special": _tokenizer(True), "text": _tokenizer(False)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("test", initializer_range=0.1)).eval()


def engine_for(model, **kw):
    return Engine(model, **{"max_batch_size": 8, "max_seq_len": 256, **kw})


def run(engine, requests):
    """Submit (prompt, params) pairs together, step until all end; the requests."""
    reqs = [engine.submit(p, params) for p, params in requests]
    while not all(r.finished for r in reqs):
        engine.step()
    return reqs


def text_of(tok, ids):
    return tok.decode(ids)  # special tokens kept: the tool-call markers are part of the syntax


def variants(constraint, n_seeds=4, **kw):
    """A greedy request and n_seeds sampled ones (temperature 1), each on its own prompt."""
    params = [SamplingParams(200, constraint=constraint, **kw)]
    params += [SamplingParams(200, temperature=1.0, seed=s, constraint=constraint, **kw) for s in range(n_seeds)]
    return [(PROMPTS[i % len(PROMPTS)], p) for i, p in enumerate(params)]


# --- the mask -------------------------------------------------------------------------------------------------------
def test_mask_forbids_what_it_should(toks):
    tok = toks["text"]
    state = G.json_object(tok).new_state()
    allowed = state.allowed()
    assert allowed.shape == (tok.vocab_size,)
    texts = {i: tok.decode([i]) for i in allowed.nonzero().flatten().tolist()}
    assert texts and all(t.lstrip(" \t\r\n").startswith("{") or t.strip(" \t\r\n") == "" for t in texts.values())
    assert tok.encode("{")[0] in texts and tok.encode("[")[0] not in texts and tok.eos_id not in texts
    padded = state.allowed(512)  # a model's vocabulary may be larger than the tokenizer's: those ids are forbidden
    assert padded.shape == (512,) and torch.equal(padded[:400], allowed) and not padded[400:].any()
    for t in tok.encode('{"a": [1, "x"]}'):
        state.advance(t)
    assert state.done and state.accepting and state.error is None
    assert state.allowed().nonzero().flatten().tolist() == [tok.eos_id]  # complete: only the end
    # a token the grammar forbids leaves the state in error, never silently accepted
    bad = G.json_object(tok).new_state()
    bad.advance(tok.encode("x")[0])
    assert bad.error is not None


def test_constrained_requests_never_sample_a_forbidden_token(model, toks):
    """Greedy with a +100 logit_bias on forbidden tokens, and logprobs: the mask comes after the bias, and the
    reported alternatives are allowed tokens only."""
    tok = toks["text"]
    c = G.json_schema(tok, SCHEMA)
    letter = tok.encode("x")[0]
    (req,) = run(engine_for(model), [(PROMPTS[0], SamplingParams(200, constraint=c, logprobs=5,
                                                                  logit_bias={letter: 100.0}))])
    events = []
    req2 = engine_for(model).submit(PROMPTS[0], SamplingParams(200, constraint=c, logprobs=5,
                                                                logit_bias={letter: 100.0}), on_event=events.append)
    while not req2.finished:
        req2._engine.step()
    assert req.finish_reason == req2.finish_reason == "stop" and req.output_ids == req2.output_ids
    jsonschema.validate(json.loads(text_of(tok, req.output_ids)), SCHEMA)
    state = c.new_state()
    for ev in [e for e in events if e.token_id is not None]:
        allowed = state.allowed()
        assert allowed[ev.token_id] and all(allowed[t] for t, _ in ev.top_logprobs)
        assert ev.top_logprobs[0][0] == ev.token_id  # greedy: the chosen token is the most likely allowed one
        state.advance(ev.token_id)
    assert state.done


# --- JSON -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["special", "text"])
def test_json_schema_outputs_validate(model, toks, kind):
    tok = toks[kind]
    reqs = run(engine_for(model), variants(G.json_schema(tok, SCHEMA)))
    for r in reqs:
        assert r.finish_reason == "stop", text_of(tok, r.output_ids)
        jsonschema.validate(json.loads(text_of(tok, r.output_ids)), SCHEMA)
    assert len({tuple(r.output_ids) for r in reqs}) > 1  # the sampled ones differ


def test_json_object_outputs_parse(model, toks):
    """Any JSON object: random weights may write long strings, so EOS gets a bias (it is only allowed where the
    object is complete); every request that stops parses as an object."""
    tok = toks["text"]
    reqs = run(engine_for(model), variants(G.json_object(tok), logit_bias={tok.eos_id: 8.0}))
    assert sum(r.finish_reason == "stop" for r in reqs) >= 3
    for r in reqs:
        if r.finish_reason == "stop":
            assert isinstance(json.loads(text_of(tok, r.output_ids)), dict)
        else:
            assert r.finish_reason == "length"


def test_a_complete_grammar_ends_the_request(model, toks):
    tok = toks["special"]
    reqs = run(engine_for(model), variants(G.json_schema(tok, {"enum": ["yes", "no"]}), n_seeds=6,
                                           stop_token_ids=[]))
    for r in reqs:
        assert r.finish_reason == "stop" and json.loads(text_of(tok, r.output_ids)) in ("yes", "no")
    (r,) = run(engine_for(model), [(PROMPTS[1], SamplingParams(50, constraint=G.lark(tok, 'start: "ab" "cd"')))])
    assert r.finish_reason == "stop" and text_of(tok, r.output_ids) == "abcd"


def test_seeded_constrained_sampling_is_reproducible_in_any_batch(model, toks):
    tok = toks["text"]
    c = G.json_schema(tok, SCHEMA)
    params = lambda: SamplingParams(200, temperature=1.0, seed=11, constraint=c, presence_penalty=0.5)
    (alone,) = run(engine_for(model), [(PROMPTS[3], params())])
    batch = run(engine_for(model), [(PROMPTS[0], SamplingParams(30, temperature=0.8, seed=1)),
                                    (PROMPTS[3], params()),
                                    (PROMPTS[2], SamplingParams(200, constraint=G.json_object(tok))),
                                    (PROMPTS[4], SamplingParams(200, temperature=1.0, seed=2, constraint=c))])
    assert batch[1].output_ids == alone.output_ids and alone.finish_reason == "stop"


# --- thinking first -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["special", "text"])
def test_reasoning_is_free_until_think_end(model, toks, kind):
    """The constraint binds after </think> (id 6): EOS, pushed hard by a logit_bias, cannot end the reasoning; a
    milder bias on </think> closes it after a few free tokens; the answer then validates."""
    tok = toks[kind]
    c = G.json_schema(tok, SCHEMA, start_after=THINK_END)
    assert G.json_schema(tok, SCHEMA).after(THINK_END) == c
    bias = {tok.eos_id: 12.0, THINK_END: 3.0}
    reqs = run(engine_for(model), variants(c, logit_bias=bias))
    saw_free_text = False
    for r in reqs:
        assert r.finish_reason == "stop" and THINK_END in r.output_ids
        k = r.output_ids.index(THINK_END)
        saw_free_text |= k > 0
        jsonschema.validate(json.loads(text_of(tok, r.output_ids[k + 1:])), SCHEMA)
    assert saw_free_text
    # unconstrained, the same bias ends at once with EOS
    (r,) = run(engine_for(model), [(PROMPTS[0], SamplingParams(50, logit_bias=bias))])
    assert r.output_ids == [] and r.finish_reason == "stop"


# --- tool calls -----------------------------------------------------------------------------------------------------
def check_calls(tok, r, style, n=None, name=None):
    assert r.finish_reason == "stop", text_of(tok, r.output_ids)
    content, calls = G.parse_tool_calls(text_of(tok, r.output_ids), style)
    assert calls and (n is None or len(calls) == n)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert name is None or call["name"] == name
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
    return content, calls


@pytest.mark.parametrize("kind", ["special", "text"])
@pytest.mark.parametrize("style", G.TOOL_CALL_STYLES)
def test_tool_calls_single_and_named(model, toks, kind, style):
    tok = toks[kind]
    one = G.tool_calls(tok, TOOLS, "required", parallel=False, style=style)
    for r in run(engine_for(model), variants(one, n_seeds=2)):
        assert check_calls(tok, r, style, n=1)[0].strip() == ""
    for r in run(engine_for(model), variants(G.tool_calls(tok, TOOLS, "add", style=style), n_seeds=2)):
        check_calls(tok, r, style, n=1, name="add")


@pytest.mark.parametrize("style", G.TOOL_CALL_STYLES)
def test_tool_calls_required_parallel(model, toks, style):
    """One or more calls. A random model chains calls up to the length limit (parallel calls happen: counted by their
    closing markers, the last call may be cut); a strong logit_bias on the closing marker (a special token here)
    lets every request stop with valid calls. Two clear settings rather than one tuned in between, whose outcome
    turned on single draws."""
    tok = toks["special"]
    c = G.tool_calls(tok, TOOLS, "required", style=style)
    chained = run(engine_for(model), variants(c, n_seeds=4))
    assert max(text_of(tok, r.output_ids).count(G.TOOL_CALL_END) for r in chained) >= 2  # parallel calls happen
    stopped = run(engine_for(model), variants(c, n_seeds=4, logit_bias={tok.token_to_id(G.TOOL_CALLS_END): 5.0}))
    for r in stopped:
        check_calls(tok, r, style)


@pytest.mark.parametrize("kind", ["special", "text"])
@pytest.mark.parametrize("style", G.TOOL_CALL_STYLES)
def test_tool_call_grammar_accepts_the_syntax(toks, kind, style):
    """The canonical tokenization of two calls (text before them for auto) is allowed token by token and completes
    the grammar; a call of an unknown function or with invalid arguments is not."""
    tok = toks[kind]

    def call(name, args):
        if style == "v3":
            return f"{G.TOOL_CALL_BEGIN}function{G.TOOL_SEP}{name}\n```json\n{args}\n```{G.TOOL_CALL_END}"
        return f"{G.TOOL_CALL_BEGIN}{name}{G.TOOL_SEP}{args}{G.TOOL_CALL_END}"

    sep = "\n" if style == "v3" else ""
    two = G.TOOL_CALLS_BEGIN + call("add", '{"a": 1, "b": 22}') + sep + call("get_weather", '{"city": "Oslo", ' \
        '"unit": "C"}') + G.TOOL_CALLS_END

    def accepts(choice, text, **kw):
        state = G.tool_calls(tok, TOOLS, choice, style=style, **kw).new_state()
        for t in tok.encode(text):
            if not state.allowed()[t]:
                return False
            state.advance(t)
        return state.done

    assert accepts("required", two) and accepts("auto", "Let me check. " + two) and accepts("auto", "No call.") is False
    assert not accepts("required", "Let me check. " + two) and not accepts("required", two, parallel=False)
    assert not accepts("add", two) and accepts("add", two[:two.index(G.TOOL_CALL_END)] + G.TOOL_CALL_END
                                                   + G.TOOL_CALLS_END)
    assert not accepts("required", two.replace('"b": 22', '"b": 100'))  # maximum 99
    assert not accepts("required", two.replace("add", "sub"))
    assert G.parse_tool_calls("Let me check. " + two, style)[1] == [
        {"name": "add", "arguments": '{"a": 1, "b": 22}'}, {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "C"}'}]


def test_tool_calls_auto(model, toks):
    """auto: free text, and once the first marker is written, valid calls (the marker's special token is pushed
    with a logit_bias); without the push the constraint leaves the free text alone."""
    tok = toks["special"]
    c = G.tool_calls(tok, TOOLS, "auto")
    begin, end = tok.token_to_id(G.TOOL_CALLS_BEGIN), tok.token_to_id(G.TOOL_CALLS_END)
    # 8 sampled requests: with 3, whether two of them write the marker came down to their seeds' draws
    reqs = run(engine_for(model), variants(c, n_seeds=8, logit_bias={begin: 3.0, end: 3.0, tok.eos_id: 3.0}))
    with_calls = 0
    for r in reqs:
        text = text_of(tok, r.output_ids)
        if G.TOOL_CALLS_BEGIN in text:
            with_calls += 1
            check_calls(tok, r, G.DEFAULT_TOOL_CALL_STYLE)
        else:
            assert r.finish_reason in ("stop", "length") and G.parse_tool_calls(text) == (text, [])
    assert with_calls >= 2
    free = run(engine_for(model), [(PROMPTS[0], SamplingParams(20, constraint=c, stop_token_ids=[]))])[0]
    plain = run(engine_for(model), [(PROMPTS[0], SamplingParams(20, stop_token_ids=[]))])[0]
    if all(t < tok.vocab_size and t not in G.prepare(tok).special for t in plain.output_ids):
        assert free.output_ids == plain.output_ids


# --- failures -------------------------------------------------------------------------------------------------------
def test_a_dead_end_ends_the_request_cleanly(model, toks, monkeypatch):
    tok = toks["text"]
    engine = engine_for(model)
    ok = engine.submit(PROMPTS[1], SamplingParams(10, stop_token_ids=[]))
    monkeypatch.setattr(G.GrammarState, "allowed", lambda self, size=None: torch.zeros(size, dtype=torch.bool))
    dead = engine.submit(PROMPTS[0], SamplingParams(50, constraint=G.json_object(tok)))
    while not (ok.finished and dead.finished):
        engine.step()
    assert dead.finish_reason == "error" and dead.output_ids == [] and dead.error.startswith("grammar:")
    assert ok.finish_reason == "length" and len(ok.output_ids) == 10
    monkeypatch.undo()
    (r,) = run(engine, [(PROMPTS[0], SamplingParams(200, constraint=G.json_schema(tok, SCHEMA)))])
    assert r.finish_reason == "stop"


def test_bad_constraints_are_refused(model, toks):
    tok = toks["text"]
    with pytest.raises(NanoseekError, match="unsupported JSON schema: .*not"):
        G.json_schema(tok, {"not": {"type": "string"}})
    with pytest.raises(NanoseekError, match="must be an object"):
        G.json_schema(tok, "{}")
    with pytest.raises(NanoseekError, match="no tool is named 'nope'"):
        G.tool_calls(tok, TOOLS, "nope")
    with pytest.raises(NanoseekError, match="tool 0"):
        G.tool_calls(tok, [{"type": "function", "function": {"name": "a b"}}])
    with pytest.raises(NanoseekError, match="two tools"):
        G.tool_calls(tok, TOOLS + TOOLS[:1])
    with pytest.raises(NanoseekError, match="style"):
        G.tool_calls(tok, TOOLS, style="v2")
    with pytest.raises(NanoseekError, match="unsupported parameters schema"):
        G.tool_calls(tok, [{"type": "function", "function": {"name": "f", "parameters": {"if": {}}}}])
    with pytest.raises(NanoseekError, match="constraint must be None or a nanoseek.grammar Constraint"):
        engine_for(model).submit(PROMPTS[0], SamplingParams(constraint={"type": "json_object"}))
    with pytest.raises(NanoseekError, match="constraint is not supported with speculative decoding"):
        engine_for(model, speculative=True).submit(PROMPTS[0], SamplingParams(constraint=G.json_object(tok)))
    small = Transformer(get_preset("test", vocab_size=300))
    with pytest.raises(NanoseekError, match="tokenizer of 400 tokens; the model has 300"):
        Engine(small, max_batch_size=1).submit(PROMPTS[0], SamplingParams(constraint=G.json_object(tok)))


def test_preparation_and_grammars_are_cached(toks):
    tok = toks["special"]
    assert G.prepare(tok) is G.prepare(tok)
    a, b = G.json_schema(tok, SCHEMA), G.json_schema(tok, dict(SCHEMA))
    assert a == b and a.prepared.compile(a.lark, "x") is b.prepared.compile(b.lark, "x")
    assert G.json_object(tok).new_state().matcher is not G.json_object(tok).new_state().matcher


def test_parse_tool_calls():
    calls = f'{G.TOOL_CALL_BEGIN}function{G.TOOL_SEP}f\n```json\n{{"x": 1}}\n```{G.TOOL_CALL_END}'
    text = f"hi {G.TOOL_CALLS_BEGIN}{calls}\n{calls}{G.TOOL_CALLS_END}"
    assert G.parse_tool_calls(text, "v3") == ("hi ", [{"name": "f", "arguments": '{"x": 1}'}] * 2)
    compact = f"{G.TOOL_CALLS_BEGIN}{G.TOOL_CALL_BEGIN}g{G.TOOL_SEP}{{}}{G.TOOL_CALL_END}{G.TOOL_CALLS_END}"
    assert G.parse_tool_calls(compact) == ("", [{"name": "g", "arguments": "{}"}])
    assert G.parse_tool_calls("no calls") == ("no calls", [])
    with pytest.raises(NanoseekError, match="ends before"):
        G.parse_tool_calls(text[:-len(G.TOOL_CALLS_END)], "v3")


def test_throughput_sanity(model, toks):
    """Eight constrained requests of every kind in one batch all complete, and the engine's counters add up (the
    per-token cost is measured by benchmarks/bench_grammar.py, not asserted here)."""
    tok = toks["special"]
    cs = [G.json_schema(tok, SCHEMA), G.json_object(tok), G.tool_calls(tok, TOOLS, "required"),
          G.tool_calls(tok, TOOLS, "add", style="v3.1")]
    engine = engine_for(model)
    reqs = run(engine, [(PROMPTS[i % 6], SamplingParams(200, temperature=0.8, seed=i, constraint=cs[i % 4],
                                                        logit_bias={tok.eos_id: 8.0})) for i in range(8)])
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert sum(r.finish_reason == "stop" for r in reqs) >= 6
    assert engine.stats()["generated_tokens"] == sum(len(r.output_ids) for r in reqs)
