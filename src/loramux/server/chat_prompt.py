"""A chat request's messages and tools as the model's chat template takes them.

Templates that render tools (their source mentions `tools`) get OpenAI's definitions as they are,
through transformers' `apply_chat_template(tools=...)`, and assistant `tool_calls` as messages'
`tool_calls` (arguments as objects, as Hugging Face templates expect). Templates that do not (such
as SmolLM2's, which only concatenates roles and contents) get the tool parser's own format instead:
the definitions and calling instructions in the system message, and earlier calls written into the
assistant's content as the model would write them. `tool` messages keep their role and get their
`tool_call_id`.
"""

from __future__ import annotations

import json
from typing import Any

from loramux.server.protocol import ChatCompletionRequest, ChatMessage
from loramux.server.tool_parsers import ToolParser


def template_inputs(body: ChatCompletionRequest, template: str, parser: ToolParser,
                    with_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools for apply_chat_template, None when none or when the template cannot take
    them). with_tools: the request's tools are offered (tool_choice is not "none")."""
    renders_tools = "tools" in template
    renders_calls = "tool_calls" in template
    messages = [_message(m, parser, renders_calls) for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if with_tools else []
    if not tools:
        return messages, None
    if renders_tools:
        return messages, tools
    instructions = parser.instructions(tools)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}".lstrip()}
    else:
        messages.insert(0, {"role": "system", "content": instructions})
    return messages, None


def _message(m: ChatMessage, parser: ToolParser, renders_calls: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        message["name"] = m.name
    if m.tool_calls:
        calls = [c.model_dump() for c in m.tool_calls]
        if renders_calls:
            message["tool_calls"] = [{**c, "function": {"name": c["function"]["name"], "arguments": _value(c["function"]["arguments"])}}
                                     for c in calls]
        else:
            message["content"] = "\n".join(part for part in (message["content"], parser.render(calls)) if part)
    return message


def _value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
