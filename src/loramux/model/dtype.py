"""The dtype the base model runs in: one given by name, or "auto", the default of `loramux serve`,
`generate` and `demo` and of `Engine.load`.

"auto" is the model's own dtype where this CPU computes it fast, float32 otherwise:

- a model made in float32 runs in float32;
- a model made in 16 bits or fewer (bfloat16, float16, a quantized GGUF file: loader.own_dtype)
  runs in bfloat16 on a CPU with bf16 matmul instructions (AMX or AVX512-BF16), where its steps take
  about half as long as float32's (docs/benchmarks.md), and in float32 on other CPUs, which emulate
  bf16 slower than they compute float32. float16 is run as bfloat16, as vLLM does on CPU: CPUs have
  no fast float16 matmuls, and bf16 keeps float16's range.

The choice and its reason are logged when the model loads. torch is imported by the functions
alone: the command line's parser takes the names from here without loading it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTO = "auto"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}  # name -> torch's name
NAMED = ("float32", "bfloat16")  # the names the command line offers


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A named dtype (DTYPES) as torch's; anything else is refused, by name."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join((AUTO, *DTYPES))}")
    return getattr(torch, DTYPES[dtype])


def fast_bf16() -> str | None:
    """The instructions that make bf16 matmuls fast on this CPU, "AMX" or "AVX512-BF16", or None.
    torch's own CPU probe (the cpuinfo library's flags); every CPU with AMX so far (Intel Sapphire
    Rapids and later) has its bf16 tiles."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def auto_dtype(own: torch.dtype, own_label: str, cpu: str | None) -> tuple[torch.dtype, str]:
    """What "auto" picks, and why, for a model made in `own` (described as `own_label`) on a CPU
    whose fast bf16 instructions are `cpu` (fast_bf16())."""
    import torch

    if own == torch.float32:
        return torch.float32, f"model {own_label}"
    if cpu is None:
        return torch.float32, f"model {own_label}, CPU has neither AVX512-BF16 nor AMX"
    return torch.bfloat16, f"model {own_label}, CPU has {cpu}"


def resolve_dtype(dtype: str | torch.dtype, own: Callable[[], tuple[torch.dtype, str]]) -> torch.dtype:
    """`dtype` as torch's, logged: a named one as it is; "auto" by auto_dtype, from `own()`, the
    model's own dtype and its description (asked only for "auto")."""
    if dtype != AUTO:
        chosen = parse_dtype(dtype)
        log.info("dtype %s (given)", str(chosen).removeprefix("torch."))
        return chosen
    chosen, reason = auto_dtype(*own(), fast_bf16())
    log.info("dtype auto -> %s (%s)", str(chosen).removeprefix("torch."), reason)
    return chosen
