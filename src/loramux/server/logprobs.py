"""The engine's log-probabilities in the response shapes of the completion routes: OpenAI's legacy
`logprobs` object of /v1/completions, with its character offsets, and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from loramux.engine.detokenizer import TextStream
from loramux.engine.sampling import TokenLogprob


class LegacyLogprobs:
    """One choice's `logprobs` on /v1/completions, built as its tokens arrive (all at once, or
    chunk by chunk when streamed): for each token its text, its log-probability (null for the
    prompt's first token, which nothing predicts), the `top` most probable tokens and the token
    itself (OpenAI's top_logprobs holds up to logprobs + 1 entries), and `text_offset`, where the
    token's text starts in the choice's text.

    Offsets count characters of the tokens' decoded text (`TextStream`, so a token that completes a
    character begun by the token before starts at that character). The echoed prompt and the
    generated tokens are decoded apart, as their texts are: `restart(base)` begins the generated
    tokens at `base`, the length of the echoed prompt."""

    def __init__(self, tokenizer, top: int, skip_special_tokens: bool) -> None:
        self.tokenizer, self.top, self.skip_special_tokens = tokenizer, top, skip_special_tokens
        self.restart(0)

    def restart(self, base: int) -> None:
        self.base, self.stream = base, TextStream(self.tokenizer, skip_special_tokens=self.skip_special_tokens)

    def add(self, tokens: Iterable[tuple[int, TokenLogprob | None]]) -> dict:
        """The logprobs object of these (token id, its log-probability or None) pairs."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in tokens:
            out["text_offset"].append(self.base + self.stream.decoded_length())
            self.stream.push(token_id)
            out["tokens"].append(self._text(token_id))
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {
                **{self._text(t): v for t, v in lp.top[: self.top]}, self._text(token_id): lp.logprob})
        return out

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def joined(first: dict, second: dict) -> dict:
    """Two logprobs objects of consecutive tokens as one."""
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs(tokenizer, entries: Sequence[TokenLogprob | None], top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, then token id (a string key)
    -> {logprob, rank, decoded_token} for the prompt's token (first, with its rank in the
    distribution) and the `top` most probable tokens (ranks 1..top)."""
    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": tokenizer.decode([token_id])}

    out: list[dict | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        alternatives = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(lp.top[:top], start=1):
            alternatives.setdefault(str(t), entry(t, v, rank))
        out.append(alternatives)
    return out
