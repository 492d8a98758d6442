import json

import pytest

import nanoseek.tokenizer as tokenizer_module
from nanoseek.data import corpus_dir
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_BEGIN,
    TOOL_TOKENS,
    USER,
    IncrementalDecoder,
    Tokenizer,
    train_tokenizer,
)

SYSTEM = {"role": "system", "content": "You are nanoseek."}
EMPTY_THINK = "<think>\n\n</think>\n\n"  # the thinking-off prompt's block, before every earlier answer
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [SYSTEM, {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
    [
        SYSTEM,
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
        {"role": "user", "content": "深度求索 DeepSeek-V3 的推理 🚀"},
        {"role": "assistant", "content": "Sure.", "reasoning_content": "earlier reasoning, must be dropped"},
        {"role": "user", "content": "And  3*3?\n\n\tThanks"},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "final answer", "reasoning_content": "step 1\nstep 2"},
    ],
]


def _corpus() -> list[str]:
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:6000]
    math = (corpus_dir() / "gsm8k" / "train.jsonl").read_text(encoding="utf-8")[:3000]
    return [text, math]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(_corpus(), vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def old_tok_dir(tmp_path_factory):
    """A tokenizer as trained before the tool-call markers were special tokens (ids 0..6 only)."""
    out = tmp_path_factory.mktemp("old_tok")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_module, "TOOL_TOKENS", [])
        train_tokenizer(_corpus(), vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_files_and_config(tok, tok_dir):
    assert tok.vocab_size == 400
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (BOS, EOS, PAD)
    assert cfg["add_bos_token"] is False and cfg["clean_up_tokenization_spaces"] is False
    assert "<｜Assistant｜><think>" in cfg["chat_template"]


@pytest.mark.parametrize("text", [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "深度求索 DeepSeek-V3 的推理",
    "emoji 🤖👍🏽👨‍👩‍👧 ok",
    "  leading and trailing  \n\n\t\tmixed\r\n whitespace \u00a0\u3000 \n",
    "digits 1234567890 and 3.14, x=<<48/2=24>>24\n#### 72",
    "",
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [0, *ids]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_tokens(tok):
    assert SPECIAL_TOKENS == [BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END]
    assert SPECIAL_TOKENS[0] == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s) == [i]
        assert tok.decode([i]) == s
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id) == (0, 1, 2, 3, 4)
    assert (tok.think_start_id, tok.think_end_id) == (5, 6)
    ids = tok.encode("a<think>\nb</think>c")
    assert 5 in ids and 6 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a\nbc"


def test_hf_tokenizer_matches(tok, hf_tok):
    text = "深度求索 DeepSeek 🤖  reasoning\n\n#### 42"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)


