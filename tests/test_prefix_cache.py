"""Prefix caching: block hashes, the allocator's ref counts and LRU, the scheduler's lookups, and
the engine's greedy outputs with caching on and off (a tiny random Llama, fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import FakeClock, make_tiny_hf, ours_from_hf

from loramux.batch import RowKind
from loramux.engine.engine import EngineConfig
from loramux.engine.requests import SLO, Request, RequestMetrics, RequestState
from loramux.engine.sampling import SamplingParams
from loramux.engine.scheduler import Scheduler, SchedulerConfig
from loramux.kv.block_allocator import BlockAllocator
from loramux.kv.block_hashes import BlockHashes, adapter_root, chain
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.adapter import LoraConfig
from loramux.lora.generations import AdapterGenerations

CONFIG = ours_from_hf(make_tiny_hf()).config
BS = 4  # block size of the scheduler tests


# --- hashes -----------------------------------------------------------------------------------
def test_a_block_hash_chains_the_adapter_identity_and_every_token_before_it():
    root = adapter_root(3, 7)
    tokens = list(range(10, 22))  # three blocks of 4
    hashes = BlockHashes(root, 4).update(12, lambda s, e: tokens[s:e])
    assert hashes == [chain(root, tokens[0:4]), chain(hashes[0], tokens[4:8]), chain(hashes[1], tokens[8:12])]
    changed = tokens[:1] + [99] + tokens[2:]  # one token of block 0 differs: every later block differs
    other = BlockHashes(root, 4).update(12, lambda s, e: changed[s:e])
    assert all(a != b for a, b in zip(hashes, other))
    for identity in ((3, 8), (4, 7), (None, 0)):  # another generation, slot, or the base model
        assert not set(hashes) & set(BlockHashes(adapter_root(*identity), 4).update(12, lambda s, e: tokens[s:e]))


def test_block_hashes_grow_with_the_sequence_and_skip_its_partial_block():
    tokens = list(range(30))
    grown = BlockHashes(adapter_root(None, 0), 4)
    assert grown.update(3, lambda s, e: tokens[s:e]) == []  # no full block yet
    for n in (5, 9, 10, 30):
        grown.update(n, lambda s, e: tokens[s:e])
    assert len(grown.hashes) == 7 and grown.hashes == BlockHashes(grown.root, 4).update(30, lambda s, e: tokens[s:e])


# --- the allocator ----------------------------------------------------------------------------
def test_shared_blocks_are_counted_and_return_to_the_lru_when_the_last_reference_goes():
    a = BlockAllocator(4)
    b0, b1 = a.allocate(2)
    a.register(b0, b"h0")
    a.register(b1, b"h1")
    assert a.cached_prefix([b"h0", b"h1", b"h2"]) == [b0, b1] and a.cached_prefix([b"h1"]) == [b1]
    a.share([b0, b1])
    assert a.ref_count(b0) == 2 and a.num_used == 2 and a.num_free == 2
    a.free([b1, b0])
    assert a.ref_count(b0) == 1 and a.num_free == 2
    a.free([b1, b0])  # the last references: cached, unreferenced, allocatable
    assert a.num_used == 0 and a.num_free == 4 and a.num_cached == 2
    with pytest.raises(ValueError, match="double free"):
        a.free([b0])
    a.share([b0])  # a later sequence takes it back out of the LRU
    assert a.ref_count(b0) == 1 and a.num_free == 3
    c = a.allocate(1)[0]
    with pytest.raises(ValueError, match="not cached"):
        a.share([c])


def test_registering_a_hash_twice_keeps_the_first_block_and_the_second_private():
    a = BlockAllocator(2)
    first, second = a.allocate(2)
    a.register(first, b"h")
    a.register(second, b"h")
    a.register(first, b"h")  # again: nothing changes
    assert a.cached_prefix([b"h"]) == [first] and a.num_cached == 1
    a.free([second])
    assert a.num_free == 1 and a.allocate(1) == [second]  # a private block goes to the free list
    with pytest.raises(ValueError, match="not allocated"):
        BlockAllocator(2).register(0, b"h")


def test_allocation_takes_free_blocks_first_then_evicts_the_least_recently_released():
    a = BlockAllocator(6)
    blocks = a.allocate(6)
    for i, b in enumerate(blocks[:4]):
        a.register(b, bytes([i]))
    a.free([blocks[2], blocks[0], blocks[3], blocks[1]])  # the LRU, oldest first: 2, 0, 3, 1
    a.free(blocks[4:])  # never registered: back on the free list
    assert a.num_free == 6 and a.num_cached == 4
    assert sorted(a.allocate(2)) == blocks[4:]  # free blocks before any cached one
    assert a.allocate(2) == [blocks[2], blocks[0]]  # then the oldest released
    assert a.num_cached == 2 and a.cached_prefix([bytes([0])]) == [] and a.cached_prefix([bytes([3])]) == [blocks[3]]
    a.share([blocks[3]])  # in use again: not evictable
    assert a.allocate(1) == [blocks[1]] and not a.can_allocate(1)


# --- the scheduler ----------------------------------------------------------------------------
def _request(order: int, tokens: list[int], slot: int | None = None, arrival: float = 0.0, max_tokens: int = 4,
             ttft: float = 2.0, **params) -> Request:
    return Request(
        id=f"r{order}", order=order, prompt_ids=list(tokens), adapter=None if slot is None else f"a{slot}", slot=slot,
        params=SamplingParams(max_tokens=max_tokens, **params), slo=SLO(ttft=ttft),
        metrics=RequestMetrics(arrival=arrival), text=None, generator=torch.Generator(),
    )


def _scheduler(num_blocks: int = 32, generations: AdapterGenerations | None = None, clock=None, **cfg) -> Scheduler:
    kv = PagedKVCache(CONFIG, num_blocks, BS, torch.float32, "cpu")
    return Scheduler(SchedulerConfig(**cfg), kv, clock or FakeClock(0.0), generations)


def _step(s: Scheduler):
    """What the engine does after a forward: mark the chunks computed, append a token when sampled."""
    out = s.schedule()
    s.mark_computed(out)
    for c in out.chunks:
        if c.samples:
            c.request.output_ids.append(5)
    return out


def _serve(s: Scheduler, request: Request) -> Request:
    """Adds a request and runs it to its last token, then removes it (as finishing does)."""
    s.add(request)
    while len(request.output_ids) < request.params.max_tokens:
        _step(s)
    s.remove(request)
    request.state = RequestState.FINISHED
    return request


PROMPT = list(range(100, 110))  # 10 tokens: two full blocks of 4 and a partial one


def test_a_later_request_of_the_same_adapter_starts_from_the_cached_full_blocks():
    s = _scheduler()
    _serve(s, _request(0, PROMPT, slot=1))
    assert s.kv.allocator.num_used == 0 and s.kv.allocator.num_cached == 3  # 13 tokens ran: 3 full blocks
    later = _request(1, PROMPT + [7], slot=1)
    s.add(later)
    out = s.schedule()
    assert [(c.start, c.end) for c in out.chunks] == [(8, 11)]  # the two prompt blocks are reused
    assert later.num_computed == 8 and s.prefix_cache_queries == 10 + 11 and s.prefix_cache_hits == 8
    shared = later.block_table[:2]
    assert all(s.kv.allocator.ref_count(b) == 1 for b in shared) and later.block_table[2] not in shared


def test_no_hits_across_adapters_or_from_the_base_model():
    s = _scheduler()
    _serve(s, _request(0, PROMPT, slot=1))
    for order, slot in ((1, 2), (2, None)):
        _serve(s, _request(order, PROMPT, slot=slot))
    assert s.prefix_cache_hits == 0 and s.kv.allocator.num_cached == 9  # each computed and cached its own
    _serve(s, _request(3, PROMPT, slot=None))
    assert s.prefix_cache_hits == 8


def test_no_hits_across_a_weights_generation_change():
    """An optimizer step (mark_updated), or an adapter unloaded and another loaded in its slot,
    moves the slot's generation: blocks computed with the old weights are never served again."""
    generations = AdapterGenerations()
    generations.bump(1)
    s = _scheduler(generations=generations)
    _serve(s, _request(0, PROMPT, slot=1))
    generations.bump(1)
    _serve(s, _request(1, PROMPT, slot=1))
    assert s.prefix_cache_hits == 0
    _serve(s, _request(2, PROMPT, slot=1))  # at the new generation, the second request's blocks serve
    assert s.prefix_cache_hits == 8


