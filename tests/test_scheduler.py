"""The scheduler's decisions on hand-made requests (no model runs)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import FakeClock, make_tiny_hf, ours_from_hf
from loramux.batch import RowKind
from loramux.engine.requests import SLO, Request, RequestMetrics, RequestState
from loramux.engine.sampling import SamplingParams
from loramux.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, StepCostModel
from loramux.kv.paged_cache import PagedKVCache

CONFIG = ours_from_hf(make_tiny_hf()).config


def _request(order: int, prompt_len: int, arrival: float = 0.0, max_tokens: int = 8, ttft: float = 2.0,
             tpot: float = 0.25) -> Request:
    return Request(
        id=f"r{order}", order=order, prompt_ids=[1] * prompt_len, adapter=None, slot=None,
        params=SamplingParams(max_tokens=max_tokens), slo=SLO(ttft=ttft, tpot=tpot),
        metrics=RequestMetrics(arrival=arrival), text=None, generator=torch.Generator(),
    )


def _scheduler(num_blocks=16, block_size=4, clock=None, **cfg) -> Scheduler:
    kv = PagedKVCache(CONFIG, num_blocks, block_size, torch.float32, "cpu")
    return Scheduler(SchedulerConfig(**cfg), kv) if clock is None else Scheduler(SchedulerConfig(**cfg), kv, clock)


def _run(scheduler: Scheduler, out) -> None:
    """What the engine does after a forward: advance computed counts, append a token when sampled."""
    for c in out.chunks:
        c.request.num_computed = c.end
        if c.samples:
            c.request.output_ids.append(7)


def test_cost_model_recovers_per_kind_rates():
    model = StepCostModel()
    rng = random.Random(0)
    for _ in range(64):
        decode, prefill = rng.randint(0, 32), rng.randint(0, 256)
        model.record({RowKind.DECODE: decode, RowKind.PREFILL: prefill}, 0.02 + 0.004 * decode + 0.001 * prefill)
    fixed, rates = model.fit()
    kinds = StepCostModel.KINDS
    assert fixed == pytest.approx(0.02, abs=2e-3)
    assert rates[kinds.index(RowKind.DECODE)] == pytest.approx(0.004, rel=0.05)
    assert rates[kinds.index(RowKind.PREFILL)] == pytest.approx(0.001, rel=0.05)
    # 0.2 s beside 10 decode rows leaves (0.2 - 0.02 - 0.04) / 0.001 = 140 prefill rows
    assert model.max_rows_within(0.2, RowKind.PREFILL, {RowKind.DECODE: 10}) == pytest.approx(140, abs=3)


def test_cost_model_from_small_steps_alone_does_not_make_rows_look_expensive():
    """Steps of a few decode rows each (as while a handful of requests run) are mostly fixed cost;
    the model must not price a prefill row at a whole small step's time per row."""
    model = StepCostModel()
    for rows in (1, 2, 4, 4, 3):
        model.record({RowKind.DECODE: rows}, 0.030 + 0.001 * rows)
    fixed, rates = model.fit()
    assert 0.02 <= fixed <= 0.031
    # the truth, 0.001 s per row, would give 170 rows in 0.2 s; pooled per-row time (about 0.011
    # s) would give 16
    assert model.max_rows_within(0.2, RowKind.PREFILL, {}) >= 60


def test_long_prompt_is_prefilled_in_chunks_then_decodes():
    s = _scheduler(max_prefill_chunk=8)
    r = _request(0, prompt_len=20)
    s.add(r)
    spans = []
    for _ in range(4):
        out = s.schedule()
        spans.append([(c.start, c.end, c.samples) for c in out.chunks])
        _run(s, out)
    assert spans == [[(0, 8, False)], [(8, 16, False)], [(16, 20, True)], [(20, 21, True)]]
    assert len(r.block_table) == s.kv.blocks_for(21)


