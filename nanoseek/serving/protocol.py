"""What goes over the wire: the request bodies (strict pydantic models), the fields refused with a reason, the
OpenAI-style error body, and the checks a body passes before any of it is used.

Every request field of OpenAI's chat-completions and completions schemas and DeepSeek's extensions is declared
here: applied by the server, or refused with HTTP 400 naming it (`param`); a field not declared is refused as
unknown. docs/serving.md has the table.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # entries
MAX_TOP_LOGPROBS = 20


# --- request bodies (strict: "1" is not an int, true is not a number; unknown fields are refused) --------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ContentPart(BaseModel):
    # other part types (image_url, input_audio, file) carry fields of their own: the type is checked by the server
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str  # system | developer (= system) | user | assistant | tool; checked by the server
    content: str | list[ContentPart] | None = None
    reasoning_content: Any = None  # DeepSeek: only on a last assistant message with prefix (else 400)
    prefix: bool = False  # DeepSeek's chat prefix completion: the last assistant message is continued
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    name: Any = None  # refused
    refusal: Any = None  # refused
    audio: Any = None  # refused
    function_call: Any = None  # refused


class FunctionDef(_Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; the call's arguments are constrained to it
    strict: bool | None = None  # arguments always follow the schema (constrained decoding): true and false alike


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema: true and false alike


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Thinking(_Body):
    type: Literal["enabled", "disabled"]


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI pads chunks with random text when true; nanoseek never does (400)


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class SamplingFields(_Body):
    """The fields /v1/chat/completions and /v1/completions share."""
    model: str | None = None  # any name is accepted; responses carry the served model's name
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 (or < 1e-5) = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: -1, 0 or None = no cut
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (decimal string) -> bias
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # torch.Generator's range
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (for benchmarks)
    user: str | None = None  # informational (an end-user id for abuse monitoring): nanoseek keeps no logs of it


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens; wins if both are set
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None  # DeepSeek's switch
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: {"thinking": bool} or {"enable_thinking": bool}
    modalities: list[str] | None = None  # ["text"] only
    store: bool | None = None  # false only: nanoseek stores nothing
    service_tier: str | None = None  # "auto" / "default" only: there is one tier
    safety_identifier: str | None = None  # informational, like `user`
    prompt_cache_key: str | None = None  # a routing hint for caches; nanoseek's one engine caches prefixes by itself
    audio: Any = None  # refused (REFUSED)
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[Any]  # text, or token ids (lists of texts or of id lists, i.e. batches, are refused)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)  # only equal to n
    suffix: Any = None  # refused


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt (as /v1/completions reads it) or messages (as /v1/chat/completions renders them)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True  # nanoseek's tokenizer adds no special tokens to a prompt either way
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False
    continue_final_message: Any = None  # refused: mark the last assistant message with prefix: true


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# Fields declared only to refuse them with a reason (HTTP 400, param = the field, code "unsupported_parameter") when
# they hold anything but null. docs/serving.md's table lists these with every other field.
REFUSED = {
    "audio": "audio output is not supported: nanoseek generates text",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated 'functions' is not supported: send 'tools'",
    "function_call": "the deprecated 'function_call' is not supported: send 'tool_choice'",
    "metadata": "nanoseek stores no completions, so there is nothing to attach metadata to",
    "reasoning_effort": "reasoning effort levels are not supported; thinking: {\"type\": \"disabled\"} turns the "
                        "reasoning off",
    "verbosity": "verbosity levels are not supported",
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "continue_final_message": "mark the last assistant message with \"prefix\": true instead",
    "name": "participant names are not supported by the chat template",
    "refusal": "assistant refusals cannot be sent back",
    "moderation": "no moderation model runs here",
    "prompt_cache_options": "the prefix cache is automatic; the server sizes it (serve --prefix-cache-mb, --cache-dir)",
    "prompt_cache_retention": "the prefix cache is automatic; the server sizes it (serve --prefix-cache-mb, "
                              "--cache-dir)",
}


# --- errors ---------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An HTTP error with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    # ensure_ascii: messages may quote client input, which can hold lone surrogates that UTF-8 cannot encode
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message, type, param, code), status, headers=headers, media_type="application/json")


# --- a body's way in: JSON, size bounds, validation ------------------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _loc(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[ContentPart]', 1) -> 'messages[0].content[1]': pydantic's union-member tags
    ('str', 'list[...]', 'NamedToolChoice', "literal['none',...]") are not fields and are left out."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part[:1].isupper() or part in _TYPE_TAGS):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    param = _loc(tuple(err.get("loc", ())))
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"{param}: unknown field (nanoseek refuses every field it does not implement; "
                        "docs/serving.md lists them)", param, "unsupported_parameter")
    return APIError(400, f"{param or 'body'}: {err.get('msg')}", param or None, err.get("type"))


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}", None, "json_invalid") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", None, "invalid_type")
    return data


def check_sizes(data: dict[str, Any], limits: dict[str, int]) -> None:
    """Cheap bounds on the lists a body may hold, before pydantic walks them (its validation holds the GIL: ~5 us a
    message, so 100k tiny messages in a 4 MiB body would stall every request for half a second)."""
    for key, limit in limits.items():
        v = data.get(key)
        if isinstance(v, (list, dict)) and len(v) > limit:
            raise APIError(400, f"{key} has {len(v)} entries; at most {limit} can fit this model's context or this "
                           "server's limits", key, "too_many_entries")
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = sum(len(m[k]) for m in messages if isinstance(m, dict) for k in ("content", "tool_calls")
                    if isinstance(m.get(k), list))
        if parts > limits["messages"]:
            raise APIError(400, f"the messages hold {parts} content parts and tool calls; at most "
                           f"{limits['messages']}", "messages", "too_many_entries")


def text_length(x: Any) -> int:
    """Characters in every string of x (dict keys too)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return sum(text_length(k) + text_length(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return sum(text_length(v) for v in x)
    return 0


def refuse(body: BaseModel, fields: tuple[str, ...], where: str = "") -> None:
    """400 for the first of `fields` (declared only to be refused, REFUSED says why) that holds anything but null."""
    for name in fields:
        if getattr(body, name, None) is not None:
            raise APIError(400, f"{where}{name}: {REFUSED[name]}", where + name, "unsupported_parameter")