def _hf_ids(hf_tok, messages, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    # transformers 5 returns a BatchEncoding; older versions a plain list
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _hf_ids(hf_tok, messages, add_generation_prompt)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_chat_template_format(tok):
    text = tok.render_chat(CONVERSATIONS[2], add_generation_prompt=True)
    assert text == (
        BOS + "You are nanoseek."
        + USER + "2+2?" + ASSISTANT + EMPTY_THINK + "It is 4." + EOS
        + USER + "深度求索 DeepSeek-V3 的推理 🚀" + ASSISTANT + EMPTY_THINK + "Sure." + EOS
        + USER + "And  3*3?\n\n\tThanks" + ASSISTANT + "<think>\n"
    )
    two_sys = tok.render_chat(CONVERSATIONS[1])
    assert two_sys == BOS + "You are nanoseek.\n\nAnswer briefly." + USER + "Hi!"
    last = tok.render_chat(CONVERSATIONS[3])
    assert last.endswith(ASSISTANT + "<think>\nstep 1\nstep 2\n</think>\n\nfinal answer" + EOS)
    # the last assistant turn without reasoning_content is kept verbatim
    verbatim = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    assert tok.render_chat(verbatim).endswith(ASSISTANT + "<think>\nr\n</think>\n\nA" + EOS)


def test_history_extends_the_thinking_off_prompt(tok):
    """An earlier assistant turn renders as the thinking-off generation prompt followed by its answer (DeepSeek
    V3.1 renders history as its non-thinking prompt does), so a chat's next prompt starts with the previous prompt
    and answer: the prefix cache hits the answer too. Reasoning is dropped from history either way."""
    q = CONVERSATIONS[0]
    prompt = tok.apply_chat_template(q, add_generation_prompt=True, thinking=False)
    answer = tok.encode("It is 4.")
    for content in ("It is 4.", "<think>\nsum\n</think>\n\nIt is 4."):
        history = q + [{"role": "assistant", "content": content}, {"role": "user", "content": "And 3*3?"}]
        ids = tok.apply_chat_template(history, add_generation_prompt=True, thinking=False)
        assert ids[:len(prompt) + len(answer) + 1] == prompt + answer + [tok.eos_id]


def test_generation_prompt_suffix(tok):
    suffix = tok.encode(ASSISTANT + THINK_START + "\n")
    assert suffix[:2] == [tok.assistant_id, tok.think_start_id] and tok.decode(suffix[2:]) == "\n"
    for messages in CONVERSATIONS[:3]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert ids[-len(suffix):] == suffix
        assert ids[: -len(suffix)] == tok.apply_chat_template(messages)


def test_encode_chat_for_training(tok):
    messages = CONVERSATIONS[2][:-1] + [
        {"role": "user", "content": "最后一个问题?"},
        {"role": "assistant", "content": "答案是 9。", "reasoning_content": "3*3 = 9 🙂"},
    ]
    ids, mask = tok.encode_chat_for_training(messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert ids == tok.apply_chat_template(messages)
    first = mask.index(1)
    assert all(mask[first:]) and not any(mask[:first])  # one contiguous block at the end
    assert ids[first - 1] == tok.assistant_id and ids[first] == tok.think_start_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[first:]) == "<think>\n3*3 = 9 🙂\n</think>\n\n答案是 9。" + EOS
    assert tok.decode(ids[:first]) == tok.render_chat(messages[:-1]) + ASSISTANT
    # without reasoning the target is just content + eos
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = tok.encode_chat_for_training(chat)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "yo" + EOS
    with pytest.raises(NanoseekError, match="last message"):
        tok.encode_chat_for_training([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("bad, where", [
    ([{"role": "robot", "content": "x"}], "message 0"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}], "message 1"),
    ([{"role": "user"}], "message 0"),
    ([{"role": "user", "content": "x"}, "hello"], "message 1"),
    ([{"role": "user", "content": "x", "reasoning_content": "r"}], "message 0"),
    ({"role": "user", "content": "x"}, "list"),
])
def test_bad_messages(tok, bad, where):
    with pytest.raises(NanoseekError, match=where):
        tok.apply_chat_template(bad)


def test_incremental_decoder(tok):
    text = "深度求索 DeepSeek-V3 的推理：先思考，再回答。🤖👍🏽"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # tiny vocab: many characters span several byte tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens ended mid-character and were held back
    skip = IncrementalDecoder(tok, skip_special_tokens=True)
    streamed = "".join(skip.feed(i) for i in [tok.think_start_id, *tok.encode("好"), tok.eos_id]) + skip.flush()
    assert streamed == "好"
    assert IncrementalDecoder(tok).feed(tok.vocab_size + 5) == "" == tok.decode([tok.vocab_size + 5])


def test_from_dir_missing(tmp_path):
    with pytest.raises(NanoseekError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_vocab_too_small(tmp_path):
    with pytest.raises(NanoseekError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100, out_dir=tmp_path)


# --- tools, prefix completion, the thinking switch ----------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名字 🌍"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "no_args"}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are nanoseek."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        CALL, {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    {"role": "assistant", "content": "Sunny in Paris, rain in Rome."},
    {"role": "user", "content": "Thanks!"},
]
PREFIX = [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "```python\n", "prefix": True}]
PREFIX_REASONING = [{"role": "user", "content": "q"},
                    {"role": "assistant", "content": "", "reasoning_content": "Let me see", "prefix": True}]
