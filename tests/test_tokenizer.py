import json

import pytest

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
    USER,
    IncrementalDecoder,
    Tokenizer,
    train_tokenizer,
)

SYSTEM = {"role": "system", "content": "You are nanoseek."}
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


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:6000]
    math = (corpus_dir() / "gsm8k" / "train.jsonl").read_text(encoding="utf-8")[:3000]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([text, math], vocab_size=400, out_dir=out)
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
        + USER + "2+2?" + ASSISTANT + "\n\nIt is 4." + EOS
        + USER + "深度求索 DeepSeek-V3 的推理 🚀" + ASSISTANT + "Sure." + EOS
        + USER + "And  3*3?\n\n\tThanks" + ASSISTANT + "<think>\n"
    )
    two_sys = tok.render_chat(CONVERSATIONS[1])
    assert two_sys == BOS + "You are nanoseek.\n\nAnswer briefly." + USER + "Hi!"
    last = tok.render_chat(CONVERSATIONS[3])
    assert last.endswith(ASSISTANT + "<think>\nstep 1\nstep 2\n</think>\n\nfinal answer" + EOS)
    # the last assistant turn without reasoning_content is kept verbatim
    verbatim = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    assert tok.render_chat(verbatim).endswith(ASSISTANT + "<think>\nr\n</think>\n\nA" + EOS)


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
