"""Compiling specs into xgrammar grammars for one tokenizer, with a bounded LRU cache keyed by spec.

Built once per engine (`Engine.grammars`): the tokenizer's vocabulary is analysed once (about 0.2 s
for SmolLM2's 49152 tokens). A typical JSON schema compiles in about 10 ms (docs/benchmarks.md), so
the server compiles in the request's handler thread, where a bad spec becomes a 400; the engine's
own `add_request` then finds it in the cache. Thread-safe: handlers and the engine thread share it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence

import xgrammar as xgr

from loramux.structured.matcher import Constraint
from loramux.structured.spec import StructuredError, StructuredSpec

# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:123: " (and some with "Check failed: ... is false: ")
_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarCache:
    """tokenizer: a transformers tokenizer; vocab_size: the model's (the logits' width, which may
    exceed the tokenizer's); stop_token_ids: the ids that end a request (the grammar allows them
    once its output is complete). Keeps the `capacity` most recently used compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], capacity: int = 128) -> None:
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # our own cache, keyed by spec; one thread: requests' grammars are small, and compiles are rare
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compile_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredSpec, xgr.CompiledGrammar] = OrderedDict()
        self.capacity = capacity

    def compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`, from the cache or compiled now; StructuredError if invalid."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        with self._compile_lock:
            try:
                compiled = self._compile(spec)
            except RuntimeError as e:
                raise StructuredError(_NOISE.sub("", str(e).strip())) from None
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, spec: StructuredSpec) -> Constraint:
        """A new request's grammar state for `spec` (StructuredError if the spec is invalid)."""
        return Constraint(self.compile(spec), self.vocab_size)

    def _compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        # JSON without free whitespace (", " and ": " separators): a model cannot wander off into
        # whitespace until max_tokens
        if spec.kind == "json":
            return self._compiler.compile_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            options = json.loads(spec.value)
            return self._compiler.compile_grammar("root ::= " + " | ".join(_literal(o) for o in options))
        if spec.kind == "grammar":
            if "::=" in spec.value:
                return self._compiler.compile_grammar(spec.value)
            return self._compiler.compile_lark(spec.value)
        raise StructuredError(f"unknown kind of structured output {spec.kind!r}")

    def __len__(self) -> int:
        return len(self._cache)


def _literal(text: str) -> str:
    """An EBNF string literal of `text` (JSON's escapes are EBNF's); the empty string is `""`."""
    return json.dumps(text, ensure_ascii=False)
