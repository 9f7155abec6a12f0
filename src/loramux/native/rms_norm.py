"""RMSNorm of inference rows as one native pass per row (rms_norm.c), in bf16 or float32.

`rms_norm_native(x, weight, eps)` gives what `model.llama.RMSNorm` computes with PyTorch ops
(Hugging Face's formula: normalized in float32; in bf16 rounded, then times the weight and rounded
again), where torch's `rms_norm` runs as eight small ops per call on CPU. Decode steps of the
default model in bf16 with 4 adapters: 58.2 -> 51.7 ms at 32 rows, 30.0 -> 28.1 at batch 1
(benchmarks/native_kernels.py). Only for rows that build no graph: it has no backward. Built for
AVX-512 or AVX2, whichever the CPU has (`native.library`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from loramux.native import available, library


def accepts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and weight.dtype == x.dtype
        and x.dim() == 2 and x.is_contiguous() and weight.is_contiguous() and available()
    )


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, n], weight [n] -> [rows, n], same dtype. Needs `accepts`."""
    y = torch.empty_like(x)
    _kernels(library())[x.dtype](x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


@functools.cache
def _kernels(lib: ctypes.CDLL) -> dict[torch.dtype, object]:
    kernels = {torch.bfloat16: lib.loramux_rms_norm_bf16, torch.float32: lib.loramux_rms_norm_f32}
    for fn in kernels.values():
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
        fn.restype = None
    return kernels
