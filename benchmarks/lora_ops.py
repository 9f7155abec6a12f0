"""Micro-benchmark of the segmented multi-LoRA op: per-segment loop vs. tiled batched path vs. the
native kernel.

What it measures
----------------
One linear of a multi-LoRA model, on CPU, under ``torch.inference_mode``: ``--rows`` rows of input
``x [rows, in]`` split among ``A`` adapters (each adapter's rows one contiguous segment, as
``LoraSegments`` lays them out), rank ``--rank`` each. For each dtype, each adapter count and each
row split it times the median wall-clock over ``--repeat`` runs (after warm-up) of

1. ``base``  : ``F.linear(x, W)`` alone (the cost every layer pays anyway),
2. ``loop``  : base + ``add_lora_loop``  (one pair of small matmuls per segment, the reference),
3. ``tiled`` : base + ``add_lora_tiled`` (two batched matmuls over equal tiles of all segments),
   with the tiles' stacked weights (``StackedLora.build(...).tiles(segments)``) gathered once outside
   the timed region, as ``MultiLoraLinear`` keeps them from one step to the next.
4. ``native``: base + ``add_lora_native`` (lora/segmented_lora: one C call reading a ``PackedLora``
   of x's dtype in place by slot), where the kernel takes this dtype on this machine (bf16 and
   float32 on x86-64 CPUs with AVX-512 or AVX2); "-" elsewhere.

The variants are interleaved inside every repeat (order rotated), so drift in machine load
hits all of them alike. ``LoraSegments`` is also built outside the timed region (it is computed
once per step and shared by every linear).

Row splits:
- ``uniform``: rows divided as evenly as possible among the adapters;
- ``zipf``   : adapter k (1-based) gets rows proportional to 1/k**s (``--zipf-s``, default 1.0),
  every adapter at least one row (skipped for a single adapter, where it equals ``uniform``).

Before timing, every configuration checks once that the tiled and native outputs agree with the loop's (max
absolute difference printed; float32 must be within 1e-4, bfloat16 within a few bf16 ulps of the
output's magnitude), so the benchmark never times a wrong result: a mismatch aborts the run.

The "spread" column is the largest interquartile range of the variants, as % of its median:
a quick flag for a noisy measurement (e.g. another process competing for the cores). The 1-minute
load average is printed before and after the run for the same reason.

The "layer uses" column says which path ``MultiLoraLinear.forward`` would pick for that batch at
inference (native where the kernel takes the dtype; else tiled when every segment fits one tile,
or from ``TILED_MIN_SEGMENTS`` segments up).

How to run
----------
    .venv/bin/python benchmarks/lora_ops.py                       # defaults, < 2 minutes on 2 cores
    .venv/bin/python benchmarks/lora_ops.py --adapters 4,16 --dtypes float32 --repeat 50
    .venv/bin/python benchmarks/lora_ops.py --json /tmp/lora_ops.json

Defaults: 512 rows, 576 -> 1536 (a SmolLM-135M-sized MLP up-projection), rank 16, adapters
1,4,16,64, dtypes float32,bfloat16. Output: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from loramux.lora.layer import TILED_MIN_SEGMENTS
from timing import time_interleaved
from loramux.lora import segmented_lora
from loramux.lora.ops import LoraWeights, PackedLora, StackedLora, add_lora_loop, add_lora_tiled
from loramux.lora.segments import LoraSegments

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_rows(rows: int, adapters: int, kind: str, zipf_s: float) -> list[int]:
    """Row counts per adapter, summing to `rows`, each at least 1 (largest-remainder rounding)."""
    if adapters > rows:
        raise ValueError(f"{adapters} adapters cannot each get a row out of {rows}")
    if kind == "uniform":
        share = [1.0] * adapters
    elif kind == "zipf":
        share = [1.0 / (k + 1) ** zipf_s for k in range(adapters)]
    else:
        raise ValueError(kind)
    spare = rows - adapters  # one row each is reserved up front
    total = sum(share)
    exact = [spare * s / total for s in share]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(adapters), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: spare - sum(counts)]:
        counts[i] += 1
    return [c + 1 for c in counts]


def make_case(rows, in_f, out_f, rank, counts, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    x = rnd(rows, in_f, std=1.0)
    W = rnd(out_f, in_f, std=0.02)
    # B is random (not PEFT's zero init) so that the deltas, and the correctness check, are non-trivial.
    weights = {
        slot: LoraWeights(A=rnd(rank, in_f, std=in_f**-0.5), B=rnd(out_f, rank, std=0.02), scale=scale)
        for slot in range(len(counts))
    }
    spans, start = [], 0
    for slot, n in enumerate(counts):
        spans.append((start, start + n, slot))
        start += n
    segments = LoraSegments.from_segments(rows, spans)
    tiles = StackedLora.build(weights, in_f, out_f).tiles(segments)
    packed = PackedLora.build(weights, in_f, out_f) if segmented_lora.accepts(x, x) else None
    return x, W, weights, segments, tiles, packed


def variants(x, W, weights, segments, tiles, packed) -> dict:
    out = {
        "base": lambda: F.linear(x, W),
        "loop": lambda: add_lora_loop(F.linear(x, W), x, segments, weights),
        "tiled": lambda: add_lora_tiled(F.linear(x, W), x, segments, tiles),
    }
    if packed is not None:
        out["native"] = lambda: segmented_lora.add_lora_native(F.linear(x, W), x, segments.spans, packed)
    return out


def check(fns: dict, dtype) -> float:
    """Max |variant - loop| over the tiled and native variants; raises if one disagrees beyond the
    dtype's tolerance."""
    y_loop = fns["loop"]()
    if dtype == torch.float32:
        tol = 1e-4
    else:  # a few ulps at the output's magnitude (the tiled path folds scale into B before rounding)
        tol = 4 * torch.finfo(dtype).eps * max(1.0, y_loop.float().abs().max().item())
    worst = 0.0
    for name in ("tiled", "native"):
        if name in fns:
            diff = (fns[name]().float() - y_loop.float()).abs().max().item()
            if not diff <= tol:  # also catches NaN
                raise SystemExit(f"MISMATCH: max |{name} - loop| = {diff:.3g} > tol {tol:.3g}; refusing to time a wrong result")
            worst = max(worst, diff)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--in-features", type=int, default=576)
    p.add_argument("--out-features", type=int, default=1536)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", default="1,4,16,64", help="comma-separated adapter counts")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {','.join(DTYPES)}")
    p.add_argument("--splits", default="uniform,zipf", help="comma-separated, of uniform,zipf")
    p.add_argument("--zipf-s", type=float, default=1.0, help="zipf exponent of the skewed split")
    p.add_argument("--repeat", type=int, default=50, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: os.cpu_count())")
    p.add_argument("--lora-scale", type=float, default=2.0, help="every adapter's scale (lora_alpha / rank; 32/16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    adapter_counts = [int(s) for s in a.adapters.split(",") if s]
    dtypes = [s.strip() for s in a.dtypes.split(",") if s.strip()]
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()}), "
          f"python {platform.python_version()}, {platform.machine()}")
    load_before = os.getloadavg()[0]
    print(f"rows {a.rows}, linear {a.in_features} -> {a.out_features}, rank {a.rank}, "
          f"median of {a.repeat} runs after {a.warmup} warm-up, inference_mode; load average {load_before:.2f}")
    print()
    header = ["dtype", "adapters", "split", "rows/adapter", "tile", "base ms", "loop ms", "tiled ms", "native ms",
              "loop over base", "tiled over base", "native over base", "tiled vs loop", "max abs diff", "spread", "layer uses"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 3 or i == len(header) - 1 else "---:" for i in range(len(header))) + "|")
    sys.stdout.flush()

    results = []
    t_start = time.perf_counter()
    with torch.inference_mode():
        for dname in dtypes:
            dtype = DTYPES[dname]
            for n_ad in adapter_counts:
                for split in splits:
                    if split == "zipf" and n_ad == 1:
                        continue  # identical to uniform
                    counts = split_rows(a.rows, n_ad, split, a.zipf_s)
                    case = make_case(a.rows, a.in_features, a.out_features, a.rank, counts, dtype, a.seed, a.lora_scale)
                    segments, fns = case[3], variants(*case)
                    diff = check(fns, dtype)
                    ms = time_interleaved(fns, a.warmup, a.repeat)
                    loop_ovh = 100 * (ms["loop"] / ms["base"] - 1)
                    tiled_ovh = 100 * (ms["tiled"] / ms["base"] - 1)
                    native_ovh = 100 * (ms["native"] / ms["base"] - 1) if "native" in ms else None
                    speedup = ms["loop"] / ms["tiled"]
                    spread = max(ms[n + "_iqr_pct"] for n in fns)
                    tiled = segments.one_tile_per_segment or len(segments.segments) >= TILED_MIN_SEGMENTS
                    layer_path = "native" if "native" in fns else "tiled" if tiled else "loop"
                    rows_desc = str(counts[0]) if len(set(counts)) == 1 else f"{max(counts)}..{min(counts)}"
                    native_ms = f"{ms['native']:.3f}" if "native" in ms else "-"
                    native_pct = f"{native_ovh:+.1f}%" if native_ovh is not None else "-"
                    print(f"| {dname} | {n_ad} | {split} | {rows_desc} | {segments.tiles.tile} | {ms['base']:.3f} | "
                          f"{ms['loop']:.3f} | {ms['tiled']:.3f} | {native_ms} | {loop_ovh:+.1f}% | {tiled_ovh:+.1f}% | "
                          f"{native_pct} | {speedup:.2f}x | {diff:.2g} | {spread:.0f}% | {layer_path} |")
                    sys.stdout.flush()
                    results.append(dict(
                        dtype=dname, adapters=n_ad, split=split, rows_per_adapter=counts, tile=segments.tiles.tile,
                        base_ms=ms["base"], loop_ms=ms["loop"], tiled_ms=ms["tiled"], native_ms=ms.get("native"),
                        loop_overhead_pct=loop_ovh, tiled_overhead_pct=tiled_ovh, tiled_speedup=speedup,
                        base_min_ms=ms["base_min"], loop_min_ms=ms["loop_min"], tiled_min_ms=ms["tiled_min"],
                        spread_iqr_pct=spread, max_abs_diff=diff, layer_path=layer_path))
    load_after = os.getloadavg()[0]
    print(f"\n(total {time.perf_counter() - t_start:.1f} s; 1-min load average {load_before:.2f} before, "
          f"{load_after:.2f} after, on {os.cpu_count()} cores)")

    if a.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                    machine=platform.machine(), load_before=load_before, load_after=load_after,
                    date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    args=vars(a))
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