def test_a_request_whose_weights_change_while_it_runs_registers_no_more_blocks():
    """Its KV then mixes two weights generations: registered under either, it would serve K/V
    that no single set of weights computes."""
    generations = AdapterGenerations()
    generations.bump(1)
    s = _scheduler(generations=generations, max_prefill_chunk=4)
    r = _request(0, PROMPT, slot=1)
    s.add(r)
    _step(s)  # block 0 computed and registered at the first generation
    generations.bump(1)
    while r.state is RequestState.RUNNING and len(r.output_ids) < 4:
        _step(s)
    assert s.kv.allocator.num_cached == 1


def test_partial_last_blocks_stay_private_and_a_fully_cached_prompt_recomputes_its_last_block():
    s = _scheduler()
    first = _request(0, PROMPT[:8], slot=1, max_tokens=1)  # exactly two blocks
    _serve(s, first)
    assert s.kv.allocator.num_cached == 2
    again = _request(1, PROMPT[:8], slot=1, max_tokens=2)
    s.add(again)
    out = _step(s)
    # its last token's logits are needed: the last block is computed again, into a block of its own
    assert [(c.start, c.end) for c in out.chunks] == [(4, 8)] and s.prefix_cache_hits == 4
    assert again.block_table[0] == s.kv.allocator.cached_prefix(BlockHashes(adapter_root(1, 0), BS).update(
        4, lambda a, b: PROMPT[a:b]))[0]
    private = again.block_table[1]
    assert s.kv.allocator.ref_count(private) == 1 and s.kv.allocator.num_cached == 2  # the first copy stays the cached one
    _step(s)  # decoding writes position 8 into a new, private block
    assert len(again.block_table) == 3 and s.kv.allocator.ref_count(again.block_table[2]) == 1
    s.remove(again)
    assert s.kv.allocator.num_cached == 2 and s.kv.allocator.num_free == s.kv.num_blocks


