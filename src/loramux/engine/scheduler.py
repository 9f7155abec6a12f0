"""Which rows run in the next step: decode first, prefill chunks by deadline, within a token budget
sized from measured step costs so that running requests keep their time-per-token target."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from typing import Callable, Mapping

import torch

from loramux.batch import RowKind
from loramux.engine.requests import SLO, Request, RequestState
from loramux.kv.paged_cache import PagedKVCache


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the request was not admitted."""


@dataclass(frozen=True)
class SchedulerConfig:
    """max_step_tokens: hard cap on rows per step. max_running: requests holding KV at once.
    max_waiting: queue bound (admission control). max_prefill_chunk: prompt tokens of one request per
    step. min_prefill_tokens: prefill progress per step even when the latency budget is spent, so
    waiting requests never starve.

    Training takes what the requests can afford (`training_budget`): while any request runs or
    waits, a step with training rows may take `step_time_share` of the time the tightest of them
    has before its next token is due (its slack: a TPOT target is an average, so a request whose
    steps were short has saved time that a training sample may spend), by the costs measured on
    this machine; a sample that does not fit waits, it is never forced in beside requests.
    min_train_tokens: training's minimum share while nothing runs: each such step that training
    wanted rows and got none adds this many rows to its next budget, so it never starves.
    idle_train_seconds: the longest a step may take while no request runs (training alone) but one
    arrived within the last `serving_window_seconds`: a request arriving during such a step waits
    that long before its prefill can start. Outside the window (say, a fine-tuning run with no
    traffic) training steps are bounded by max_step_tokens alone, so the split of an optimizer
    batch over steps does not depend on measured timings (a resumed run repeats it exactly).
    step_time_share: the share of the time a step may plan to take (the rest is headroom for
    sampling, streaming and the cost model's error)."""

    max_step_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 1024
    max_prefill_chunk: int = 256
    min_prefill_tokens: int = 16
    min_train_tokens: int = 32
    idle_train_seconds: float = 0.5
    serving_window_seconds: float = 30.0
    step_time_share: float = 0.9
    default_slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_running", "max_waiting", "max_prefill_chunk", "min_prefill_tokens", "min_train_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.idle_train_seconds <= 0:
            raise ValueError("idle_train_seconds must be positive")
        if self.serving_window_seconds < 0:
            raise ValueError("serving_window_seconds must not be negative")
        if not 0 < self.step_time_share <= 1:
            raise ValueError("step_time_share must be in (0, 1]")


