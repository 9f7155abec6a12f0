"""Turning generated ids into text as they arrive, with stop strings.

Text is released only once it is final: a byte-level token that ends inside a multi-byte character
decodes to U+FFFD and is held back until the character completes, and text that could still be the
start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenization of one request's output (the prefix/read-offset method).

    push(token) -> (new_text, stopped). finish() -> the rest of the text. `text` is all text
    released so far; after a stop string it ends just before the stop string, or just after it
    with `include_stop`. With `skip_special_tokens`, special tokens have no text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # text of all ids up to the read offset
        self.text = ""  # text released to the caller
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.ids[self._prefix_offset :])
        if len(current) > len(prefix) and not current.endswith(REPLACEMENT):
            self._decoded += current[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(final=False)

    def decoded_length(self) -> int:
        """Characters the ids pushed so far decode to, less a trailing partial character."""
        tail = self._decode(self.ids[self._prefix_offset :])
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        return len(self._decoded) + len(tail[len(prefix) :].rstrip(REPLACEMENT))

    def finish(self) -> str:
        """Everything not yet released (a dangling partial character included)."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self._prefix_offset :])
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        self._decoded += tail[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self.ids)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        pending = self._decoded[len(self.text) :]
        # Released text never ends in the start of a stop string, so a stop starts in `pending`.
        hits = [(i, -len(s), s) for i, s in ((pending.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            start, _, stop = min(hits)  # the first stop string in the text (the longest of those starting there)
            new = pending[: start + len(stop) if self.include_stop else start]
            self.text += new
            self.stopped = True
            return new, True
        hold = 0 if final else _longest_stop_prefix_suffix(pending, self.stop)
        new = pending[: len(pending) - hold]
        self.text += new
        return new, False


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
