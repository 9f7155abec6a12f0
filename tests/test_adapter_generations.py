"""Adapter weight generations: a slot reused by another adapter, or updated in place, serves the
weights it holds now, whether or not a step ran in between (lora/generations.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from loramux import LoraConfig, SamplingParams
from loramux.lora.generations import AdapterGenerations

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["One two three", "The cat sat on"]


def _outputs(engine, adapter):
    return [g.token_ids for g in engine.generate(PROMPTS, adapter, params=GREEDY)]


def _reference(tiny_engine, seed):
    """What a fresh engine holding only the adapter made with `seed` generates."""
    engine = tiny_engine()
    engine.create_adapter("x", LoraConfig(r=8, target_modules="all-linear"), seed=seed, init_b="random")
    return _outputs(engine, "x")


def test_generations_never_repeat_for_a_reused_slot():
    generations = AdapterGenerations()
    generations.bump(0)
    first = generations.of(0)
    generations.bump(1)
    generations.bump(0)
    assert generations.of(0) > first and generations.of(0) != generations.of(1)
    assert generations.version == 3 and generations.of(7) == 0


@pytest.mark.parametrize("step_between", [True, False])
def test_a_name_reused_after_unload_serves_the_new_weights(tiny_engine, step_between):
    expected_old, expected_new = _reference(tiny_engine, seed=1), _reference(tiny_engine, seed=2)
    assert expected_old != expected_new  # the test can tell the two adapters apart
    engine = tiny_engine()
    lora = LoraConfig(r=8, target_modules="all-linear")
    engine.create_adapter("x", lora, seed=1, init_b="random")
    assert _outputs(engine, "x") == expected_old  # the linears now hold stacked copies of slot 0
    slot = engine.adapters.slot("x")
    engine.unload_adapter("x")
    gc.collect()  # the old tensors are freed: their ids may be handed to the new ones
    if step_between:
        assert _outputs(engine, None) == _outputs(tiny_engine(), None)
    engine.create_adapter("x", lora, seed=2, init_b="random")
    assert engine.adapters.slot("x") == slot
    assert _outputs(engine, "x") == expected_new


def test_in_place_updates_are_served_once_marked(tiny_engine):
    engine = tiny_engine()
    engine.create_adapter("x", LoraConfig(r=8, target_modules="all-linear"), seed=1, init_b="random")
    before = _outputs(engine, "x")
    with torch.no_grad():
        for A, B in engine.adapters.get("x").weights.values():
            B.mul_(-3)
    engine.adapters.mark_updated("x")
    after = _outputs(engine, "x")
    reference = tiny_engine()
    reference.create_adapter("x", LoraConfig(r=8, target_modules="all-linear"), seed=1, init_b="random")
    with torch.no_grad():
        for A, B in reference.adapters.get("x").weights.values():
            B.mul_(-3)
    assert after == _outputs(reference, "x") and after != before
