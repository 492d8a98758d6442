"""A chat request -> the chat template's inputs: its chat-only fields checked, its messages checked and put in the
template's shape, and the thinking switch. Each refusal is an APIError naming the field (docs/serving.md's table).
"""

from __future__ import annotations

from typing import Any

from nanoseek.serving.protocol import APIError, ChatCompletionRequest, TokenizeRequest, refuse


def check_chat_options(body: ChatCompletionRequest) -> None:
    """Refusals and value checks of chat-only fields (the field table in docs/serving.md)."""
    refuse(body, ("audio", "prediction", "web_search_options", "functions", "function_call", "metadata",
                  "reasoning_effort", "verbosity", "moderation", "prompt_cache_options", "prompt_cache_retention"))
    if body.modalities is not None and body.modalities != ["text"]:
        raise APIError(400, f"modalities: nanoseek generates text only; send [\"text\"] or leave it out, got "
                       f"{body.modalities}", "modalities", "unsupported_value")
    if body.store:
        raise APIError(400, "store: nanoseek stores no completions (send false or leave it out)", "store",
                       "unsupported_value")
    if body.service_tier not in (None, "auto", "default"):
        raise APIError(400, f"service_tier: one tier is served (\"auto\" / \"default\"), got {body.service_tier!r}",
                       "service_tier", "unsupported_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")


def chat_messages(body: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
    """Checked messages in the template's shape; raises APIError naming the field."""
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    last = len(body.messages) - 1
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]."
        role = "system" if m.role == "developer" else m.role
        if role == "function":
            raise APIError(400, f"{where}role: the deprecated role 'function' is not supported: send role 'tool' "
                           "with tool_call_id", where + "role", "unsupported_value")
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"{where}role: must be system, developer, user, assistant or tool, got "
                           f"{m.role!r}", where + "role", "invalid_value")
        refuse(m, ("name", "refusal", "audio", "function_call"), where)
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"{where}content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                   f"...}}) are supported, got type {part.type!r}", f"{where}content[{j}].type",
                                   "unsupported_value")
                extra = next(iter(part.model_extra or {}), None)  # e.g. cache_control, prompt_cache_breakpoint
                if extra is not None:
                    raise APIError(400, f"{where}content[{j}].{extra}: unknown field of a text part",
                                   f"{where}content[{j}].{extra}", "unsupported_parameter")
            content = "".join(p.text for p in content)
        if content is None and not (role == "assistant" and (m.tool_calls or m.prefix)):
            raise APIError(400, f"{where}content: required", where + "content", "missing")
        msg: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.reasoning_content is not None or "reasoning_content" in m.model_fields_set:
            if not (m.prefix and i == last):
                raise APIError(400, f"{where}reasoning_content: send earlier answers back with their content only "
                               "(as the DeepSeek API requires); reasoning_content is accepted only on a last "
                               "assistant message with prefix: true", where + "reasoning_content")
            if not isinstance(m.reasoning_content, str):
                raise APIError(400, f"{where}reasoning_content: must be a string", where + "reasoning_content")
            msg["reasoning_content"] = m.reasoning_content
        if m.prefix:
            if role != "assistant" or i != last:
                raise APIError(400, f"{where}prefix: only the last message may be a prefix, and it must be an "
                               "assistant message", where + "prefix")
            if m.tool_calls:
                raise APIError(400, f"{where}prefix: a prefix message cannot carry tool_calls", where + "prefix")
            msg["prefix"] = True
        if m.tool_calls is not None:
            if role != "assistant":
                raise APIError(400, f"{where}tool_calls: only assistant messages carry tool calls",
                               where + "tool_calls")
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            call_ids |= {c.id for c in m.tool_calls if c.id is not None}
        if role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"{where}tool_call_id: required on a tool message", where + "tool_call_id",
                               "missing")
            if m.tool_call_id not in call_ids:
                raise APIError(400, f"{where}tool_call_id: {m.tool_call_id!r} answers no earlier assistant tool "
                               "call", where + "tool_call_id", "invalid_value")
            msg["tool_call_id"] = m.tool_call_id
        elif m.tool_call_id is not None:
            raise APIError(400, f"{where}tool_call_id: only tool messages carry it", where + "tool_call_id")
        out.append(msg)
    return out


def thinking(body: ChatCompletionRequest | TokenizeRequest) -> bool:
    """thinking: {"type"} (DeepSeek) and chat_template_kwargs {"thinking"} / {"enable_thinking"} (vLLM)."""
    choices = []
    if body.thinking is not None:
        choices.append(("thinking", body.thinking.type == "enabled"))
    for key, value in (body.chat_template_kwargs or {}).items():
        param = f"chat_template_kwargs.{key}"
        if key not in ("thinking", "enable_thinking"):
            raise APIError(400, f"{param}: nanoseek's chat template takes only 'thinking' / 'enable_thinking'",
                           param, "unsupported_parameter")
        if not isinstance(value, bool):
            raise APIError(400, f"{param}: must be true or false", param, "bool_type")
        choices.append((param, value))
    if len({v for _, v in choices}) > 1:
        raise APIError(400, f"{choices[1][0]} contradicts {choices[0][0]}", choices[1][0], "invalid_value")
    return choices[0][1] if choices else True
