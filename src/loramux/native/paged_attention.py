"""Decode attention read in place from the paged KV cache (paged_attention.c), in bf16 or float32.

`paged_attention_native(q, kv, layer, slots, mask)` computes what `Attention._decode` computes with
PyTorch ops, where those copy every decode row's context out of the pool into a padded buffer
(`PagedKVCache.gather`), every layer and step, and run one masked SDPA call over it: the kernel
reads each context position's K and V rows where they lie in the pool, through the row's slots,
and skips the padding. In float32 it gives SDPA's results up to summation order; in bf16 it rounds
only its output (SDPA also rounds the probabilities to bf16 before multiplying them with V).
Decode attention of SmolLM2-135M's shape, 30 layers, on one Zen 4 core: 7-12x faster than the gather
and SDPA in bf16, 1.7-3x in float32 (docs/benchmarks.md, paged attention). Only for rows that
build no graph: it has no backward. The kernel is plain C built for AVX-512 or for AVX2, whichever
the CPU has (`native.library`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import torch

from loramux.native import available, library

if TYPE_CHECKING:
    from loramux.kv.paged_cache import PagedKVCache


def accepts(q: torch.Tensor, kv: PagedKVCache, slots: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the kernel computes the attention of q [B, H, D] over kv's pools at slots [B, C]
    where mask [B, 1, 1, C] (else: the gather and SDPA of `Attention._decode`): `reads_in_place`
    (the same for every layer of a step) and `takes_queries`."""
    return reads_in_place(kv, slots, mask) and takes_queries(q, kv, slots)


def reads_in_place(kv: PagedKVCache, slots: torch.Tensor, mask: torch.Tensor) -> bool:
    """The step's half of `accepts`: the pools on the CPU, float32 or bf16, laid out as
    `PagedKVCache` lays them, D a multiple of 16 (the kernel's vectors), slots [B, C] and mask
    [B, 1, 1, C] contiguous, and a kernel built for this CPU."""
    return (
        kv.k.device.type == "cpu" and kv.k.dtype in (torch.bfloat16, torch.float32) and kv.v.dtype == kv.k.dtype
        and kv.k.is_contiguous() and kv.v.is_contiguous() and kv.k.shape[3] % 16 == 0
        and slots.dtype == torch.long and slots.is_contiguous()
        and mask.dtype == torch.bool and mask.is_contiguous() and mask.numel() == slots.numel()
        and available()
    )


def takes_queries(q: torch.Tensor, kv: PagedKVCache, slots: torch.Tensor) -> bool:
    """A layer's half of `accepts`: q [B, H, D] in the pools' dtype, one row per row of slots,
    heads contiguous (rows any stride apart), H a multiple of the pools' KV heads."""
    return (
        q.dtype == kv.k.dtype and q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
        and q.shape[2] == kv.k.shape[3] and q.shape[1] % kv.k.shape[2] == 0 and q.shape[0] == slots.shape[0]
    )


def paged_attention_native(q: torch.Tensor, kv: PagedKVCache, layer: int, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (heads contiguous; rows any stride apart) -> [B, H, D] in q's dtype: row b
    attends over the positions of slots[b] [C] in `layer`'s pools where mask[b] [1, 1, C] holds
    (the plan's decode_slots and decode_mask), GQA heads sharing KV heads as SDPA's `enable_gqa`.
    Needs `accepts`."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=q.dtype)
    _kernels(library())[q.dtype](
        q.data_ptr(), q.stride(0), kv.k[layer].data_ptr(), kv.v[layer].data_ptr(), slots.data_ptr(), mask.data_ptr(),
        out.data_ptr(), B, slots.shape[1], H, kv.k.shape[2], D,
    )
    return out


@functools.cache
def _kernels(lib: ctypes.CDLL) -> dict[torch.dtype, object]:
    kernels = {torch.bfloat16: lib.loramux_paged_attention_bf16, torch.float32: lib.loramux_paged_attention_f32}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in kernels.values():
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
        fn.restype = None
    return kernels
