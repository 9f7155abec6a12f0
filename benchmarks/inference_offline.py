"""Offline mixed-adapter inference: loramux's engine against transformers + PEFT, same run.

Workload (issue 7's reference): the default model, 4 adapters of rank 16 (alpha 32) on all seven
linears with random non-zero B, N requests (default 32) of 64-token prompts and 64 greedy output
tokens (EOS ignored), adapters assigned round-robin, all submitted at once.

- loramux: `Engine.generate` (continuous batching, paged KV cache, one mixed batch per step).
- PEFT: `PeftModel.generate(..., adapter_names=[...])` over the whole batch (PEFT's mixed-adapter
  batch inference), left-padded, with transformers' KV cache.

Prints output tokens/s of each and the ratio; with --json writes every figure and the setup.

    .venv/bin/python benchmarks/inference_offline.py [--requests 32] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from loramux import SLO, Engine, EngineConfig, LoraConfig, SamplingParams, SchedulerConfig
from loramux.engine.engine import parse_dtype

ADAPTERS = ("a0", "a1", "a2", "a3")


def prompts(engine: Engine, n: int, length: int) -> list[list[int]]:
    text = " ".join(f"word{i} is a token of the benchmark prompt number" for i in range(200))
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * 7 : i * 7 + length] for i in range(n)]


def run_loramux(engine: Engine, batch: list[list[int]], adapters: list[str], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(batch[:2], adapters[:2], params=SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(batch, adapters, params=params)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)


def run_peft(model_dir: Path, adapter_dirs: dict[str, Path], batch: list[list[int]], adapters: list[str],
             max_tokens: int, dtype: torch.dtype, pad: int) -> tuple[float, int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dirs[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, min_new_tokens=max_tokens, max_new_tokens=max_tokens)
    with torch.no_grad():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], adapter_names=adapters[:2], do_sample=False,
                       pad_token_id=pad, max_new_tokens=4)  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=ids, adapter_names=adapters, **kwargs)
    return time.perf_counter() - start, (out.shape[1] - width) * out.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tpot", type=float, default=0.25, help="loramux's time-per-output-token target (s)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype)
    slo = SLO(ttft=max(2.0, args.tpot * 8), tpot=args.tpot)
    engine = Engine.load(dtype=dtype, config=EngineConfig(scheduler=SchedulerConfig(default_slo=slo)))
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = {}
        for i, name in enumerate(ADAPTERS):
            engine.create_adapter(name, LoraConfig(r=16, alpha=32, target_modules="all-linear"), seed=i, init_b="random")
            adapter_dirs[name] = Path(tmp) / name
            engine.save_adapter(name, adapter_dirs[name])
        batch = prompts(engine, args.requests, args.prompt_tokens)
        adapters = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.requests)]
        load_before = os.getloadavg()[0]
        ours_s, ours_tokens = run_loramux(engine, batch, adapters, args.output_tokens)
        peft_s, peft_tokens = (float("nan"), 0) if args.skip_peft else run_peft(
            engine.loaded.path, adapter_dirs, batch, adapters, args.output_tokens, dtype, engine.tokenizer.eos_token_id)
    ours_tps, peft_tps = ours_tokens / ours_s, peft_tokens / peft_s
    report = {
        "setup": {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                  "dtype": args.dtype, "tpot_target": args.tpot, "adapters": "4 x rank 16 on all linears", "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "loramux": {"seconds": ours_s, "output_tokens": ours_tokens, "tokens_per_second": ours_tps},
        "peft": {"seconds": peft_s, "output_tokens": peft_tokens, "tokens_per_second": peft_tps},
        "ratio_loramux_over_peft": ours_tps / peft_tps,
    }
    print("| system | output tokens | seconds | output tokens/s |\n|---|---:|---:|---:|")
    print(f"| loramux engine | {ours_tokens} | {ours_s:.2f} | {ours_tps:.1f} |")
    print(f"| transformers + PEFT generate(adapter_names=...) | {peft_tokens} | {peft_s:.2f} | {peft_tps:.1f} |")
    print(f"\nloramux / PEFT: {ours_tps / peft_tps:.2f}x ({args.dtype}, TPOT target {args.tpot}s, {torch.get_num_threads()} threads, "
          f"load average {load_before:.2f} before)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
