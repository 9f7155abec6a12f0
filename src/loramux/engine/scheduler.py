"""Which rows run in the next step: decode first, prefill chunks by deadline, within a token budget
sized from measured step costs so that running requests keep their time-per-token target."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loramux.engine.requests import SLO, Request, RequestState
from loramux.kv.paged_cache import PagedKVCache


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the request was not admitted."""


@dataclass(frozen=True)
class SchedulerConfig:
    """max_step_tokens: hard cap on rows per step. max_running: requests holding KV at once.
    max_waiting: queue bound (admission control). max_prefill_chunk: prompt tokens of one request per
    step. min_prefill_tokens: prefill progress per step even when the latency budget is spent, so
    waiting requests never starve. step_time_share: the share of the tightest TPOT target a step may
    take (the rest is headroom for sampling, streaming and noise)."""

    max_step_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 1024
    max_prefill_chunk: int = 256
    min_prefill_tokens: int = 16
    step_time_share: float = 0.8
    default_slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_running", "max_waiting", "max_prefill_chunk", "min_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.step_time_share <= 1:
            raise ValueError("step_time_share must be in (0, 1]")


class StepCostModel:
    """Step seconds ~= fixed + per_row * rows, a least-squares fit over the last `window` steps."""

    def __init__(self, window: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per row), or None before there is anything to fit."""
        if not self.samples:
            return None
        n = len(self.samples)
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self.samples)
        if var == 0:  # all steps the same size: attribute the time to rows
            return 0.0, mean_y / max(mean_x, 1)
        slope = max(sum((x - mean_x) * (y - mean_y) for x, y in self.samples) / var, 1e-9)
        return max(mean_y - slope * mean_x, 0.0), slope

    def predict(self, rows: int) -> float | None:
        fit = self.fit()
        return None if fit is None else fit[0] + fit[1] * rows

    def max_rows_within(self, seconds: float) -> int | None:
        fit = self.fit()
        return None if fit is None else int((seconds - fit[0]) / fit[1])


@dataclass(frozen=True)
class ScheduledChunk:
    """Positions [start, end) of `request` run this step; `samples` when the chunk reaches the end
    of the known sequence, so its last row's logits give the next token."""

    request: Request
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_rows(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: PagedKVCache) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cost = StepCostModel()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        capacity = self.kv.num_blocks * self.kv.block_size
        if request.max_total_tokens > capacity:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"exceeds the KV cache capacity of {capacity} tokens"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests); retry later")
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Takes a request out (finished or aborted) and frees its KV blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free(request)

    def token_budget(self) -> int:
        """Rows for the next step: what the cost model says fits in the tightest TPOT target of the
        running requests (all of max_step_tokens while nothing is running or nothing is measured)."""
        cfg = self.config
        if not self.running:
            return cfg.max_step_tokens
        target = cfg.step_time_share * min(r.slo.tpot for r in self.running)
        fits = self.cost.max_rows_within(target)
        return cfg.max_step_tokens if fits is None else max(1, min(fits, cfg.max_step_tokens))

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget()
        preempted: list[Request] = []
        chunks: list[ScheduledChunk] = []
        # 1. Decodes, oldest first; when blocks run out, preempt the newest running request.
        for request in sorted(self.running, key=lambda r: r.priority):
            if request.state is not RequestState.RUNNING or request.num_pending != 1:
                continue
            while not self._reserve(request, request.num_tokens):
                victim = max(self.running, key=lambda r: r.priority)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.state is RequestState.RUNNING:
                chunks.append(ScheduledChunk(request, request.num_computed, request.num_tokens))
        # 2. Prefill chunks by deadline: partly prefilled running requests, then waiting ones.
        prefill_budget = max(budget - len(chunks), self.config.min_prefill_tokens)
        candidates = [r for r in self.running if r.num_pending > 1] + sorted(self.waiting, key=Request.deadline)
        for request in sorted(candidates, key=Request.deadline):
            if prefill_budget <= 0:
                break
            if request.state is RequestState.WAITING and len(self.running) >= self.config.max_running:
                continue
            n = min(request.num_pending, prefill_budget, self.config.max_prefill_chunk, self._room(request))
            if n <= 0 or not self._reserve(request, request.num_computed + n):
                continue
            if request.state is RequestState.WAITING:
                self.waiting.remove(request)
                self.running.append(request)
                request.state = RequestState.RUNNING
            chunks.append(ScheduledChunk(request, request.num_computed, request.num_computed + n))
            prefill_budget -= n
        return SchedulerOutput(chunks, preempted)

    def _room(self, request: Request) -> int:
        """Tokens the request could add with its own blocks plus every free block."""
        return (len(request.block_table) + self.kv.allocator.num_free) * self.kv.block_size - request.num_computed

    def _reserve(self, request: Request, num_tokens: int) -> bool:
        """Grows the request's block table to hold `num_tokens` positions, if blocks are free."""
        missing = self.kv.blocks_for(num_tokens) - len(request.block_table)
        if missing <= 0:
            return True
        if not self.kv.allocator.can_allocate(missing):
            return False
        request.block_table.extend(self.kv.allocator.allocate(missing))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free(request)
        request.num_computed = 0
        request.state = RequestState.WAITING
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        if request.block_table:
            self.kv.allocator.free(request.block_table)
            request.block_table = []
