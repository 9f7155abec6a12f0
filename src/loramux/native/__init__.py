"""Native CPU kernels for the small, frequent operations PyTorch runs as many ops: C files here
(`*.c`, sharing `vec.h`), compiled into libraries loaded with ctypes.

- `segmented_lora.c`: the LoRA deltas of bf16 and float32 inference rows, one call per fused linear (called
  from lora/segmented_lora.py, beside the PyTorch paths it replaces);
- `rms_norm.c`: RMSNorm of inference rows, one pass per row (native/rms_norm.py);
- `paged_attention.c`: decode attention read in place from the paged KV cache
  (native/paged_attention.py).
- `rotary.c`: the rotary embedding of q and k heads in place, with the rows' K and V written to the
  paged KV cache in the same pass (native/rotary.py).

All are plain C written with the compiler's generic vectors (`vec.h`) and built into one library
for the best instruction set of ISAS this CPU has (`library()`), so AVX2-only CPUs run them too.
Which that is, `cpu_isa()` asks `cpu.c`, built on its own for the baseline x86-64 so that asking
runs no instruction the CPU may lack; `LORAMUX_NATIVE_ISA=avx2` makes an AVX-512 CPU run what an
AVX2-only one would.

Libraries are compiled on first use with the system's C compiler (`$CC`, else `cc`; a few seconds
for each instruction set, most of it the attention kernel's head shapes) into the cache
(`$LORAMUX_CACHE_DIR/kernels`, keyed by the sources, compiler and flags) and loaded with ctypes. Their OpenMP loops link `libgomp.so.1`, which resolves to the copy torch has
already loaded, so they share torch's threads. Where one cannot be built or run (not x86-64, no
compiler, a CPU without the instruction set, `LORAMUX_NATIVE_KERNELS=0`), it is None, callers keep
their PyTorch path, and the log says why, once.
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
from pathlib import Path

from loramux.atomic import write_file_atomic
from loramux.config import cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# The instruction sets kernels are built for, best first, and the compiler flags that enable each.
ISAS = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
}
def available() -> bool:
    """Whether the kernels (`library()`) run here."""
    return library() is not None


def library() -> ctypes.CDLL | None:
    """Every kernel (the C files here but cpu.c), built for the best instruction set this CPU has
    (`cpu_isa()`); None where it runs none or native kernels are off (the log says why)."""
    isa = cpu_isa()
    return None if isa is None else _library(isa)


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    return _load(f"loramux-{isa}", [p for p in sorted(HERE.glob("*.c")) if p.name != "cpu.c"], ISAS[isa])


@functools.cache
def cpu_isa() -> str | None:
    """The best of ISAS this CPU runs, or no better than `$LORAMUX_NATIVE_ISA` (`avx2`: what an
    AVX2-only CPU would run); None where it runs none, or native kernels are off or cannot be built
    here (the log says which)."""
    probe = _load("cpu", [HERE / "cpu.c"], ())
    if probe is None:
        return None
    names = list(ISAS)
    cap = os.environ.get("LORAMUX_NATIVE_ISA", names[0])
    if cap not in names:
        log.warning("LORAMUX_NATIVE_ISA=%s ignored: it takes one of %s", cap, ", ".join(names))
        cap = names[0]
    isa = next((isa for isa in names[names.index(cap):] if getattr(probe, f"loramux_cpu_has_{isa}")()), None)
    if isa is None:
        log.info("native kernels off (this CPU has neither AVX-512 nor AVX2): the PyTorch paths are used")
    return isa


def _load(name: str, sources: list[Path], isa_flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """`sources` built into library `name` (`_build`) and loaded; None where native kernels are off
    or that fails, the reason logged."""
    reason = _unavailable()
    if reason:
        log.info("native kernels off (%s): the PyTorch paths are used", reason)
        return None
    try:
        return ctypes.CDLL(str(_build(name, sources, isa_flags)))
    except subprocess.CalledProcessError as e:
        log.warning("native kernels did not compile, the PyTorch paths are used: %s", e.stderr.strip()[-2000:])
    except OSError as e:
        log.warning("native kernels could not be built or loaded, the PyTorch paths are used: %s", e)
    return None


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


def _build(name: str, sources: list[Path], isa_flags: tuple[str, ...]) -> Path:
    """The compiled library `name`, built once per sources (and headers), compiler and flags;
    concurrent builders each write their own file and the last rename wins, so a reader never sees
    a half-written library."""
    compiler = _compiler()
    flags = (*FLAGS, *isa_flags)
    digest = hashlib.sha256()
    for path in [*sources, *sorted(HERE.glob("*.h"))]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join((compiler, *flags)).encode())
    cache = cache_dir() / "kernels"
    target = cache / f"{name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        write_file_atomic(target, lambda tmp: subprocess.run([compiler, *flags, *map(str, sources), "-o", str(tmp), "-lm"],
                                                             check=True, capture_output=True, text=True))
    return target
