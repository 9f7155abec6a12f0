"""Structured outputs in the engine: specs as cache keys, every kind of constraint on a tiny random
model (whose free output is noise, so a conforming output shows the constraint at work), constrained
and free rows of several adapters in the same steps, the sampler's mask, and the chat template's
options of `Engine.encode_chat`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from pydantic import BaseModel, Field

from loramux.engine.sampling import SamplingParams, sample_next
from loramux.lora.adapter import LoraConfig
from loramux.structured import StructuredError, StructuredSpec


class Person(BaseModel):
    """Bounded fields: a random model's output of this schema ends within a few dozen tokens."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    admin: bool


EMAIL = r"[a-z]{1,6}@[a-z]{2,5}\.com"
CHOICES = ["red", "green", "blue"]
EBNF = 'root ::= "(" [0-9] [0-9]? ")" " " ("yes" | "no")'
LARK = 'start: "<" WORD ">"\nWORD: /[a-z]{1,4}/'
CONFORMS = {  # kind -> (spec, check of a complete output)
    "json": (StructuredSpec.json_schema(Person.model_json_schema()), lambda t: Person.model_validate_json(t) is not None),
    "regex": (StructuredSpec.regex(EMAIL), lambda t: re.fullmatch(EMAIL, t) is not None),
    "choice": (StructuredSpec.choice(CHOICES), lambda t: t in CHOICES),
    "ebnf": (StructuredSpec.grammar(EBNF), lambda t: re.fullmatch(r"\(\d\d?\) (yes|no)", t) is not None),
    "lark": (StructuredSpec.grammar(LARK), lambda t: re.fullmatch(r"<[a-z]{1,4}>", t) is not None),
    "json_object": (StructuredSpec.json_object(), lambda t: isinstance(json.loads(t), dict)),
}


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    """The tiny engine with two random adapters."""
    from conftest import make_tiny_hf, ours_from_hf

    from loramux.engine.engine import Engine, EngineConfig
    from loramux.model.loader import LoadedModel, resolve_model_dir

    hf = make_tiny_hf(seed=0, vocab_size=49152, tie_word_embeddings=True)
    loaded = LoadedModel(name="tiny", path=resolve_model_dir(None)[1], model=ours_from_hf(hf), tokenizer=default_tokenizer)
    e = Engine(loaded, EngineConfig(kv_cache_memory=16 * 2**20))
    for i, name in enumerate(("poet", "coder")):
        e.create_adapter(name, LoraConfig(r=4, alpha=8), seed=i + 1, init_b="random")
    return e


def test_equal_schemas_are_one_spec_and_the_cache_is_bounded(engine):
    a = StructuredSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}})
    b = StructuredSpec.json_schema('{"type":  "object",\n "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}}')
    assert a == b and hash(a) == hash(b)
    # the order of properties is the output's order: part of the spec
    assert a != StructuredSpec.json_schema({"type": "object", "properties": {"y": {"type": "boolean"}, "x": {"type": "integer"}}})
    from loramux.structured.grammars import GrammarCache

    cache = GrammarCache(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids, capacity=2)
    assert cache.compile(a) is cache.compile(b) and len(cache) == 1
    cache.compile(StructuredSpec.regex("x+"))
    cache.compile(StructuredSpec.regex("y+"))
    assert len(cache) == 2 and a not in cache._cache  # the least recently used went first


@pytest.mark.parametrize("kind", sorted(CONFORMS))
def test_each_kind_of_constraint_is_followed_and_ends_with_stop(engine, kind):
    spec, conforms = CONFORMS[kind]
    # A random model's free-form JSON loops inside a string when greedy, and rambles in it until
    # max_tokens when sampled: a bias on '"' closes each string at its first chance, whatever the seed.
    free = kind == "json_object"
    bias = {engine.tokenizer.convert_tokens_to_ids('"'): 100.0} if free else {}
    [out] = engine.generate(["Tell me something."], params=SamplingParams(max_tokens=120, temperature=1.0 if free else 0.0, seed=1,
                                                                          logit_bias=bias, structured=spec))
    assert out.finish_reason == "stop" and conforms(out.text), out.text
    assert out.token_ids[-1] in engine.eos_token_ids  # the grammar's end allowed the end of sequence, and it ended the request


