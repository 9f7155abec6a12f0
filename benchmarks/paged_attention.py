"""Micro-benchmark of decode attention over the paged KV cache: gather + masked SDPA, the native
kernel that reads the cache in place, and a contiguous cache.

What it measures
----------------
One decode step's attention, all ``--layers`` layers, on CPU, under ``torch.inference_mode``, for a
batch of ``B`` sequences that each add one token. Per dtype, batch size and context length it times
the median wall-clock over ``--repeat`` runs (after warm-up) of

1. ``paged``      : the PyTorch path of ``Attention._decode`` in ``loramux/model/llama.py``, per layer:
   ``keys, values = kv.gather(layer, decode_slots)`` (into the cache's reused workspace), then
   ``F.scaled_dot_product_attention(q [B, heads, 1, D], keys.transpose(1, 2), values.transpose(1, 2),
   attn_mask=decode_mask, enable_gqa=True)``. The plan (``decode_slots [B, C]`` padded,
   ``decode_mask [B, 1, 1, C]``) comes from the real ``Batch.build`` over DECODE ``Chunk``s and a
   real ``PagedKVCache``.
2. ``native``     : what ``Attention._decode`` runs where the native kernel does
   (``loramux/native/paged_attention``): ``paged_attention_native(q, kv, layer, decode_slots,
   decode_mask)``, each row's K and V read in place through its slots, no gather, no padding.
3. ``contiguous`` : the lower bound of the SDPA path, a per-sequence cache that needs no copy:
   pre-built contiguous ``[B, kv_heads, C, D]`` keys/values per layer holding the same data, the
   same masked SDPA call.
4. ``gather``     : the two gathers of (1) alone, i.e. what share of (1) is copying the context out
   of the pool.

The cache is fragmented on purpose: the pool holds 25% more blocks than the batch needs
(``--slack``) and every sequence's block table is drawn from one random permutation of the block
ids, so consecutive blocks of a sequence are scattered over the pool (as after many allocations
and frees), not adjacent. Contexts are mixed within the batch: the first sequence has exactly
``C`` tokens (so the padded width is ``C``), the others uniform in ``[C/2, C]``; padded positions
are masked, as in loramux. Queries and cache contents are random normal values.

"gathered MB" (JSON only) is what the gathers of one step write (K and V, every layer, the padded
width ``B * C`` rows of ``kv_heads * head_dim`` elements; padded rows gather slot 0).

Before timing, every configuration checks once that (1) and (3) agree and that (2) agrees with
(1) (max absolute differences printed; float32 must be within 1e-5, bfloat16 within a few bf16
ulps: SDPA rounds its probabilities to bf16, the kernel only its output), so a wrong result aborts
the run. The variants are interleaved inside every repeat (order rotated), so drift in machine
load hits all of them alike; "spread" is the largest interquartile range of them, as % of its
median. The 1-minute load average is printed before and after. The native kernel's build is the
best this CPU runs (``LORAMUX_NATIVE_ISA=avx2`` times the AVX2 build on an AVX-512 CPU); where
none runs, the native column is left out.

How to run
----------
    .venv/bin/python benchmarks/paged_attention.py                    # defaults, a few minutes on 2 cores
    .venv/bin/python benchmarks/paged_attention.py --batch 8 --context 2048 --dtypes float32 --repeat 20
    .venv/bin/python benchmarks/paged_attention.py --json /tmp/paged_attention.json

Defaults: SmolLM2-135M attention (9 heads, 3 KV heads, head_dim 64, 30 layers), block size 16,
batch sizes 1,8,32, context lengths 128,512,2048, dtypes float32,bfloat16. The largest case
(float32, 32 x 2048) holds about 6 GB (pool + contiguous copy). Output: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from loramux.config import ModelConfig
from timing import time_interleaved
from loramux.batch import Batch, Chunk, RowKind
from loramux.kv.paged_cache import PagedKVCache
from loramux.native import cpu_isa, paged_attention
from loramux.native.paged_attention import paged_attention_native

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(layers: int, heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    # Only the attention geometry matters here; the rest is SmolLM2-135M's.
    return ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=heads * head_dim, intermediate_size=1536,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True,
    )


def make_case(config: ModelConfig, batch: int, context: int, block_size: int, slack: float, dtype, seed: int):
    """A fragmented paged cache holding `batch` sequences, the decode plan from `Batch.build`, random
    queries per layer and the same contexts as contiguous [B, kv_heads, C, D] tensors per layer."""
    rng = random.Random(seed)
    lengths = [context] + [rng.randint(context // 2, context) for _ in range(batch - 1)]
    need = [-(-n // block_size) for n in lengths]
    num_blocks = max(1, int(sum(need) * (1 + slack)))
    kv = PagedKVCache(config, num_blocks, block_size, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    for t in (kv.k, kv.v):  # one random layer, scaled differently per layer (randn of all layers is slow)
        base = torch.randn(t[0].shape, generator=g)
        for layer in range(config.num_layers):
            torch.mul(base, 1.0 + layer / config.num_layers, out=t[layer])
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # scattered blocks: a fragmented pool
    chunks, offset = [], 0
    for n, nb in zip(lengths, need):
        table = ids[offset: offset + nb]
        offset += nb
        # one new token at position n - 1; its K/V slot is the last of the context (already in the pool here)
        chunks.append(Chunk(token_ids=[0], kind=RowKind.DECODE, start_pos=n - 1, block_table=table))
    plan = Batch.build(chunks, kv).parts[0].attention
    assert plan.decode_slots.shape == (batch, context) and not plan.spans
    q = torch.randn(config.num_layers, batch, config.num_heads, 1, config.head_dim, generator=g).to(dtype)
    # The contiguous lower bound: the same values, laid out [B, kv_heads, C, D] per layer, built once.
    shape = (config.num_layers, batch, config.num_kv_heads, context, config.head_dim)
    k_c, v_c = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    for layer in range(config.num_layers):
        k_c[layer].copy_(kv.k[layer][plan.decode_slots].transpose(1, 2))
        v_c[layer].copy_(kv.v[layer][plan.decode_slots].transpose(1, 2))
    return kv, plan, q, k_c, v_c, lengths, num_blocks


def paged_step(kv, plan, q, layers):
    out = []
    for layer in range(layers):
        keys, values = kv.gather(layer, plan.decode_slots)
        out.append(F.scaled_dot_product_attention(q[layer], keys.transpose(1, 2), values.transpose(1, 2),
                                                  attn_mask=plan.decode_mask, enable_gqa=True))
    return out


def native_step(kv, plan, q, layers):
    return [paged_attention_native(q[layer][:, :, 0], kv, layer, plan.decode_slots, plan.decode_mask).unsqueeze(2)
            for layer in range(layers)]


def contiguous_step(k_c, v_c, mask, q, layers):
    return [F.scaled_dot_product_attention(q[layer], k_c[layer], v_c[layer], attn_mask=mask, enable_gqa=True)
            for layer in range(layers)]


def gather_step(kv, plan, layers):
    for layer in range(layers):
        kv.gather(layer, plan.decode_slots)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor], dtype) -> float:
    """Max |a - b| over all layers; raises if they disagree beyond the dtype's tolerance."""
    a, b = torch.stack(a).float(), torch.stack(b).float()
    diff = (a - b).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * max(1.0, b.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise SystemExit(f"MISMATCH: max abs diff {diff:.3g} > tol {tol:.3g}; refusing to time a wrong result")
    return diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--context", default="128,512,2048", help="comma-separated context lengths (the longest in the batch)")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {','.join(DTYPES)}")
    p.add_argument("--slack", type=float, default=0.25, help="free blocks in the pool, as a fraction of the used ones")
    p.add_argument("--repeat", type=int, default=10, help="timed decode steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    batches = [int(s) for s in a.batch.split(",") if s]
    contexts = [int(s) for s in a.context.split(",") if s]
    dtypes = [s.strip() for s in a.dtypes.split(",") if s.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    if a.heads % a.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    config = make_config(a.layers, a.heads, a.kv_heads, a.head_dim)
    L = a.layers

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()}), "
          f"python {platform.python_version()}, {platform.machine()}, native kernel: {cpu_isa() or 'none'} build")
    load_before = os.getloadavg()[0]
    print(f"{L} layers, {a.heads} heads / {a.kv_heads} KV heads x {a.head_dim}, block size {a.block_size}, "
          f"pool slack {a.slack:.0%}, contexts uniform in [C/2, C] (one at C); median of {a.repeat} steps after "
          f"{a.warmup} warm-up, inference_mode; load average {load_before:.2f}")
    print()
    header = ["dtype", "batch", "context", "paged ms/step", "native ms/step", "contiguous ms/step", "gather-only ms",
              "native / paged", "native / contiguous", "paged / contiguous", "max abs diff native-paged",
              "max abs diff paged-contiguous", "spread"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    sys.stdout.flush()

    results = []
    t_start = time.perf_counter()
    with torch.inference_mode():
        for dname in dtypes:
            dtype = DTYPES[dname]
            for B in batches:
                for C in contexts:
                    kv, plan, q, k_c, v_c, lengths, num_blocks = make_case(
                        config, B, C, a.block_size, a.slack, dtype, a.seed)
                    fns = {
                        "paged": lambda: paged_step(kv, plan, q, L),
                        "native": lambda: native_step(kv, plan, q, L),
                        "contiguous": lambda: contiguous_step(k_c, v_c, plan.decode_mask, q, L),
                        "gather": lambda: gather_step(kv, plan, L),
                    }
                    if not paged_attention.accepts(q[0][:, :, 0], kv, plan.decode_slots, plan.decode_mask):
                        del fns["native"]
                    reference = paged_step(kv, plan, q, L)
                    diff = max_diff(reference, contiguous_step(k_c, v_c, plan.decode_mask, q, L), dtype)
                    native_diff = max_diff(native_step(kv, plan, q, L), reference, dtype) if "native" in fns else None
                    ms = time_interleaved(fns, a.warmup, a.repeat)
                    esize = torch.empty((), dtype=dtype).element_size()
                    gathered = 2 * L * B * C * config.kv_size * esize  # K and V, padded width
                    spread = max(ms[n + "_iqr_pct"] for n in fns)
                    native = ms.get("native", float("nan"))
                    print(f"| {dname} | {B} | {C} | {ms['paged']:.2f} | {native:.2f} | {ms['contiguous']:.2f} | {ms['gather']:.2f} | "
                          f"{native / ms['paged']:.2f}x | {native / ms['contiguous']:.2f}x | {ms['paged'] / ms['contiguous']:.2f}x | "
                          f"{native_diff if native_diff is not None else float('nan'):.2g} | {diff:.2g} | {spread:.0f}% |")
                    sys.stdout.flush()
                    results.append(dict(
                        dtype=dname, batch=B, context=C, lengths=lengths, pool_blocks=num_blocks,
                        paged_ms=ms["paged"], native_ms=ms.get("native"), contiguous_ms=ms["contiguous"], gather_ms=ms["gather"],
                        paged_min_ms=ms["paged_min"], native_min_ms=ms.get("native_min"),
                        contiguous_min_ms=ms["contiguous_min"], gather_min_ms=ms["gather_min"],
                        gathered_bytes=gathered, max_abs_diff=diff, native_max_abs_diff=native_diff, spread_iqr_pct=spread))
                    del kv, plan, q, k_c, v_c, fns, reference
                    gc.collect()
    load_after = os.getloadavg()[0]
    print(f"\n(total {time.perf_counter() - t_start:.1f} s; 1-min load average {load_before:.2f} before, "
          f"{load_after:.2f} after, on {os.cpu_count()} cores)")

    if a.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(), native_isa=cpu_isa(),
                    machine=platform.machine(), load_before=load_before, load_after=load_after,
                    date=datetime.now(timezone.utc).isoformat(timespec="seconds"), args=vars(a))
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
