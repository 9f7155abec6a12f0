"""Choosing each request's next token from its logits, OpenAI/vLLM semantics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. A request draws from its
    own generator (seeded if `seed` is set), so its output does not depend on its batch neighbours.

    presence_penalty / frequency_penalty: OpenAI's, over generated tokens (-2..2).
    repetition_penalty: transformers' (> 1 discourages), over prompt and generated tokens.
    stop: strings that end the output (not included in it); stop_token_ids likewise for ids.
    min_tokens: end-of-sequence and stop tokens are blocked until this many tokens are out.
    logprobs: None, or how many top alternatives to report with each token's log-probability (0..20).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    blocked_ids: Sequence[int] = (),
    argmax: int | None = None,
) -> tuple[int, TokenLogprob | None]:
    """logits [vocab] float32 -> (next token id, its log-probabilities if asked for).

    blocked_ids are forbidden for now (end-of-sequence ids while `min_tokens` is not reached).
    argmax: logits.argmax(), if the caller has it (one call for a whole batch's rows costs about
    what one row's costs).
    Log-probabilities are those of the model's raw distribution, as vLLM reports by default.
    """
    scores = logits
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        picked = scores[seen]
        scores = scores.index_copy(0, seen, torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty))
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=scores.shape[0]).to(scores.dtype)
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    if blocked_ids:
        scores = scores.index_fill(0, torch.tensor(list(blocked_ids), dtype=torch.long, device=logits.device), float("-inf"))
    token = argmax if argmax is not None and params.greedy and scores is logits else _choose(scores, params, generator)
    if params.logprobs is None:
        return token, None
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return token, TokenLogprob(token, float(logprobs[token]), alternatives)


def _choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(scores))
    # Shifted so the best score is 0 before dividing, and divided by no less than the dtype's
    # smallest normal number: a tiny temperature then sends the other scores to -inf instead of
    # overflowing every score to +-inf or dividing by a zero it rounds to (softmax of those is NaN).
    scores = (scores - scores.max()) / max(params.temperature, torch.finfo(scores.dtype).tiny)
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False  # explicitly: a top_p below float32's range rounds to 0, which would drop it too
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
