"""Micro-benchmark behind the choice of loramux's grammar engine: xgrammar vs. llguidance.

What it measures
----------------
For SmolLM2's tokenizer at the model's vocabulary (49152 tokens), on this CPU, one thread:

1. ``vocab``  : preparing the tokenizer once (xgrammar's TokenizerInfo, llguidance's LLTokenizer);
2. ``compile``: a typical JSON schema (7 properties: strings, a bounded integer, an enum, an array,
   a nested object, a boolean, a pattern) made into a matcher, median of ``--repeat`` fresh
   schemas (one property renamed each time, so no cache answers);
3. ``mask``   : filling one request's token bitmask, per token, while the matcher follows a
   valid 72-token JSON output of that schema (mean and median over its tokens; the mean is the
   figure that adds up to a decode step's cost), and the same for any JSON object
   (``json_object``); the second of two passes with fresh matchers of the same grammar (the first
   pays tables each engine builds lazily).

Each engine gets whitespace as it defaults for JSON (llguidance's flexible whitespace accepts the
output's ", " and ": "). Run: ``python benchmarks/grammar_engines.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from loramux.model.loader import load_tokenizer, resolve_model_dir

VOCAB = 49152
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string"}, "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city"]},
    "active": {"type": "boolean"}}, "required": ["name", "age", "role", "active"], "additionalProperties": False}
OUTPUT = json.dumps({"name": "Alice Smith", "age": 33, "email": "alice@example.com", "role": "admin", "tags": ["a", "bb"],
                     "address": {"street": "1 Main St", "city": "Paris", "zip": "75001"}, "active": True})


def schemas(n: int) -> list[str]:
    """n distinct variants of SCHEMA (one extra property each)."""
    return [json.dumps({**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}": {"type": "string"}}}) for i in range(n)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def xgrammar_figures(tokenizer, ids: list[int], repeat: int) -> dict[str, float]:
    import xgrammar as xgr

    vocab, info = timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiles = [timed(lambda s=s: compiler.compile_json_schema(s, any_whitespace=False)) for s in schemas(repeat)]
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)

    def masks(compiled) -> list[float]:
        matcher, times = xgr.GrammarMatcher(compiled), []
        for token in ids:
            times.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask))[0])
            assert matcher.accept_token(token)
        return times

    schema_masks = warm(masks, compiles[0][1])
    object_masks = warm(masks, compiler.compile_json_schema('{"type": "object"}', any_whitespace=False))
    return summary(vocab, [c[0] for c in compiles], schema_masks, object_masks)


def llguidance_figures(tokenizer, ids: list[int], repeat: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    vocab, lltok = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB))
    def make(schema: str):
        return llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))

    compiles = [timed(lambda s=s: make(s)) for s in schemas(repeat)]
    bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)

    def masks(matcher) -> list[float]:
        times = []
        for token in ids:
            times.append(timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0))[0])
            assert matcher.consume_token(token), matcher.get_error()
        return times

    object_grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    schema_masks = warm(lambda s: masks(make(s)), schemas(1)[0])
    object_masks = warm(lambda g: masks(llguidance.LLMatcher(lltok, g)), object_grammar)
    return summary(vocab, [c[0] for c in compiles], schema_masks, object_masks)


def warm(measure, arg) -> list[float]:
    """The second of two passes (the first pays the engine's lazily built tables)."""
    measure(arg)
    return measure(arg)


def summary(vocab: float, compiles: list[float], schema_masks: list[float], object_masks: list[float]) -> dict[str, float]:
    return {"vocab ms": vocab * 1e3, "compile ms (median)": statistics.median(compiles) * 1e3,
            "mask us (mean)": statistics.mean(schema_masks) * 1e6, "mask us (median)": statistics.median(schema_masks) * 1e6,
            "mask us (max)": max(schema_masks) * 1e6, "json_object mask us (mean)": statistics.mean(object_masks) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_dir(None)[1])
    ids = tokenizer(OUTPUT, add_special_tokens=False)["input_ids"]
    rows = {"xgrammar": xgrammar_figures(tokenizer, ids, args.repeat), "llguidance": llguidance_figures(tokenizer, ids, args.repeat)}
    names = list(next(iter(rows.values())))
    print("| engine | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for engine, figures in rows.items():
        print(f"| {engine} | " + " | ".join(f"{figures[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
