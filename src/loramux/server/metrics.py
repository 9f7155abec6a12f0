"""Prometheus metrics of one server (its own registry, so tests can run several servers).

Two sets of names on one `/metrics`: loramux's own (`loramux_*`, labelled by the model a request
named) and vLLM's (`vllm:*`, as vllm/v1/metrics/loggers.py defines them: labelled with
`model_name` = the served model's id and `engine` = "0"), so that dashboards and routers made for
vLLM read loramux unchanged. A quantity both sets have is a `Twin`: it is observed once and each
observation goes to both families; the two differ only in names, labels and histogram buckets.
The process's own (`process_*`: resident memory, CPU seconds, open files) are there too, as in
prometheus_client's default registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from loramux.engine.engine import Engine
from loramux.engine.requests import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vLLM's buckets for the same histograms (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                    960.0, 1920.0, 7680.0)
VLLM_LABELS = ("model_name", "engine")
# an adapter load (server/resident.py) reads megabytes off disk: milliseconds to seconds
ADAPTER_LOAD_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class _Both:
    """A child of a loramux family and one of its vLLM twin: every update goes to both."""

    def __init__(self, *children) -> None:
        self.children = children

    def inc(self, amount: float = 1) -> None:
        for child in self.children:
            child.inc(amount)

    def set(self, value: float) -> None:
        for child in self.children:
            child.set(value)

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class Twin:
    """One quantity under loramux's name (labelled by `labelnames`) and vLLM's (labelled
    `model_name`, `engine`). A Counter's names are given without `_total`, which prometheus_client
    appends to the exposed sample (`vllm:prompt_tokens` is exposed as `vllm:prompt_tokens_total`)."""

    def __init__(self, kind: type, ours: str, theirs: str, documentation: str, *, registry: CollectorRegistry, served: str,
                 labelnames: Sequence[str] = (), vllm_buckets: Sequence[float] = ()) -> None:
        ours_kw = {"buckets": LATENCY_BUCKETS} if kind is Histogram else {}
        theirs_kw = {"buckets": vllm_buckets} if kind is Histogram else {}
        self.ours = kind(ours, documentation, labelnames, registry=registry, **ours_kw)
        self.theirs = kind(theirs, documentation, VLLM_LABELS, registry=registry, **theirs_kw).labels(served, "0")

    def labels(self, *values: str) -> _Both:
        return _Both(self.ours.labels(*values) if values else self.ours, self.theirs)


class Metrics:
    """`served`: the base model's id (vLLM's `model_name` label); `max_lora`: the resident adapter
    limit (0: none), reported as vLLM reports its `max_loras`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, served: str = "", max_lora: int = 0) -> None:
        r = self.registry = CollectorRegistry()
        twin = {"registry": r, "served": served}
        self.max_lora = max_lora
        self.requests = Counter("loramux_requests", "Completed generation requests", ["model", "status"], registry=r)
        self.prompt_tokens = Twin(Counter, "loramux_prompt_tokens", "vllm:prompt_tokens", "Prompt tokens of completed requests",
                                  labelnames=["model"], **twin)
        self.generated_tokens = Twin(Counter, "loramux_generated_tokens", "vllm:generation_tokens", "Generated tokens",
                                     labelnames=["model"], **twin)
        self.ttft = Twin(Histogram, "loramux_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                         "Time to first token", labelnames=["model"], vllm_buckets=VLLM_TTFT_BUCKETS, **twin)
        self.tpot = Twin(Histogram, "loramux_time_per_output_token_seconds", "vllm:time_per_output_token_seconds",
                         "Time per output token after the first (a request's mean)", labelnames=["model"],
                         vllm_buckets=VLLM_TPOT_BUCKETS, **twin)
        self.e2e = Twin(Histogram, "loramux_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                        "End-to-end request latency", labelnames=["model"], vllm_buckets=VLLM_E2E_BUCKETS, **twin)
        self.running = Twin(Gauge, "loramux_requests_running", "vllm:num_requests_running", "Requests holding KV blocks", **twin)
        self.waiting = Twin(Gauge, "loramux_requests_waiting", "vllm:num_requests_waiting", "Requests in the queue", **twin)
        self.kv_blocks = Gauge("loramux_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_total = Gauge("loramux_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", VLLM_LABELS,
                              registry=r).labels(served, "0")
        self.prefix_queries = Twin(Counter, "loramux_prefix_cache_queries", "vllm:prefix_cache_queries",
                                   "Prompt tokens looked up in the prefix cache", **twin)
        self.prefix_hits = Twin(Counter, "loramux_prefix_cache_hits", "vllm:prefix_cache_hits",
                                "Prompt tokens found in the prefix cache", **twin)
        self._prefix_seen = (0, 0)  # the scheduler's (queries, hits) at the last observation
        # vLLM's own labels, no model_name: a series per (running, waiting) set of adapter names,
        # valued the time it was seen; only the latest is kept, so the series do not pile up
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self.adapters = Gauge("loramux_adapters_resident", "Adapters loaded", registry=r)
        self.adapter_loads = Histogram("loramux_adapter_load_seconds", "Adapter loads from the catalog, disk to servable "
                                       "(read, evictions to make room, registration)", registry=r, buckets=ADAPTER_LOAD_BUCKETS)
        self.adapter_evictions = Counter("loramux_adapter_evictions", "Idle adapters evicted (LRU) under the resident limit",
                                         registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and the rest, as the default registry has them
        self.train_tps = Gauge("loramux_training_tokens_per_second", "Training tokens per second", ["job"], registry=r)
        self.train_loss = Gauge("loramux_training_loss", "Latest training loss", ["job"], registry=r)

    def record_requests(self, model: str, status: str, prompts: list[list[int]], outs: dict[str, list[RequestOutput]]) -> None:
        for seq in outs.values():
            self.requests.labels(model, status).inc()
            self.generated_tokens.labels(model).inc(sum(len(o.new_token_ids) for o in seq))
            m = seq[-1].metrics if seq else None
            if m is not None:
                for histogram, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e)):
                    if value is not None:
                        histogram.labels(model).observe(value)
        self.prompt_tokens.labels(model).inc(sum(len(p) for p in prompts))

    def observe_engine(self, engine: Engine) -> None:
        """Called in the engine thread after every step."""
        scheduler = engine.scheduler
        self.running.labels().set(len(scheduler.running))
        self.waiting.labels().set(len(scheduler.waiting))
        self.kv_blocks.set(engine.kv.allocator.num_used)
        self.kv_blocks_total.set(engine.kv.num_blocks)
        self.kv_usage.set(engine.kv.allocator.num_used / engine.kv.num_blocks)
        seen = (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits)
        self.prefix_queries.labels().inc(seen[0] - self._prefix_seen[0])
        self.prefix_hits.labels().inc(seen[1] - self._prefix_seen[1])
        self._prefix_seen = seen
        labels = (str(self.max_lora), _names(scheduler.waiting), _names(scheduler.running))
        self.lora_info.labels(*labels).set_to_current_time()
        if self._lora_labels not in (None, labels):
            self.lora_info.remove(*self._lora_labels)
        self._lora_labels = labels
        self.adapters.set(len(engine.adapters))
        for job in engine.trainer.jobs.values():
            if job.step and not job.state.is_final:
                self.train_tps.labels(job.id).set(job.train_tokens / max(job.running_seconds, 1e-9))
                self.train_loss.labels(job.id).set(job.last_train_loss or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _names(requests) -> str:
    """The adapters of these requests, comma-separated, as vLLM's lora_requests_info labels them."""
    return ",".join(sorted({r.adapter for r in requests if r.adapter is not None}))
