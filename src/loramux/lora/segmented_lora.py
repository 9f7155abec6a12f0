"""The segmented multi-LoRA matmul as one native call per fused linear (segmented_lora.c), for bf16
and float32 inference rows.

`add_lora_native(y, x, spans, packed)` computes what `lora.ops.add_lora_stacked` and
`add_lora_tiled` compute, in one call instead of per-segment or batched matmuls (and, for bf16
rows, a float32 conversion and a mixed-dtype add): both matmuls and the add run in float32
registers (AVX-512 or AVX2), against the adapters' weights in the rows' dtype
(`lora.ops.PackedLora`: a model's adapters are in its dtype anyway; for bf16 only the folded scale
is rounded), read in place through each segment's slot, for decode and prefill rows alike, and of B
only the projections' blocks (a fused group's B is block-diagonal: the zeros are neither stored
nor read). Nothing is gathered per step, so a batch whose adapters change from step to step costs
no more than one whose adapters stay, and an adapter's stack costs its own bytes, not the
block-diagonal B's.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from loramux.lora.ops import PackedLora
from loramux.native import available, library


KERNELS = {torch.bfloat16: "loramux_add_lora_segments_bf16", torch.float32: "loramux_add_lora_segments_f32"}


def accepts(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel computes y += the deltas for rows x (else: the PyTorch paths of lora/ops):
    CPU rows, bf16 or float32, y of x's dtype, both contiguous."""
    return (x.device.type == "cpu" and x.dtype in KERNELS and y.dtype == x.dtype and x.is_contiguous() and y.is_contiguous()
            and available())


def add_lora_native(y: torch.Tensor, x: torch.Tensor, spans: torch.Tensor, packed: PackedLora) -> torch.Tensor:
    """y [T, out] += each segment's delta, in place; returns y. x [T, in]; spans [n, 3] long,
    (start, end, slot) of each segment (`LoraSegments.spans`), every slot below the stack's; the
    weights read in place from `packed` (of x's dtype) through each segment's slot. Needs `accepts`."""
    A, B = packed.A_t, packed.B
    if A.dtype != x.dtype:
        raise ValueError(f"the packed stack is {A.dtype}, the rows {x.dtype}: the kernel reads both as one dtype")
    h = torch.empty(x.shape[0], A.shape[2], dtype=torch.float32)  # x @ A, the kernel's scratch
    _kernel(library(), KERNELS[x.dtype])(
        x.data_ptr(), y.data_ptr(), x.shape[1], y.shape[1], A.data_ptr(), B.data_ptr(), A.shape[2], B.shape[1],
        packed.blocks.data_ptr(), packed.blocks.shape[0], spans.data_ptr(), spans.shape[0], h.data_ptr(),
    )
    return y


@functools.cache
def _kernel(lib: ctypes.CDLL, name: str):
    fn = getattr(lib, name)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, ptr, i64, ptr]
    fn.restype = None
    return fn
