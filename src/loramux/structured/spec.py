"""A request's output constraint as a frozen, hashable value (the grammar cache's key).

Light on purpose (no xgrammar import): SamplingParams carries it, and the server builds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "regex", "choice", "grammar"]


class StructuredError(ValueError):
    """A spec that does not compile (an invalid schema, regex or grammar); the message says why."""


@dataclass(frozen=True)
class StructuredSpec:
    """kind "json": `value` is a JSON schema as compact JSON text in the schema's own key order
    (properties are written in that order, so it is part of the spec), so a schema given as a dict
    or as text of any spacing is one key of the grammar cache; kind "regex": a regular expression the whole output matches;
    kind "choice": a JSON list of the strings the output may be, exactly; kind "grammar": an EBNF
    grammar (xgrammar's GBNF dialect, rules written `name ::= ...`, starting at `root`) or a Lark
    grammar (rules written `name: ...`, starting at `start`).

    Build one with the constructors below rather than by hand."""

    kind: Kind
    value: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> StructuredSpec:
        """Output is JSON valid under `schema` (a dict, or its JSON text)."""
        parsed = json.loads(schema) if isinstance(schema, str) else schema
        return cls("json", json.dumps(parsed, ensure_ascii=False, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> StructuredSpec:
        """Output is one JSON object, any keys (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredSpec:
        if not options:
            raise ValueError("a choice needs at least one option")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> StructuredSpec:
        return cls("grammar", text)
