"""A unified step with its two parts' base GEMMs merged (one read of each base weight, the model's
default) against one GEMM per part, timed in one process, variants interleaved (benchmarks/timing.py).

The step: one training sample (`--train-rows` tokens of an adapter being trained, forward with
autograd, next-token loss, backward) beside `--infer-rows` inference rows of four other adapters
(one-token EVAL chunks: decode-sized GEMM rows, without the KV cache). Rank-16 adapters on all
linears, the default model.

    .venv/bin/python benchmarks/merged_parts.py --dtype float32
    .venv/bin/python benchmarks/merged_parts.py --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import time_interleaved

from loramux.batch import Batch, Chunk, RowKind
from loramux.bench.machine import machine_info
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.registry import AdapterRegistry
from loramux.model.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--train-rows", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--infer-rows", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    model = load_model(None, dtype=getattr(torch, args.dtype)).model
    registry = AdapterRegistry(model)
    names = ["T", "A", "B", "C", "D"]
    for i, name in enumerate(names):
        registry.add(LoraAdapter.create(name, LoraConfig(r=16, alpha=32, target_modules="all-linear"), model.config,
                                        generator=torch.Generator().manual_seed(i), init_b="random", dtype=model.dtype))
    params = [t for pair in registry.get("T").weights.values() for t in pair]
    for t in params:
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    print(f"CPU: {machine_info()['cpu']}, {torch.get_num_threads()} threads; default model, {args.dtype}")
    for train_rows in args.train_rows:
        for infer_rows in args.infer_rows:
            sample = torch.randint(0, vocab, (train_rows,), generator=g).tolist()
            chunks = [Chunk(sample, RowKind.TRAIN, registry.slot("T"))]
            chunks += [Chunk([int(t)], RowKind.EVAL, registry.slot(names[1 + i % 4]))
                       for i, t in enumerate(torch.randint(0, vocab, (infer_rows,), generator=g))]
            batch = Batch.build(chunks)
            targets = torch.tensor(sample[1:])

            def step(merge: bool) -> None:
                model.merge_parts = merge
                with torch.no_grad():  # the model turns autograd on for the TRAIN part only
                    hidden = model(batch)
                rows = batch.chunk_rows[0]
                F.cross_entropy(model.logits(hidden[rows.start : rows.stop - 1]), targets).backward()
                for t in params:
                    t.grad = None

            times = time_interleaved({"merged": lambda: step(True), "per part": lambda: step(False)}, warmup=2, repeat=args.repeat)
            print(f"{train_rows:4d} training rows + {infer_rows:3d} inference rows: merged {times['merged']:7.1f} ms "
                  f"(IQR {times['merged_iqr_pct']:3.0f}%), per part {times['per part']:7.1f} ms "
                  f"(IQR {times['per part_iqr_pct']:3.0f}%), per part / merged {times['per part'] / times['merged']:.3f}")


if __name__ == "__main__":
    main()
