"""Native CPU kernels for the small, frequent operations PyTorch runs as many ops: each C file here
(`*.c`, sharing `bf16.h`) is compiled into one library, loaded with ctypes.

- `segmented_lora.c`: the LoRA deltas of bf16 inference rows, one call per fused linear (called
  from lora/segmented_lora.py, beside the PyTorch paths it replaces);
- `rms_norm.c`: RMSNorm of inference rows, one pass per row (native/rms_norm.py).

The library is compiled on first use with the system's C compiler (`$CC`, else `cc`; under a
second) into the cache (`$LORAMUX_CACHE_DIR/kernels`, keyed by the sources, compiler and flags) and
loaded with ctypes. Its OpenMP loops link `libgomp.so.1`, which resolves to the copy torch has
already loaded, so they share torch's threads. Where it cannot be built or run (not x86-64, no
compiler, a CPU without AVX-512, `LORAMUX_NATIVE_KERNELS=0`), `library()` is None, callers keep
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
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-shared", "-fPIC")


def available() -> bool:
    return library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    reason = _unavailable()
    if reason:
        log.info("native kernels off (%s): the PyTorch paths are used", reason)
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as e:
        log.warning("native kernels did not compile, the PyTorch paths are used: %s", e.stderr.strip()[-2000:])
        return None
    except OSError as e:
        log.warning("native kernels could not be built or loaded, the PyTorch paths are used: %s", e)
        return None
    if not lib.loramux_cpu_supported():
        log.info("native kernels off (this CPU lacks AVX-512): the PyTorch paths are used")
        return None
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
    """The compiled library, built once per sources, compiler and flags; concurrent builders each
    write their own file and the last rename wins, so a reader never sees a half-written library."""
    compiler = _compiler()
    sources = sorted(HERE.glob("*.c"))
    digest = hashlib.sha256()
    for path in sorted(HERE.glob("*.[ch]")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join((compiler, *FLAGS)).encode())
    cache = cache_dir() / "kernels"
    target = cache / f"loramux-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        write_file_atomic(target, lambda tmp: subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", str(tmp), "-lm"],
                                                             check=True, capture_output=True, text=True))
    return target
