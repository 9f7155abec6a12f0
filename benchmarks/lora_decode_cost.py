"""What the LoRA deltas cost a decode step, and what computing them in bf16 would change.

The default model with the bench's 4 adapters (rank 16, all linears), `--rows` requests decoding
at once (64-token prompts, 4 adapters mixed), bf16. Three variants run on one engine, toggled
between rounds of three steps, order rotated every round so that drift in machine load (and the
contexts growing by a token per step) hits all alike; the median over `--rounds` rounds is printed:

- `shipped`: the tiled path as it is (each tile's stacked weights kept in float32, the deltas
  computed in float32 and rounded once when added);
- `bf16 tiles`: the same tiles' weights in bf16 (bmm in bf16, added in place);
- `no delta`: `add_lora_tiled` returns the base output untouched. Not a correct model: the bound
  any LoRA kernel could reach, since everything else about the step (the adapters' segments, the
  cached tiles, the base GEMMs) stays as it is.

    .venv/bin/python benchmarks/lora_decode_cost.py                  # about 2 minutes
    .venv/bin/python benchmarks/lora_decode_cost.py --rows 1,8,32
"""

from __future__ import annotations

import argparse
import statistics
import time

from decoding import decoding_engine

from loramux.lora import layer
from loramux.lora.ops import StackedLora, TileWeights

SHIPPED_DELTA, SHIPPED_TILES = layer.add_lora_tiled, StackedLora.tiles


def bf16_tiles(stacked: StackedLora, segments) -> TileWeights:
    tiles = SHIPPED_TILES(stacked, segments)
    return TileWeights(tiles.A.bfloat16(), tiles.B.bfloat16())


VARIANTS = {
    "shipped": (SHIPPED_DELTA, SHIPPED_TILES),
    "bf16 tiles": (SHIPPED_DELTA, bf16_tiles),
    "no delta": (lambda y, x, segments, tiles: y, SHIPPED_TILES),
}


def step_times(rows: int, rounds: int) -> dict[str, float]:
    engine = decoding_engine("bfloat16", rows, warm_steps=4)
    linears = [m for m in engine.model.modules() if isinstance(m, layer.FusedLoraLinear)]
    names = list(VARIANTS)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            layer.add_lora_tiled, StackedLora.tiles = VARIANTS[name]
            for linear in linears:
                linear.adapters_changed()  # drops the kept tiles: the next step gathers them again
            engine.step()  # not timed: it gathers the tiles
            t0 = time.perf_counter()
            for _ in range(3):
                engine.step()
            seconds[name].append((time.perf_counter() - t0) / 3)
    layer.add_lora_tiled, StackedLora.tiles = VARIANTS["shipped"]
    return {n: 1e3 * statistics.median(s) for n, s in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args()
    print("| rows | shipped ms/step | bf16 tiles ms/step | no delta ms/step | deltas' share of the step |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (int(r) for r in a.rows.split(",")):
        ms = step_times(rows, a.rounds)
        share = 1 - ms["no delta"] / ms["shipped"]
        print(f"| {rows} | {ms['shipped']:.1f} | {ms['bf16 tiles']:.1f} | {ms['no delta']:.1f} | {100 * share:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
