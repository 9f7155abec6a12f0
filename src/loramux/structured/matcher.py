"""One request's grammar state: which tokens may come next, and the tokens it has taken.

A `Constraint` is made when the request is added and lives as long as it does; preemption does not
touch it (the output so far stays, and so does the state that follows it).
"""

from __future__ import annotations

import torch
import xgrammar as xgr


class Constraint:
    """compiled: from GrammarCache.compile; vocab_size: the logits' width V.

    Invariant: the matcher has accepted exactly the request's output ids so far."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)], bit i of word j: token 32j + i
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [V]: True where the token may come next (end-of-sequence ids only once the output is complete)."""
        self.matcher.fill_next_token_bitmask(self._bitmask)
        bits = (self._bitmask[0].unsqueeze(-1) >> self._bits) & 1  # [words, 32]; >> keeps the sign, & 1 the bit
        return bits.flatten()[: self.vocab_size].bool()

    def accept(self, token: int) -> None:
        """Follows the chosen token; ValueError if the grammar does not allow it (a bug: the mask did)."""
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} does not follow the output's grammar")

    @property
    def terminated(self) -> bool:
        """The output is complete and its end-of-sequence token taken: nothing may follow."""
        return self.matcher.is_terminated()