def test_a_preempted_request_returns_its_full_blocks_as_cached_and_its_recompute_reuses_them():
    """Blocks are freed tail first, so the LRU evicts a preempted sequence's later blocks before
    its first ones, which its recompute then reuses."""
    s = _scheduler(num_blocks=7)
    old, new = _request(0, PROMPT, slot=1, arrival=0.0, max_tokens=9), _request(1, PROMPT, slot=2, arrival=1.0, max_tokens=9)
    s.add(old)
    s.add(new)
    preempted = []
    while not preempted:
        preempted = _step(s).preempted
    assert preempted == [new] and new.block_table == [] and new.num_computed == 0
    hashes = BlockHashes(adapter_root(2, 0), BS).update(new.num_tokens, new.tokens)
    assert len(s.kv.allocator.cached_prefix(hashes)) == 3  # all its full blocks wait in the LRU
    while new.state is not RequestState.RUNNING:
        cached = s.kv.allocator.cached_prefix(hashes)
        _step(s)
        if len(old.output_ids) == old.params.max_tokens:
            s.remove(old)  # old finishes: room for new again
    assert len(cached) == 2 and new.block_table[:2] == cached  # old's growth evicted the tail, not the head
    assert s.prefix_cache_hits == 2 * BS


def test_a_waiting_requests_plan_follows_blocks_registered_and_evicted_while_it_waits():
    s = _scheduler(num_blocks=6, max_running=1)
    first, waiting = _request(0, PROMPT[:8] + [1], slot=1, max_tokens=2), _request(1, PROMPT, slot=1)
    s.add(first)
    s.add(waiting)
    assert s._uncached_pending(waiting) == 10
    _step(s)  # first computes and registers the two blocks waiting shares
    assert s._uncached_pending(waiting) == 2
    s.remove(first)
    s.kv.allocator.allocate(6)  # every block: the cached ones are evicted
    assert s._uncached_pending(waiting) == 10


