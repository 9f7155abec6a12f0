"""Per-request timings and the figures a run is judged by, the same for every system.

Times are seconds on one clock from the run's start. A request's time to first token counts from its
*scheduled* arrival, so a system that is late to even accept a request pays for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from loramux.bench.workload import BenchRequest


@dataclass
class RequestRecord:
    index: int
    adapter: str | None
    arrival: float
    prompt_tokens: int
    max_tokens: int
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @classmethod
    def of(cls, r: BenchRequest) -> "RequestRecord":
        return cls(r.index, r.adapter, r.arrival, len(r.prompt_ids), r.max_tokens)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (0 for a one-token output)."""
        if self.finished is None or self.first_token is None:
            return None
        return (self.finished - self.first_token) / max(self.output_tokens - 1, 1)

    def meets(self, ttft: float, tpot: float) -> bool:
        return self.error is None and self.finished is not None and self.ttft <= ttft and self.tpot <= tpot


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(records: list[RequestRecord], ttft_target: float, tpot_target: float) -> dict:
    """Throughput over the run's span (first arrival to last finish), latency percentiles, and SLO
    attainment: the share of all requests that finished and met both targets."""
    done = [r for r in records if r.finished is not None and r.error is None]
    span = (max(r.finished for r in done) - min(r.arrival for r in records)) if done else math.nan
    tokens = sum(r.output_tokens for r in done)
    ttfts, tpots = [r.ttft for r in done], [r.tpot for r in done]
    out = {
        "requests": len(records),
        "completed": len(done),
        "errors": sum(r.error is not None for r in records),
        "output_tokens": tokens,
        "seconds": span,
        "output_tokens_per_second": tokens / span if done and span > 0 else math.nan,
        "slo_attainment": sum(r.meets(ttft_target, tpot_target) for r in records) / len(records),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    return out


def record_dicts(records: list[RequestRecord]) -> list[dict]:
    return [asdict(r) | {"ttft": r.ttft, "tpot": r.tpot} for r in records]
