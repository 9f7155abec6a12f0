"""Prometheus metrics of one server (its own registry, so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loramux.engine.engine import Engine
from loramux.engine.requests import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loramux_requests", "Completed generation requests", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens of completed requests", ["model"], registry=r)
        self.generated_tokens = Counter("loramux_generated_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loramux_time_per_output_token_seconds", "Time per output token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loramux_e2e_request_latency_seconds", "End-to-end request latency", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("loramux_requests_running", "Requests holding KV blocks", registry=r)
        self.waiting = Gauge("loramux_requests_waiting", "Requests in the queue", registry=r)
        self.kv_blocks = Gauge("loramux_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_total = Gauge("loramux_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.adapters = Gauge("loramux_adapters_resident", "Adapters loaded", registry=r)
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
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_blocks.set(engine.kv.allocator.num_used)
        self.kv_blocks_total.set(engine.kv.num_blocks)
        self.adapters.set(len(engine.adapters))
        for job in engine.trainer.jobs.values():
            if job.step and not job.state.is_final:
                self.train_tps.labels(job.id).set(job.train_tokens / max(job.running_seconds, 1e-9))
                self.train_loss.labels(job.id).set(job.last_train_loss or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
