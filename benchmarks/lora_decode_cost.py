"""What the LoRA deltas cost a decode step, with the native kernel and with PyTorch's `bmm`s.

The default model with the bench's 4 adapters (rank 16, all linears), `--rows` requests decoding
at once (64-token prompts, 4 adapters mixed), in each of `--dtypes`. Three variants run on one
engine, toggled between rounds of three steps, order rotated every round so that drift in machine
load (and the contexts growing by a token per step) hits all alike; the median over `--rounds`
rounds is printed:

- `native`: the tiled path as shipped where the native kernel runs (lora/native: one call per
  fused linear; bf16 rows read bf16 tiles);
- `bmm`: the PyTorch tiled path (`ops.add_lora_tiled`: tiles' weights in float32, two `bmm`s per
  fused linear, the deltas rounded once when added);
- `no delta`: the deltas are skipped. Not a correct model: the bound any LoRA kernel could reach,
  since everything else about the step (the adapters' segments, the kept tiles, the base GEMMs)
  stays as it is.

    .venv/bin/python benchmarks/lora_decode_cost.py                  # about 1 minute
    .venv/bin/python benchmarks/lora_decode_cost.py --rows 1,8,32 --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from unittest import mock

from decoding import decoding_engine

from loramux.lora import layer, native


@contextmanager
def variant(name: str):
    if name == "native":
        yield
    elif name == "bmm":
        with mock.patch.object(native, "tile_dtype", lambda x: None), mock.patch.object(native, "accepts", lambda *a: False):
            yield
    else:
        with mock.patch.object(layer, "add_lora_native", lambda y, *a: y), mock.patch.object(layer, "add_lora_tiled", lambda y, *a: y):
            yield


def step_times(dtype: str, rows: int, rounds: int) -> dict[str, float]:
    engine = decoding_engine(dtype, rows, warm_steps=4)
    names = ["native", "bmm", "no delta"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            with variant(name):
                engine.step()  # not timed: it may gather the tiles in another dtype
                t0 = time.perf_counter()
                for _ in range(3):
                    engine.step()
                seconds[name].append((time.perf_counter() - t0) / 3)
    return {n: 1e3 * statistics.median(s) for n, s in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args()
    if not native.available():
        raise SystemExit("the native kernel is not available here (see the log): nothing to compare")
    print("| dtype | rows | native ms/step | bmm ms/step | no delta ms/step | bmm / native | deltas' share, native | deltas' share, bmm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            ms = step_times(dtype, rows, a.rounds)
            share = {n: 100 * (1 - ms["no delta"] / ms[n]) for n in ("native", "bmm")}
            print(f"| {dtype} | {rows} | {ms['native']:.1f} | {ms['bmm']:.1f} | {ms['no delta']:.1f} | "
                  f"{ms['bmm'] / ms['native']:.2f}x | {share['native']:.0f}% | {share['bmm']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
