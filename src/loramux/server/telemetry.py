"""The serving time series the web console charts and the OpenAI API has nothing for
(`GET /v1/loramux/stats`): requests per second, TTFT and TPOT percentiles beside their targets,
SLO attainment, KV cache use, the waiting queue, and the rows of each kind the steps carried.

Two bounded ring buffers, one of per-step records (fed after every step from the engine's thread,
`observe_step`, out of `Engine.last_step`) and one of finished requests (fed where completions
record their metrics, `record_requests`), are summed into fixed intervals when asked (`stats`).
Nothing here is persisted: a restart starts the series afresh.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loramux.batch import RowKind
from loramux.engine.engine import Engine
from loramux.engine.requests import SLO, RequestOutput

KINDS = tuple(kind.value for kind in RowKind)  # train, eval, prefill, decode
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class StepSample:
    at: float  # wall-clock seconds (epoch) when the step ended
    seconds: float  # the step's wall time
    rows: dict[str, int]  # rows of each kind (RowKind's values)
    waiting: int
    running: int
    kv_usage: float  # share of the KV blocks in use


@dataclass(frozen=True)
class RequestSample:
    at: float  # wall-clock seconds (epoch) when the request was recorded as finished
    ok: bool  # finished normally (not failed, not aborted)
    ttft: float | None
    tpot: float | None
    met_slo: bool  # met its own latency targets


class Telemetry:
    """`default_slo`: the targets the charts draw (a request may carry its own; attainment counts
    each against its own). `max_steps`, `max_requests`: the ring buffers' bounds."""

    def __init__(self, default_slo: SLO, *, max_steps: int = 50_000, max_requests: int = 20_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.default_slo = default_slo
        self.clock = clock
        self._steps: deque[StepSample] = deque(maxlen=max_steps)
        self._requests: deque[RequestSample] = deque(maxlen=max_requests)
        self._lock = threading.Lock()  # the engine's thread appends, the HTTP thread reads

    def observe_step(self, engine: Engine) -> None:
        """After every step, in the engine's thread: what the step carried (nothing if it computed nothing)."""
        step = engine.last_step
        if step is None:
            return
        kv = engine.kv
        sample = StepSample(self.clock(), step.seconds, step.rows, len(engine.scheduler.waiting),
                            len(engine.scheduler.running), kv.allocator.num_used / kv.num_blocks)
        with self._lock:
            self._steps.append(sample)

    def record_requests(self, status: str, outs: dict[str, list[RequestOutput]], slo: SLO) -> None:
        """The choices of one completion call, once they finished ("ok", "error" or "aborted")."""
        now = self.clock()
        samples = []
        for seq in outs.values():
            m = seq[-1].metrics if seq else None
            ok = status == "ok" and m is not None
            samples.append(RequestSample(now, ok, m and m.ttft, m and m.tpot, ok and m.meets(slo)))
        with self._lock:
            self._requests.extend(samples)

    def stats(self, window: float, interval: float) -> dict:
        """The series over the last `window` seconds in buckets of `interval` seconds, oldest
        first; `time` holds each bucket's start (epoch seconds); the last bucket is the current,
        partial one. Rates are per second of the bucket's interval; a bucket without requests has null
        latencies and attainment, one without steps null KV use and queue."""
        now = self.clock()
        count = max(1, math.ceil(window / interval))
        first = (math.floor(now / interval) - count + 1) * interval
        with self._lock:
            steps = [s for s in self._steps if s.at >= first]
            requests = [r for r in self._requests if r.at >= first]
        step_buckets = _bucketed(steps, first, interval, count)
        request_buckets = _bucketed(requests, first, interval, count)
        ok = [[r for r in bucket if r.ok] for bucket in request_buckets]
        finished = [r for r in requests if r.ok]
        return {
            "object": "loramux.stats",
            "now": now,
            "window": count * interval,
            "interval": interval,
            "targets": {"ttft": self.default_slo.ttft, "tpot": self.default_slo.tpot},
            "time": [first + i * interval for i in range(count)],
            "requests_per_second": [round(len(b) / interval, 4) for b in request_buckets],
            "ttft": _percentile_series(ok, "ttft"),
            "tpot": _percentile_series(ok, "tpot"),
            "slo_attainment": [_share(b) for b in ok],
            "kv_cache_usage": [max((s.kv_usage for s in b), default=None) for b in step_buckets],
            "waiting": [max((s.waiting for s in b), default=None) for b in step_buckets],
            "running": [max((s.running for s in b), default=None) for b in step_buckets],
            "steps_per_second": [round(len(b) / interval, 4) for b in step_buckets],
            "busy": [round(min(1.0, sum(s.seconds for s in b) / interval), 4) for b in step_buckets],
            "rows_per_second": {kind: [round(sum(s.rows.get(kind, 0) for s in b) / interval, 2) for b in step_buckets]
                                for kind in KINDS},
            "totals": {"requests": len(requests), "failed": len(requests) - len(finished), "steps": len(steps),
                       "slo_attainment": _share(finished)},
        }


def _bucketed(samples: Iterable, first: float, interval: float, count: int) -> list[list]:
    buckets: list[list] = [[] for _ in range(count)]
    for s in samples:
        buckets[min(count - 1, int((s.at - first) // interval))].append(s)
    return buckets


def _percentile_series(buckets: list[list[RequestSample]], field: str) -> dict[str, list[float | None]]:
    values = [sorted(v for r in b if (v := getattr(r, field)) is not None) for b in buckets]
    return {f"p{p}": [_percentile(v, p) for v in values] for p in PERCENTILES}


def _percentile(values: list[float], p: int) -> float | None:
    """The nearest-rank percentile of sorted values."""
    if not values:
        return None
    return round(values[max(0, math.ceil(p / 100 * len(values)) - 1)], 5)


def _share(requests: list[RequestSample]) -> float | None:
    return round(sum(r.met_slo for r in requests) / len(requests), 4) if requests else None
