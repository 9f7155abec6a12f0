"""Fixed-size KV blocks handed out to sequences and taken back."""

from __future__ import annotations

import heapq


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler preempts instead of failing a request."""


class BlockAllocator:
    """Free list over block ids [0, num_blocks). A block belongs to at most one sequence: blocks
    are never shared (LoRA on k/v makes each adapter's cache its own, ARCHITECTURE.md invariant 5).
    Blocks are handed out lowest id first, which keeps a sequence's blocks mostly adjacent."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a min-heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV block {b} is not allocated (double free?)")
            self._used.remove(b)
            heapq.heappush(self._free, b)
