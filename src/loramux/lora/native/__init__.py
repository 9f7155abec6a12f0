"""The segmented multi-LoRA matmul as one native CPU kernel (segmented_lora.c), for bf16 inference rows.

`add_lora_native(y, x, segments, A, B, blocks)` computes what `ops.add_lora_tiled` computes, in one
call per fused linear instead of a float32 conversion, two `bmm`s and a mixed-dtype add: both
matmuls and the add run in float32 registers on AVX-512, against the tiles' weights in bf16 (half
the bytes of the float32 stack; a bf16 model's adapters are bf16 anyway, only the folded scale is
rounded), read only inside each projection's block (a fused group's B is block-diagonal). Decode
steps of the default model in bf16 with 4 adapters: 65.6 -> 58.3 ms at 32 rows, 32.6 -> 30.4 at
batch 1 (benchmarks/lora_decode_cost.py). Float32 rows keep the `bmm`s, which cost no more there.

The kernel is compiled on first use with the system's C compiler (`$CC`, else `cc`) into the cache
(`$LORAMUX_CACHE_DIR/kernels`, keyed by the source, compiler and flags; under a second) and loaded
with ctypes. Where it cannot be (not x86-64, no compiler, a CPU without AVX-512,
`LORAMUX_NATIVE_KERNELS=0`), `available()` is False and callers keep the PyTorch path; the reason
is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from loramux.config import cache_dir
from loramux.lora.segments import LoraSegments

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("segmented_lora.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")


def available() -> bool:
    return _library() is not None


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
    _library().loramux_add_lora_segments(
        x.data_ptr(), y.data_ptr(), x.shape[1], y.shape[1], A.data_ptr(), B.data_ptr(), A.shape[2],
        blocks.data_ptr(), blocks.shape[0], segments.tile_spans.data_ptr(), segments.tile_spans.shape[0], h.data_ptr(),
    )
    return y


@functools.cache
def _library() -> ctypes.CDLL | None:
    reason = _unavailable()
    if reason:
        log.info("native LoRA kernel off (%s): the PyTorch path is used", reason)
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as e:
        log.warning("native LoRA kernel did not compile, the PyTorch path is used: %s", e.stderr.strip()[-2000:])
        return None
    except OSError as e:
        log.warning("native LoRA kernel could not be built or loaded, the PyTorch path is used: %s", e)
        return None
    if not lib.loramux_cpu_supported():
        log.info("native LoRA kernel off (this CPU lacks AVX-512): the PyTorch path is used")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.loramux_add_lora_segments.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ptr]
    lib.loramux_add_lora_segments.restype = None
    return lib


def _unavailable() -> str | None:
    if os.environ.get("LORAMUX_NATIVE_KERNELS", "1") == "0":
        return "LORAMUX_NATIVE_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not x86-64 but {platform.machine()}"
    if _compiler() is None:
        return "no C compiler found"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build() -> Path:
    """The compiled library, built once per source and flags; concurrent builders each write
    their own file and the last rename wins, so a reader never sees a half-written library."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    cache = cache_dir() / "kernels"
    target = cache / f"segmented_lora-{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target
