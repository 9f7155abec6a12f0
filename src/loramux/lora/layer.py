"""The virtualized linear: one frozen base weight shared by any number of LoRA adapters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loramux.lora.ops import LoraWeights, StackedLora, add_lora_loop, add_lora_tiled
from loramux.lora.segments import LoraSegments

# Below this many segments the per-segment loop is as fast as the tiled batched path on CPU
# (benchmarks/lora_ops.py: tiled wins in bf16 from 16 adapters, ties or loses below).
TILED_MIN_SEGMENTS = 16


class MultiLoraLinear(nn.Module):
    """y = x @ W.T (+ b) for all rows, then each adapter's delta on its own row segment.

    weight: [out, in], frozen (requires_grad is False, always).
    adapters: slot -> LoraWeights, installed and removed by the adapter registry. The tensors are
    the adapter's own (shared, not copied), so an optimizer step on them is seen at once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str, layer_idx: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.name, self.layer_idx = name, layer_idx
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.adapters: dict[int, LoraWeights] = {}
        self._stacked: StackedLora | None = None
        self._stacked_version = -1

    def set_adapter(self, slot: int, weights: LoraWeights) -> None:
        self.adapters[slot] = weights
        self._stacked = None

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)
        self._stacked = None

    def forward(self, x: torch.Tensor, segments: LoraSegments, builds_graph: bool, weights_version: int) -> torch.Tensor:
        """x: [T, in] -> [T, out].

        builds_graph: rows of adapters being trained; the delta runs through the loop path so that
        autograd reaches each adapter's own A and B. Otherwise (no grad) the tiled path is used when
        it pays. `weights_version` changes whenever any adapter's weights change (it invalidates
        the stacked copy used by the tiled path).
        """
        y = F.linear(x, self.weight, self.bias)
        present = [s for s in segments.slots if s in self.adapters]
        if not present:
            return y
        use_tiled = (
            not builds_graph
            and not torch.is_grad_enabled()
            and len(segments.segments) >= TILED_MIN_SEGMENTS
            and len(present) == len(segments.slots)
        )
        if not use_tiled:
            return add_lora_loop(y, x, segments, self.adapters, training=builds_graph)
        if self._stacked is None or self._stacked_version != weights_version:
            self._stacked = StackedLora.build(self.adapters, self.in_features, self.out_features)
            self._stacked_version = weights_version
        return add_lora_tiled(y, x, segments, self._stacked)