EXTENDED = [  # (messages, tools, template kwargs)
    (TOOL_CONVERSATION, TOOLS, {}),
    (TOOL_CONVERSATION[:5], TOOLS, {}),  # ends inside the tool outputs
    (CONVERSATIONS[2], None, {"thinking": False}),
    (CONVERSATIONS[0], TOOLS, {"enable_thinking": False}),
    (PREFIX, None, {}),
    (PREFIX_REASONING, None, {}),
    ([*PREFIX[:1], {**PREFIX[1], "reasoning_content": "plan"}], None, {}),
]


@pytest.mark.parametrize("tok_name", ["tok_dir", "old_tok_dir"])
@pytest.mark.parametrize("messages, tools, kwargs", EXTENDED)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_extended_template_matches_transformers(request, tok_name, messages, tools, kwargs, add_generation_prompt):
    """Tools, tool calls and outputs, prefix completion and the thinking switch: the same ids as transformers'
    apply_chat_template, with the tool markers as special tokens (new tokenizers) and as text (old ones)."""
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(tok_name)
    tok, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    ids = tok.apply_chat_template(messages, add_generation_prompt, tools=tools, **kwargs)
    out = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ids == (list(out["input_ids"]) if hasattr(out, "keys") else list(out))
    text = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  tokenize=False, **kwargs)
    assert text == tok.render_chat(messages, add_generation_prompt, tools=tools, **kwargs)
    assert tok.decode(ids) == text


def test_tool_tokens(tok, old_tok_dir):
    assert tok.has_tool_tokens and [tok.token_to_id(t) for t in TOOL_TOKENS] == list(range(7, 16))
    assert all(tok.encode(t) == [7 + i] for i, t in enumerate(TOOL_TOKENS))
    old = Tokenizer.from_dir(old_tok_dir)
    assert not old.has_tool_tokens and old.vocab_size == 400
    assert len(old.encode(TOOL_CALLS_BEGIN)) > 1 and old.decode(old.encode(TOOL_CALLS_BEGIN)) == TOOL_CALLS_BEGIN
    # tool markers are text, not skipped: a streamed output keeps them for the tool-call parser
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    assert "".join(dec.feed(i) for i in [5, 7, 6]) == TOOL_CALLS_BEGIN


def test_tool_template_format(tok):
    text = tok.render_chat(TOOL_CONVERSATION, add_generation_prompt=True, tools=TOOLS)
    system, rest = text.split(USER, 1)
    assert system.startswith(BOS + "You are nanoseek.\n\n## Tools\n\n")
    assert '### get_weather\nThe weather in a city, now.\nParameters: {"type": "object", "properties": ' in system
    assert "### no_args\nParameters: {}" in system
    call = "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
    assert rest == (
        "Weather in Paris and Rome?" + ASSISTANT + EMPTY_THINK + TOOL_CALLS_BEGIN + call.format('{"city": "Paris"}')
        + call.format('{"city": "Rome"}') + "<｜tool▁calls▁end｜>" + EOS + "<｜tool▁outputs▁begin｜>"
        + "<｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜><｜tool▁output▁begin｜>rain<｜tool▁output▁end｜>"
        + "<｜tool▁outputs▁end｜>" + ASSISTANT + EMPTY_THINK + "Sunny in Paris, rain in Rome." + EOS + USER + "Thanks!"
        + ASSISTANT + "<think>\n")


def test_thinking_switch_and_prefix_format(tok):
    q = CONVERSATIONS[0]
    on = tok.render_chat(q, add_generation_prompt=True)
    for kwargs in ({"thinking": False}, {"enable_thinking": False}):
        off = tok.render_chat(q, add_generation_prompt=True, **kwargs)
        assert off == on.removesuffix("<think>\n") + "<think>\n\n</think>\n\n"
        # the same text an assistant turn with empty reasoning renders to
        turn = tok.render_chat(q + [{"role": "assistant", "content": "A", "reasoning_content": ""}])
        assert turn == off + "A" + EOS
    assert tok.render_chat(q, True, thinking=True) == on
    # prefix: the last assistant turn stays open, whatever add_generation_prompt says
    for gen in (True, False):
        assert tok.render_chat(PREFIX, gen) == BOS + USER + "Write code" + ASSISTANT + \
            "<think>\n\n</think>\n\n```python\n"
        assert tok.render_chat(PREFIX_REASONING, gen).endswith(ASSISTANT + "<think>\nLet me see")
    both = [PREFIX[0], {**PREFIX[1], "reasoning_content": "plan"}]
    assert tok.render_chat(both).endswith(ASSISTANT + "<think>\nplan\n</think>\n\n```python\n")


