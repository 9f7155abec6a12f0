"""Frozen linear layers whose bfloat16 weights are pre-packed for the CPU's GEMM library.

`F.linear` on a bfloat16 CPU tensor has oneDNN reorder the weight into its blocked layout on
every call. `FrozenLinear` does that once and keeps the packed copy for rows that build no graph
(inference rows, evaluation rows); rows that build graphs use `F.linear` on the plain weight, which
autograd needs. Results are the same as `F.linear`'s; the cost is a second copy of the weights.
Measured with the default model and 4 adapters (benchmarks/prepacked_weights.py, docs/benchmarks.md):
bf16 decode steps of 1 row 37.3 -> 31.2 ms, of 32 rows 75.7 -> 69.0 ms.

The packed copy is rebuilt if the weight or bias changes in place (their version counters move).
Other dtypes and devices, and empty inputs, go to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its blocking from a typical row count; any row count gives the same result.
ROWS_HINT = 32
# Whether this torch build can pack at all: asked once, not on every GEMM of every step.
_ONEDNN_PACKING = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def can_prepack(weight: torch.Tensor) -> bool:
    return _ONEDNN_PACKING and weight.device.type == "cpu" and weight.dtype == torch.bfloat16


class FrozenLinear:
    """y = x @ weight.T (+ bias) for a frozen weight [out, in]; x [T, in] -> y [T, out]."""

    def __init__(self) -> None:
        self.enabled = True
        self._packed: torch.Tensor | None = None
        self._key: tuple | None = None  # what the packed copy was made from

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled or torch.is_grad_enabled() or x.shape[0] == 0 or not can_prepack(weight):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version))
        if self._key != key:
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def release(self) -> None:
        """Drops the packed copy (it is made again on the next call, if enabled)."""
        self._packed = self._key = None
