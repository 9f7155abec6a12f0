"""What the LoRA deltas cost a decode step, with the native kernel and with PyTorch's `bmm`s.

The default model with the bench's 4 adapters (rank 16, all linears), `--rows` requests decoding
at once (64-token prompts, 4 adapters mixed), in each of `--dtypes`. Each variant runs in a fresh
process (a serving engine runs one path, not a mix: toggling paths on one engine makes every
switch gather tiles and fill caches again), 8 warm-up steps then the median of 10 steps; the
variants are interleaved `--repeats` times and the median of those is printed:

- `native`: the tiled path as shipped where the native kernel runs (lora/native: one call per
  fused linear; bf16 rows read bf16 tiles);
- `bmm`: the PyTorch tiled path (`ops.add_lora_tiled`: tiles' weights in float32, two `bmm`s per
  fused linear, the deltas rounded once when added), as with `LORAMUX_NATIVE_KERNELS=0`;
- `no delta`: the deltas are skipped. Not a correct model: the bound any LoRA kernel could reach,
  since everything else about the step (the adapters' segments, the kept tiles, the base GEMMs)
  stays as it is.

    .venv/bin/python benchmarks/lora_decode_cost.py                  # about 3 minutes
    .venv/bin/python benchmarks/lora_decode_cost.py --rows 1,8,32 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from unittest import mock

VARIANTS = ("native", "bmm", "no delta")


def child(variant: str, dtype: str, rows: int) -> None:
    """Runs in the fresh process: prints the median step time in ms."""
    from decoding import decoding_engine

    from loramux.lora import layer, native

    with ExitStack() as patches:
        if variant == "bmm":
            patches.enter_context(mock.patch.object(native, "available", lambda: False))
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
    from loramux.lora import native

    if not native.available():
        raise SystemExit("the native kernel is not available here (see the log): nothing to compare")
    print("| dtype | rows | native ms/step | bmm ms/step | no delta ms/step | bmm / native | deltas' share, native | deltas' share, bmm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(a.repeats):
                for v in VARIANTS[r % 3:] + VARIANTS[: r % 3]:
                    runs[v].append(step_ms(v, dtype, rows))
            ms = {v: statistics.median(t) for v, t in runs.items()}
            share = {v: 100 * (1 - ms["no delta"] / ms[v]) for v in ("native", "bmm")}
            print(f"| {dtype} | {rows} | {ms['native']:.1f} | {ms['bmm']:.1f} | {ms['no delta']:.1f} | "
                  f"{ms['bmm'] / ms['native']:.2f}x | {share['native']:.0f}% | {share['bmm']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
