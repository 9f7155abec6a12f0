"""Block allocation and the paged cache's slot arithmetic."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_hf, ours_from_hf
from loramux.kv.block_allocator import BlockAllocator, OutOfBlocks
from loramux.kv.paged_cache import PagedKVCache


def test_allocate_and_free_round_trip():
    a = BlockAllocator(8)
    first = a.allocate(3)
    second = a.allocate(5)
    assert sorted(first + second) == list(range(8)) and a.num_free == 0
    with pytest.raises(OutOfBlocks, match="asked for 1 KV blocks, 0 free of 8"):
        a.allocate(1)
    a.free(first)
    assert a.num_free == 3 and a.num_used == 5
    with pytest.raises(ValueError, match="double free"):
        a.free(first[:1])


def test_fragmented_free_list_is_fully_reusable():
    """Freeing every other block leaves holes; later allocations use exactly those holes, lowest first."""
    a = BlockAllocator(10)
    blocks = [a.allocate(1)[0] for _ in range(10)]
    a.free(blocks[::2])
    assert a.allocate(5) == [0, 2, 4, 6, 8]
    assert not a.can_allocate(1)


def test_slots_follow_the_block_table():
    config = ours_from_hf(make_tiny_hf()).config
    kv = PagedKVCache(config, num_blocks=6, block_size=4, dtype=torch.float32, device="cpu")
    assert kv.slots([5, 0, 3], 2, 10) == [22, 23, 0, 1, 2, 3, 12, 13]
    assert kv.blocks_for(0) == 0 and kv.blocks_for(4) == 1 and kv.blocks_for(5) == 2


def test_context_slots_of_many_sequences_are_their_slots_padded_and_masked():
    """Hand-computed: block size 4; a table longer than its sequence needs (a block held ahead)."""
    config = ours_from_hf(make_tiny_hf()).config
    kv = PagedKVCache(config, num_blocks=6, block_size=4, dtype=torch.float32, device="cpu")
    slots, mask = kv.context_slots([[5, 0, 3], [2], [4, 1]], [10, 3, 5])
    assert slots.shape == mask.shape == (3, 10) and slots.is_contiguous()
    assert slots[0].tolist() == [20, 21, 22, 23, 0, 1, 2, 3, 12, 13]
    assert slots[1, :3].tolist() == [8, 9, 10] and slots[2, :5].tolist() == [16, 17, 18, 19, 4]
    assert mask.tolist() == [[True] * 10, [True] * 3 + [False] * 7, [True] * 5 + [False] * 5]
    assert all(0 <= s < kv.num_blocks * kv.block_size for s in slots.flatten().tolist())  # padding too: in the pool
    empty_slots, empty_mask = kv.context_slots([], [])
    assert empty_slots.shape == empty_mask.shape == (0, 0)


def test_sized_from_memory():
    config = ours_from_hf(make_tiny_hf()).config
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    kv = PagedKVCache.from_memory(config, memory_bytes=per_token * 16 * 7 + 5, block_size=16, dtype=torch.float32, device="cpu")
    assert kv.num_blocks == 7
    assert kv.k.numel() * 4 + kv.v.numel() * 4 == per_token * 16 * 7
    with pytest.raises(ValueError, match="holds no block"):
        PagedKVCache.from_memory(config, memory_bytes=per_token, block_size=16, dtype=torch.float32, device="cpu")
