"""A chat request's tool calls: what `tool_choice` asks of the output, and how the output's text
becomes OpenAI's `tool_calls`, whole or streamed.

tool_choice "none" (or no tools): plain text. "auto" (the default with tools): the model writes
freely and the server's tool parser reads calls out of the text. "required" or a named function:
the output is constrained (structured outputs), as vLLM does it, to a JSON list of
`{"name", "parameters"}` objects over the tools (one object when parallel_tool_calls is false), or
to the named function's arguments; arguments then always validate against the function's schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from loramux.server.protocol import ChatCompletionRequest, NamedToolChoice
from loramux.server.tool_parsers import ParsedCall, ToolParser
from loramux.structured.spec import StructuredSpec

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # a function declared without parameters


class ToolCalls:
    """One request's tool-call handling (see the module's docstring)."""

    def __init__(self, body: ChatCompletionRequest, parser: ToolParser) -> None:
        self.tools = {t.function.name: t.function.parameters or ANY_OBJECT for t in body.tools or []}
        self.choice = (body.tool_choice or "auto") if self.tools else "none"
        self.parallel = body.parallel_tool_calls
        self.parser = parser

    @property
    def active(self) -> bool:
        """The output may hold tool calls."""
        return self.choice != "none"

    @property
    def guided(self) -> bool:
        return self.choice == "required" or isinstance(self.choice, NamedToolChoice)

    def spec(self) -> StructuredSpec | None:
        """The constraint of a "required" or named choice (None otherwise)."""
        if isinstance(self.choice, NamedToolChoice):
            return StructuredSpec.json_schema(self.tools[self.choice.function.name])
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False} for name, params in self.tools.items()]
        listing = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        return StructuredSpec.json_schema({**listing, "maxItems": 1} if not self.parallel else listing)

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished output. A guided output that did not complete (max_tokens)
        is no call: it stays content."""
        if not self.active:
            return text, []
        if not self.guided:
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if isinstance(self.choice, NamedToolChoice):
            return None, [ParsedCall(self.choice.function.name, json.dumps(value, ensure_ascii=False))]
        return None, [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]

    def stream(self) -> CallStream:
        return CallStream(self)


class CallStream:
    """One choice's stream: content is released as it comes, except text that is (or may still
    become) a call, which is held; at the end the calls are parsed and sent whole."""

    def __init__(self, calls: ToolCalls) -> None:
        self.calls = calls
        self.text = ""
        self.released = 0  # characters of `text` sent as content
        self.in_call = calls.guided  # a guided output is all call

    def push(self, new_text: str, finished: bool) -> tuple[str, list[ParsedCall]]:
        """(content to send now, the calls: only once finished)."""
        self.text += new_text
        if finished:
            content, found = self.calls.extract(self.text)
            content = content or ""
            sent = self.text[: self.released]
            return (content[len(sent):] if content.startswith(sent) else ""), found
        if not self.in_call:
            parser = self.calls.parser
            start = parser.call_start(self.text)
            self.in_call = start >= 0
            end = start if self.in_call else len(self.text) - parser.held_back(self.text)
            if end > self.released:
                piece, self.released = self.text[self.released : end], end
                return piece, []
        return "", []


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message_calls(calls: list[ParsedCall]) -> list[dict]:
    """OpenAI's `message.tool_calls`."""
    return [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def delta_calls(calls: list[ParsedCall]) -> list[list[dict]]:
    """The `delta.tool_calls` of a stream, as OpenAI sends them: per call, first its index, id,
    type, name and arguments "", then its arguments."""
    deltas = []
    for i, c in enumerate(calls):
        deltas.append([{"index": i, "id": call_id(), "type": "function", "function": {"name": c.name, "arguments": ""}}])
        deltas.append([{"index": i, "function": {"arguments": c.arguments}}])
    return deltas
