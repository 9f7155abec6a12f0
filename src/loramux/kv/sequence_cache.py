"""A contiguous KV cache for one sequence (the paged pool replaces it in the engine issue)."""

from __future__ import annotations

import torch

from loramux.config import ModelConfig


class SequenceKV:
    """Keys and values of one sequence for every layer, preallocated to `capacity` tokens.

    k, v: [num_layers, num_kv_heads, capacity, head_dim]. Positions [0, start_pos + L) are valid
    after a chunk of L tokens starting at `start_pos` was written to every layer.
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write_and_read(
        self, layer: int, start_pos: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: [L, kv_heads, head_dim] for positions [start_pos, start_pos + L).
        Returns the whole context (k, v), each [kv_heads, start_pos + L, head_dim] (views)."""
        end = start_pos + k_new.shape[0]
        if end > self.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds its KV capacity of {self.capacity}")
        self.k[layer, :, start_pos:end] = k_new.transpose(0, 1)
        self.v[layer, :, start_pos:end] = v_new.transpose(0, 1)
        return self.k[layer, :, :end], self.v[layer, :, :end]
