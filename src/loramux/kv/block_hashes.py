"""Chained hashes of a sequence's full KV blocks: the prefix cache's keys.

A block's K/V depend on the weights that computed them and on every token up to its end, so the
hash of block i is sha256(hash of block i-1, its tokens), and the chain starts at the adapter's
identity: its slot and the generation of its weights (lora/generations.py). The registry moves a
slot's generation when it installs an adapter there, removes one, or is told its weights changed
(every optimizer step of a training job, a restored checkpoint), and every move takes a number never
used before; so blocks computed with other weights, by another adapter, or by an earlier adapter of
the same name never share a hash. The base model is slot None at generation 0 (its weights never
change). sha256 keeps collisions (which would serve another sequence's K/V) out of reach.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence


def adapter_root(slot: int | None, generation: int) -> bytes:
    """The chain's start for one adapter's weights (slot None: the base model)."""
    return hashlib.sha256(f"loramux-kv:{'base' if slot is None else slot}:{generation}".encode()).digest()


def chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block of `tokens` whose preceding block (or adapter root) hashes to `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockHashes:
    """hashes[i]: the hash of block i (positions [i * block_size, (i + 1) * block_size)) of one
    sequence under `root`. A sequence only grows, so the list only grows too."""

    def __init__(self, root: bytes, block_size: int) -> None:
        self.root = root
        self.block_size = block_size
        self.hashes: list[bytes] = []

    def update(self, num_tokens: int, tokens: Callable[[int, int], Sequence[int]]) -> list[bytes]:
        """Hashes every full block of the sequence's first `num_tokens` tokens not hashed yet;
        tokens(start, end) gives the sequence's tokens [start, end). Returns `hashes`."""
        bs = self.block_size
        for i in range(len(self.hashes), num_tokens // bs):
            self.hashes.append(chain(self.hashes[-1] if self.hashes else self.root, tokens(i * bs, (i + 1) * bs)))
        return self.hashes
