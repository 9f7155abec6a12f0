"""Tool calls in a model's text: one small class per format, and a registry by name (`serve
--tool-call-parser NAME`, vLLM's names).

A parser reads calls out of a finished output (`parse`), tells a stream where calls begin so that
their text is not sent as content (`call_start`, `held_back`), and writes calls and tool
definitions in its format for chat templates that do not render tools themselves (`render`,
`instructions`; SmolLM2's template is one: it ignores `tools` and `tool_calls`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as JSON text (OpenAI's `arguments`)."""

    name: str
    arguments: str


def _call(obj: Any, argument_keys: tuple[str, ...]) -> ParsedCall | None:
    """A call from a parsed JSON object {"name": ..., <one of argument_keys>: {...}}, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _arguments(call: dict) -> Any:
    """The arguments of an OpenAI tool call (JSON text) as a value, for writing it back."""
    try:
        return json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        return call["function"]["arguments"]


class ToolParser:
    """The interface; `text` is always the output so far (or all of it)."""

    name: ClassVar[str]

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content without the calls, None if nothing is left; the calls in order). Text that
        looks like a call but does not parse stays content."""
        raise NotImplementedError

    def call_start(self, text: str) -> int:
        """Where the first call begins in `text`, or -1."""
        raise NotImplementedError

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` (which has no call yet) may still begin one."""
        raise NotImplementedError

    def render(self, calls: list[dict]) -> str:
        """OpenAI tool calls ({"function": {"name", "arguments"}}) as the model writes them."""
        raise NotImplementedError

    def instructions(self, tools: list[dict]) -> str:
        """A system prompt describing OpenAI tool definitions and how to call them in this format."""
        raise NotImplementedError


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them, anywhere in
    the text (Hermes, Qwen 2.5). A list of such objects in one tag is read too: SmolLM2's model
    card asks for `<tool_call>[{...}, ...]</tool_call>`. An unclosed tag at the end is read as if closed."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALLS = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls: list[ParsedCall] = []
        content = []
        last = 0
        for match in self._CALLS.finditer(text):
            try:
                body = json.loads(match.group(1))
            except json.JSONDecodeError:
                continue
            found = [_call(obj, ("arguments", "parameters")) for obj in (body if isinstance(body, list) else [body])]
            if not found or None in found:
                continue
            calls += found
            content.append(text[last : match.start()])
            last = match.end()
        content.append(text[last:])
        rest = "".join(content).strip()
        return (rest or None) if calls else (text or None), calls

    def call_start(self, text: str) -> int:
        return text.find(self.OPEN)

    def held_back(self, text: str) -> int:
        return next((n for n in range(min(len(self.OPEN) - 1, len(text)), 0, -1) if self.OPEN.startswith(text[-n:])), 0)

    def render(self, calls: list[dict]) -> str:
        return "\n".join(f"{self.OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)}, ensure_ascii=False)}\n{self.CLOSE}"
                         for c in calls)

    def instructions(self, tools: list[dict]) -> str:
        signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
                f"XML tags. You may call one or more functions to assist with the user query.\n<tools>\n{signatures}\n</tools>\n"
                "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
                'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class Llama3JsonParser(ToolParser):
    """Llama 3's JSON tool calls: the output is `{"name": ..., "parameters": {...}}` (or
    "arguments"), several separated by `;`, optionally after `<|python_tag|>`. Calls are the whole
    output or none of it: text that does not start with one is content."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text or None, []
            call = _call(obj, ("parameters", "arguments"))
            if call is None:
                return text or None, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return (None, calls) if calls else (text or None, [])

    def call_start(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(("{", self.TAG)) else -1

    def held_back(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if self.TAG.startswith(stripped) else 0  # blank, or maybe the tag's beginning

    def render(self, calls: list[dict]) -> str:
        return "; ".join(json.dumps({"name": c["function"]["name"], "parameters": _arguments(c)}, ensure_ascii=False) for c in calls)

    def instructions(self, tools: list[dict]) -> str:
        signatures = "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
        return ("Given the following functions, please respond with a JSON for a function call with its proper arguments "
                "that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
                f"Do not use variables.\n\n{signatures}")


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}
DEFAULT_TOOL_PARSER = HermesParser.name  # SmolLM2's format (see HermesParser)
