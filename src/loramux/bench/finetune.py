"""The fine-tuning-only setting: one and two adapters trained at once, loramux against PEFT.

Four scenarios, each in a fresh child process (`python -m loramux.bench.finetune SCENARIO OPTIONS`)
so that its peak memory is its own:
- loramux, 1 adapter / 2 adapters: jobs in the engine (two jobs share every step);
- PEFT, 1 adapter / 2 adapters one after the other: a plain training loop (peft_peer.PeftTrainer).
All train LoRA r=`rank` on all linears, AdamW at 2e-4 (constant), `train_batch` samples per optimizer
step, for `train_steps` steps each, on the same project-made samples (workload.training_records).

Peak memory is the kernel's high-water mark (VmHWM): the whole process, and its growth over the
RSS right after the model is loaded and resident (the training's own peak; transformers maps
safetensors lazily, so the PEFT child reads every weight once before taking that baseline). The
children run with glibc's default allocator settings: a fixed mmap threshold would make the peak
track live tensors more exactly, but it turns every large allocation into fresh page faults and
halved loramux's training speed in a first run.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from loramux.bench.options import BenchOptions, Run, load_engine
from loramux.bench.report import Table, line_plot
from loramux.bench.workload import Workload, training_records

SCENARIOS = {"loramux-1": "loramux, 1 adapter", "loramux-2": "loramux, 2 adapters at once",
             "peft-1": "PEFT, 1 adapter", "peft-2": "PEFT, 2 adapters one after the other"}
LEARNING_RATE = 2e-4


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def peft_lora_kwargs(w: Workload) -> dict:
    """PEFT LoraConfig arguments for adapters like the workload's (all linears, no dropout)."""
    return {"r": w.rank, "lora_alpha": w.alpha, "target_modules": "all-linear", "lora_dropout": 0.0}


def _run_loramux(o: BenchOptions, num_adapters: int, records: list[dict]) -> dict:
    from loramux.lora.adapter import LoraConfig
    from loramux.training.config import TrainingConfig

    engine = load_engine(o)
    rss_loaded = _status_kb("VmRSS")
    config = TrainingConfig(max_steps=o.train_steps, batch_size=o.train_batch, learning_rate=LEARNING_RATE,
                            lr_schedule="constant", max_grad_norm=1.0)
    lora = LoraConfig(r=o.workload.rank, alpha=o.workload.alpha, target_modules="all-linear")
    start = time.perf_counter()
    jobs = [engine.create_job(f"train-{i}", records, lora=lora, training=dataclasses.replace(config, seed=i))
            for i in range(num_adapters)]
    losses: list[list[float]] = [[] for _ in jobs]
    progress = []
    while engine.has_work:
        engine.step()
        for job, curve in zip(jobs, losses):
            if job.step > len(curve):
                curve.append(job.last_train_loss)
        progress.append((time.perf_counter() - start, sum(j.train_tokens for j in jobs)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(j.train_tokens for j in jobs), "losses": losses, "progress": progress,
            "rss_loaded_kb": rss_loaded, "states": [j.state.value for j in jobs]}


def _run_peft(o: BenchOptions, num_adapters: int, records: list[dict]) -> dict:
    from loramux.bench.peft_peer import PeftTrainer, load_peft
    from loramux.model.dtype import parse_dtype
    from loramux.model.loader import load_tokenizer, resolve_model_dir
    from loramux.training.data import parse_jsonl, tokenize

    _, model_dir = resolve_model_dir(o.model)
    tok = load_tokenizer(model_dir)
    samples = [tokenize(r, tok, tok.eos_token_id, 2048) for r in parse_jsonl(json.dumps(r) for r in records)]
    names = [f"train-{i}" for i in range(num_adapters)]
    model = load_peft(model_dir, {}, parse_dtype(o.dtype), trainable={n: peft_lora_kwargs(o.workload) for n in names})
    for p in model.parameters():  # page in weights transformers mapped lazily, as loramux's are resident
        p.detach().sum()
    rss_loaded = _status_kb("VmRSS")
    start = time.perf_counter()
    losses, progress, tokens = [], [], 0
    for name in names:  # one after the other, as PEFT users train adapters
        trainer = PeftTrainer(model, name, samples, o.train_batch, LEARNING_RATE, tok.eos_token_id)
        curve = []
        for _ in range(o.train_steps):
            trainer.step()
            curve.append(trainer.last_loss)
            progress.append((time.perf_counter() - start, tokens + trainer.tokens))
        tokens += trainer.tokens
        losses.append(curve)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "losses": losses, "progress": progress,
            "rss_loaded_kb": rss_loaded, "states": ["succeeded"] * num_adapters}