def test_a_failed_reservation_gives_the_hit_blocks_back():
    s = _scheduler(num_blocks=4)
    _serve(s, _request(0, PROMPT[:8], slot=None, max_tokens=1))  # two cached blocks
    hog = _request(1, list(range(200, 207)), max_tokens=1)
    s.add(hog)
    s.schedule()  # holds the two free blocks
    long = _request(2, PROMPT[:8] + list(range(300, 306)), max_tokens=1)  # 2 hits, needs 2 more
    s.add(long)
    out = s.schedule()
    assert long.state is RequestState.WAITING and long.block_table == [] and long.num_computed == 0
    assert s.prefix_cache_hits == 0 and s.kv.allocator.num_free == 2 and s.kv.allocator.num_cached == 2
    assert hog in [c.request for c in out.chunks] or hog.num_computed == 0


def test_prompt_logprobs_requests_bypass_the_lookup_but_register_their_blocks():
    s = _scheduler()
    scored = _serve(s, _request(0, PROMPT, slot=1, prompt_logprobs=0))
    assert s.prefix_cache_queries == 0 and s.kv.allocator.num_cached == 3
    again = _request(1, PROMPT, slot=1, prompt_logprobs=0)
    s.add(again)
    assert [(c.start, c.end) for c in s.schedule().chunks] == [(0, 10)] and scored.finish_reason is None
    plain = _request(2, PROMPT, slot=1)
    s.add(plain)
    assert [(c.start, c.end) for c in s.schedule().chunks][-1] == (8, 10)


def test_caching_off_neither_looks_up_nor_registers():
    s = _scheduler(enable_prefix_caching=False)
    for order in range(2):
        _serve(s, _request(order, PROMPT, slot=1))
    assert s.prefix_cache_queries == 0 and s.kv.allocator.num_cached == 0


def test_cached_tokens_are_not_prefill_work_in_the_budget_or_the_first_token_plan():
    """A waiting request's plan counts the prompt rows it must compute, not those the cache has:
    training may take more of its time, and its chunk needs budget for its uncached rows only."""
    clock = FakeClock(100.0)
    s = _scheduler(num_blocks=128, max_step_tokens=4096, step_time_share=1.0, clock=clock)
    for rows in (8, 64, 256):  # prefill rows cost 2 ms, training rows 4 ms, on top of 20 ms
        s.cost.record({RowKind.PREFILL: rows}, 0.02 + 0.002 * rows)
        s.cost.record({RowKind.TRAIN: rows}, 0.02 + 0.004 * rows)
    system = list(range(1000, 1096))  # 96 tokens, 24 blocks
    _serve(s, _request(0, system + [1, 2, 3, 4], ttft=2.0, max_tokens=1))
    clock.now = 200.0
    uncached = _request(1, list(range(2000, 2100)), arrival=199.5)  # due at 201.5, its prompt costs 0.2 s
    s.add(uncached)
    without = s.training_budget({})
    s.remove(uncached)
    cached = _request(2, system + [9, 9, 9, 9], arrival=199.5)  # 96 of its 100 tokens cached
    s.add(cached)
    assert without == pytest.approx((1.5 - 0.2 - 0.02) / 0.004, abs=5)
    assert s.training_budget({}) - without == pytest.approx(96 * 0.002 / 0.004, abs=10)  # 96 rows it need not compute
    s.config = SchedulerConfig(max_step_tokens=4096, step_time_share=1.0, min_prefill_tokens=4, max_prefill_chunk=4)
    out = s.schedule()  # a 4-row budget takes its whole uncached rest
    assert [(c.start, c.end, c.samples) for c in out.chunks] == [(96, 100, True)]


# --- the engine ---------------------------------------------------------------------------------
ADAPTERS = {"a": LoraConfig(r=8, alpha=16, target_modules="all-linear"),
            "b": LoraConfig(r=4, alpha=8, target_modules=("k_proj", "v_proj"))}


@pytest.fixture
def engines(tiny_engine):
    """make(caching, kv_blocks): an engine over the tiny model (block size 16) with adapters a and
    b (random B, fixed seeds: the same weights in every engine)."""

    def make(caching: bool = True, kv_blocks: int = 256, **scheduler):
        memory = kv_blocks * 16 * PagedKVCache.bytes_per_token(CONFIG, torch.float32)
        config = EngineConfig(kv_cache_memory=memory, scheduler=SchedulerConfig(enable_prefix_caching=caching, **scheduler))
        engine = tiny_engine(config=config)
        for i, (name, cfg) in enumerate(ADAPTERS.items()):
            engine.create_adapter(name, cfg, seed=i, init_b="random")
        return engine

    return make


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 49152) for _ in range(n)]


