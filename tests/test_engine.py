"""The engine on the real default model: batch invariance, peer parity, preemption, memory
pressure, cancellation, admission control and the latency-aware step budget."""

from __future__ import annotations

import pytest
import torch

from loramux import Engine, LoraConfig, SamplingParams
from loramux.engine.engine import EngineConfig
from loramux.engine.scheduler import QueueFullError, SchedulerConfig
from loramux.kv.paged_cache import PagedKVCache

pytestmark = pytest.mark.integration

ADAPTERS = {
    "a-qv-r8": LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
    "b-all-r16": LoraConfig(r=16, alpha=32, target_modules="all-linear"),
    "c-mlp-r4": LoraConfig(r=4, alpha=8, target_modules=("gate_proj", "up_proj", "down_proj")),
    "d-kvo-r32": LoraConfig(r=32, alpha=16, target_modules=("k_proj", "v_proj", "o_proj"), use_rslora=True),
}
PROMPTS = [
    "What is the capital of France?", "Name a fruit that is yellow.", "Write a short greeting.",
    "What is 2 plus 3?", "Describe the sky in one sentence.", "Give me a synonym for happy.",
    "What do bees make?", "Say something about winter.", "Which animal barks?", "What color is grass?",
    "Tell me a fun fact.", "How many legs does a spider have?", "What is the opposite of hot?",
    "Name a planet.", "What is water made of?", "Write a word that rhymes with cat.",
]


@pytest.fixture
def make_engine(default_engine):
    """Engines over the session's model with their own KV cache and scheduler; adapters of the
    engine are removed afterwards so the next engine can use the same model."""
    made: list[Engine] = []

    def make(kv_tokens: int = 8192, block_size: int = 16, adapters: bool = True, **scheduler) -> Engine:
        config = default_engine.model.config
        memory = kv_tokens * PagedKVCache.bytes_per_token(config, default_engine.model.dtype)
        engine = Engine(default_engine.loaded, EngineConfig(kv_cache_memory=memory, block_size=block_size,
                                                            scheduler=SchedulerConfig(**scheduler)))
        if adapters:
            for i, (name, cfg) in enumerate(ADAPTERS.items()):
                engine.create_adapter(name, cfg, seed=i, init_b="random")
        made.append(engine)
        return engine

    yield make
    for engine in made:
        for name in engine.adapters.names():
            engine.adapters.remove(name)


def _assignments(n: int) -> list[str | None]:
    names = [None, *ADAPTERS]
    return [names[i % len(names)] for i in range(n)]


def _alone(engine: Engine, prompt: str, adapter: str | None, max_tokens: int) -> list[int]:
    return engine.generate([prompt], [adapter], chat=True, max_tokens=max_tokens)[0].token_ids


def test_batch_invariance_with_staggered_arrivals(make_engine):
    """16 requests over 4 adapters and the base model: the same greedy tokens one at a time and all
    together, with arrivals spread over the first steps (fp32)."""
    engine = make_engine()
    adapters = _assignments(len(PROMPTS))
    alone = [_alone(engine, p, a, 20) for p, a in zip(PROMPTS, adapters)]
    outputs: dict[str, list[int]] = {}
    ids = []
    pending = list(zip(PROMPTS, adapters))
    while pending or engine.has_unfinished:
        for prompt, adapter in pending[:3]:  # three new arrivals per step
            ids.append(engine.add_request(prompt, adapter, SamplingParams(max_tokens=20), chat=True).id)
        pending = pending[3:]
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    together = [outputs[i] for i in ids]
    assert together == alone
    assert len({tuple(t) for t in alone}) > 8, "adapters should make outputs differ"


