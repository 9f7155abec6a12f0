"""Where one optimizer step of fine-tuning spends its time: loramux's engine against a plain PEFT loop.

The default model in float32, LoRA r=16 (alpha 32) on all seven linears, 8 samples of the bench's
project-made sorting task (about 130 tokens each) per optimizer step. Each system runs one step to
warm up, one timed step, and one step under torch.profiler, whose table (top ops by self CPU time)
is printed.

    .venv/bin/python benchmarks/profile_training_step.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from loramux.bench.options import BenchOptions, load_engine
from loramux.bench.peft_peer import PeftTrainer, load_peft
from loramux.bench.workload import training_records
from loramux.lora.adapter import LoraConfig
from loramux.training.config import TrainingConfig


def profiled(name: str, step) -> None:
    step()
    t0 = time.perf_counter()
    step()
    print(f"{name}: one optimizer step in {time.perf_counter() - t0:.2f} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    records = training_records(64)
    engine = load_engine(BenchOptions(setting="finetune", out_dir="/tmp"))
    job = engine.create_job("t", records, lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                            training=TrainingConfig(max_steps=100, batch_size=8, lr_schedule="constant"))

    def loramux_step() -> None:
        start = job.step
        while job.step == start:
            engine.step()

    profiled("loramux", loramux_step)
    model = load_peft(engine.loaded.path, {}, torch.float32,
                      trainable={"t": dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)})
    trainer = PeftTrainer(model, "t", engine.load_data(records, 2048), 8, 2e-4, engine.tokenizer.eos_token_id)
    profiled("transformers + PEFT", trainer.step)


if __name__ == "__main__":
    main()
