"""A generation request's state as it moves through the engine, and what it emits."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loramux.engine.detokenizer import TextStream
from loramux.engine.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # xgrammar is imported only by engines that constrain outputs
    from loramux.structured.matcher import Constraint


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds: time to first token and time per output token."""

    ttft: float = 2.0
    tpot: float = 0.25

    def __post_init__(self) -> None:
        if self.ttft <= 0 or self.tpot <= 0:
            raise ValueError(f"latency targets must be positive, got ttft={self.ttft}, tpot={self.tpot}")


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: no KV blocks
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Seconds on the engine's clock. tpot is the mean gap between output tokens after the first."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished is None or self.first_token is None or self.num_output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.num_output_tokens - 1)

    def meets(self, slo: SLO) -> bool:
        return self.ttft is not None and self.ttft <= slo.ttft and (self.tpot is None or self.tpot <= slo.tpot)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and, when it finished, why.
    finish_reason: "stop" (end of sequence, stop token or stop string), "length", "abort" (cancelled
    by its caller) or "error" (the request failed; `error` says why, and the output ends there).
    prompt_logprobs: with params.prompt_logprobs set, on the output of the first token (or the
    finishing output of a max_tokens=0 request): one entry per prompt token, None for the first."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    new_logprobs: tuple[TokenLogprob, ...] = ()
    metrics: RequestMetrics | None = None
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(eq=False)
class Request:
    """prompt_ids + output_ids are the sequence; the first `num_computed` of them have KV in the
    blocks of `block_table`. Preemption frees the blocks and sets num_computed to 0: the next
    prefill recomputes prompt and output so far, and sampling resumes where it stopped."""

    id: str
    order: int  # admission order, breaks ties between equal arrival times
    prompt_ids: list[int]
    adapter: str | None
    slot: int | None
    params: SamplingParams
    slo: SLO
    metrics: RequestMetrics
    text: TextStream
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: RequestState = RequestState.WAITING
    finish_reason: str | None = None
    error: str | None = None  # the message, when finish_reason is "error"
    # with params.prompt_logprobs set: entries for prompt tokens 0..len-1 computed so far (0's is
    # None); kept across preemption, so a recomputed prefill does not compute them again
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    # with params.structured set: the grammar's state, which has accepted exactly output_ids
    constraint: Constraint | None = None

    @property
    def priority(self) -> tuple[float, int]:
        """Lower is more important: earlier arrival first (preemption takes the highest)."""
        return (self.metrics.arrival, self.order)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not yet computed (1 for a request that is decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        return (self.prompt_ids[start:end] if start < n else []) + self.output_ids[max(start - n, 0) : max(end - n, 0)]

    def deadline(self) -> float:
        """When its next token is due: first token by arrival + ttft, later ones tpot apart."""
        if self.metrics.first_token is None:
            return self.metrics.arrival + self.slo.ttft
        return self.metrics.first_token + self.slo.tpot * len(self.output_ids)
