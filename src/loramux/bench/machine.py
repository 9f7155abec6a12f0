"""The machine a run ran on, whether it was idle, and its roofline: matmul FLOP/s and memory bandwidth.

The compute bound of a decoder is `matmul FLOP/s / (2 x parameters)` tokens/s: every token costs one
multiply-add per weight. A throughput is stated as a fraction of that bound, in the run's dtype.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Callable

import torch
import torch.nn.functional as F

from loramux.config import ModelConfig

IDLE_SHARE = 0.05  # the run counts as alone on the machine when other processes used less of the CPU


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("loramux", "torch", "transformers", "peft")},
        "cuda": torch.cuda.is_available(),
    }


def _busy_cpu_seconds() -> float:
    """CPU seconds every process together has been busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


_unreaped_cpu_seconds = 0.0  # CPU time of helpers' workers that os.times() never sees (see stop_session)


def _reaped_children_cpu_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _own_cpu_seconds() -> float:
    """CPU seconds of this process, of the children it has waited for (servers, scenarios), and of
    their workers that nobody waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _unreaped_cpu_seconds


def proc_stat(path: str) -> tuple[int, float]:
    """(session id, CPU seconds so far) of the process or thread whose /proc stat file is `path`."""
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on: the name may hold spaces
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def session_cpu_seconds(session: int) -> float:
    """CPU seconds used so far by the live processes of a session."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            sid, seconds = proc_stat(f"/proc/{entry.name}/stat")
        except OSError:  # it ended meanwhile
            continue
        if sid == session:
            total += seconds
    return total


def stop_session(leader: subprocess.Popen, stop: Callable[[], None]) -> None:
    """Runs `stop`, which ends and waits for `leader` (a process started in a session of its own),
    and counts as this run's own the CPU time of the session's workers that waiting for the leader
    did not bring into os.times(): vLLM's engine process, for one, is not waited for by its server."""
    global _unreaped_cpu_seconds
    session, reaped = session_cpu_seconds(leader.pid), _reaped_children_cpu_seconds()
    stop()
    _unreaped_cpu_seconds += max(session - (_reaped_children_cpu_seconds() - reaped), 0.0)


class LoadMonitor:
    """Whether a run had the machine to itself: the CPU time all processes used during the run minus
    this process's and its children's, as a share of the machine's capacity over the run."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()[0]
        self.start, self.busy, self.own = time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds()

    def result(self) -> dict:
        wall = time.monotonic() - self.start
        other = max(0.0, (_busy_cpu_seconds() - self.busy) - (_own_cpu_seconds() - self.own))
        share = other / max(wall * (os.cpu_count() or 1), 1e-9)
        return {"load_average_1m_before": self.load_before, "other_cpu_seconds": other, "other_cpu_share": share,
                "idle": share < IDLE_SHARE}


def matmul_flops(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a square matmul in `dtype` (best of repeated timed batches)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def memory_bandwidth(megabytes: int = 256, seconds: float = 1.0) -> float:
    """Bytes/s of a large copy (bytes read + bytes written), best of repeats."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    return best


def linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear a decode step runs: 7 per layer, then the output projection."""
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * config.num_layers + [(config.vocab_size, h)]


def linears_step_seconds(config: ModelConfig, rows: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best time of the model's linear layers alone (own random weights, so they stream from memory as
    real ones do) over `rows` rows: what a decode step of that batch costs before anything else."""
    weights = [torch.randn(o, i).to(dtype) for o, i in linear_shapes(config)]
    inputs = {i: torch.randn(rows, i).to(dtype) for _, i in linear_shapes(config)}
    best, end = math.inf, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > end:
            return best


def roofline(config: ModelConfig, num_parameters: int, seconds: float = 1.0, rows: int = 32) -> dict:
    """Measured peaks and, per dtype, the model's compute bound in tokens/s (square-matmul peak FLOP/s
    / 2 x parameters) and the linear layers' own bound at a `rows`-row decode step."""
    out = {"parameters": num_parameters, "memory_bandwidth_gb_s": memory_bandwidth(seconds=seconds) / 1e9,
           "linears": len(linear_shapes(config)), "linears_rows": rows}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        flops = matmul_flops(dtype, seconds=seconds)
        out[f"matmul_gflop_s_{name}"] = flops / 1e9
        out[f"compute_bound_tokens_s_{name}"] = flops / (2 * num_parameters)
        out[f"linears_bound_tokens_s_{name}"] = rows / linears_step_seconds(config, rows, dtype, seconds)
    return out
