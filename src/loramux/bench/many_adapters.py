"""The inference setting with more adapters than `loramux serve` holds (`--max-adapters M`).

All N adapters of the workload are written to disk in PEFT's format, then loaded into the server
one by one through /v1/load_lora_adapter, which puts them in its catalog: it holds at most M and
loads the others on demand, evicting the least recently used idle one (server/resident.py).
(Through the API rather than N `--adapter` flags, so that the server times every load.) Two
systems on that server, taking turns workload by workload:
- "loramux HTTP": the workload, its requests over its --active adapters (uniform or zipf);
- "loramux HTTP, 1 adapter": the same requests, all on the first adapter: the reference the first
  is judged against (issue 19: at least 80% of its throughput).
Before each of them, the server's slots are filled with adapters the workload does not use (the
last min(M, N - active) of the catalog), one short request each, so that for both systems alike
each adapter's first request in the workload is a cold load that evicts another.

Beside the requests' figures: the cold loads in the measured workloads (count, p50/p99 estimated
from the server's histogram `loramux_adapter_load_seconds`, mean, evictions), and the memory of a
resident adapter: its tensor bytes (the first adapter as the server reads it), and the server's resident
memory growth, per adapter, from loading the filler adapters first (nothing evicted yet) and
serving a request on each, all at once (so the engine has made its stacked copies of their
weights, lora/ops.PackedLora or StackedLora).

The in-process engine and transformers + PEFT are left out: neither has a resident limit, so they
would hold all N adapters at once; so is vLLM (options.py refuses --vllm-python here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx

from loramux.bench.http_driver import loramux_server, run_http, served_models
from loramux.bench.report import Table
from loramux.bench.server_stats import ServerStats, server_stats
from loramux.bench.workload import BenchRequest

MANY = "loramux HTTP"
ONE_ADAPTER = "loramux HTTP, 1 adapter"
TARGET_RATIO = 0.8  # issue 19: throughput over many adapters at least 80% of one adapter's
MB = 2**20


class ManyAdapters:
    """Measures an InferenceBench's workloads (`bench.requests`) on `loramux serve --max-adapters`,
    recording the requests through `bench.record`. Made while the bench's engine is loaded (for
    the shapes); `measure` needs only the adapters on disk."""

    def __init__(self, bench) -> None:
        self.bench = bench
        o, w = bench.o, bench.o.workload
        self.filler = w.adapter_names[max(w.active_adapters, w.num_adapters - o.max_adapters):]
        first = w.adapter_names[0]  # as the server reads it: in the model's dtype
        self.adapter_bytes = sum(t.nbytes for t in bench.engine.read_adapter(first, bench.adapter_dirs[first]).parameters())
        self.windows: dict[str, dict[str, ServerStats]] = {MANY: {}, ONE_ADAPTER: {}}  # system -> workload -> its loads
        self.memory: dict[str, int] = {}
        self.whole_run: ServerStats | None = None

    def measure(self) -> None:
        b = self.bench
        names, one = b.o.workload.adapter_names, b.o.workload.adapter_names[0]
        tmp = Path(b.tmp.name)
        with loramux_server(b.o, {}, tmp / "server-data", b.run.plot("loramux-serve.log"), allow_adapter_dir=tmp) as url:
            models = served_models(url, names)
            run_http(url, b.base_requests[:2], models)  # warm-up on the base model: nothing is resident yet
            start = server_stats(url)
            self._load(url, self.filler)
            self._fill(url, models, max_tokens=8)  # steps over all of them at once: the engine's copies of their weights
            filled = server_stats(url)
            self.memory = {"adapters_added": filled.resident - start.resident, "rss_growth_bytes": filled.rss_bytes - start.rss_bytes}
            self._load(url, [n for n in names if n not in self.filler])
            for label, requests in b.requests.items():
                on_one = [dataclasses.replace(r, adapter=one) for r in requests]
                for system, reqs in ((ONE_ADAPTER, on_one), (MANY, requests)):
                    self._fill(url, models)
                    before = server_stats(url)
                    print(f"[bench] {system} ...", flush=True)
                    b.record(system, label, run_http(url, reqs, models))
                    self.windows[system][label] = server_stats(url) - before
            self.whole_run = server_stats(url) - start

    def _load(self, url: str, names: list[str]) -> None:
        """Loads these adapters into the server (and its catalog), one after the other."""
        with httpx.Client(base_url=url, timeout=600) as client:
            for name in names:
                body = {"lora_name": name, "lora_path": str(self.bench.adapter_dirs[name])}
                client.post("/v1/load_lora_adapter", json=body).raise_for_status()

    def _fill(self, url: str, models: dict, max_tokens: int = 1) -> None:
        """One short request on each filler adapter, all at once: they become the resident ones."""
        prompt = self.bench.pool[:8]
        requests = [BenchRequest(i, prompt, max_tokens, name, 0.0) for i, name in enumerate(self.filler)]
        failed = [r.error for r in run_http(url, requests, models) if r.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} of the requests filling the server's slots failed, e.g. {failed[0]}")

    def measured(self) -> ServerStats:
        """The loads and evictions of every measured workload of both systems, together."""
        windows = [s for by_label in self.windows.values() for s in by_label.values()]
        return sum(windows[1:], windows[0])

    def results(self, summaries: dict) -> dict:
        return {"max_adapters": self.bench.o.max_adapters, "filler_adapters": len(self.filler),
                "adapter_tensor_bytes": self.adapter_bytes, "memory": self.memory,
                "ratios": {label: self._ratio(summaries, label) for label in summaries[MANY]},
                "loads": {system: {label: dataclasses.asdict(s) for label, s in by_label.items()}
                          for system, by_label in self.windows.items()},
                "whole_run": dataclasses.asdict(self.whole_run)}

    @staticmethod
    def _ratio(summaries: dict, label: str) -> float:
        return summaries[MANY][label]["output_tokens_per_second"] / summaries[ONE_ADAPTER][label]["output_tokens_per_second"]

    def tables(self, summaries: dict) -> list[Table]:
        o, w = self.bench.o, self.bench.o.workload
        many = f"{w.active_adapters} of {w.num_adapters}"
        table = Table(f"Many adapters: {w.num_adapters} on disk, at most {o.max_adapters} resident "
                      f"(`loramux serve --max-adapters {o.max_adapters}`), requests over {w.active_adapters} ({w.skew})",
                      ["workload", f"output tok/s, {many} adapters", "output tok/s, 1 adapter", f"ratio (target {TARGET_RATIO:g})",
                       f"TTFT p90 s, {many}", "TTFT p90 s, 1", f"TPOT p90 ms, {many}", "TPOT p90 ms, 1", "cold loads", "evictions"])
        for label, s in summaries[MANY].items():
            one, loads = summaries[ONE_ADAPTER][label], self.windows[MANY][label]
            table.rows.append([label if label == "offline" else f"{label} req/s", s["output_tokens_per_second"],
                               one["output_tokens_per_second"], self._ratio(summaries, label), s["ttft_p90"], one["ttft_p90"],
                               1e3 * s["tpot_p90"], 1e3 * one["tpot_p90"], loads.loads, loads.evictions])
        table.note = (f"One server, the two systems taking turns workload by workload; before each, the server's slots were "
                      f"filled with {len(self.filler)} adapters the workload does not use, so every adapter's first request "
                      "in it was a cold load (the one-adapter run has one). Cold loads and evictions: the many-adapter "
                      "run's, from the server's /metrics. Not measured here: the in-process engine and transformers + PEFT, "
                      f"which have no resident limit and would hold all {w.num_adapters} adapters, and vLLM.")
        measured, whole = self.measured(), self.whole_run
        added, growth = self.memory["adapters_added"], self.memory["rss_growth_bytes"]
        cold = Table("Cold adapter loads (disk to servable) and memory per resident adapter", ["quantity", "value"], [
            ["cold loads in the measured workloads (both systems)", measured.loads],
            ["load time p50 ms (from the histogram's buckets)", 1e3 * measured.load_quantile(0.5)],
            ["load time p99 ms (from the histogram's buckets)", 1e3 * measured.load_quantile(0.99)],
            ["load time mean ms", 1e3 * measured.mean_load_seconds],
            ["evictions in the measured workloads", measured.evictions],
            [f"loads over the whole run (the {w.num_adapters} through the API, the fills), mean ms",
             f"{whole.loads}, {1e3 * whole.mean_load_seconds:.1f}"],
            [f"adapter tensors MB (rank {w.rank}, all linears, {o.dtype})", self.adapter_bytes / MB],
            [f"all {w.num_adapters} adapters resident would need, GB", w.num_adapters * self.adapter_bytes / 2**30],
            [f"server RSS growth per resident adapter MB ({added} loaded and served, none evicted)",
             growth / added / MB if added else float("nan")],
        ])
        cold.note = ("A load is the server's `loramux_adapter_load_seconds`: reading the PEFT files, evicting an idle "
                     "adapter if the limit needs it, and registering it, on the engine's thread between two steps. p50 "
                     "and p99 are interpolated within the histogram's buckets, as Prometheus's histogram_quantile does; "
                     "the mean is exact. RSS growth: the server's resident memory after the first adapters were loaded "
                     "through the API, up to the limit, and served one 8-token request each at once, less before (after "
                     "a warm-up on the base model), per adapter: the adapter's tensors, the engine's stacked copy of them "
                     "(lora/ops: bf16 PackedLora where the native LoRA kernel runs, else float32 StackedLora) and a KV block.")
        return [table, cold]
