"""What the native kernels (loramux.native) save a decode step, and what the LoRA deltas still cost.

The default model with the bench's 4 adapters (rank 16, all linears), `--rows` requests decoding
at once (64-token prompts, 4 adapters mixed), in each of `--dtypes`. Each variant runs in a fresh
process (a serving engine runs one path, not a mix: toggling paths on one engine makes every
switch gather tiles and fill caches again), 8 warm-up steps then the median of 10 steps; the
variants are interleaved `--repeats` times and the median of those is printed, in ms per step:

- `native`: as shipped (lora/segmented_lora for bf16 rows' LoRA deltas, native/rms_norm for
  every norm of rows without autograd);
- `torch norms`: the norms with PyTorch ops (`RMSNorm.reference`);
- `torch LoRA`: the LoRA deltas with PyTorch's tiled path (`ops.add_lora_tiled`: float32 tiles,
  two `bmm`s per fused linear);
- `no delta`: the native norms, the LoRA deltas skipped. Not a correct model: the bound any LoRA
  kernel could reach, everything else about the step (segments, kept tiles, base GEMMs) as it is.

    .venv/bin/python benchmarks/native_kernels.py                    # about 10 minutes
    .venv/bin/python benchmarks/native_kernels.py --rows 32 --dtypes bfloat16 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from unittest import mock

VARIANTS = ("native", "torch norms", "torch LoRA", "no delta")


def child(variant: str, dtype: str, rows: int) -> None:
    """Runs in the fresh process: prints the median step time in ms."""
    from decoding import decoding_engine

    from loramux.lora import layer
    from loramux.lora import segmented_lora
    from loramux.native import rms_norm

    with ExitStack() as patches:
        if variant == "torch norms":
            patches.enter_context(mock.patch.object(rms_norm, "available", lambda: False))
        elif variant == "torch LoRA":
            patches.enter_context(mock.patch.object(segmented_lora, "available", lambda: False))
        elif variant == "no delta":
            patches.enter_context(mock.patch.object(layer, "add_lora_native", lambda y, *a: y))
            patches.enter_context(mock.patch.object(layer, "add_lora_tiled", lambda y, *a: y))
        engine = decoding_engine(dtype, rows)
        seconds = []
        for _ in range(10):
            t0 = time.perf_counter()
            engine.step()
            seconds.append(time.perf_counter() - t0)
    print(1e3 * statistics.median(seconds))


def step_ms(variant: str, dtype: str, rows: int) -> float:
    run = subprocess.run([sys.executable, __file__, "--child", variant, dtype, str(rows)], capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], int(a.child[2]))
    from loramux import native

    if not native.available():
        raise SystemExit("the native kernels are not available here (see the log): nothing to compare")
    print("| dtype | rows | " + " | ".join(VARIANTS) + " | torch norms / native | torch LoRA / native | deltas' share |")
    print("|---|---:|" + "---:|" * (len(VARIANTS) + 3))
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(a.repeats):
                for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
                    runs[v].append(step_ms(v, dtype, rows))
            ms = {v: statistics.median(t) for v, t in runs.items()}
            print(f"| {dtype} | {rows} | " + " | ".join(f"{ms[v]:.1f}" for v in VARIANTS)
                  + f" | {ms['torch norms'] / ms['native']:.2f}x | {ms['torch LoRA'] / ms['native']:.2f}x"
                  + f" | {100 * (1 - ms['no delta'] / ms['native']):.0f}% |", flush=True)


if __name__ == "__main__":
    main()