def child(scenario: str, options_json: str) -> None:
    """Runs one scenario and prints its figures as JSON on the last line of stdout."""
    raw = json.loads(options_json)
    o = BenchOptions(**(raw | {"out_dir": Path(raw["out_dir"]), "workload": Workload(**raw["workload"]),
                               "rates": tuple(raw["rates"])}))
    records = training_records(max(64, o.train_batch * o.train_steps), seed=o.workload.seed)
    system, n = scenario.split("-")
    result = (_run_loramux if system == "loramux" else _run_peft)(o, int(n), records)
    result |= {"peak_kb": _status_kb("VmHWM")}
    print(json.dumps(result))


def _spawn(scenario: str, o: BenchOptions) -> dict:
    print(f"[bench] {SCENARIOS[scenario]} ...", flush=True)
    raw = dataclasses.asdict(o) | {"out_dir": str(o.out_dir)}
    proc = subprocess.run([sys.executable, "-m", "loramux.bench.finetune", scenario, json.dumps(raw)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning scenario {scenario} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    result["peak_mb"] = result["peak_kb"] / 1024
    result["training_peak_mb"] = (result["peak_kb"] - result["rss_loaded_kb"]) / 1024
    print(f"[bench]   {result['tokens_per_second']:.0f} tokens/s, peak {result['peak_mb']:.0f} MB "
          f"({result['training_peak_mb']:.0f} MB over the loaded model)", flush=True)
    return result


def run(o: BenchOptions) -> Path:
    engine = load_engine(o)  # only to size the roofline; each scenario loads its own
    run_ = Run(o, engine)
    del engine
    scenarios = [s for s in SCENARIOS if o.peft or s.startswith("loramux")]
    results = {s: _spawn(s, o) for s in scenarios}
    run_.results = {"scenarios": results}
    table = Table(f"Fine-tuning: LoRA r={o.workload.rank} on all linears, {o.train_steps} steps x {o.train_batch} samples "
                  f"per adapter ({o.dtype})",
                  ["scenario", "train tokens/s", "x PEFT (same adapters)", "peak RSS MB", "peak over loaded model MB",
                   "x PEFT memory", "final loss per adapter"])
    for s, r in results.items():
        peer = results.get("peft-" + s.split("-")[1])
        ratio = r["tokens_per_second"] / peer["tokens_per_second"] if peer else float("nan")
        memory = r["training_peak_mb"] / peer["training_peak_mb"] if peer else float("nan")
        table.rows.append([SCENARIOS[s], r["tokens_per_second"], ratio, r["peak_mb"], r["training_peak_mb"], memory,
                           ", ".join(f"{c[-1]:.3f}" for c in r["losses"] if c)])
    table.note = ("Tokens are all tokens of the trained samples; 2 adapters: loramux trains both in the same steps, "
                  "PEFT one after the other. Peak over loaded model: VmHWM minus RSS after loading.")
    run_.tables.append(table)
    run_.plots.append(line_plot(run_.plot("finetune_loss.png"), "Training loss", "optimizer step", "loss",
                                {f"{SCENARIOS[s]} #{i}": (list(range(1, len(c) + 1)), c)
                                 for s, r in results.items() for i, c in enumerate(r["losses"])}))
    run_.plots.append(line_plot(run_.plot("finetune_tokens.png"), "Trained tokens over time", "seconds", "tokens",
                                {SCENARIOS[s]: ([p[0] for p in r["progress"]], [p[1] for p in r["progress"]])
                                 for s, r in results.items()}))
    return run_.finish()


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
