"""What the chat template was given for a stored chat request, the way vLLM gives it.

The gateway stores a request as the product sent it: `messages`, and its other fields in
`params`. vLLM does not pass those to the chat template as they are: it validates `tools` into
its own shape, parses tool-call arguments into objects, and merges request fields into the
template's keyword arguments. Training must render the same text, so it repeats those steps here.

Mirrors vLLM 0.32: ChatCompletionRequest.build_chat_params, OnlineRenderer.render_chat and
preprocess_chat, ChatCompletionToolsParam's serialiser, and renderers/chat_utils
_postprocess_messages. tests/integration/test_train_serve_consistency.py compares the result with
what vLLM's /tokenize renders, so a vLLM upgrade that changes any of this fails there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Request fields that change what the template renders (tool_choice does not, but replaying the
# request needs it: vLLM refuses tools without a tool_choice it can honour).
TEMPLATE_FIELDS = ("tools", "tool_choice", "chat_template_kwargs", "documents", "reasoning_effort",
                   "chat_template", "add_generation_prompt", "continue_final_message")

# chat_template_kwargs that vLLM refuses, or that replace its template or the request's tools:
# such a request is not trained on.
_REFUSED_KWARGS = frozenset({"chat_template", "conversation", "tools"})
# Set by vLLM from the request's own fields whatever chat_template_kwargs say; the renderer sets
# them for training. apply_chat_template's tokenizing options never reach the template.
_IGNORED_KWARGS = frozenset({
    "add_generation_prompt", "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class UnsupportedRequest(ValueError):
    """The request was rendered in a way training cannot (or must not) repeat."""


def template_fields(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a request's stored params that the template (or a replay) needs."""
    params = params or {}
    return {k: params[k] for k in TEMPLATE_FIELDS if params.get(k) is not None}


def template_args(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """apply_chat_template's keyword arguments (besides the generation-prompt flags) for a
    request with these params, as vLLM derives them; {} for a request with none."""
    params = params or {}
    if params.get("chat_template") is not None:
        raise UnsupportedRequest("the request carried its own chat_template")
    if params.get("continue_final_message") or params.get("add_generation_prompt") is False:
        raise UnsupportedRequest("the request continued its final message")
    args = _user_kwargs(params.get("chat_template_kwargs"))
    for key in ("documents", "reasoning_effort"):
        if params.get(key) is not None:
            args[key] = params[key]
    effort = params.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in (params.get("chat_template_kwargs") or {}):
        args["enable_thinking"] = effort != "none"
    tools = tool_dicts(params.get("tools"))
    if tools is not None:
        args["tools"] = tools
    return args


def _user_kwargs(kwargs: Any) -> dict[str, Any]:
    """The request's chat_template_kwargs that reach the template."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise UnsupportedRequest("chat_template_kwargs is not an object")
    refused = sorted(_REFUSED_KWARGS & kwargs.keys())
    if refused:
        raise UnsupportedRequest(f"chat_template_kwargs sets {', '.join(refused)}")
    kept = {}
    for key, value in kwargs.items():
        # vLLM's merge_kwargs drops None and "auto": the template never sees such a key.
        if key in _IGNORED_KWARGS or value is None or value == "auto":
            continue
        if not isinstance(key, str) or not _is_plain_json(value):
            raise UnsupportedRequest(f"chat_template_kwargs[{str(key)[:40]!r}] is not a JSON value")
        kept[key] = value
    return kept


def _is_plain_json(value: Any) -> bool:
    """Whether value is made of JSON's own types only (what a stored request can hold)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_json(v) for k, v in value.items())
    return False


def tool_dicts(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` as vLLM hands them to the template: validated into its tool model and dumped."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise UnsupportedRequest("tools is not a non-empty list")
    return [_tool_dict(tool) for tool in tools]


def _tool_dict(tool: Any) -> dict[str, Any]:
    # Field order and the None fields kept (description, parameters) or dropped (strict,
    # defer_loading) are vLLM's: templates that dump a tool as JSON show them.
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type", "function") != "function" \
            or not isinstance(function.get("name"), str):
        raise UnsupportedRequest("a tool is not a function with a name")
    out = {"name": function["name"], "description": function.get("description"),
           "parameters": copy.deepcopy(function.get("parameters"))}
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    defer = tool.get("defer_loading")
    if (function_defer := function.get("defer_loading", None)) is None:
        function_defer = defer  # vLLM copies the tool's flag into its function
    if function_defer is not None:
        out["defer_loading"] = function_defer
    return {"type": "function", "function": out,
            **({"defer_loading": defer} if defer is not None else {})}


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the template sees them: tool-call arguments parsed into objects (an
    empty, unparsable or non-object argument string becomes {}), empty tool_calls dropped, and
    an assistant's `reasoning` also given as `reasoning_content` (the older name templates use)."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant":
            if isinstance(message.get("tool_calls"), list):
                if message["tool_calls"]:
                    message["tool_calls"] = [_parsed_call(c) for c in message["tool_calls"]]
                else:
                    del message["tool_calls"]
            if message.get("reasoning") is not None:
                message["reasoning_content"] = message["reasoning"]
        out.append(message)
    return out


def _parsed_call(call: Mapping[str, Any]) -> dict[str, Any]:
    parsed = copy.deepcopy(dict(call))
    function = parsed.get("function")
    if isinstance(function, dict):
        function["arguments"] = parse_arguments(function.get("arguments"))
    return parsed


def parse_arguments(arguments: Any) -> Any:
    """A tool call's arguments as vLLM gives them to the template."""
    if not arguments:
        return {}
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {}
    return arguments if isinstance(arguments, dict) else {}