class StepCostModel:
    """Step seconds ~= fixed + sum over row kinds of (seconds per row of that kind * rows of it).

    Fitted by least squares over the last `window` steps, with a light ridge pull of the fixed
    part toward most of the cheapest step's time, and of every kind's rate toward the pooled
    seconds-per-row beyond that: a kind seen rarely (or always alongside another) still gets a
    sensible rate, and a few small steps (mostly fixed cost) do not make rows look expensive.
    """

    KINDS = tuple(RowKind)
    FIXED_SHARE_OF_CHEAPEST = 0.8

    def __init__(self, window: int = 64, ridge: float = 0.5) -> None:
        self.num_kinds = len(self.KINDS)
        self.ridge = ridge
        self.samples: deque[tuple[tuple[int, ...], float]] = deque(maxlen=window)
        self._fit: tuple[float, tuple[float, ...]] | None = None  # of the samples as they are now

    def record(self, rows: Mapping[RowKind, int], seconds: float) -> None:
        self.samples.append((self._counts(rows), seconds))
        self._fit = None

    def _counts(self, rows: Mapping[RowKind, int]) -> tuple[int, ...]:
        return tuple(rows.get(kind, 0) for kind in self.KINDS)

    def fit(self) -> tuple[float, tuple[float, ...]] | None:
        """(fixed seconds, seconds per row of each kind in KINDS order), or None before any step.
        Solved once per recorded step: a step's scheduling asks for it several times."""
        if self._fit is None and self.samples:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> tuple[float, tuple[float, ...]]:
        X = torch.tensor([[1.0, *c] for c, _ in self.samples], dtype=torch.float64)
        y = torch.tensor([s for _, s in self.samples], dtype=torch.float64)
        fixed = self.FIXED_SHARE_OF_CHEAPEST * float(y.min())
        pooled = float((y - fixed).sum() / X[:, 1:].sum().clamp(min=1.0))
        prior = torch.tensor([fixed] + [pooled] * self.num_kinds, dtype=torch.float64)
        # ridge toward the prior, worth `ridge` samples of each term: negligible for kinds seen
        # often, decisive for kinds never seen (their column is all zeros)
        scale = torch.diag(self.ridge * (X**2).mean(0) + 1e-9)
        coef = torch.linalg.solve(X.T @ X + scale, X.T @ y + scale @ prior)
        rates = tuple(max(float(r), 1e-3 * pooled, 1e-7) for r in coef[1:])
        return max(float(coef[0]), 0.0), rates

    def max_rows_within(self, seconds: float, kind: RowKind, beside: Mapping[RowKind, int]) -> int | None:
        """How many rows of `kind` fit in `seconds` in a step that also carries `beside`."""
        fit = self.fit()
        if fit is None:
            return None
        used = fit[0] + sum(r * n for r, n in zip(fit[1], self._counts(beside)))
        return max(int((seconds - used) / fit[1][self.KINDS.index(kind)]), 0)


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
    """clock: seconds on the clock the requests' metrics use (the engine's perf_counter; tests
    pass a fake one)."""

    def __init__(self, config: SchedulerConfig, kv: PagedKVCache, clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cost = StepCostModel()
        self._train_credit = 0
        self._last_arrival: float | None = None

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
        self._last_arrival = self.clock()

    @property
    def serving(self) -> bool:
        """A request runs, waits, or arrived within the serving window."""
        recent = self._last_arrival is not None and self.clock() - self._last_arrival < self.config.serving_window_seconds
        return self.has_work or recent

    def remove(self, request: Request) -> None:
        """Takes a request out (finished or aborted) and frees its KV blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free(request)

    def step_target(self) -> float:
        """Seconds a step may take while requests run: a share of their tightest TPOT target."""
        return self.config.step_time_share * min(r.slo.tpot for r in self.running)

    def rows_within_target(self, kind: RowKind, beside: Mapping[RowKind, int]) -> int:
        """Rows of `kind` the next step may carry beside `beside` so that it fits the tightest TPOT
        target of the running requests; while none runs, training rows fit `idle_train_seconds`
        inside the serving window (up to max_step_tokens in all cases, and while nothing is
        measured yet)."""
        cfg = self.config
        room = cfg.max_step_tokens - sum(beside.values())
        if not self.running:
            if kind is not RowKind.TRAIN or not self.serving:
                return room
            target = cfg.idle_train_seconds
        else:
            target = self.step_target()
        fits = self.cost.max_rows_within(target, kind, beside)
        return room if fits is None else min(fits, room)

    def affordable_seconds(self) -> float:
        """How long the next step may take before the tightest request falls behind its plan, a
        `step_time_share` of its targets (the rest is headroom for what a step's plan does not
        see: sampling, streaming, the cost model's error): for a request that is decoding, the
        time until its next token is due (first token + share x TPOT target x tokens so far: what
        its earlier short steps saved is spendable); for one whose first token is still to come,
        the time until arrival + share x TTFT target less the measured cost of the prompt rows it
        still needs. Negative when a request is behind."""
        due = self._planned_due()
        return min(due(r) for r in (*self.running, *self.waiting)) - self.clock()

    def _planned_due(self) -> Callable[[Request], float]:
        """When each request's next token is due by its plan (`affordable_seconds`)."""
        share = self.config.step_time_share
        fit = self.cost.fit()
        prefill_rate = fit[1][StepCostModel.KINDS.index(RowKind.PREFILL)] if fit is not None else 0.0

        def due(r: Request) -> float:
            if r.metrics.first_token is None:
                return r.metrics.arrival + share * r.slo.ttft - prefill_rate * r.num_pending
            return r.metrics.first_token + share * r.slo.tpot * len(r.output_ids)

        return due

    def training_budget(self, beside: Mapping[RowKind, int]) -> int:
        """Rows training (TRAIN and EVAL samples) may add to a step that carries `beside`.

        While requests run or wait: the rows that keep the step within what the tightest request
        can afford (`affordable_seconds`), by the measured costs (none before any step is
        measured); no credit forces a sample in. Otherwise the idle bound, or the credit training
        has earned while starved."""
        if self.running or self.waiting:
            room = self.config.max_step_tokens - sum(beside.values())
            fits = self.cost.max_rows_within(self.affordable_seconds(), RowKind.TRAIN, beside)
            return 0 if fits is None else min(fits, room)
        return max(self.rows_within_target(RowKind.TRAIN, beside), self._train_credit)

    def note_step(self, train_rows: int, wanted_training: bool) -> None:
        """After each step: the training rows it ran, and whether training wanted rows. A step with
        no request running or waiting in which training wanted rows and got none earns training
        `min_train_tokens` of credit; rows run, or requests to serve, reset it."""
        if wanted_training and train_rows == 0 and not (self.running or self.waiting):
            self._train_credit += self.config.min_train_tokens
        else:
            self._train_credit = 0

    def schedule(self) -> SchedulerOutput:
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
        budget = self.rows_within_target(RowKind.PREFILL, {RowKind.DECODE: len(chunks)})
        # Requests behind their first-token plan (arrival + share x TTFT, less what their prompt
        # rows cost) get their prompts in regardless of the running requests' TPOT: trickling them
        # in would make their TTFT miss, and both targets miss for longer.
        now, due = self.clock(), self._planned_due()
        late = sum(r.num_pending for r in (*self.running, *self.waiting) if r.metrics.first_token is None and due(r) < now)
        prefill_budget = max(budget, self.config.min_prefill_tokens, min(late, self.config.max_step_tokens - len(chunks)))
        # After a preemption memory is short: admit nobody new this step (the preempted would thrash).
        waiting = [] if preempted else list(self.waiting)
        candidates = [r for r in self.running if r.num_pending > 1] + waiting
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
