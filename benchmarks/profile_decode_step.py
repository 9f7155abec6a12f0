"""Where a decode step spends its time: torch.profiler over the engine the bench builds.

The default model with the bench's adapters (rank 16, all linears), `rows` requests (64-token
prompts, spread over `adapters` adapters; 0: the bare base model) decoding together, greedy or
sampling at `temperature` (each request with its own seed). Prints the
median step time over 10 steps and, measured right after in the same process, the model's linear
layers alone over the same rows (`bench/machine.linears_step_seconds`, the roofline's bound: the
step's share of it is the bound's time / the step's), then the top ops by self CPU time over 5
profiled steps.

    .venv/bin/python benchmarks/profile_decode_step.py bfloat16 32 4
    .venv/bin/python benchmarks/profile_decode_step.py float32 1 4
    .venv/bin/python benchmarks/profile_decode_step.py bfloat16 32 4 1.0   # sampling at temperature 1
"""

from __future__ import annotations

import statistics
import sys
import time

from torch.profiler import ProfilerActivity, profile

from decoding import decoding_engine
from loramux.bench.machine import linears_step_seconds


def main(dtype: str = "bfloat16", rows: int = 32, adapters: int = 4, temperature: float = 0.0) -> None:
    engine = decoding_engine(dtype, rows, adapters, temperature=temperature)
    seconds = []
    for _ in range(10):
        t0 = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - t0)
    step = statistics.median(seconds)
    print(f"{dtype}, {rows} rows, {adapters} adapters, temperature {temperature}: {1e3 * step:.1f} ms per decode step", flush=True)
    bound = linears_step_seconds(engine.model.config, rows, engine.model.dtype, seconds=2.0)
    print(f"linear layers alone over {rows} rows: {1e3 * bound:.1f} ms; the step is at {100 * bound / step:.0f}% of that bound", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bfloat16", *(int(a) for a in sys.argv[2:4]), *(float(a) for a in sys.argv[4:5]))
