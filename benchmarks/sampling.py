"""Micro-benchmark of choosing the next token of N sampling rows: loramux's one batched call against
transformers' logits warpers, per row (one call per request, what loramux did before) and batched.

What it measures
----------------
Logits are the default model's (SmolLM2-135M-Instruct, float32) at N consecutive positions of an
English text, so each row is a real next-token distribution over the 49,152-token vocabulary. Per
setting and N, the median wall-clock over ``--repeat`` runs (after warm-up, variants interleaved,
benchmarks/timing.py) of

1. ``loramux``   : ``choose_tokens(logits, params, generators)`` (loramux/engine/sampling.py): one
   chain of batched calls with per-row parameters, one uniform number from each row's generator.
2. ``per_row``   : for each row alone, transformers' warpers (``TemperatureLogitsWarper``,
   ``MinPLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, as ``generate`` chains them)
   then ``torch.multinomial`` with that row's generator: what a sampler with per-request parameters
   and seeds does one request at a time.
3. ``hf_batched``: the same warpers and one ``torch.multinomial`` over all N rows: transformers'
   ``generate``, which needs every row to share its parameters and one generator.

Before timing, each setting checks that the tokens loramux draws lie where transformers' warpers
leave a finite score (the same top_k, top_p, min_p support), over 200 draws per row.

    .venv/bin/python benchmarks/sampling.py            # N = 1, 8, 32
    .venv/bin/python benchmarks/sampling.py --rows 32 --repeat 50
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.engine.sampling import SamplingParams, choose_tokens
from loramux.model.loader import load_model
from timing import time_interleaved

TEXT = (
    "The river ran quietly past the old mill, where the miller's daughter sat each evening counting the boats "
    "that carried grain to the city. She knew every captain by name and every boat by the sound of its engine, "
    "and on the night of the storm she was the first to notice that one of them had not come home."
)

SETTINGS = {
    "T=1": SamplingParams(temperature=1.0),
    "T=0.7 top_p=0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "T=0.7 top_k=50": SamplingParams(temperature=0.7, top_k=50),
    "T=0.8 top_k=50 top_p=0.95 min_p=0.05": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),
}


def real_logits(rows: int) -> torch.Tensor:
    """[rows, vocab] float32: the default model's logits at the text's first `rows` positions."""
    path = load_model(None, dtype="float32").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :rows]
    assert ids.shape[1] == rows, f"the text has only {ids.shape[1]} tokens"
    with torch.inference_mode():
        return model(ids).logits[0].float().contiguous()


def warpers(p: SamplingParams) -> LogitsProcessorList:
    out = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.min_p > 0:
        out.append(MinPLogitsWarper(p.min_p))
    if p.top_k > 0:
        out.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        out.append(TopPLogitsWarper(p.top_p))
    return out


def hf_sample(logits: torch.Tensor, warp: LogitsProcessorList, generator: torch.Generator) -> list[int]:
    scores = warp(None, logits)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0].tolist()


def check_support(logits: torch.Tensor, p: SamplingParams) -> None:
    allowed = torch.isfinite(warpers(p)(None, logits.clone()))
    generators = [torch.Generator().manual_seed(i) for i in range(len(logits))]
    for _ in range(200):
        tokens = torch.tensor(choose_tokens(logits, [p] * len(logits), generators))
        assert allowed[torch.arange(len(logits)), tokens].all(), "loramux drew a token transformers' warpers exclude"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    logits = real_logits(max(args.rows))
    print(f"{'setting':40s} {'N':>3s} {'loramux':>9s} {'per_row':>9s} {'hf_batched':>10s}  per_row/loramux  hf_batched/loramux")
    for name, p in SETTINGS.items():
        check_support(logits, p)
        for n in args.rows:
            rows = logits[:n]
            warp = warpers(p)
            generators = [torch.Generator().manual_seed(i) for i in range(n)]
            shared = torch.Generator().manual_seed(0)
            ms = time_interleaved({
                "loramux": lambda: choose_tokens(rows, [p] * n, generators),
                "per_row": lambda: [hf_sample(rows[i : i + 1], warp, g) for i, g in enumerate(generators)],
                "hf_batched": lambda: hf_sample(rows, warp, shared),
            }, warmup=3, repeat=args.repeat)
            print(f"{name:40s} {n:3d} {ms['loramux']:8.2f}ms {ms['per_row']:8.2f}ms {ms['hf_batched']:9.2f}ms"
                  f"  {ms['per_row'] / ms['loramux']:14.1f}x  {ms['hf_batched'] / ms['loramux']:17.1f}x", flush=True)


if __name__ == "__main__":
    main()
