"""Which rows run in the next step: decode first, prefill chunks by deadline, within a token budget
sized from measured step costs so that running requests keep their time-per-token target; and which
KV blocks a request reuses from the prefix cache (kv/block_allocator.py, kv/block_hashes.py)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from typing import Callable, Mapping

import torch

from loramux.batch import RowKind
from loramux.engine.requests import SLO, Request, RequestState
from loramux.kv.block_hashes import BlockHashes, adapter_root
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.generations import AdapterGenerations


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
    min_train_rows_beside: while fewer training rows than this fit beside running requests and the
    time in hand still grows from one step to the next, training waits (banks the slack) for a
    larger part: a training part costs much before its first row counts (its forward with
    autograd, its backward), so one part of several samples trains faster than one sample a step
    (docs/benchmarks.md, latency targets while training). 0: take whatever fits at once.
    min_train_tokens: training's minimum share while nothing runs: each such step that training
    wanted rows and got none adds this many rows to its next budget, so it never starves.
    idle_train_seconds: the longest a step may take while no request runs (training alone) but one
    arrived within the last `serving_window_seconds`: a request arriving during such a step waits
    that long before its prefill can start. Outside the window (say, a fine-tuning run with no
    traffic) training steps are bounded by max_step_tokens alone, so the split of an optimizer
    batch over steps does not depend on measured timings (a resumed run repeats it exactly).
    step_time_share: the share of the time a step may plan to take (the rest is headroom for
    sampling, streaming and the cost model's error).
    enable_prefix_caching: full KV blocks stay cached under their hashes and a request admitted
    without KV starts from the longest cached prefix of its own adapter at its current weights
    (vLLM's --enable-prefix-caching); cached tokens are neither computed nor counted as prefill work."""

    max_step_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 1024
    max_prefill_chunk: int = 256
    min_prefill_tokens: int = 16
    min_train_tokens: int = 32
    min_train_rows_beside: int = 64
    idle_train_seconds: float = 0.5
    serving_window_seconds: float = 30.0
    step_time_share: float = 0.9
    enable_prefix_caching: bool = True
    default_slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_running", "max_waiting", "max_prefill_chunk", "min_prefill_tokens", "min_train_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.idle_train_seconds <= 0:
            raise ValueError("idle_train_seconds must be positive")
        if self.serving_window_seconds < 0:
            raise ValueError("serving_window_seconds must not be negative")
        if self.min_train_rows_beside < 0:
            raise ValueError("min_train_rows_beside must not be negative")
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
    pass a fake one). generations: the adapter registry's (`AdapterRegistry.generations`), which
    name the weights a request's KV is computed with (default: a fresh one, as with no adapters).

    Prefix caching (`config.enable_prefix_caching`): a request admitted without KV takes a
    reference to the cached blocks of the longest prefix it shares with earlier sequences of its
    adapter at its current weights (kv/block_hashes.py), short of its last token, whose logits must
    be computed; after each forward `mark_computed` registers the blocks it filled. A request whose
    adapter's weights change after its first computed token registers nothing more until a
    preemption drops its KV. prefix_cache_queries / prefix_cache_hits count the tokens looked up at
    admission and the tokens found (vLLM's counters of the same names)."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv: PagedKVCache,
        clock: Callable[[], float] = time.perf_counter,
        generations: AdapterGenerations | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock
        self.generations = AdapterGenerations() if generations is None else generations
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._hashes: dict[Request, BlockHashes | None] = {}  # None: its KV mixes weights generations
        self._known_hits: dict[Request, tuple[BlockHashes, int, int]] = {}  # see _cached_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cost = StepCostModel()
        self._train_credit = 0
        self._banked: float | None = None  # the time in hand when training last waited to bank it
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
        self._hashes.pop(request, None)
        self._known_hits.pop(request, None)

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
        still needs (none for its cached prefix). Negative when a request is behind."""
        due = self._planned_due()
        return min(due(r) for r in (*self.running, *self.waiting)) - self.clock()

    def _planned_due(self) -> Callable[[Request], float]:
        """When each request's next token is due by its plan (`affordable_seconds`)."""
        share = self.config.step_time_share
        fit = self.cost.fit()
        prefill_rate = fit[1][StepCostModel.KINDS.index(RowKind.PREFILL)] if fit is not None else 0.0

        def due(r: Request) -> float:
            if r.metrics.first_token is None:
                return r.metrics.arrival + share * r.slo.ttft - prefill_rate * self._uncached_pending(r)
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
            affordable = self.affordable_seconds()
            fits = self.cost.max_rows_within(affordable, RowKind.TRAIN, beside)
            if fits is None:
                return 0
            fits = min(fits, room)
            # bank the slack: a step's training part costs much before its first row, so while the
            # time in hand still grows from step to step, wait for room for a larger part
            banked, self._banked = self._banked, None
            if fits < self.config.min_train_rows_beside and (banked is None or affordable > banked):
                self._banked = affordable
                return 0
            return fits
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
        # Requests behind their first-token plan (arrival + share x TTFT, less what their uncached
        # prompt rows cost) get their prompts in regardless of the running requests' TPOT: trickling them
        # in would make their TTFT miss, and both targets miss for longer.
        now, due = self.clock(), self._planned_due()
        late = sum(self._uncached_pending(r) for r in (*self.running, *self.waiting) if r.metrics.first_token is None and due(r) < now)
        prefill_budget = max(budget, self.config.min_prefill_tokens, min(late, self.config.max_step_tokens - len(chunks)))
        # After a preemption memory is short: admit nobody new this step (the preempted would thrash).
        waiting = [] if preempted else list(self.waiting)
        candidates = [r for r in self.running if r.num_pending > 1] + waiting
        for request in sorted(candidates, key=Request.deadline):
            if prefill_budget <= 0:
                break
            if request.state is RequestState.WAITING and len(self.running) >= self.config.max_running:
                continue
            num_cached = self._cached_blocks(request) if request.state is RequestState.WAITING else None
            if num_cached:
                cached = self.kv.allocator.cached_prefix(self._hashes[request].hashes[:num_cached])
                self.kv.allocator.share(cached)
                request.block_table, request.num_computed = cached, num_cached * self.kv.block_size
            n = min(request.num_pending, prefill_budget, self.config.max_prefill_chunk, self._room(request))
            if n <= 0 or not self._reserve(request, request.num_computed + n):
                if num_cached:
                    self._free(request)
                    request.num_computed = 0
                continue
            if request.state is RequestState.WAITING:
                if num_cached is not None:
                    self.prefix_cache_queries += request.num_tokens
                    self.prefix_cache_hits += request.num_computed
                self.waiting.remove(request)
                self.running.append(request)
                request.state = RequestState.RUNNING
            chunks.append(ScheduledChunk(request, request.num_computed, request.num_computed + n))
            prefill_budget -= n
        for c in chunks:  # before the forward, which runs with the weights current now
            self._block_hashes(c.request)
        return SchedulerOutput(chunks, preempted)

    def mark_computed(self, output: SchedulerOutput) -> None:
        """After the step's forward: each chunk's positions have KV, and the blocks the chunk filled
        are registered in the prefix cache under the hashes `schedule` fixed (the forward's weights:
        an optimizer step later in the same step does not change them)."""
        bs = self.kv.block_size
        for c in output.chunks:
            request = c.request
            request.num_computed = c.end
            hashes = self._hashes.get(request)
            if hashes is None:
                continue
            hashes.update(c.end, request.tokens)
            for i in range(c.start // bs, c.end // bs):
                self.kv.allocator.register(request.block_table[i], hashes.hashes[i])

    def _block_hashes(self, request: Request) -> BlockHashes | None:
        """The request's block hashes under the weights its KV is computed with: its adapter's
        current weights while it has no KV; None without prefix caching, and once its KV mixes two
        generations (the weights changed after its first computed token) until it has none again."""
        if not self.config.enable_prefix_caching:
            return None
        generation = 0 if request.slot is None else self.generations.of(request.slot)
        root = adapter_root(request.slot, generation)
        hashes = self._hashes.get(request)
        if request.num_computed == 0:
            if hashes is None or hashes.root != root:
                hashes = self._hashes[request] = BlockHashes(root, self.kv.block_size)
        elif hashes is not None and hashes.root != root:
            hashes = self._hashes[request] = None
        return hashes

    def _cached_blocks(self, request: Request) -> int | None:
        """For a request without KV: how many of its leading blocks the cache holds (the longest
        cached prefix of its block hashes, short of its last token); None when it does not use the
        cache (prefix caching off, or it asks for its prompt's logprobs, which need every position
        computed). The count is remembered per request and only extended while nothing is evicted,
        so a long queue costs each plan a dict lookup per request, not a walk over every prefix."""
        if request.params.prompt_logprobs is not None:
            return None
        hashes = self._block_hashes(request)
        if hashes is None:
            return None
        usable = hashes.update(request.num_tokens, request.tokens)[: (request.num_tokens - 1) // self.kv.block_size]
        evictions = self.kv.allocator.num_evictions
        known = self._known_hits.get(request)
        n = known[2] if known is not None and known[0] is hashes and known[1] == evictions else 0
        n += len(self.kv.allocator.cached_prefix(usable[n:]))
        self._known_hits[request] = (hashes, evictions, n)
        return n

    def _uncached_pending(self, request: Request) -> int:
        """Tokens the request still has to compute: for one without KV, those past its cached prefix."""
        cached = self._cached_blocks(request) if request.num_computed == 0 else None
        return request.num_pending - (cached or 0) * self.kv.block_size

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
        """Drops the request's blocks, tail first: cached ones enter the LRU tail first, so eviction
        takes a sequence's later blocks (useful only with the earlier ones) before its earlier ones."""
        if request.block_table:
            self.kv.allocator.free(request.block_table[::-1])
            request.block_table = []
