"""What the bench reads off a running `loramux serve`'s /metrics: its adapter loads (the histogram
`loramux_adapter_load_seconds`, server/resident.py), evictions, resident adapters and memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

LOADS = "loramux_adapter_load_seconds"


@dataclass(frozen=True)
class ServerStats:
    """One scrape, or the difference of two (`later - earlier`: what happened between them; the
    gauges, `resident` and `rss_bytes`, are then the later scrape's). buckets: the load histogram's
    (upper bound, cumulative count), +Inf last."""

    loads: int
    load_seconds: float
    buckets: tuple[tuple[float, float], ...]
    evictions: int
    resident: int
    rss_bytes: int

    def __sub__(self, earlier: ServerStats) -> ServerStats:
        buckets = tuple((le, n - m) for (le, n), (_, m) in zip(self.buckets, earlier.buckets))
        return ServerStats(self.loads - earlier.loads, self.load_seconds - earlier.load_seconds, buckets,
                           self.evictions - earlier.evictions, self.resident, self.rss_bytes)

    def __add__(self, other: ServerStats) -> ServerStats:
        """Two windows' loads and evictions together (the gauges are `other`'s)."""
        buckets = tuple((le, n + m) for (le, n), (_, m) in zip(self.buckets, other.buckets))
        return ServerStats(self.loads + other.loads, self.load_seconds + other.load_seconds, buckets,
                           self.evictions + other.evictions, other.resident, other.rss_bytes)

    def load_quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the load times, estimated from the histogram's buckets as
        Prometheus's histogram_quantile does: linear within the bucket that holds it, the highest
        finite bound if that is +Inf; nan for no loads."""
        if not self.loads:
            return math.nan
        rank = q * self.loads
        lower, below = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - below) / (count - below) if count > below else lower
            lower, below = le, count
        return lower

    @property
    def mean_load_seconds(self) -> float:
        return self.load_seconds / self.loads if self.loads else math.nan


def server_stats(url: str) -> ServerStats:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)}

    def sample(family: str, name: str) -> float:
        return next(s.value for s in families[family].samples if s.name == name)

    buckets = tuple((float(s.labels["le"]), s.value) for s in families[LOADS].samples if s.name == f"{LOADS}_bucket")
    return ServerStats(loads=int(sample(LOADS, f"{LOADS}_count")), load_seconds=sample(LOADS, f"{LOADS}_sum"), buckets=buckets,
                       evictions=int(sample("loramux_adapter_evictions", "loramux_adapter_evictions_total")),
                       resident=int(sample("loramux_adapters_resident", "loramux_adapters_resident")),
                       rss_bytes=int(sample("process_resident_memory_bytes", "process_resident_memory_bytes")))
