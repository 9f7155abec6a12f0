"""Structured outputs: grammar-constrained decoding, per request, inside mixed-adapter batches.

`spec.StructuredSpec` is a request's constraint as a value (what SamplingParams carries); the engine
compiles it once through `grammars.GrammarCache` (xgrammar, cached by spec) and keeps a
`matcher.Constraint` per request, which gives the tokens allowed next and follows the ones chosen.
This package knows nothing of the HTTP server: the server translates OpenAI's and vLLM's fields
into a spec.
"""

from loramux.structured.spec import StructuredError, StructuredSpec

__all__ = ["StructuredError", "StructuredSpec"]
