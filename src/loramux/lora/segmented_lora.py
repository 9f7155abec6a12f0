"""The segmented multi-LoRA matmul as one native call per fused linear (segmented_lora.c), for bf16
inference rows.

`add_lora_native(y, x, segments, A, B, blocks)` computes what `lora.ops.add_lora_tiled` computes,
in one call instead of a float32 conversion, two `bmm`s and a mixed-dtype add: both matmuls and
the add run in float32 registers on AVX-512, against the tiles' weights in bf16 (half the bytes of
the float32 stack; a bf16 model's adapters are bf16 anyway, only the folded scale is rounded),
read only inside each projection's block (a fused group's B is block-diagonal). Decode steps of
the default model in bf16 with 4 adapters: 62.1 -> 51.7 ms at 32 rows, 30.2 -> 28.1 at batch 1
(benchmarks/native_kernels.py). Float32 rows keep the `bmm`s, which cost no more there.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from loramux.lora.segments import LoraSegments
from loramux.native import available, library


def tile_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the tiles' weights should have for rows x: bf16 where the kernel will run, else
    None (the stack's: float32 at least, which suits the `bmm`s)."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 and x.device.type == "cpu" and available() else None


def accepts(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the kernel computes y += the deltas for these tensors (else: `ops.add_lora_tiled`)."""
    return (
        x.device.type == "cpu" and all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (y, x, A, B))
        and available()
    )


def add_lora_native(
    y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, A: torch.Tensor, B: torch.Tensor, blocks: torch.Tensor
) -> torch.Tensor:
    """y [T, out] += each tile's delta, in place; returns y. x [T, in]; A [n_tiles, in, R] and
    B [n_tiles, R, out]: tile i's weights, for the rows of segments.tile_spans[i]; blocks [n, 4]
    long: (k0, k1, c0, c1), the only parts of B read (rows k0..k1, columns c0..c1). Needs `accepts`."""
    h = torch.empty(x.shape[0], A.shape[2], dtype=torch.float32)  # x @ A, the kernel's scratch
    _kernel()(
        x.data_ptr(), y.data_ptr(), x.shape[1], y.shape[1], A.data_ptr(), B.data_ptr(), A.shape[2],
        blocks.data_ptr(), blocks.shape[0], segments.tile_spans.data_ptr(), segments.tile_spans.shape[0], h.data_ptr(),
    )
    return y


@functools.cache
def _kernel():
    fn = library().loramux_add_lora_segments
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ptr]
    fn.restype = None
    return fn