def test_greedy_tokens_match_transformers_peft(make_engine, tmp_path):
    """Mixed-adapter continuous batching gives the tokens transformers + PEFT give per request."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = make_engine()
    chosen = ["a-qv-r8", "b-all-r16", "d-kvo-r32"]
    for name in chosen:
        engine.save_adapter(name, tmp_path / name)
    prompts = PROMPTS[:4]
    adapters = [None, *chosen]
    ours = engine.generate(prompts, adapters, chat=True, max_tokens=16)
    base = AutoModelForCausalLM.from_pretrained(engine.loaded.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / chosen[0], adapter_name=chosen[0])
    for name in chosen[1:]:
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    peft_model.eval()
    for prompt, adapter, out in zip(prompts, adapters, ours):
        ids = torch.tensor([engine.encode(prompt, chat=True)])
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                      pad_token_id=engine.tokenizer.eos_token_id)
        with torch.no_grad():
            if adapter is None:
                with peft_model.disable_adapter():
                    expected = peft_model.generate(**kwargs)
            else:
                peft_model.set_adapter(adapter)
                expected = peft_model.generate(**kwargs)
        assert out.token_ids == expected[0, ids.shape[1]:].tolist(), (prompt, adapter)


def test_steps_that_pay_one_time_costs_are_not_samples_of_step_cost(make_engine):
    """The first step, and the first after the adapters changed (their stacks are rebuilt), pay
    costs that later steps do not."""
    engine = make_engine(adapters=False)
    engine.add_request([1, 2, 3, 4], None, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    assert len(engine.scheduler.cost.samples) == 0
    engine.step()
    assert len(engine.scheduler.cost.samples) == 1
    engine.create_adapter("late", LoraConfig(r=4, target_modules=("q_proj",)), seed=0, init_b="random")
    engine.step()
    assert len(engine.scheduler.cost.samples) == 1
    engine.step()
    assert len(engine.scheduler.cost.samples) == 2


def test_preempted_requests_recompute_to_the_same_output(make_engine):
    """A cache too small for four growing sequences forces preemption; the preempted requests are
    recomputed later and still give their greedy output alone."""
    engine = make_engine(kv_tokens=12 * 16)  # 12 blocks; four requests need up to 4 each
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = PROMPTS[:4]
    adapters = ["b-all-r16", None, "a-qv-r8", "c-mlp-r4"]
    together = engine.generate(prompts, adapters, chat=True, params=params)
    assert sum(g.metrics.num_preemptions for g in together) > 0, "the test should force preemption"
    assert engine.kv.allocator.num_used == 0
    for prompt, adapter, out in zip(prompts, adapters, together):
        assert out.token_ids == engine.generate([prompt], [adapter], chat=True, params=params)[0].token_ids


def test_two_hundred_requests_through_a_cache_that_holds_ten(make_engine):
    engine = make_engine(kv_tokens=20 * 16)  # each request needs 2 blocks: 10 fit at once
    prompts = [f"Count: {i}" for i in range(10)]
    adapters = _assignments(10)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    references = {(p, a): engine.generate([p], [a], params=params)[0].token_ids for p, a in zip(prompts, adapters)}
    jobs = [(prompts[i % 10], adapters[i % 10]) for i in range(200)]
    results = engine.generate([p for p, _ in jobs], [a for _, a in jobs], params=params)
    assert [r.token_ids for r in results] == [references[j] for j in jobs]
    assert all(r.finish_reason == "length" for r in results)
    assert engine.kv.allocator.num_used == 0 and not engine.has_unfinished


def test_cancel_frees_blocks_at_once(make_engine):
    engine = make_engine()
    keep = engine.add_request("Tell me a story.", "a-qv-r8", SamplingParams(max_tokens=30, ignore_eos=True), chat=True)
    doomed = engine.add_request("Tell me another story.", "b-all-r16", SamplingParams(max_tokens=30, ignore_eos=True), chat=True)
    for _ in range(3):
        engine.step()
    held = len(doomed.block_table)
    used = engine.kv.allocator.num_used
    assert held > 0
    out = engine.abort(doomed.id)
    assert out.finished and out.finish_reason == "abort"
    assert engine.kv.allocator.num_used == used - held
    while engine.has_unfinished:
        engine.step()
    assert len(keep.output_ids) == 30 and engine.kv.allocator.num_used == 0
    assert engine.abort(doomed.id) is None  # aborting twice is harmless


def test_admission_control_rejects_cleanly(make_engine):
    engine = make_engine(kv_tokens=64, block_size=16, max_waiting=2, adapters=False)
    with pytest.raises(ValueError, match="exceeds the KV cache capacity of 64 tokens"):
        engine.add_request(list(range(1, 50)), None, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="context is 8192 tokens; the prompt has 8190 and max_tokens is 16"):
        engine.add_request([1] * 8190, None, SamplingParams(max_tokens=16))
    with pytest.raises(LookupError, match="unknown adapter 'nope'"):
        engine.add_request("hi", "nope")
    engine.add_request("one", None, SamplingParams(max_tokens=2))
    engine.add_request("two", None, SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("three", None, SamplingParams(max_tokens=2))
    while engine.has_unfinished:
        engine.step()
    engine.add_request("three", None, SamplingParams(max_tokens=2))  # room again once the queue drains
