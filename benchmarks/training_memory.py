"""Peak memory of one TRAIN-only, one inference-only and one mixed step, plus two reference points.

What it measures
----------------
The *additional* peak resident memory (RSS) of one engine-style step over the process's RSS right
before it (the loaded model, its adapters, the filled KV cache, and whatever the warm-up step left
behind). The default model (SmolLM2-135M-Instruct), float32, CPU. Scenarios:

- ``train``      : 8 TRAIN chunks of 128 tokens for one adapter (LoRA r=16, alpha=32, all linears):
                   ``model(batch)``, then ``Trainer._loss(..., backward=True)`` itself (targets at every
                   row after each sample's first, 8 x 127 = 1016 rows, logits in chunks of
                   ``LOSS_CHUNK_ROWS`` rows, one backward through the model).
- ``infer``      : 32 DECODE rows, each with 128 tokens already in its KV blocks (filled by real
                   prefill steps during setup), plus one PREFILL chunk of 256 new tokens, over 4
                   adapters (8 decode rows each; the prefill chunk on the first), then the logits of
                   the 33 rows that sample, as ``Engine.step`` does.
- ``mixed``      : both in one ``Batch`` (one forward; TRAIN part with autograd, the rest without),
                   the 33 sampled logits, then the same loss/backward on the TRAIN rows.
- ``train-full`` : ``train`` with ``trainer.LOSS_CHUNK_ROWS`` patched to 1,000,000, i.e. the logits of
                   all 1016 target rows at once (what the chunked loss saves).
- ``peft``       : the same 8 x 128 token ids through transformers + PEFT (LoRA r=16, alpha=32,
                   ``target_modules="all-linear"``, the same safetensors weights, float32),
                   ``model(input_ids, labels=input_ids).loss.backward()``.

Every step is what an engine step with an optimizer would see: LoRA gradients are set to None
before it (as ``zero_grad()`` does), so the gradient buffers (18.6 MB for r=16 on all 210 linears)
are part of each training step's peak.

How it measures
---------------
Each scenario runs in its own fresh subprocess (``--scenario NAME``), so no peak or allocator state
leaks from one scenario into another. The child loads the model, sets up adapters and KV blocks,
runs one warm-up step (first-use page-ins of libraries, oneDNN scratch, lazily touched KV pages), then
resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``, which sets VmHWM to the
current VmRSS), reads VmRSS, runs the measured step, and reads VmHWM: ``peak = VmHWM - VmRSS before``.
That is exact (the kernel updates the high-water mark on every fault) and needs no sampling. If
clear_refs is not writable, it falls back to a thread sampling /proc/self/statm every 0.2 ms (the
JSON records which method was used; the sampled peak is always recorded as a cross-check).

RSS only reflects freed memory if the allocator returns it to the kernel. glibc serves blocks below
its mmap threshold from heap arenas that it keeps, and it raises that threshold dynamically (up to
32 MB) as blocks are freed, so after a warm-up many of a step's tensors would be recycled from
arenas that are already resident and the growth would be underestimated. The children therefore
run with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=65536`` (a fixed threshold
turns the dynamic one off): every tensor of 64 KB or more is its own mmap, returned on free, so RSS
tracks live tensor memory and the high-water mark is the step's true peak.

How to run
----------
    .venv/bin/python benchmarks/training_memory.py                   # all scenarios, ~2 minutes idle
    .venv/bin/python benchmarks/training_memory.py --repeat 2        # ~4 minutes idle
    .venv/bin/python benchmarks/training_memory.py --scenarios train,infer,mixed
    .venv/bin/python benchmarks/training_memory.py --json /tmp/training_memory.json

Output: a markdown table on stdout (``--repeat`` > 1 shows the median over fresh processes and the
range). Columns: "baseline RSS" is the child's RSS right before the measured step; "peak over
baseline" the step's peak growth (VmHWM); "sampled peak" the sampler's cross-check; "held after
forward" the growth once the forward pass returned (autograd-saved activations; for ``peft`` the
loss is computed inside forward, so it is included); "step s" the measured step's wall time (only
meaningful on an idle machine). ``mixed / (train + infer)`` is the issue's criterion: it should stay
within 1.10. "vs train" compares the two reference points with loramux's chunked ``train``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from types import SimpleNamespace

SCENARIOS = ("train", "infer", "mixed", "train-full", "peft")
DESCRIPTIONS = {
    "train": "TRAIN 8 x 128, chunked loss",
    "infer": "32 DECODE (ctx 128) + PREFILL 256, 4 adapters",
    "mixed": "train + infer in one batch",
    "train-full": "train, logits of all 1016 target rows at once",
    "peft": "transformers + PEFT, 8 x 128, model(ids, labels)",
}
TRAIN_SAMPLES, TRAIN_LEN = 8, 128
DECODE_ROWS, DECODE_CONTEXT, PREFILL_LEN, INFER_ADAPTERS = 32, 128, 256, 4
LORA_R, LORA_ALPHA = 16, 32
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


# --- memory probes (child side) ---------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Polls /proc/self/statm in a thread (torch ops release the GIL, so it keeps running)."""

    def __init__(self, interval: float = 0.0002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


marks: dict[str, int] = {}  # RSS at points inside the step ("forward": once the forward pass returned)


def measure(step, params, phases: dict) -> dict:
    """Warm-up step, then the measured step; returns RSS before it and its peak growth."""
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    step()
    phases["warmup_s"] = time.perf_counter() - t0
    for p in params:
        p.grad = None
    gc.collect()
    hwm_ok = _reset_hwm()
    before = _rss_bytes()
    marks.clear()
    started = time.perf_counter()
    with RssSampler() as sampler:
        step()
    seconds = time.perf_counter() - started
    hwm = _status_kb("VmHWM") * 1024 if hwm_ok else None
    peak = hwm if hwm_ok else sampler.peak
    return {
        "method": "VmHWM reset via clear_refs" if hwm_ok else "sampled /proc/self/statm",
        "baseline_rss_mb": before / MB,
        "peak_over_baseline_mb": (peak - before) / MB,
        "sampled_peak_over_baseline_mb": (sampler.peak - before) / MB,
        "after_forward_over_baseline_mb": (marks["forward"] - before) / MB,
        "after_over_baseline_mb": (_rss_bytes() - before) / MB,
        "step_seconds": seconds,
        **phases,
    }


# --- scenarios (child side) -------------------------------------------------------------------------
def train_tokens(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (TRAIN_SAMPLES, TRAIN_LEN), generator=g)


def run_loramux(scenario: str) -> dict:
    import torch

    from loramux.batch import Batch, Chunk, RowKind
    from loramux.engine.engine import Engine
    from loramux.lora.adapter import LoraConfig
    from loramux.training import trainer as trainer_mod

    torch.manual_seed(0)
    t0 = time.perf_counter()
    engine = Engine.load(dtype="float32")
    phases = {"load_s": time.perf_counter() - t0, "loaded_rss_mb": _rss_bytes() / MB}
    t0 = time.perf_counter()
    model, kv = engine.model, engine.kv
    vocab = model.config.vocab_size
    lora = LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear")
    trained = engine.create_adapter("train", lora, seed=1, init_b="random").requires_grad_(True)
    train_slot = engine.adapters.slot("train")
    slots = []
    for k in range(INFER_ADAPTERS):
        engine.create_adapter(f"serve{k}", lora, seed=10 + k, init_b="random")
        slots.append(engine.adapters.slot(f"serve{k}"))
    params = trained.parameters()

    # TRAIN chunks and the work items Trainer._loss reads (loss mask on every token).
    ids = train_tokens(vocab).tolist()
    train_chunks = [Chunk(s, RowKind.TRAIN, train_slot) for s in ids]
    items = [SimpleNamespace(sample=SimpleNamespace(input_ids=s, loss_mask=[1] * len(s)), weight=1.0) for s in ids]
    trainer = trainer_mod.Trainer(model)
    if scenario == "train-full":
        trainer_mod.LOSS_CHUNK_ROWS = 1_000_000

    # Inference chunks: 32 sequences whose 128-token contexts are prefilled into their KV blocks now,
    # each decoding one token; one fresh 256-token prompt chunk.
    infer_chunks = []
    if scenario in ("infer", "mixed"):
        g = torch.Generator().manual_seed(1)
        contexts = torch.randint(0, vocab, (DECODE_ROWS, DECODE_CONTEXT), generator=g).tolist()
        tables = [kv.allocator.allocate(kv.blocks_for(DECODE_CONTEXT + 1)) for _ in range(DECODE_ROWS)]
        adapters = [slots[i * INFER_ADAPTERS // DECODE_ROWS] for i in range(DECODE_ROWS)]
        with torch.no_grad():
            for s in range(0, DECODE_ROWS, 8):  # fill the cache, 8 prompts per prefill step
                fill = [Chunk(contexts[i], RowKind.PREFILL, adapters[i], 0, tables[i]) for i in range(s, s + 8)]
                model(Batch.build(fill, kv))
        next_ids = torch.randint(0, vocab, (DECODE_ROWS,), generator=g).tolist()
        infer_chunks = [
            Chunk([next_ids[i]], RowKind.DECODE, adapters[i], DECODE_CONTEXT, tables[i]) for i in range(DECODE_ROWS)
        ]
        prompt = torch.randint(0, vocab, (PREFILL_LEN,), generator=g).tolist()
        infer_chunks.append(Chunk(prompt, RowKind.PREFILL, slots[0], 0, kv.allocator.allocate(kv.blocks_for(PREFILL_LEN))))

    chunks = (train_chunks if scenario != "infer" else []) + infer_chunks
    n_train = len(chunks) - len(infer_chunks)

    def step() -> None:
        # As Engine.step: forward under no_grad (the model turns autograd on for the TRAIN part),
        # logits of the rows that sample, then the trainer's loss and backward on the TRAIN rows.
        batch = Batch.build(chunks, kv, model.device)
        with torch.no_grad():
            hidden = model(batch)
            marks["forward"] = _rss_bytes()
            if infer_chunks:
                rows = torch.tensor([batch.chunk_rows[i].stop - 1 for i in range(n_train, len(chunks))], dtype=torch.long)
                logits = model.logits(hidden[rows])
                logits.argmax(-1)
        if n_train:
            trainer._loss(hidden, list(batch.chunk_rows[:n_train]), items, True)

    phases["setup_s"] = time.perf_counter() - t0
    result = measure(step, params, phases)
    result["rows"] = sum(len(c.token_ids) for c in chunks)
    result["grad_params"] = sum(p.numel() for p in params)
    return result


def run_peft() -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loramux.model.loader import _quiet_transformers, resolve_model_dir

    _quiet_transformers()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    _, directory = resolve_model_dir(None)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    phases = {"load_s": time.perf_counter() - t0, "loaded_rss_mb": _rss_bytes() / MB, "setup_s": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    ids = train_tokens(base.config.vocab_size)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        marks["forward"] = _rss_bytes()  # here: forward and loss (HF computes the loss inside forward)
        loss.backward()

    result = measure(step, params, phases)
    result["rows"] = ids.numel()
    result["grad_params"] = sum(p.numel() for p in params)
    result["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
    return result


def child(scenario: str) -> None:
    import torch

    result = run_peft() if scenario == "peft" else run_loramux(scenario)
    result.update(scenario=scenario, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


# --- parent -----------------------------------------------------------------------------------------
def spawn(scenario: str) -> dict:
    env = dict(os.environ, **MALLOC_ENV)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--scenario", scenario],
        env=env, capture_output=True, text=True,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"scenario {scenario} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def fmt_range(values: list[float]) -> str:
    return f"{min(values):.1f}..{max(values):.1f}" if len(values) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per scenario (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.scenario:
        child(args.scenario)
        return 0

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    load_before, started = os.getloadavg(), time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in scenarios}
    for r in range(args.repeat):  # interleave scenarios across repeats
        for s in scenarios:
            runs[s].append(spawn(s))
            print(f"# {s} run {r + 1}: {runs[s][-1]['peak_over_baseline_mb']:.1f} MB", file=sys.stderr, flush=True)
    load_after, elapsed = os.getloadavg(), time.perf_counter() - started

    peak = {s: statistics.median(x["peak_over_baseline_mb"] for x in runs[s]) for s in scenarios}
    import torch

    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, {runs[scenarios[0]][0]['threads']} threads, "
          f"Python {platform.python_version()}; method: {runs[scenarios[0]][0]['method']}; "
          f"children with {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    print(f"# load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {elapsed:.0f} s; repeat {args.repeat}")
    print()
    print("| scenario | what | rows | baseline RSS MB | peak MB over baseline | range | sampled peak MB | held after forward MB | step s | mixed / (train + infer) | vs train |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for s in scenarios:
        xs = runs[s]
        med = lambda k: statistics.median(x[k] for x in xs)  # noqa: E731
        ratio = f"{peak['mixed'] / (peak['train'] + peak['infer']):.3f}" if s == "mixed" and {"train", "infer"} <= peak.keys() else ""
        vs_train = f"{peak[s] / peak['train']:.2f}x" if s in ("train-full", "peft") and "train" in peak else ""
        print(f"| {s} | {DESCRIPTIONS[s]} | {xs[0]['rows']} | {med('baseline_rss_mb'):.0f} | {peak[s]:.1f} | "
              f"{fmt_range([x['peak_over_baseline_mb'] for x in xs])} | {med('sampled_peak_over_baseline_mb'):.1f} | "
              f"{med('after_forward_over_baseline_mb'):.1f} | {med('step_seconds'):.2f} | {ratio} | {vs_train} |")
    if {"train", "infer"} <= peak.keys():
        print(f"\n# train + infer = {peak['train'] + peak['infer']:.1f} MB" + (f"; mixed = {peak['mixed']:.1f} MB" if "mixed" in peak else ""))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.now(timezone.utc).isoformat(), "load_before": load_before, "load_after": load_after,
                "seconds": elapsed, "malloc_env": MALLOC_ENV, "runs": runs, "median_peak_mb": peak,
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
