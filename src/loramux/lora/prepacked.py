"""Frozen linear layers whose bfloat16 weights are pre-packed for the CPU's GEMM library.

`F.linear` on a bfloat16 CPU tensor has oneDNN reorder the weight into its blocked layout on
every call. `FrozenLinear` does that once and keeps the packed copy for rows that build no graph
(inference rows, evaluation rows); rows that build graphs use `F.linear` on the plain weight, which
autograd needs. Results are the same as `F.linear`'s; the cost is a second copy of the weights.
docs/benchmarks.md (benchmarks/prepacked_weights.py) gives what it saves per decode step.

Packing needs a CPU that oneDNN's bf16 path supports (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): on
others (AVX2 only, for example) torch raises at the first packed call. `packing_unavailable()`
tries it once, on a tiny weight, and every `FrozenLinear` then falls back to `F.linear`; the log
says why, once.

The packed copy is rebuilt if the weight or bias changes in place (their version counters move).
Other dtypes and devices, and empty inputs, go to `F.linear`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("loramux.model")

# oneDNN picks its blocking from a typical row count; any row count gives the same result.
ROWS_HINT = 32


@functools.cache
def packing_unavailable() -> str | None:
    """Why this process cannot pre-pack bf16 weights (None: it can). Asked once: a packed GEMM of
    a tiny weight, which raises where the CPU lacks oneDNN's bf16 instructions."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        reason = "this torch build has no oneDNN weight packing"
    else:
        try:
            with torch.inference_mode():
                weight = torch.ones(8, 8, dtype=torch.bfloat16)
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
                y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
            reason = None if torch.equal(y, torch.full((2, 8), 8.0, dtype=torch.bfloat16)) else "packed GEMMs gave wrong results"
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
    if reason is not None:
        log.info("bf16 base weights are not pre-packed (plain F.linear instead): %s", reason)
    return reason


def can_prepack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and packing_unavailable() is None


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
