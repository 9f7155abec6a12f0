"""Activations that backward recomputes instead of keeping.

A LoRA adapter's gradient needs each linear's input (dA = dh^T x), so autograd keeps every
input of every adapted linear for the whole backward. Some of them are cheap to make again from
tensors that are kept anyway: a normalized hidden state from the norm's input (which the norm's own
backward keeps), the MLP's silu(gate) * up from gate and up (which its backward keeps). Inside
`recomputed(tensor, recompute)`, whatever autograd would save of `tensor` (the tensor or any view
of it) is stored as where the view lies; backward calls `recompute()` and takes the same view of
its result. `model/llama.py` does this for both normed hidden states of a layer, the attention
output o reads and the MLP's silu(gate) * up: a 512-row step of the default model saves 861 MB
instead of 1,061 (frozen weights included), with bitwise the same gradients (docs/benchmarks.md,
fine-tuning).

Other saved tensors pass to the hooks around the block, if any (so a census of saved tensors
sees what is really kept), or are kept as they are.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

_NOTHING = nullcontext()  # without autograd nothing is saved: no hooks (per layer of every step)


class _View:
    """Where a saved view lies in the recomputed tensor: size, stride, offset from its start."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: torch.Tensor, base_offset: int) -> None:
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset() - base_offset


def recomputed(tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> AbstractContextManager:
    """A context in which autograd saves no memory of `tensor`. `recompute()` must give the same
    values in the same layout (it runs without autograd, during backward, once per saved view)."""
    if not torch.is_grad_enabled():
        return _NOTHING
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    storage, base_offset = tensor.untyped_storage().data_ptr(), tensor.storage_offset()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == storage:
            return _View(t, base_offset)
        return outer[0](t) if outer else t.detach()  # detached: no cycle through t's grad_fn

    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, _View):
            with torch.no_grad():
                full = recompute()
            return full.as_strided(packed.size, packed.stride, full.storage_offset() + packed.offset)
        return outer[1](packed) if outer else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
