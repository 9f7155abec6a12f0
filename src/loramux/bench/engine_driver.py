"""Drive loramux's Python engine with an open-loop arrival schedule.

One thread: before every step, the requests whose arrival time has come are added; the step's
outputs stamp first tokens and finishes. With nothing to do the driver sleeps until the next
arrival, unless a training job keeps the engine busy.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from loramux.bench.records import RequestRecord
from loramux.bench.workload import BenchRequest
from loramux.engine.engine import Engine
from loramux.engine.requests import SLO
from loramux.engine.sampling import SamplingParams


def run_engine(engine: Engine, requests: list[BenchRequest], slo: SLO,
               on_step: Callable[[float], None] | None = None) -> list[RequestRecord]:
    """Runs until every request finished. on_step(t) is called after each step with its end time
    (seconds since the start), e.g. to sample a training job's progress."""
    records = {f"bench-{r.index}": RequestRecord.of(r) for r in requests}
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    start = time.perf_counter()
    while pending or engine.has_unfinished:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            params = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
            engine.add_request(r.prompt_ids, r.adapter, params, slo=slo, request_id=f"bench-{r.index}")
        if not engine.has_work:
            time.sleep(max(pending[0].arrival - now, 0.0))
            continue
        outputs = engine.step()
        t = time.perf_counter() - start
        for out in outputs:
            record = records.get(out.request_id)
            if record is None:
                continue
            if out.new_token_ids and record.first_token is None:
                record.first_token = t
            record.output_tokens += len(out.new_token_ids)
            if out.finished:
                record.finished = t
        if on_step is not None:
            on_step(t)
    return list(records.values())


def warm_up(engine: Engine, adapters: list[str | None], prompt_ids: list[int]) -> None:
    """A few short requests on every adapter, so kernels are warm and the step cost model has data."""
    names = list(adapters) or [None]
    engine.generate([prompt_ids] * len(names), names, params=SamplingParams(max_tokens=8, ignore_eos=True))
