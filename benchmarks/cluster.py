"""`loramux serve` in one process against the same API from a Ray Serve cluster of 1 and of N
replicas (`serve --replicas`), measured in one run over HTTP with the bench's workload and client
(loramux.bench): streamed greedy completions with `ignore_eos`, rank-16 adapters on all linears.

- routing overhead: the median latency of `--probes` one-token completions sent one at a time, on
  the cluster of one replica less that of the single process (the ingress, the router and Ray's
  hops; the engine's work is the same);
- throughput: `--requests` requests over `--adapters` adapters, all at once, then Poisson arrivals
  at `--rate` requests/s: output tokens/s, TTFT and TPOT percentiles, SLO attainment.

The single process and the one-replica cluster get every core (torch threads = cores); N replicas
share them (cores / N threads each), so on one small machine the replicas show what the cluster
costs and how it spreads load, not more compute.

    .venv/bin/python benchmarks/cluster.py                     # the default model, float32, 2 replicas
    .venv/bin/python benchmarks/cluster.py --quick             # the tests' tiny model: checks the harness
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from loramux.bench.http_driver import run_http, server_process
from loramux.bench.machine import LoadMonitor, machine_info
from loramux.bench.options import loramux_command
from loramux.bench.records import summarize
from loramux.bench.workload import Workload, make_requests, prompt_token_pool
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter
from loramux.model.loader import load_tokenizer, resolve_model_dir

PORT = 8330
URL = f"http://127.0.0.1:{PORT}"


def write_adapters(model_dir: Path, names: list[str], root: Path) -> dict[str, Path]:
    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    return {name: save_peft_adapter(LoraAdapter.create(name, LoraConfig(r=16, alpha=32, target_modules="all-linear"), config,
                                                       generator=torch.Generator().manual_seed(i), init_b="random"), root / name)
            for i, name in enumerate(names)}


def probe_latency(model: str, probes: int) -> float:
    """Median seconds of a one-token completion, sent one at a time (after two to warm up)."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    times = []
    with httpx.Client(base_url=URL, timeout=60) as client:
        for i in range(probes + 2):
            start = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, command: list[str], args, adapters: dict[str, Path], pool: list[int], base: str, out: Path) -> dict:
    workloads = {
        "all at once": Workload(num_requests=args.requests, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                num_adapters=len(adapters), active_adapters=len(adapters)),
        f"poisson {args.rate:g} req/s": Workload(num_requests=args.requests, prompt_tokens=args.prompt_tokens,
                                                  output_tokens=args.output_tokens, num_adapters=len(adapters),
                                                  active_adapters=len(adapters), arrival="poisson", rate=args.rate),
    }
    models = {None: base} | {n: n for n in adapters}
    result = {"system": name, "command": command}
    # from before the server starts to after it is stopped and reaped: its CPU time is then this
    # process's children's, not other processes'
    monitor = LoadMonitor()
    with tempfile.TemporaryDirectory() as data, server_process(command + ["--data-dir", data], URL, out / f"{name}.log"):
        result["probe_seconds"] = probe_latency(base, args.probes)
        run_http(URL, make_requests(workloads["all at once"], pool)[:4], models)  # every adapter loaded, every path warm
        for label, workload in workloads.items():
            result[label] = summarize(run_http(URL, make_requests(workload, pool), models), args.ttft, args.tpot)
    result["load"] = monitor.result()
    print(f"{name}: probe {1000 * result['probe_seconds']:.1f} ms, "
          + ", ".join(f"{label}: {result[label]['output_tokens_per_second']:.1f} tok/s" for label in workloads), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--ttft", type=float, default=2.0)
    parser.add_argument("--tpot", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="the tests' tiny model and a few requests")
    parser.add_argument("--out", default=None, help="directory for report.json and the servers' logs")
    args = parser.parse_args()
    out = Path(args.out or f"bench-results/cluster-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="loramux-cluster-bench-"))
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from tiny_model import build_tiny_model

        args.model, args.requests, args.probes = str(build_tiny_model(tmp / "tiny")), 8, 5
    name, model_dir = resolve_model_dir(args.model)
    adapters = write_adapters(model_dir, Workload(num_adapters=args.adapters).adapter_names, tmp / "adapters")
    pool = prompt_token_pool(load_tokenizer(model_dir))
    cores = os.cpu_count() or 1
    serve = loramux_command() + ["serve", "--port", str(PORT), "--dtype", args.dtype,
                                 *(["--model", args.model] if args.model else []),
                                 *[a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")]]
    systems = {
        "single process": serve,
        "cluster, 1 replica": serve + ["--replicas", "1", "--replica-cpus", str(cores), "--threads", str(cores)],
        f"cluster, {args.replicas} replicas": serve + ["--replicas", str(args.replicas)],
    }
    results = [measure(system, command, args, adapters, pool, name, out) for system, command in systems.items()]
    report = {"machine": machine_info(), "argv": sys.argv, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    single = results[0]
    print(f"\nrouting overhead per request: {1000 * (results[1]['probe_seconds'] - single['probe_seconds']):.1f} ms "
          f"(one-token completion: {1000 * single['probe_seconds']:.1f} ms in one process, "
          f"{1000 * results[1]['probe_seconds']:.1f} ms through a one-replica cluster)\n")
    print("| system | workload | output tok/s | vs one process | TTFT p50 / p90 s | TPOT p50 / p90 ms | SLO % | other load % |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for r in results:
        for label in (k for k in r if isinstance(r[k], dict) and "output_tokens_per_second" in r[k]):
            s, base_tps = r[label], single[label]["output_tokens_per_second"]
            print(f"| {r['system']} | {label} | {s['output_tokens_per_second']:.1f} | {s['output_tokens_per_second'] / base_tps:.2f} | "
                  f"{s['ttft_p50']:.2f} / {s['ttft_p90']:.2f} | {1000 * s['tpot_p50']:.0f} / {1000 * s['tpot_p90']:.0f} | "
                  f"{100 * s['slo_attainment']:.0f} | {100 * r['load']['other_cpu_share']:.0f} |")
    print(f"\nCPU: {report['machine']['cpu']}, {cores} cores; report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
