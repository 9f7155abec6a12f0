"""The paged KV cache: one pool of fixed-size blocks per layer, shared by all sequences.

k[layer], v[layer]: [num_blocks * block_size, kv_heads, head_dim]. Token `pos` of a sequence with
block table `bt` lives in slot `bt[pos // block_size] * block_size + pos % block_size`. Writes and
reads go through slot indices computed once per step (batch.py), and whole caches are never copied
between steps. Decode rows read their context in place where the native kernel runs
(native/paged_attention.py); elsewhere, and for prefill chunks, attention gathers a sequence's
context once per layer into a workspace reused by every layer and step: fresh buffers of that size
cost page faults each time (docs/benchmarks.md, paged attention).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        self._workspace = torch.empty(2, 0, config.num_kv_heads, config.head_dim, dtype=dtype, device=device)  # K, V

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

    def context_slots(self, block_tables: Sequence[Sequence[int]], lengths: Sequence[int],
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of positions [0, lengths[i]) of each sequence i, from its block table (covering
        at least those positions), padded to the longest: (slots [n, C] long, mask [n, C] bool, True
        on real positions), C = max(lengths). Computed as tensors, one row of blocks per sequence,
        not position by position in Python: a step's cost stays O(blocks) as contexts grow. The
        padding holds slots of the pool (whatever they contain): readers must honour the mask."""
        n, width = len(lengths), max(lengths, default=0)
        widest = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([[*t, *[0] * (widest - len(t))] for t in block_tables], dtype=torch.long).reshape(n, widest)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        slots = (tables[:, :, None] * self.block_size + offsets).reshape(n, widest * self.block_size)[:, :width]
        mask = torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]
        return slots.contiguous().to(device), mask.to(device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, head_dim] into `slots` [n]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape S), each [*S, kv_heads, head_dim]. Without autograd the
        result is a view of the workspace, valid until the next `gather`: use it before calling again."""
        if torch.is_grad_enabled():
            return self.k[layer][slots], self.v[layer][slots]
        n, flat = slots.numel(), slots.reshape(-1)
        if self._workspace.shape[1] < n:
            with torch.inference_mode(False):  # a normal tensor: steps outside inference mode write it too
                self._workspace = self._workspace.new_empty(2, max(n, 2 * self._workspace.shape[1]), *self._workspace.shape[2:])
        k, v = self._workspace[0, :n], self._workspace[1, :n]
        torch.index_select(self.k[layer], 0, flat, out=k)
        torch.index_select(self.v[layer], 0, flat, out=v)
        return k.view(*slots.shape, *k.shape[1:]), v.view(*slots.shape, *v.shape[1:])
