"""Decode steps with and without pre-packed base weights (lora/prepacked.py), in one process.

The default model with the bench's 4 adapters (rank 16, all linears), `--rows` requests decoding
at once (64-token prompts, 4 adapters mixed), in each `--dtypes`. Both variants run on the same
engine, toggled by `LlamaModel.prepack_weights`, three steps at a time, interleaved (order swapped
every round) so that drift in machine load hits both alike; the median over `--rounds` rounds is
printed per step. Prepacking applies to bf16 weights on CPU only: float32 rows are a control (both
variants run the same code).

    .venv/bin/python benchmarks/prepacked_weights.py                   # about 3 minutes
    .venv/bin/python benchmarks/prepacked_weights.py --rows 1,8,32 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

from decoding import decoding_engine


def step_times(dtype: str, rows: int, rounds: int) -> dict[bool, float]:
    engine = decoding_engine(dtype, rows, warm_steps=4)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for packed in (True, False) if r % 2 else (False, True):
            engine.model.prepack_weights(packed)
            engine.step()  # the first step after a switch packs (or drops) the weights: not timed
            t0 = time.perf_counter()
            for _ in range(3):
                engine.step()
            seconds[packed].append((time.perf_counter() - t0) / 3)
    return {packed: 1e3 * statistics.median(s) for packed, s in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args()
    print("| dtype | rows | plain F.linear ms/step | pre-packed ms/step | plain / pre-packed |")
    print("|---|---:|---:|---:|---:|")
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            ms = step_times(dtype, rows, a.rounds)
            print(f"| {dtype} | {rows} | {ms[False]:.1f} | {ms[True]:.1f} | {ms[False] / ms[True]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
