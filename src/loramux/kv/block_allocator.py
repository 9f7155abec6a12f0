"""Fixed-size KV blocks handed out to sequences, shared through the prefix cache, and taken back.

Every block is in exactly one of three states:

    free        on the free list (a min-heap: lowest id first, which keeps a sequence's blocks
                mostly adjacent); holds nothing anyone may read
    referenced  in the block tables of `ref_count(b)` >= 1 sequences
    cached      referenced by nobody but still holding a full block registered under its hash;
                kept in an LRU (least recently released first) until allocation needs the room

A registered block is full and read-only: only full blocks are registered, and a sequence writes
only positions it has not computed, which never lie in a full block. Registered blocks are shared
only by sequences whose block hashes are equal (kv/block_hashes.py: the same adapter at the same
weights generation, the same tokens from position 0), so sharing never crosses adapters
(docs/architecture.md, invariant 5).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler preempts instead of failing a request."""


class BlockAllocator:
    """Block ids [0, num_blocks): free, referenced (with counts) or cached (see the module).
    num_evictions: cached blocks dropped so far; while it stands still, every registered block
    stays registered (eviction is the only way out of the cache)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a min-heap
        self._refs: dict[int, int] = {}  # referenced blocks -> how many block tables hold them
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest release first
        self._block_of: dict[bytes, int] = {}  # registered hash -> its block
        self._hash_of: dict[int, bytes] = {}  # registered block -> its hash
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Registered blocks, referenced or not."""
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._refs.get(block, 0)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n private blocks: free ones first (lowest id first), then the least recently released
        cached ones, whose registration is dropped."""
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} free of {self.num_blocks}")
        blocks = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
                self.num_evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drops one reference to each block, in the order given: a block nobody references any
        more goes to the LRU's young end if registered (in order, so a sequence's blocks given
        tail first are evicted tail first), else to the free list."""
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None:
                raise ValueError(f"KV block {b} is not allocated (double free?)")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                heapq.heappush(self._free, b)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks registered under hashes[0], hashes[1], ... up to the first not registered."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each registered block (out of the LRU if nobody held it)."""
        for b in blocks:
            if b not in self._hash_of:
                raise ValueError(f"KV block {b} is not cached; only cached blocks are shared")
            if b in self._evictable:
                del self._evictable[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Caches a referenced, now full block under its hash, unless that hash already has a block
        (then this one stays private and is freed as usual). Registering a block again is a no-op."""
        if block not in self._refs:
            raise ValueError(f"KV block {block} is not allocated; only blocks in use are registered")
        if block_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
