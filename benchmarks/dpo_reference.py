"""Where a DPO step's reference log-probabilities come from, timed two ways in one process:

- same batch: the reference rows (the pairs' sequences with no adapter) are a no-grad part of the
  step's one batch, beside the adapter's TRAIN rows (what the engine does: training/objectives.py);
- separate forward: a no-grad forward of the reference rows alone, then the TRAIN rows' forward.

Both run the same sequences (`--pairs` pairs of a 48-token prompt with 24- and 32-token replies),
the adapter rank 16 on all linears, the loss from the replies' log-probabilities and one backward;
variants interleaved (benchmarks/timing.py). `--model tiny` is the tests' 2-layer random Llama with
the default vocabulary; `default` the default model, float32.

    .venv/bin/python benchmarks/dpo_reference.py --model tiny
    .venv/bin/python benchmarks/dpo_reference.py --model default     # about 2 minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timing import time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loramux.batch import Batch, Chunk, RowKind
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.registry import AdapterRegistry

PROMPT = 48


def load(name: str):
    if name == "tiny":
        from conftest import make_tiny_hf, ours_from_hf

        return ours_from_hf(make_tiny_hf(seed=0, vocab_size=49152, tie_word_embeddings=True))
    from loramux.model.loader import load_model

    return load_model(None, dtype=torch.float32).model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    model = load(args.model)
    registry = AdapterRegistry(model)
    adapter = LoraAdapter.create("X", LoraConfig(r=16, alpha=32, target_modules="all-linear"), model.config,
                                 generator=torch.Generator().manual_seed(0), init_b="random")
    registry.add(adapter)
    adapter.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    sequences = []
    for _ in range(args.pairs):
        prompt = torch.randint(0, vocab, (PROMPT,), generator=g).tolist()
        sequences += [prompt + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (24, 32)]
    policy = [Chunk(s, RowKind.TRAIN, registry.slot("X")) for s in sequences]
    reference = [Chunk(s, RowKind.EVAL, None) for s in sequences]

    def reply_logps(hidden, batch, first):  # summed log-probabilities of the replies of chunks first..
        out = []
        for i, s in enumerate(sequences):
            rows = batch.chunk_rows[first + i]
            logp = torch.log_softmax(model.logits(hidden[rows.start + PROMPT - 1 : rows.stop - 1]), -1)
            out.append(logp[torch.arange(len(s) - PROMPT), torch.tensor(s[PROMPT:])].sum())
        return torch.stack(out)

    def finish(policy_logps, reference_logps):
        (policy_logps - reference_logps).sum().backward()
        for t in adapter.parameters():
            t.grad = None

    def same_batch():
        batch = Batch.build(policy + reference)
        with torch.no_grad():  # the model turns autograd on for the TRAIN part only
            hidden = model(batch)
            ref = reply_logps(hidden, batch, len(policy))
        finish(reply_logps(hidden, batch, 0), ref)

    def separate_forward():
        ref_batch = Batch.build(reference)
        with torch.no_grad():
            ref = reply_logps(model(ref_batch), ref_batch, 0)
            batch = Batch.build(policy)
            hidden = model(batch)
        finish(reply_logps(hidden, batch, 0), ref)

    times = time_interleaved({"same batch": same_batch, "separate forward": separate_forward}, warmup=2, repeat=args.repeat)
    rows = 2 * sum(map(len, sequences))
    print(f"{args.model}: {args.pairs} pairs, {rows} rows per step (half of them reference rows)")
    for name in ("same batch", "separate forward"):
        print(f"  {name:17s} median {times[name]:8.1f} ms  min {times[name + '_min']:8.1f} ms  IQR {times[name + '_iqr_pct']:4.0f}%")
    print(f"  separate / same: {times['separate forward'] / times['same batch']:.3f} (median), "
          f"{times['separate forward_min'] / times['same batch_min']:.3f} (min)")


if __name__ == "__main__":
    main()
