"""Which thread runs the engine matters: libgomp's barrier spinning and the number of OpenMP teams.

The same offline workload (32 requests, 64-token prompts, 64 output tokens, 4 adapters of rank 16,
default model, fp32) runs on the engine, in one process, four ways, interleaved:

1. ``main``          : engine steps on the main thread (the one that loaded the model).
2. ``own thread``    : engine steps on a new thread while the main thread waits in ``join`` (how
                       ``loramux serve`` ran before: its engine loop had a thread of its own).
3. ``main, spin 100``: a child process running (1) with ``GOMP_SPINCOUNT=100``: libgomp's spin
                       count at barriers when it manages more threads than there are cores.
4. ``main, after a side op``: (1) while another thread that once ran one parallel torch op (a dtype
                       conversion of 131,072 elements) is still alive, as an ``asyncio.to_thread``
                       worker would be.

Per run: output tokens/s (first step to last finish), and the CPU seconds of each busy thread
(from /proc), whose sum stays the same while the wall time grows if threads sit idle at barriers.

    .venv/bin/python benchmarks/engine_thread.py
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import torch

from loramux.bench.machine import proc_stat
from loramux.bench.options import BenchOptions, add_bench_adapters, load_engine
from loramux.bench.workload import make_requests, prompt_token_pool
from loramux.engine.sampling import SamplingParams


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    return {tid: proc_stat(f"/proc/self/task/{tid}/stat")[1] for tid in os.listdir("/proc/self/task")}


class Workload:
    def __init__(self) -> None:
        options = BenchOptions(setting="inference", out_dir="/tmp")
        workload = dataclasses.replace(options.workload, fixed_lengths=True, arrival="offline")
        self.engine = load_engine(options)
        add_bench_adapters(self.engine, workload)
        self.requests = make_requests(workload, prompt_token_pool(self.engine.tokenizer))

    def run(self, label: str) -> None:
        for r in self.requests:
            self.engine.add_request(r.prompt_ids, r.adapter, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
        before, t0, tokens = thread_cpu(), time.perf_counter(), 0
        while self.engine.has_unfinished:
            tokens += len(self.engine.step())
        wall = time.perf_counter() - t0
        after = thread_cpu()
        busy = sorted((after[t] - before.get(t, 0.0) for t in after if after[t] - before.get(t, 0.0) >= 0.1), reverse=True)
        print(f"{label:24s} {tokens / wall:6.1f} tokens/s  wall {wall:5.1f} s  busy threads' CPU s: "
              + ", ".join(f"{c:.1f}" for c in busy), flush=True)


def on_own_thread(work: Workload) -> None:
    t = threading.Thread(target=work.run, args=("own thread",))
    t.start()
    t.join()


def after_side_op(work: Workload) -> None:
    done = threading.Event()
    side = threading.Thread(target=lambda: (torch.ones(1 << 17).to(torch.bfloat16), done.wait()))
    side.start()
    try:
        work.run("main, after a side op")
    finally:
        done.set()
        side.join()


def main() -> None:
    if sys.argv[1:] == ["--main-only"]:
        work = Workload()
        work.run("warm-up")
        work.run("main, spin 100")
        return
    work = Workload()
    work.run("warm-up")
    for _ in range(2):
        work.run("main")
        on_own_thread(work)
    subprocess.run([sys.executable, __file__, "--main-only"], env={**os.environ, "GOMP_SPINCOUNT": "100"}, check=True)
    after_side_op(work)  # last, in case the side thread's team outlived it


if __name__ == "__main__":
    main()
