"""Choosing each request's next token from its logits, OpenAI/vLLM semantics."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from loramux.structured.spec import StructuredSpec

MAX_LOGPROBS = 20
TOP_P_CANDIDATES = 64  # a top_p prefix is looked for among each row's best 64 tokens first
CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF that draws a token
EXP_FLOOR = -87.0  # e^-87 is about float32's smallest normal number
DRAW_ROWS = 8  # rows that sample are drawn this many at a time (8 x a 49k vocabulary: 1.5 MB of scores)


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
    allowed: torch.Tensor | None = None,
) -> tuple[int, TokenLogprob | None]:
    """logits [vocab] float32 -> (next token id, its log-probabilities if asked for): one row of
    what the engine does for a whole step with `adjusted_scores` per row and one `choose_tokens`.
    Log-probabilities are those of the model's raw distribution, as vLLM reports by default."""
    scores = adjusted_scores(logits, params, prompt_ids, output_ids, blocked_ids, allowed)
    token = choose_tokens((logits if scores is None else scores)[None], [params], [generator])[0]
    return token, chosen_logprobs(logits[None], [0], [token], [params.logprobs])[0]


def chosen_logprobs(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int], ks: Sequence[int | None]) -> list[TokenLogprob | None]:
    """logits [N, vocab]; for each chosen token, its row of logits, the token and how many
    alternatives it asks for (None: no log-probabilities) -> its TokenLogprob or None, from one
    `token_logprobs` call over the rows that ask (none: no call)."""
    wanted = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if wanted:
        found = token_logprobs(logits[[rows[i] for i in wanted]], torch.tensor([tokens[i] for i in wanted], device=logits.device),
                               max(ks[i] for i in wanted))
        for i, logprob in zip(wanted, found):
            out[i] = replace(logprob, top=logprob.top[: ks[i]])
    return out


