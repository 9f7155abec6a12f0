"""Rotary embedding of inference rows' q and k heads, in place, with their K and V written to the
paged cache, as one native call per layer (rotary.c), in bf16 or float32.

`rotary_native(qkv, num_heads, cos, sin, kv, layer, slots)` does what `model.rope.apply_rotary` and
`PagedKVCache.write` do with seven PyTorch ops per layer (a negation, a concatenation, three
products and sums, two index copies), bit for bit. Only for rows that build no graph: it writes
in place and has no backward. Built for AVX-512 or AVX2, whichever the CPU has (`native.library`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import torch

from loramux.native import available, library

if TYPE_CHECKING:
    from loramux.kv.paged_cache import PagedKVCache

KERNELS = {torch.bfloat16: "loramux_rotary_bf16", torch.float32: "loramux_rotary_f32"}


def accepts(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: PagedKVCache | None) -> bool:
    """Whether the kernel takes qkv [T, heads, D] with these tables and pools: `takes_tables` (the
    same for every layer of a step) and `takes_rows`."""
    return takes_tables(cos, sin, kv) and takes_rows(qkv, cos)


def takes_tables(cos: torch.Tensor, sin: torch.Tensor, kv: PagedKVCache | None) -> bool:
    """The step's half of `accepts`: tables cos, sin [T, 1, D], contiguous, bf16 or float32 on the
    CPU, the pools of `kv` (if any) of their dtype, layout and D, and a kernel built for this CPU."""
    return (
        cos.device.type == "cpu" and cos.dtype in KERNELS and sin.dtype == cos.dtype and cos.dim() == 3
        and cos.shape == sin.shape and cos.shape[1] == 1 and cos.shape[2] % 2 == 0
        and cos.is_contiguous() and sin.is_contiguous()
        and (kv is None or (kv.k.dtype == cos.dtype and kv.k.is_contiguous() and kv.v.is_contiguous()
                            and kv.k.shape[3] == cos.shape[2]))
        and available()
    )


def takes_rows(qkv: torch.Tensor, cos: torch.Tensor) -> bool:
    """A layer's half of `accepts`: qkv [T, heads, D] in the tables' dtype and shape, heads
    contiguous (rows any stride apart)."""
    return (
        qkv.dtype == cos.dtype and qkv.dim() == 3 and qkv.stride(2) == 1 and qkv.stride(1) == qkv.shape[2]
        and qkv.shape[0] == cos.shape[0] and qkv.shape[2] == cos.shape[2]
    )


def rotary_native(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  kv: PagedKVCache | None = None, layer: int = 0, slots: torch.Tensor | None = None) -> None:
    """In place: qkv [T, num_heads + 2 kv_heads, D]'s first num_heads + kv_heads heads (q, then k)
    rotated by the tables (`rope.rotary_tables`); with `slots` [T] (long, contiguous), row t's k and
    v heads then written to slot slots[t] of `layer`'s pools in `kv`. Needs `accepts`."""
    T, heads, D = qkv.shape
    kv_heads = (heads - num_heads) // 2
    k_pool = v_pool = None
    if slots is not None:
        if slots.dtype != torch.long or not slots.is_contiguous() or slots.shape != (T,):
            raise ValueError(f"slots must be a contiguous long tensor of {T} slots, got {slots.dtype} {tuple(slots.shape)}")
        k_pool, v_pool = kv.k[layer].data_ptr(), kv.v[layer].data_ptr()
    _kernels(library())[qkv.dtype](
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), None if slots is None else slots.data_ptr(),
        k_pool, v_pool, T, num_heads, kv_heads, D,
    )


@functools.cache
def _kernels(lib: ctypes.CDLL) -> dict[torch.dtype, object]:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernels = {dtype: getattr(lib, name) for dtype, name in KERNELS.items()}
    for fn in kernels.values():
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
        fn.restype = None
    return kernels
