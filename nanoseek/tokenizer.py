"""Byte-level BPE tokenizer with DeepSeek-R1 special tokens and chat template.

The tokenizer is trained with the HF `tokenizers` library and saved as `tokenizer.json` + `tokenizer_config.json`, so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it unchanged. Byte-level means every UTF-8 string (Chinese,
emoji, control characters) encodes losslessly with no unknown token: the 256 byte symbols are always in the vocab.

Special tokens use DeepSeek's exact strings (fullwidth bar U+FF5C, "▁" U+2581) but small ids 0..6 (V3 has bos=0,
eos=1 too; its <think> etc. sit at ~128k, which a small vocab cannot use).

The chat template is the single Jinja2 string CHAT_TEMPLATE. nanoseek renders it with the same Jinja2 environment
settings transformers uses (sandboxed, trim_blocks, lstrip_blocks, loopcontrols), so nanoseek and
`AutoTokenizer.apply_chat_template` produce identical ids.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.errors import NanoseekError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END]  # ids 0..6 in this order

DEFAULT_MODEL_MAX_LENGTH = 1024  # matches ModelConfig.max_position_embeddings' default; only advisory for HF

# R1 format: {bos}{system prompts joined by "\n\n"}, then per turn <｜User｜>{u} or
# <｜Assistant｜>{a}<｜end▁of▁sentence｜>; generation prompt <｜Assistant｜><think>\n
# (R1 forces the model to open its reasoning).
# The LAST message, if it is an assistant turn with reasoning_content, is rendered with its reasoning (the SFT target).
# Earlier assistant turns keep only the text after the last </think>: R1 never feeds reasoning back into the context.
# Every line starts with "{%-" or "{{-" so the newlines of this source never reach the output.
CHAT_TEMPLATE = r"""{%- set ns = namespace(system='', has_system=false) %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- if ns.has_system %}{% set ns.system = ns.system + '\n\n' + message['content'] %}
{%- else %}{% set ns.system = message['content'] %}{% set ns.has_system = true %}{% endif %}
{%- endif %}
{%- endfor %}
{{- bos_token + ns.system }}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{{- '<｜User｜>' + message['content'] }}
{%- elif message['role'] == 'assistant' %}
{%- set content = message['content'] %}
{%- if not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}
{%- if loop.last and message['reasoning_content'] is defined and message['reasoning_content'] is not none %}
{%- set content = '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' + content %}
{%- endif %}
{{- '<｜Assistant｜>' + content + eos_token }}
{%- elif message['role'] != 'system' %}
{{- raise_exception('unknown role: ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"""

ROLES = ("system", "user", "assistant")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=1)
def _compiled_template() -> jinja2.Template:
    # Same environment options as transformers' chat-template renderer: whitespace handling must match exactly.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(CHAT_TEMPLATE)


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table that byte-level BPE (GPT-2, HF ByteLevel) uses for its 256 base symbols:
    # printable Latin-1 bytes stand for themselves, the other 68 bytes are moved to code points 256, 257, ...
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


class Tokenizer:
    """A trained byte-level BPE with the seven special tokens at ids 0..6."""

    def __init__(self, hf_tokenizer: HFTokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        self._tok = hf_tokenizer
        self.model_max_length = model_max_length
        for i, s in enumerate(SPECIAL_TOKENS):
            if self._tok.token_to_id(s) != i:
                raise NanoseekError(f"tokenizer: special token {s!r} must have id {i}, has {self._tok.token_to_id(s)}")
        # id -> raw bytes, for streaming decode (IncrementalDecoder) without going through lossy str decoding
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._id_bytes: list[bytes] = [b""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                self._id_bytes[i] = added[i].encode("utf-8")
            else:
                self._id_bytes[i] = bytes(byte_decoder[c] for c in token)

    # ----- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise NanoseekError(f"tokenizer: {tok_file} not found (train one with train_tokenizer, or check the path)")
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise NanoseekError(f"tokenizer: cannot read {tok_file}: {e}") from e
        max_len = DEFAULT_MODEL_MAX_LENGTH
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                max_len = int(json.loads(cfg_file.read_text(encoding="utf-8")).get("model_max_length", max_len))
            except (ValueError, TypeError, AttributeError) as e:
                raise NanoseekError(f"tokenizer: cannot read {cfg_file}: {e}") from e
        return cls(hf, model_max_length=max_len)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers.AutoTokenizer)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out_dir / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": False,  # the chat template writes bos itself; plain encode() adds none
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # decoding must never insert or remove spaces
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        (out_dir / "tokenizer_config.json").write_text(
            json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return out_dir

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: identifies it in data-cache metadata."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    # ----- ids ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def pad_id(self) -> int:
        return 2

    @property
    def user_id(self) -> int:
        return 3

    @property
    def assistant_id(self) -> int:
        return 4

    @property
    def think_start_id(self) -> int:
        return 5

    @property
    def think_end_id(self) -> int:
        return 6

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes a token stands for (a byte-level token may hold half a character).
        Ids outside the vocabulary (a model's padded embedding rows) give b"", as decode() ignores them."""
        return self._id_bytes[token_id] if 0 <= token_id < len(self._id_bytes) else b""

    # ----- text <-> ids -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() for many texts at once (tokenizers runs the batch in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----- chat ---------------------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The prompt text for `messages` (list of {"role", "content", optional "reasoning_content"})."""
        clean = _check_messages(messages)
        return _compiled_template().render(messages=clean, add_generation_prompt=add_generation_prompt,
                                           bos_token=BOS, eos_token=EOS, pad_token=PAD)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def encode_chat_for_training(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT: mask is 1 exactly on the final assistant turn after its <｜Assistant｜> token,
        i.e. on `<think>\\n{reasoning}\\n</think>\\n\\n{content}<｜end▁of▁sentence｜>` (or `{content}<eos>`)."""
        clean = _check_messages(messages)
        if not clean or clean[-1]["role"] != "assistant":
            raise NanoseekError("chat: the last message must be an assistant turn to train on")
        full = self.render_chat(clean)
        # Render the final turn alone (it is still the last message, so it gets the same treatment) to find the
        # target text; it follows the <｜Assistant｜> special token, so the two halves tokenize independently.
        head = BOS + ASSISTANT
        alone = self.render_chat(clean[-1:])
        target = alone[len(head):]
        prefix = full[: len(full) - len(target)]
        if not alone.startswith(head) or not full.endswith(target) or not prefix.endswith(ASSISTANT):
            raise AssertionError("chat template: the final assistant turn is not a suffix after <｜Assistant｜>")
        prefix_ids, target_ids = self.encode(prefix), self.encode(target)
        ids = prefix_ids + target_ids
        if ids != self.encode(full):
            raise AssertionError("chat template: tokenisation merged across the prompt/target boundary")
        return ids, [0] * len(prefix_ids) + [1] * len(target_ids)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate and copy messages down to the fields the template reads."""
    if not isinstance(messages, (list, tuple)):
        raise NanoseekError(f"chat: messages must be a list of dicts, got {type(messages).__name__}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise NanoseekError(f"chat: message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise NanoseekError(f"chat: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise NanoseekError(f"chat: message {i} ({role}) 'content' must be a string, got "
                                f"{type(m.get('content')).__name__}")
        out = {"role": role, "content": m["content"]}
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise NanoseekError(f"chat: message {i} ({role}) has 'reasoning_content'; only assistant turns may")
            if not isinstance(reasoning, str):
                raise NanoseekError(f"chat: message {i} 'reasoning_content' must be a string, got "
                                    f"{type(reasoning).__name__}")
            out["reasoning_content"] = reasoning
        clean.append(out)
    return clean


class IncrementalDecoder:
    """Streams text from token ids fed one at a time.

    A byte-level token can end in the middle of a multi-byte character (Chinese, emoji); decoding it alone would give
    U+FFFD. This keeps such an incomplete tail back (Python's incremental UTF-8 decoder) until the next tokens complete
    it, so the concatenation of everything returned equals tokenizer.decode(all ids) for valid UTF-8 output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Newly completed text after this token ("" while a character is still incomplete)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id < len(SPECIAL_TOKENS):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 byte symbols included) on `texts`,
    save it to `out_dir` and return it."""
    min_vocab = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise NanoseekError(f"tokenizer: vocab_size must be an integer >= {min_vocab} (7 special + 256 bytes), "
                            f"got {vocab_size!r}")
    hf = HFTokenizer(models.BPE())
    # No normalizer: any normalisation (NFC, lowercasing) would break the lossless round trip.
    # Digits are split one by one before the GPT-2 byte-level regex: numbers then tokenize the same way everywhere,
    # which makes GSM8K arithmetic learnable for a small model (Llama and DeepSeek also split digits).
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..6 in list order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones absent from the texts
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf)
    tok.save(out_dir)
    return tok