def test_decodes_come_first_and_prefill_follows_deadlines():
    s = _scheduler(num_blocks=64)
    running = _request(0, 4, arrival=0.0)
    s.add(running)
    _run(s, s.schedule())  # prefilled, now decoding
    late_deadline = _request(1, 4, arrival=1.0, ttft=5.0)
    early_deadline = _request(2, 4, arrival=2.0, ttft=0.5)
    s.add(late_deadline)
    s.add(early_deadline)
    out = s.schedule()
    assert [c.request.id for c in out.chunks] == ["r0", "r2", "r1"]
    assert out.chunks[0].end - out.chunks[0].start == 1


def test_out_of_blocks_preempts_the_newest_and_frees_its_blocks():
    s = _scheduler(num_blocks=4, block_size=4)
    old, new = _request(0, 4, arrival=0.0), _request(1, 4, arrival=1.0)
    for r in (old, new):
        s.add(r)
    _run(s, s.schedule())  # both prefilled: one block each, 2 free
    for _ in range(4):  # decoding grows both into a second block; then the third needs more
        _run(s, s.schedule())
    assert s.kv.allocator.num_free == 0
    out = s.schedule()  # old needs a 3rd block (position 8): new is preempted
    assert out.preempted == [new] and new.state is RequestState.WAITING and new.num_computed == 0
    assert new.block_table == [] and [c.request for c in out.chunks] == [old]
    assert s.waiting[0] is new


def test_queue_bound_and_capacity_are_enforced():
    s = _scheduler(num_blocks=2, block_size=4, max_waiting=1)
    with pytest.raises(ValueError, match="exceeds the KV cache capacity of 8 tokens"):
        s.add(_request(0, 5, max_tokens=4))
    s.add(_request(1, 2, max_tokens=4))
    with pytest.raises(QueueFullError):
        s.add(_request(2, 2, max_tokens=4))


def test_max_running_holds_new_requests_back():
    s = _scheduler(num_blocks=64, max_running=2)
    rs = [_request(i, 4, arrival=i) for i in range(3)]
    for r in rs:
        s.add(r)
    out = s.schedule()
    assert {c.request.id for c in out.chunks} == {"r0", "r1"} and rs[2] in s.waiting


def _fitted_training_costs(s: Scheduler) -> None:
    """Step costs of 0.02 s + 4 ms per decode or training row."""
    rng = random.Random(0)
    for _ in range(64):
        decode, train = rng.randint(0, 32), rng.randint(0, 512)
        s.cost.record({RowKind.DECODE: decode, RowKind.TRAIN: train}, 0.02 + 0.004 * decode + 0.004 * train)


def _decoding(s: Scheduler, *specs: tuple[float, int, float]) -> list[Request]:
    """Requests admitted and prefilled together; spec (first_token, tokens, tpot): each produced
    its first token at `first_token` and has `tokens` output tokens now."""
    requests = [_request(i, prompt_len=4, arrival=first - 0.1, tpot=tpot) for i, (first, _, tpot) in enumerate(specs)]
    for r in requests:
        s.add(r)
    _run(s, s.schedule())
    for r, (first, tokens, _) in zip(requests, specs):
        r.metrics.first_token, r.output_ids = first, [7] * tokens
        r.num_computed = r.num_tokens - 1
    return requests


def test_training_alone_is_bounded_so_arrivals_do_not_wait_long():
    """Within the serving window, a step of training rows with no request running may take
    idle_train_seconds (by the fitted costs), not max_step_tokens rows; with a request running
    its next token's due time bounds it instead."""
    clock = FakeClock(100.0)
    s = _scheduler(max_step_tokens=4096, idle_train_seconds=0.5, step_time_share=0.8, min_train_rows_beside=0, clock=clock)
    _fitted_training_costs(s)
    (r,) = _decoding(s, (clock.now, 1, 0.25))  # its next token is due in 0.25 s
    rows = lambda seconds: pytest.approx((seconds - 0.02 - 0.004) / 0.004, abs=3)  # beside r's decode row
    assert s.training_budget({RowKind.DECODE: 1}) == rows(0.8 * 0.25)  # planned at 0.8 x its target
    s.remove(r)  # r has just finished: nothing runs, but requests are arriving
    assert s.training_budget({}) == pytest.approx((0.5 - 0.02) / 0.004, abs=3)  # 120 rows, not 4096