def adjusted_scores(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    blocked_ids: Sequence[int] = (),
    allowed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """logits [vocab] float32 -> the row's scores [vocab] after what is particular to its request,
    in this order: logit_bias, repetition penalty, presence and frequency penalties, blocked ids
    (forbidden for now: end ids while `min_tokens` is not reached), and `allowed` (bool [vocab], a
    structured output's grammar: False tokens are forbidden). None when none of them applies: the
    row's scores are its logits, and `logits` is never modified."""
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
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return None if scores is logits else scores


def choose_tokens(scores: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """scores [N, vocab] float32, row i's parameters and generator -> row i's next token, for all
    rows with a few batched calls: greedy rows share one max; the others, DRAW_ROWS at a time, one
    chain of temperature, min_p, top_k and top_p over tensors of per-row parameters, then one draw
    by inverse CDF with one uniform number from each row's own generator. A row's token depends only
    on its scores, its parameters and its generator's state, never on the other rows."""
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:  # max, not argmax: the first of ties as well, and 2.5x faster
        best = (scores if len(greedy) == len(params) else scores[greedy]).max(-1).indices.tolist()
        for i, token in zip(greedy, best):
            tokens[i] = token
    for first in range(0, len(drawn), DRAW_ROWS):  # a few rows at a time: their scores stay in cache
        some = drawn[first : first + DRAW_ROWS]
        rows = scores[some[0] : some[-1] + 1] if some[-1] - some[0] + 1 == len(some) else scores[some]
        for i, token in zip(some, _draw(rows, [params[i] for i in some], [generators[i] for i in some])):
            tokens[i] = token
    return tokens


def _draw(scores: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """scores [n, vocab] float32 of rows that sample (never modified) -> their tokens."""
    device, vocab = scores.device, scores.shape[-1]
    per_row = functools.partial(torch.tensor, dtype=scores.dtype, device=device)
    # Shifted so the best score is 0 before dividing, and divided by no less than the dtype's
    # smallest normal number: a tiny temperature then sends the other scores to -inf instead of
    # overflowing every score to +-inf or dividing by a zero it rounds to (softmax of those is NaN).
    tiny = torch.finfo(scores.dtype).tiny
    scores = (scores - scores.max(-1, keepdim=True).values).div_(per_row([max(p.temperature, tiny) for p in params])[:, None])
    if any(p.min_p > 0 for p in params):  # scores are log(p / p_max) here
        floors = per_row([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])
        scores.masked_fill_(scores < floors[:, None], -math.inf)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        kth = torch.topk(scores, max(ks), dim=-1).values.gather(1, torch.tensor([max(k - 1, 0) for k in ks], device=device)[:, None])
        kth.masked_fill_(torch.tensor([k == 0 for k in ks], device=device)[:, None], -math.inf)
        scores.masked_fill_(scores < kth, -math.inf)
    probs = _exp(scores)  # each row's best is e^0 = 1: unnormalised, which the draw does not need
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if len(nucleus) == len(params):
        _keep_top_p(probs, per_row([p.top_p for p in params]))
    elif nucleus:
        probs[nucleus] = _keep_top_p(probs[nucleus], per_row([params[i].top_p for i in nucleus]))
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(device, torch.float64)
    return _inverse_cdf(probs, u).tolist()


def _exp(scores: torch.Tensor) -> torch.Tensor:
    """e^scores (scores <= 0, changed in place) with every entry below EXP_FLOOR (-inf among them)
    exactly 0: those would be subnormal numbers, which CPUs compute about 30x slower than normal
    ones, for a probability too small to ever be drawn (a forbidden token's must be exactly 0)."""
    below = scores < EXP_FLOOR
    return scores.clamp_min_(EXP_FLOOR).exp_().masked_fill_(below, 0.0)


def _keep_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [n, vocab] (unnormalised), top_p [n] -> probs, changed in place: all but each row's
    smallest most probable prefix whose mass reaches its top_p (always at least the top token) 0.

    The prefix is found among each row's TOP_P_CANDIDATES best tokens, and only rows whose
    candidates do not hold top_p look further (x16, up to a sort of the whole vocabulary): sorting
    32 rows of a 49k vocabulary costs about 60 ms, their top 64 about 1.5 ms."""
    vocab = probs.shape[-1]
    totals = probs.sum(-1, keepdim=True)
    kept = torch.zeros_like(probs, dtype=torch.bool)
    pending = torch.arange(probs.shape[0], device=probs.device)
    k = min(TOP_P_CANDIDATES, vocab)
    while True:
        values, ids = torch.topk(probs if len(pending) == len(probs) else probs[pending], k, dim=-1)
        shares = values / totals[pending]
        mass = shares.cumsum(-1)
        keep = mass - shares < top_p[pending, None]
        keep[:, 0] = True  # explicitly: a top_p below float32's range rounds to 0, which would drop it too
        held = (mass[:, -1] >= top_p[pending]) | (k == vocab)
        kept[pending[held]] = kept[pending[held]].scatter(1, ids[held], keep[held])
        pending = pending[~held]
        if not len(pending):
            return probs.masked_fill_(~kept, 0.0)
        k = min(k * 16, vocab)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [n, vocab] (unnormalised, >= 0), u [n] float64 uniform in [0, 1) -> [n] long: in each
    row the token where u x the row's total falls in its cumulative sum, so token j has probability
    probs[j] / total, and tokens of probability 0 are never chosen.

    In two levels, so no [n, vocab] cumulative sum is written: the block of CDF_BLOCK tokens where
    the target falls (a cumulative sum of block masses), then the token within that block, at the
    same fraction of the block's mass. Cumulative sums are float64; a float32 uniform is below 1 by
    2^-24 at least, so each target stays below its total and lands on an entry of positive mass."""
    n, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    if blocks * CDF_BLOCK != vocab:
        probs = torch.nn.functional.pad(probs, (0, blocks * CDF_BLOCK - vocab))
    probs = probs.view(n, blocks, CDF_BLOCK)
    block_cdf = probs.sum(-1).double().cumsum(-1)
    target = u * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True)
    end = block_cdf.gather(1, block)[:, 0]
    start = torch.where(block[:, 0] > 0, block_cdf.gather(1, (block - 1).clamp_min(0))[:, 0], 0.0)
    fraction = ((target - start) / (end - start)).clamp(0.0, 1.0 - 2.0**-30)
    inside = probs[torch.arange(n, device=probs.device), block[:, 0]].cumsum(-1, dtype=torch.float64)
    token = torch.searchsorted(inside, (fraction * inside[:, -1])[:, None], right=True)[:, 0]
    return block[:, 0] * CDF_BLOCK + token
