"""An engine with requests in their decode phase, shared by the decode-step benchmarks."""

from __future__ import annotations

from loramux.bench.options import BenchOptions, add_bench_adapters, load_engine
from loramux.engine.engine import Engine
from loramux.engine.sampling import SamplingParams


def decoding_engine(dtype: str, rows: int, adapters: int = 4, warm_steps: int = 8, temperature: float = 0.0) -> Engine:
    """The default model with the bench's adapters (rank 16, all linears) and `rows` requests of
    64-token prompts spread over the first `adapters` of them (0: the bare base model), run for
    `warm_steps` steps: prefilled, then decoding one row each per step, for thousands of steps more.
    temperature 0 is greedy; above 0, each request samples with its own seed."""
    options = BenchOptions(setting="inference", out_dir="/tmp", dtype=dtype)
    engine = load_engine(options)
    add_bench_adapters(engine, options.workload)
    names = options.workload.adapter_names[:adapters]
    for i in range(rows):
        engine.add_request(list(range(100, 164)), names[i % len(names)] if names else None,
                           SamplingParams(max_tokens=4000, ignore_eos=True, temperature=temperature, seed=i))
    for _ in range(warm_steps):
        engine.step()
    return engine