def test_training_spends_the_slack_of_the_tightest_request_and_nothing_more():
    """A request whose steps were short has time in hand (its TPOT is an average); training may
    take the smallest such time of all requests, planned against share x their targets, and
    nothing once a request is behind."""
    clock = FakeClock(100.0)
    s = _scheduler(max_step_tokens=4096, step_time_share=0.8, min_train_tokens=1000, min_train_rows_beside=0, clock=clock)
    _fitted_training_costs(s)
    rows = lambda seconds: pytest.approx(max((seconds - 0.02 - 0.004 * 2) / 0.004, 0), abs=3)  # beside two decode rows
    # planned at 0.8 x their TPOT targets: a has 6 tokens since 99.0, its next due at 99.0 + 0.8 x
    # 6 x 0.25 = 100.2; b at 99.5 + 0.8 x 4 x 0.5 = 101.1
    a, b = _decoding(s, (99.0, 6, 0.25), (99.5, 4, 0.5))
    assert s.training_budget({RowKind.DECODE: 2}) == rows(0.2)  # a, the tighter, has 0.2 s in hand
    clock.now = 100.1
    assert s.training_budget({RowKind.DECODE: 2}) == rows(0.1)
    a.output_ids.append(7)  # a's next token came: due at 99.0 + 0.8 x 7 x 0.25 = 100.4
    assert s.training_budget({RowKind.DECODE: 2}) == rows(0.3)
    clock.now = 101.0  # a is behind: no training, and no credit forces it in while requests run
    for _ in range(5):
        s.note_step(0, wanted_training=True)
    assert s.training_budget({RowKind.DECODE: 2}) == 0
    s.remove(a)
    s.remove(b)
    s.note_step(0, wanted_training=True)  # nothing to serve now: starved training earns credit
    assert s.training_budget({}) >= 1000


def test_training_banks_the_slack_while_it_grows_then_takes_a_larger_part():
    """Beside running requests a training part costs much before its first row counts, so while
    fewer than min_train_rows_beside rows fit and the time in hand still grows step by step,
    training waits for a larger part; once the time in hand stops growing it takes what fits."""
    clock = FakeClock(100.0)
    s = _scheduler(max_step_tokens=4096, step_time_share=0.8, min_train_rows_beside=64, clock=clock)
    _fitted_training_costs(s)  # 20 ms + 4 ms a row
    rows = lambda seconds: pytest.approx((seconds - 0.02 - 0.004) / 0.004, abs=3)  # beside one decode row
    (r,) = _decoding(s, (100.0, 1, 0.25))  # its next token is due at 100.0 + 0.8 x 0.25 = 100.2
    assert s.training_budget({RowKind.DECODE: 1}) == 0  # 44 rows fit: it waits
    clock.now, r.output_ids = 100.05, r.output_ids + [7]  # a short decode step: due at 100.4
    assert s.training_budget({RowKind.DECODE: 1}) == rows(0.35)  # 81 rows: a larger part
    clock.now = 100.15  # 0.25 s in hand, 56 rows: it waits again
    assert s.training_budget({RowKind.DECODE: 1}) == 0
    clock.now = 100.2  # no token since: the time in hand shrank, so training takes what fits
    assert s.training_budget({RowKind.DECODE: 1}) == rows(0.2)


