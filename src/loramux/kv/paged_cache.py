"""The paged KV cache: one pool of fixed-size blocks per layer, shared by all sequences.

k[layer], v[layer]: [num_blocks * block_size, kv_heads, head_dim]. Token `pos` of a sequence with
block table `bt` lives in slot `bt[pos // block_size] * block_size + pos % block_size`. Writes and
reads go through slot indices computed once per step (engine/batch.py), so attention reads a
sequence's context with one gather per layer and never copies whole caches between steps.
"""

from __future__ import annotations

import torch

from loramux.config import ModelConfig
from loramux.kv.block_allocator import BlockAllocator


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * config.kv_size * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_memory(cls, config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype, device) -> PagedKVCache:
        """As many blocks as fit in `memory_bytes`."""
        num_blocks = memory_bytes // (cls.bytes_per_token(config, dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(f"KV cache memory of {memory_bytes} bytes holds no block of {block_size} tokens")
        return cls(config, int(num_blocks), block_size, dtype, device)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Slot ids of positions [start, end) of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, head_dim] into `slots` [n]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)
