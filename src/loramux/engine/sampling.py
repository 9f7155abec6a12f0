"""Choosing each request's next token from its logits, OpenAI/vLLM semantics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from loramux.structured.spec import StructuredSpec

MAX_LOGPROBS = 20


class InvalidParam(ValueError):
    """A sampling parameter out of its range; `param` names it (the server's 400 names it too)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 or -1 (vLLM's "off"), top_p 1 and min_p 0 disable those
    filters. A request draws from its own generator (seeded if `seed` is set), so its output does not
    depend on its batch neighbours.

    presence_penalty / frequency_penalty: OpenAI's, over generated tokens (-2..2).
    repetition_penalty: transformers' (> 1 discourages), over prompt and generated tokens.
    min_p: vLLM's: after temperature, tokens less probable than min_p x the most probable are dropped.
    logit_bias: OpenAI's, (token id, bias in [-100, 100]) pairs (a mapping is accepted) added to the
        logits before anything else; ids are checked against the vocabulary by `check_vocab`.
    stop: strings that end the output (not included in it unless include_stop_str_in_output);
        stop_token_ids likewise for ids.
    include_stop_str_in_output: the stop string, or the text of the stop or end token, ends the text.
    skip_special_tokens: special tokens (e.g. <|im_end|>) have no text in the output.
    min_tokens: end-of-sequence and stop tokens are blocked until this many tokens are out.
    logprobs: None, or how many top alternatives to report with each token's log-probability (0..20).
    prompt_logprobs: None, or how many top alternatives to report with each prompt token after the
        first (0..20); the engine computes them from the prompt's own rows while it prefills.
    max_tokens: at least 1; 0 only with prompt_logprobs set, for scoring a prompt: the request then
        finishes ("length") right after its prefill, with its prompt log-probabilities and no token.
    structured: the output follows this constraint (a JSON schema, regex, choice or grammar; see
        loramux.structured): only tokens its grammar allows are sampled, and the request ends
        ("stop") when the grammar is complete.
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
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        scoring = self.max_tokens == 0 and self.prompt_logprobs is not None
        checks = [
            ("max_tokens", self.max_tokens >= 1 or scoring,
             f"max_tokens must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= -1, f"top_k must be -1 or 0 (off) or positive, got {self.top_k}"),
            ("min_p", 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            ("logit_bias", all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
             f"logit_bias must map token ids to biases in [-100, 100], got {dict(self.logit_bias)}"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("repetition_penalty", self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParam(param, message)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by these parameters must be in [0, vocab_size) (raises InvalidParam)."""
        outside = [t for t, _ in self.logit_bias if t >= vocab_size]
        if outside:
            raise InvalidParam("logit_bias", f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {outside}")

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
    """A token's log-probability under the model, its rank in that distribution (1 + the number of
    more probable tokens), and the top alternatives (id, logprob), most probable first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = field(default=())


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits [N, vocab] float32, token_ids [N] -> for each row, the log-softmax of token_ids[i],
    its rank and the row's k most probable tokens (k in 0..MAX_LOGPROBS)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_values, top_ids = torch.topk(logprobs, k, dim=-1)
    rows = zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist())
    return [TokenLogprob(t, lp, rank, tuple(zip(ids, values))) for t, lp, rank, ids, values in rows]


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    blocked_ids: Sequence[int] = (),
    argmax: int | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[int, TokenLogprob | None]:
    """logits [vocab] float32 -> (next token id, its log-probabilities if asked for).

    Order: logit_bias, penalties, blocked ids, then temperature, min_p, top_k, top_p.
    blocked_ids are forbidden for now (end-of-sequence ids while `min_tokens` is not reached).
    allowed: bool [vocab], a structured output's grammar: False tokens are forbidden like blocked_ids.
    argmax: logits.argmax(), if the caller has it (one call for a whole batch's rows costs about
    what one row's costs).
    Log-probabilities are those of the model's raw distribution, as vLLM reports by default.
    """
    scores = logits
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        scores = scores.index_add(0, torch.tensor(ids, device=logits.device), torch.tensor(biases, dtype=logits.dtype, device=logits.device))
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        picked = scores[seen]
        scores = scores.index_copy(0, seen, torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty))
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=scores.shape[0]).to(scores.dtype)
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    if blocked_ids:
        scores = scores.index_fill(0, torch.tensor(list(blocked_ids), dtype=torch.long, device=logits.device), float("-inf"))
    # the best token, when allowed, is the best allowed one: a greedy row then pays no pass over the vocabulary
    if allowed is not None and not (argmax is not None and params.greedy and scores is logits and allowed[argmax]):
        scores = scores.masked_fill(~allowed, float("-inf"))
    token = argmax if argmax is not None and params.greedy and scores is logits else _choose(scores, params, generator)
    if params.logprobs is None:
        return token, None
    return token, token_logprobs(logits[None], torch.tensor([token], device=logits.device), params.logprobs)[0]


def _choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(scores))
    # Shifted so the best score is 0 before dividing, and divided by no less than the dtype's
    # smallest normal number: a tiny temperature then sends the other scores to -inf instead of
    # overflowing every score to +-inf or dividing by a zero it rounds to (softmax of those is NaN).
    scores = (scores - scores.max()) / max(params.temperature, torch.finfo(scores.dtype).tiny)
    if params.min_p > 0:  # scores are log(p / p_max) here
        scores = scores.masked_fill(scores < math.log(params.min_p), float("-inf"))
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
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