def test_a_waiting_request_keeps_time_for_its_prompt_before_its_first_token_deadline():
    clock = FakeClock(100.0)
    s = _scheduler(num_blocks=64, max_step_tokens=4096, step_time_share=1.0, clock=clock)
    for rows in (8, 64, 256):  # prefill rows cost 2 ms, training rows 4 ms, on top of 20 ms
        s.cost.record({RowKind.PREFILL: rows}, 0.02 + 0.002 * rows)
        s.cost.record({RowKind.TRAIN: rows}, 0.02 + 0.004 * rows)
    s.add(_request(0, prompt_len=100, arrival=99.5, ttft=2.0))  # due at 101.5; its prompt costs about 0.2 s
    assert s.training_budget({}) == pytest.approx((1.5 - 0.2 - 0.02) / 0.004, abs=5)


def test_training_outside_the_serving_window_is_bounded_by_rows_not_timings():
    """With no request arrived within serving_window_seconds, a training step is bounded by
    max_step_tokens alone, whatever the fitted costs, so its split of a batch is deterministic."""
    clock = FakeClock(100.0)
    s = _scheduler(max_step_tokens=4096, idle_train_seconds=0.5, serving_window_seconds=0.0, clock=clock)
    _fitted_training_costs(s)
    assert s.training_budget({}) == 4096  # nothing ever arrived
    r = _request(0, prompt_len=4, arrival=clock.now)
    s.add(r)
    assert 0 < s.training_budget({}) < 4096  # r waits: bounded by its first-token deadline
    _run(s, s.schedule())
    s.remove(r)
    clock.now += 1.0
    assert s.training_budget({}) == 4096  # a zero-second window has passed

def test_running_requests_keep_their_tpot_while_long_prompts_arrive():
    """Eight requests decode while eight long prompts (400 tokens each) arrive. Steps cost a known
    10 ms + 0.5 ms per decode row + 1 ms per prefill row (the clock is this formula, not the
    machine): with no budget a step would carry up to 2048 prompt rows (2 s); the scheduler sizes
    steps from the costs it has recorded, so every step while requests decode fits their TPOT
    target, and the long prompts are still all served."""
    def seconds(rows) -> float:
        return 0.010 + 0.0005 * rows.get(RowKind.DECODE, 0) + 0.001 * rows.get(RowKind.PREFILL, 0)

    tpot = 0.3
    s = _scheduler(num_blocks=1024, block_size=16, max_step_tokens=2048, max_prefill_chunk=2048)
    now = time.perf_counter()  # arrival times far from any first-token deadline (60 s)
    runners = [_request(i, 20, arrival=now, max_tokens=40, ttft=60.0, tpot=tpot) for i in range(8)]
    late = [_request(8 + i, 400, arrival=now, max_tokens=4, ttft=60.0, tpot=tpot) for i in range(8)]
    for r in runners:
        s.add(r)
    decode_step_costs, late_done_at = [], None
    for step in range(400):
        if step == 4:  # the runners decode; the long prompts arrive
            for r in late:
                s.add(r)
        out = s.schedule()
        if not out.chunks:
            break
        rows = {RowKind.DECODE: 0, RowKind.PREFILL: 0}
        for c in out.chunks:
            rows[RowKind.DECODE if c.end - c.start == 1 and c.start > 0 else RowKind.PREFILL] += c.end - c.start
        if any(r in s.running and r.output_ids for r in runners):
            decode_step_costs.append(seconds(rows))
        s.cost.record(rows, seconds(rows))
        _run(s, out)
        for r in [*runners, *late]:
            if len(r.output_ids) >= r.params.max_tokens and r.state is RequestState.RUNNING:
                s.remove(r)
                r.state = RequestState.FINISHED
        if late_done_at is None and all(r.state is RequestState.FINISHED for r in late):
            late_done_at = step
    assert all(len(r.output_ids) == 40 for r in runners) and all(len(r.output_ids) == 4 for r in late)
    assert max(decode_step_costs) <= tpot, sorted(decode_step_costs)[-5:]
    # the budget is used, not just respected: the 3,200 prompt rows took about 256 rows a step
    # (0.9 x 0.3 s less the decodes), not the 16-row minimum (200 steps)
    assert late_done_at - 4 <= 25, late_done_at