def _greedy(engine, prompts, adapters, max_tokens=8):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [g.token_ids for g in engine.generate(prompts, adapters, params=params)]


def test_a_shared_system_prompt_over_two_adapters_and_the_base_gives_the_same_greedy_tokens(engines):
    system = _tokens(40, 0)  # 2 full blocks and a partial one
    prompts = [system + _tokens(3 + i % 5, 100 + i) for i in range(12)]
    names = [None, "a", "b"] * 4
    on, off = engines(True), engines(False)
    # one after another: each finds the others' blocks registered, and reuses none of them
    first = [_greedy(on, [p], [n])[0] for p, n in zip(prompts[:3], names[:3])]
    assert on.scheduler.prefix_cache_hits == 0 and on.kv.allocator.num_cached >= 3 * 2
    assert first == _greedy(off, prompts[:3], names[:3])
    assert _greedy(on, prompts, names) == _greedy(off, prompts, names)
    assert on.scheduler.prefix_cache_hits >= 12 * 32  # every later request reused the system prompt's full blocks
    assert off.scheduler.prefix_cache_queries == 0 and on.kv.allocator.num_used == 0


@pytest.mark.parametrize("length", [48, 45])  # a multiple of the block size, and not
def test_a_whole_cached_prompt_still_computes_its_last_token(engines, length):
    prompt = _tokens(length, 1)
    on, off = engines(True), engines(False)
    (expected,) = _greedy(off, [prompt], ["a"], 12)
    assert _greedy(on, [prompt], ["a"], 12) == [expected]
    hits = on.scheduler.prefix_cache_hits
    assert _greedy(on, [prompt], ["a"], 12) == [expected]
    assert on.scheduler.prefix_cache_hits - hits == (length - 1) // 16 * 16  # 32 of 48, 32 of 45
    hits = on.scheduler.prefix_cache_hits
    # a prompt that runs into the blocks the first request generated
    assert _greedy(on, [prompt + expected[:5]], ["a"], 7) == [expected[5:]]
    assert on.scheduler.prefix_cache_hits - hits == (length + 4) // 16 * 16


def test_preemption_under_a_small_pool_keeps_the_greedy_tokens(engines):
    system = _tokens(33, 2)
    prompts = [system + _tokens(4, 200 + i) for i in range(6)]
    names = ["a", "b", None] * 2
    on, off = engines(True, kv_blocks=9), engines(False, kv_blocks=9)
    together = on.generate(prompts, names, params=SamplingParams(max_tokens=40, ignore_eos=True))
    assert sum(g.metrics.num_preemptions for g in together) > 0, "the pool should force preemption"
    assert [g.token_ids for g in together] == _greedy(off, prompts, names, 40)
    assert on.scheduler.prefix_cache_hits > 0 and on.kv.allocator.num_used == 0


def test_an_adapter_trained_or_replaced_between_two_requests_is_not_served_old_blocks(engines):
    prompt = _tokens(40, 3)
    on, off = engines(True), engines(False)
    assert _greedy(on, [prompt], ["a"]) == _greedy(off, [prompt], ["a"])
    for engine in (on, off):  # an optimizer step, as the trainer reports it
        with torch.no_grad():
            for _, lora_b in engine.adapters.get("a").weights.values():
                lora_b.add_(0.5 * torch.randn(lora_b.shape, generator=torch.Generator().manual_seed(9)))
        engine.adapters.mark_updated("a")
    hits = on.scheduler.prefix_cache_hits
    assert _greedy(on, [prompt], ["a"]) == _greedy(off, [prompt], ["a"])
    assert on.scheduler.prefix_cache_hits == hits
    for engine in (on, off):  # the name reused after an unload, with other weights
        engine.unload_adapter("a")
        engine.create_adapter("a", ADAPTERS["a"], seed=42, init_b="random")
    assert _greedy(on, [prompt], ["a"]) == _greedy(off, [prompt], ["a"])
    assert on.scheduler.prefix_cache_hits == hits
