"""Byte-level BPE tokenizer with DeepSeek-R1 special tokens and chat template.

The tokenizer is trained with the HF `tokenizers` library and saved as `tokenizer.json` + `tokenizer_config.json`, so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it unchanged. Byte-level means every UTF-8 string (Chinese,
emoji, control characters) encodes losslessly with no unknown token: the 256 byte symbols are always in the vocab.

Special tokens use DeepSeek's exact strings (fullwidth bar U+FF5C, "▁" U+2581) but small ids 0..6 (V3 has bos=0,
eos=1 too; its <think> etc. sit at ~128k, which a small vocab cannot use). Tokenizers trained now also hold V3's nine
tool-call markers as special tokens at ids 7..15; in a tokenizer trained before they existed, the same strings are
plain text (several tokens each), and everything here works with both.

The chat template is the single Jinja2 string CHAT_TEMPLATE. nanoseek renders it with the same Jinja2 environment
settings transformers uses (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, its `tojson`), so nanoseek and
`AutoTokenizer.apply_chat_template` produce identical ids — except for one deliberate difference: text that a user,
a system prompt or a tool supplies is always tokenized as text, so a user who types `<｜Assistant｜>` gets the
characters, never the control token (transformers would match it as a special token). Only the template's own
markers (and assistant turns, which are model output) become special tokens; see `apply_chat_template`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
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
# DeepSeek-V3's tool-call markers: special tokens at ids 7..15 (in this order) of tokenizers trained since they were
# added; plain text in older ones. Calls are written as DeepSeek-V3.1 writes them (nanoseek.grammar's style "v3.1",
# fewer tokens than V3's "function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```"):
# <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>,
# and tool results come back as
# <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>.
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
               TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]  # ids 7..15 in new tokenizers
TOOL_CALL_STYLE = "v3.1"  # the call layout above, in nanoseek.grammar's terms (its tool_calls / parse_tool_calls)

DEFAULT_MODEL_MAX_LENGTH = 1024  # matches ModelConfig.max_position_embeddings' default; only advisory for HF

# R1 format: {bos}{system prompts joined by "\n\n"}, then per turn <｜User｜>{u} or
# <｜Assistant｜>{a}<｜end▁of▁sentence｜>; generation prompt <｜Assistant｜><think>\n
# (R1 forces the model to open its reasoning).
# The LAST message, if it is an assistant turn with reasoning_content, is rendered with its reasoning (the SFT target).
# Earlier assistant turns keep only the text after the last </think>: R1 never feeds reasoning back into the context.
# They render as the thinking-off generation prompt's empty block, then that text: <｜Assistant｜><think>\n\n</think>
# \n\n{answer}<｜end▁of▁sentence｜> (DeepSeek V3.1 likewise renders history as its non-thinking prompt, with
# `</think>`). So a thinking-off turn's prompt and answer are exactly the start of the next turn's prompt, and the
# prefix cache reuses the answer too (R1's template drops the block, which made every previous answer a miss).
# Extensions (each renders nothing unless used, so plain chats render exactly as before):
# - thinking switch: `thinking=False` (DeepSeek V3.1's name) or `enable_thinking=False` (Qwen's), passed as template
#   variables (as transformers' apply_chat_template(..., thinking=False) does): the generation prompt becomes an
#   empty, closed reasoning block <｜Assistant｜><think>\n\n</think>\n\n, the same text an assistant turn with
#   reasoning_content "" renders to, so the model answers at once;
# - prefix completion (DeepSeek): a last assistant message with `prefix: true` is left open (no eos, no generation
#   prompt) for the model to continue. Its content is the answer, after an empty reasoning block; with a
#   reasoning_content the block holds it, and with reasoning_content but empty content the block stays open, so the
#   model continues the reasoning itself;
# - tools (OpenAI's [{"type": "function", "function": {name, description, parameters}}]) are described in the
#   system prompt; an assistant turn's tool_calls follow its content as V3's markers; consecutive `tool` messages
#   become one <｜tool▁outputs▁begin｜>...<｜tool▁outputs▁end｜> block (matched to the calls by order).
# Every line starts with "{%-" or "{{-" so the newlines of this source never reach the output.
CHAT_TEMPLATE = r"""{%- set ns = namespace(system='', has_system=false, outputs=false, prefix=false) %}
{%- set think = thinking if thinking is defined and thinking is not none
    else (enable_thinking if enable_thinking is defined and enable_thinking is not none else true) %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- if ns.has_system %}{% set ns.system = ns.system + '\n\n' + message['content'] %}
{%- else %}{% set ns.system = message['content'] %}{% set ns.has_system = true %}{% endif %}
{%- endif %}
{%- endfor %}
{%- if tools %}
{%- set tool_ns = namespace(text='## Tools\n\nYou can call these functions:') %}
{%- for tool in tools %}
{%- set tool_ns.text = tool_ns.text + '\n\n### ' + tool['function']['name'] %}
{%- if tool['function']['description'] is defined and tool['function']['description'] %}
{%- set tool_ns.text = tool_ns.text + '\n' + tool['function']['description'] %}{% endif %}
{%- set tool_ns.text = tool_ns.text + '\nParameters: ' + (tool['function']['parameters'] | default({}) | tojson) %}
{%- endfor %}
{%- set tool_ns.text = tool_ns.text + '\n\nTo call functions, end your answer with\n'
    + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n'
    + 'where ARGUMENTS is one JSON object, with one <｜tool▁call▁begin｜>...<｜tool▁call▁end｜> per call. '
    + 'The results come back in the next turn.' %}
{%- if ns.has_system %}{% set ns.system = ns.system + '\n\n' + tool_ns.text %}
{%- else %}{% set ns.system = tool_ns.text %}{% set ns.has_system = true %}{% endif %}
{%- endif %}
{{- bos_token + ns.system }}
{%- for message in messages %}
{%- if message['role'] == 'tool' %}
{%- if not ns.outputs %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.outputs = true %}{% endif %}
{{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}
{%- else %}
{%- if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.outputs = false %}{% endif %}
{%- if message['role'] == 'user' %}
{{- '<｜User｜>' + message['content'] }}
{%- elif message['role'] == 'assistant' %}
{%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' %}
{%- set prefix = loop.last and message['prefix'] is defined and message['prefix'] %}
{%- set reasoning = loop.last and message['reasoning_content'] is defined
    and message['reasoning_content'] is not none %}
{%- if not loop.last %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}{% set content = '<think>\n\n</think>\n\n' + content %}{% endif %}
{%- if prefix and reasoning and content == '' %}{% set content = '<think>\n' + message['reasoning_content'] %}
{%- elif reasoning %}{% set content = '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' + content %}
{%- elif prefix %}{% set content = '<think>\n\n</think>\n\n' + content %}
{%- endif %}
{{- '<｜Assistant｜>' + content }}
{%- if message['tool_calls'] is defined and message['tool_calls'] %}
{{- '<｜tool▁calls▁begin｜>' }}
{%- for call in message['tool_calls'] %}
{%- set arguments = call['function']['arguments'] %}
{{- '<｜tool▁call▁begin｜>' + call['function']['name'] + '<｜tool▁sep｜>'
    + (arguments if arguments is string else arguments | tojson) + '<｜tool▁call▁end｜>' }}
{%- endfor %}
{{- '<｜tool▁calls▁end｜>' }}
{%- endif %}
{%- if prefix %}{% set ns.prefix = true %}{% else %}{{ eos_token }}{% endif %}
{%- elif message['role'] != 'system' %}
{{- raise_exception('unknown role: ' + message['role']) }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}
{%- if add_generation_prompt and not ns.prefix %}
{{- '<｜Assistant｜><think>\n' if think else '<｜Assistant｜><think>\n\n</think>\n\n' }}{% endif %}"""

ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' `tojson` (jinja's own escapes <, >, & and ' for HTML): plain json.dumps, non-ASCII kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _compiled_template() -> jinja2.Template:
    # Same environment options as transformers' chat-template renderer: whitespace handling must match exactly.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
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
    """A trained byte-level BPE with the seven special tokens at ids 0..6 (and the tool-call markers at 7..15 when it
    was trained with them)."""

    def __init__(self, hf_tokenizer: HFTokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        self._tok = hf_tokenizer
        self.model_max_length = model_max_length
        for i, s in enumerate(SPECIAL_TOKENS):
            if self._tok.token_to_id(s) != i:
                raise NanoseekError(f"tokenizer: special token {s!r} must have id {i}, has {self._tok.token_to_id(s)}")
        # special strings -> ids: what apply_chat_template splits the template's own text at
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)))
        self._text_tok: HFTokenizer | None = None  # a copy that encodes special-token strings as text (lazily)
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

    @property
    def has_tool_tokens(self) -> bool:
        """True when the tool-call markers are special tokens (tokenizers trained since they were added)."""
        return all(t in self._specials for t in TOOL_TOKENS)

    @property
    def max_token_bytes(self) -> int:
        """The longest token's UTF-8 length: a text of n characters needs at least n / max_token_bytes tokens."""
        return max(len(b) for b in self._id_bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes a token stands for (a byte-level token may hold half a character).
        Ids outside the vocabulary (a model's padded embedding rows) give b"", as decode() ignores them."""
        return self._id_bytes[token_id] if 0 <= token_id < len(self._id_bytes) else b""

    # ----- text <-> ids -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if len(text) > 4096 and hasattr(self._tok, "encode_batch_fast"):
            # the same ids; encode_batch_fast releases the GIL (a server's event loop runs meanwhile), encode does not
            ids = self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() for many texts at once (tokenizers runs the batch in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ----- chat ---------------------------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                    tools: Sequence[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The prompt text for `messages` (list of {"role", "content", optional "reasoning_content", "prefix",
        "tool_calls", "tool_call_id"}); `tools` and `template_kwargs` (thinking=False) as in transformers'
        apply_chat_template."""
        clean, tools = _check_messages(messages), _check_tools(tools)
        return self._render(clean, tools, add_generation_prompt, template_kwargs)

    @staticmethod
    def _render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool,
                template_kwargs: dict[str, Any]) -> str:
        return _compiled_template().render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                           **template_kwargs, bos_token=BOS, eos_token=EOS, pad_token=PAD)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tools: Sequence[dict[str, Any]] | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of render_chat(...). Text from users, system prompts, tools and tool definitions is encoded as
        text: the special-token strings it may contain (`<｜Assistant｜>`, `</think>`, the tool markers) become their
        characters, not control tokens. Only the template's own markers and assistant turns (model output, including
        the `<think>`...`</think>` an SFT target writes) are matched as special tokens.

        How: those text fields are rendered wrapped in a marker character that occurs nowhere in the input; the
        rendered string is split at the special tokens found OUTSIDE the wrapped spans only, and each piece between
        two special tokens is encoded by a copy of the tokenizer that does not match special tokens. transformers
        encodes the whole string by splitting it at every special token and encoding the pieces between them, so
        for input without special-token strings the ids are identical to its apply_chat_template (tested)."""
        clean, tools = _check_messages(messages), _check_tools(tools)
        mark = _free_mark(clean, tools)
        text = self._render(_wrap_text(clean, mark), _wrap_tools(tools, mark), add_generation_prompt, template_kwargs)
        return self._encode_segments(text, mark)

    def _encode_segments(self, text: str, mark: str) -> list[int]:
        """`text` alternates template text and wrapped text at each `mark`: split the template text at its special
        tokens, join the rest into the runs between them, encode each run with special-token matching off."""
        parts = text.split(mark)
        if len(parts) % 2 != 1:
            raise AssertionError("chat template: a wrapped text field was split or dropped")
        ids: list[int | None] = []
        runs: list[str] = []  # the text between two special tokens, encoded in one call below
        run: list[str] = []

        def flush() -> None:
            joined = "".join(run)
            run.clear()
            if joined:
                runs.append(joined)
                ids.append(None)  # where the run's ids go

        for k, part in enumerate(parts):
            if k % 2:  # wrapped text: never split
                run.append(part)
                continue
            pos = 0
            for m in self._special_re.finditer(part):
                run.append(part[pos:m.start()])
                flush()
                ids.append(self._specials[m.group()])
                pos = m.end()
            run.append(part[pos:])
        flush()
        encoded = iter(self._encode_text(runs))
        return [t for i in ids for t in (next(encoded) if i is None else (i,))]

    def _encode_text(self, texts: list[str]) -> list[list[int]]:
        """Encode without matching special tokens (other added tokens still match, as in transformers). Long input
        goes through encode_batch_fast, which releases the GIL, so a server's event loop keeps running meanwhile."""
        if self._text_tok is None:
            text_tok = HFTokenizer.from_str(self._tok.to_str())
            text_tok.encode_special_tokens = True
            self._text_tok = text_tok
        if sum(map(len, texts)) > 4096 and hasattr(self._text_tok, "encode_batch_fast"):
            return [e.ids for e in self._text_tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [self._text_tok.encode(t, add_special_tokens=False).ids for t in texts]

    def encode_chat_for_training(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT: mask is 1 exactly on the final assistant turn after its <｜Assistant｜> token,
        i.e. on `<think>\\n{reasoning}\\n</think>\\n\\n{content}<｜end▁of▁sentence｜>` (or `{content}<eos>`)."""
        clean = _check_messages(messages)
        if not clean or clean[-1]["role"] != "assistant" or clean[-1].get("prefix"):
            raise NanoseekError("chat: the last message must be an assistant turn (not a prefix) to train on")
        ids = self.apply_chat_template(clean)
        # The final turn rendered alone (it is still the last message, so it gets the same treatment) gives the
        # target text; it follows the <｜Assistant｜> special token, so it tokenizes on its own.
        head = BOS + ASSISTANT
        alone = self.render_chat(clean[-1:])
        if not alone.startswith(head):
            raise AssertionError("chat template: the final assistant turn does not start with <｜Assistant｜>")
        target_ids = self.encode(alone[len(head):])
        n = len(ids) - len(target_ids)
        if ids[n:] != target_ids or ids[n - 1] != self.assistant_id:
            raise AssertionError("chat template: the final assistant turn is not a suffix after <｜Assistant｜>")
        return ids, [0] * n + [1] * len(target_ids)


_MARKS = [chr(c) for c in range(0xE000, 0xF900)]  # Unicode private use: characters no template writes


def _strings(x: Any) -> Iterator[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _free_mark(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """A private-use character that occurs in none of the input's strings."""
    seen = set("".join(_strings([messages, tools or []])))
    mark = next((c for c in _MARKS if c not in seen), None)
    if mark is None:
        raise NanoseekError("chat: the messages use every private-use character (U+E000..U+F8FF)")
    return mark


def _wrap(x: Any, mark: str) -> Any:
    """Every non-empty string in x (dict keys too) as mark + s + mark. Empty strings stay as they are, so the
    template's truth tests (`if description`) see the same values."""
    if isinstance(x, str):
        return f"{mark}{x}{mark}" if x else x
    if isinstance(x, dict):
        return {_wrap(k, mark): _wrap(v, mark) for k, v in x.items()}
    if isinstance(x, list):
        return [_wrap(v, mark) for v in x]
    return x


def _wrap_text(messages: list[dict[str, Any]], mark: str) -> list[dict[str, Any]]:
    """The text fields of user, system and tool messages, and the names and arguments of assistant tool calls."""
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] in ("system", "user", "tool"):
            m["content"] = _wrap(m["content"], mark)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {"name": _wrap(c["function"]["name"], mark),
                                                  "arguments": _wrap(c["function"]["arguments"], mark)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def _wrap_tools(tools: list[dict[str, Any]] | None, mark: str) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    return [{**t, "function": {k: _wrap(v, mark) for k, v in t["function"].items()}} for t in tools]


def _check_messages(messages: Any) -> list[dict[str, Any]]:
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
        content = m.get("content")
        calls = m.get("tool_calls")
        if not isinstance(content, str) and not (role == "assistant" and content is None and calls):
            raise NanoseekError(f"chat: message {i} ({role}) 'content' must be a string, got "
                                f"{type(content).__name__}")
        out: dict[str, Any] = {"role": role, "content": content}
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise NanoseekError(f"chat: message {i} ({role}) has 'reasoning_content'; only assistant turns may")
            if not isinstance(reasoning, str):
                raise NanoseekError(f"chat: message {i} 'reasoning_content' must be a string, got "
                                    f"{type(reasoning).__name__}")
            out["reasoning_content"] = reasoning
        if m.get("prefix"):
            if role != "assistant" or i != len(messages) - 1 or calls:
                raise NanoseekError(f"chat: message {i} has 'prefix'; only the last message may, and it must be an "
                                    "assistant turn without tool_calls")
            out["prefix"] = True
        if calls is not None:
            if role != "assistant" or not isinstance(calls, (list, tuple)):
                raise NanoseekError(f"chat: message {i} ({role}) 'tool_calls' must be a list on an assistant turn")
            out["tool_calls"] = [_check_call(i, c) for c in calls]
        if role == "tool" and m.get("tool_call_id") is not None:
            out["tool_call_id"] = m["tool_call_id"]
        clean.append(out)
    return clean


def _check_call(i: int, call: Any) -> dict[str, Any]:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"),
                                                                                      (str, dict)):
        raise NanoseekError(f"chat: message {i} has a tool call without function.name (a string) and "
                            "function.arguments (a JSON string or an object)")
    return {"id": call.get("id"), "type": "function", "function": {"name": f["name"], "arguments": f["arguments"]}}


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI's tool list: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise NanoseekError(f"chat: tools must be a list, got {type(tools).__name__}")
    clean = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or t.get("type", "function") != "function":
            raise NanoseekError(f"chat: tool {i} must be {{'type': 'function', 'function': {{'name': ...}}}}")
        if not isinstance(f.get("description", ""), str) or not isinstance(f.get("parameters", {}), dict):
            raise NanoseekError(f"chat: tool {i}: description must be a string and parameters an object")
        clean.append({"type": "function", "function": {k: f[k] for k in ("name", "description", "parameters")
                                                       if k in f}})
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
    """Train a byte-level BPE of `vocab_size` tokens (the 16 special tokens and the 256 byte symbols included) on
    `texts`, save it to `out_dir` and return it."""
    min_vocab = len(SPECIAL_TOKENS) + len(TOOL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise NanoseekError(f"tokenizer: vocab_size must be an integer >= {min_vocab} (16 special + 256 bytes), "
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
        special_tokens=SPECIAL_TOKENS + TOOL_TOKENS,  # ids 0..15 in list order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones absent from the texts
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf)
    tok.save(out_dir)
    return tok