def test_constrained_and_free_rows_share_steps_across_adapters(engine):
    prompts = [f"Prompt number {i}" for i in range(8)]
    adapters = ["poet", "coder", None, "poet", "coder", None, "poet", "coder"]
    kinds = ["json", "regex", "choice", "ebnf"]
    params = [SamplingParams(max_tokens=40, structured=CONFORMS[kinds[i // 2]][0]) if i % 2 == 0 else SamplingParams(max_tokens=12)
              for i in range(8)]
    together = engine.generate(prompts, adapters, params=params)
    for i, out in enumerate(together):
        if i % 2 == 0:
            assert out.finish_reason == "stop" and CONFORMS[kinds[i // 2]][1](out.text), (i, out.text)
        else:
            [alone] = engine.generate([prompts[i]], adapters[i], params=params[i])
            assert out.token_ids == alone.token_ids  # free rows pay no mask and see none
    [free] = engine.generate([prompts[0]], adapters[0], max_tokens=12)
    assert not free.text.startswith("{")  # unconstrained, the same row writes no JSON: the constraint made it


def test_max_tokens_cuts_a_constrained_output_into_a_valid_prefix(engine):
    [out] = engine.generate(["Count."], params=SamplingParams(max_tokens=3, structured=StructuredSpec.grammar('root ::= "(" [0-9]+ ")"')))
    assert out.finish_reason == "length" and re.fullmatch(r"\(\d*\)?", out.text), out.text


def test_json_properties_come_in_the_schemas_order(engine):
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}, "required": ["zeta", "alpha"]}
    [out] = engine.generate(["Tell me."], params=SamplingParams(max_tokens=60, structured=StructuredSpec.json_schema(schema)))
    assert list(json.loads(out.text)) == ["zeta", "alpha"]


def test_min_tokens_yields_to_a_complete_output(engine):
    spec, conforms = CONFORMS["choice"]
    [out] = engine.generate(["Pick."], params=SamplingParams(max_tokens=20, min_tokens=10, temperature=1.0, seed=0, structured=spec))
    assert out.finish_reason == "stop" and conforms(out.text), out.text


def test_sampling_seeded_constrained_outputs_conform(engine):
    spec, conforms = CONFORMS["json"]
    outs = engine.generate(["Who?"] * 4, params=[SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured=spec) for s in range(4)])
    assert all(o.finish_reason == "stop" and conforms(o.text) for o in outs), [o.text for o in outs]


@pytest.mark.parametrize("spec, words", [
    (StructuredSpec.json_schema({"type": "nonsense"}), "nonsense"),
    (StructuredSpec.regex("(ab"), "parenthesis"),
    (StructuredSpec.grammar('root ::= "a" |'), "EBNF"),
])
def test_an_invalid_spec_is_refused_when_the_request_is_added(engine, spec, words):
    with pytest.raises(StructuredError, match=words):
        engine.add_request("Hi", params=SamplingParams(structured=spec))
    assert not engine.has_unfinished


def test_the_mask_forbids_tokens_and_greedy_takes_the_best_allowed():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0])
    allowed = torch.tensor([False, False, True, True])
    assert sample_next(logits, SamplingParams(), torch.Generator(), allowed=allowed)[0] == 2
    seeded = SamplingParams(temperature=1.0, seed=0)
    assert all(sample_next(logits, seeded, seeded.generator(), allowed=allowed)[0] in (2, 3) for _ in range(20))


def test_encode_chat_options(engine):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    text = engine.tokenizer.decode(engine.encode_chat(conversation, add_generation_prompt=False, continue_final_message=True))
    assert text.endswith("<|im_start|>assistant\nHel")
    assert engine.tokenizer.decode(engine.encode_chat(conversation[:1])).endswith("<|im_start|>assistant\n")  # the old call
    with pytest.raises(ValueError, match="cannot both be true"):
        engine.encode_chat(conversation, continue_final_message=True)
    with pytest.raises(ValueError, match="tokenize"):
        engine.encode_chat(conversation[:1], chat_template_kwargs={"tokenize": True})