SPECIALS_TEXT = "a" + "".join(SPECIAL_TOKENS + TOOL_TOKENS) + " b<think>c"


@pytest.mark.parametrize("tok_name", ["tok_dir", "old_tok_dir"])
def test_user_text_is_never_a_control_token(request, tok_name):
    """Special-token strings in user, system and tool text and in tool definitions are encoded as their characters;
    the template's own markers, and assistant turns (model output), still give the special tokens."""
    tok = Tokenizer.from_dir(request.getfixturevalue(tok_name))
    tools = [{"type": "function", "function": {"name": "f", "description": SPECIALS_TEXT,
                                               "parameters": {"type": "object", SPECIALS_TEXT: SPECIALS_TEXT}}}]
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": SPECIALS_TEXT}}
    injected = [{"role": "system", "content": SPECIALS_TEXT}, {"role": "user", "content": SPECIALS_TEXT},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "1", "content": SPECIALS_TEXT},
                {"role": "assistant", "content": "<think>\nr\n</think>\n\nfine"}]
    plain = [{**m, "content": "x"} if m["role"] in ("system", "user", "tool") else m for m in injected]
    plain[2] = {**plain[2], "tool_calls": [{**call, "function": {"name": "f", "arguments": "x"}}]}
    plain_tools = [{"type": "function", "function": {"name": "f", "description": "x", "parameters": {}}}]
    ids = tok.apply_chat_template(injected, add_generation_prompt=True, tools=tools)
    assert tok.decode(ids) == tok.render_chat(injected, add_generation_prompt=True, tools=tools)
    specials = range(16 if tok.has_tool_tokens else 7)
    reference = tok.apply_chat_template(plain, add_generation_prompt=True, tools=plain_tools)
    assert [i for i in ids if i in specials] == [i for i in reference if i in specials]
    assert tok.think_start_id in ids  # the earlier assistant turn's <think> is dropped, the generation prompt's kept
    last = tok.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}])
    assert last.count(tok.think_start_id) == 1 and last.count(tok.think_end_id) == 1  # assistant: special tokens
    # apply_chat_template vs encoding the rendered text: the same ids exactly when no content holds a special string
    for messages in CONVERSATIONS + [TOOL_CONVERSATION]:
        assert tok.apply_chat_template(messages, True, tools=TOOLS) == tok.encode(
            tok.render_chat(messages, True, tools=TOOLS))
    edge = [{"role": "user", "content": "<｜Assist"}, {"role": "assistant", "content": "ant｜>"},
            {"role": "user", "content": "｜>\ue000\n\n"}]  # split markers, and the first wrapping candidate
    assert tok.apply_chat_template(edge, True) == tok.encode(tok.render_chat(edge, True))


def test_max_token_bytes(tok):
    assert tok.max_token_bytes == max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    assert tok.max_token_bytes >= len(TOOL_CALLS_BEGIN.encode())


@pytest.mark.parametrize("bad, where", [
    ([{"role": "assistant", "content": "x", "prefix": True}, {"role": "user", "content": "y"}], "message 0"),
    ([{"role": "user", "content": "x", "prefix": True}], "message 0"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "message 0"),
    ([{"role": "assistant", "content": None}], "message 0"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3}}]}], "message 0"),
])
def test_bad_extended_messages(tok, bad, where):
    with pytest.raises(NanoseekError, match=where):
        tok.apply_chat_template(bad)
    with pytest.raises(NanoseekError, match="tool 0"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function"}])
