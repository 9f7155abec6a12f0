"""The benchmark harness: its workloads and figures against hand-computed values, and each setting's
quick mode run as a user would (`loramux bench SETTING --quick`), checked for well-formed reports
(not for speed)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest

from live_server import tiny_model_dir  # also puts scripts/ on sys.path
from loramux.bench.machine import _own_cpu_seconds, stop_session
from loramux.bench.records import RequestRecord, percentile, summarize
from loramux.bench.server_stats import ServerStats
from loramux.bench.workload import Workload, make_requests, training_records
from loramux.cli import _latency_summary, main
from loramux.engine.engine import Engine
from loramux.engine.requests import SLO, RequestMetrics
from loramux.engine.sampling import SamplingParams
from random_llama import LLAMA_3_2_1B, build_random_llama  # noqa: E402  (scripts/)

POOL = list(range(1000, 9000))


def test_cpu_of_a_servers_unreaped_workers_counts_as_the_runs_own(tmp_path):
    """A server that starts a busy worker and never waits for it (vLLM's engine process): its CPU
    time must not make the run look like it shared the machine with other processes. The worker
    spins until it has used 1.1 CPU seconds (however long that takes on a busy machine: the tenth
    covers the kernel's accounting in clock ticks, which can read a few ticks short), then says so
    and sleeps."""
    done = tmp_path / "worker-done"
    worker = f"import time\nwhile time.process_time() < 1.1: pass\nopen({str(done)!r}, 'w').close()\ntime.sleep(60)"
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    before = _own_cpu_seconds()
    proc = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not done.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the worker never finished its CPU second"
            time.sleep(0.05)
    finally:
        stop_session(proc, lambda: (os.killpg(proc.pid, signal.SIGKILL), proc.wait()))
    assert _own_cpu_seconds() - before >= 1.0  # the worker's CPU second, though nobody reaped it


def test_workload_is_deterministic_and_sized():
    w = Workload(num_requests=50, fixed_lengths=True, prompt_tokens=64, output_tokens=32, arrival="poisson", rate=2.0)
    a, b = make_requests(w, POOL), make_requests(w, POOL)
    assert a == b
    assert all(len(r.prompt_ids) == 64 and r.max_tokens == 32 for r in a)
    assert [r.arrival for r in a] == sorted(r.arrival for r in a) and a[0].arrival == 0.0
    assert make_requests(Workload(seed=1), POOL) != make_requests(Workload(seed=0), POOL)


def test_varied_lengths_stay_within_bounds():
    w = Workload(num_requests=400, fixed_lengths=False, prompt_tokens=64, output_tokens=64, min_tokens=8,
                 max_prompt_tokens=200, max_output_tokens=100)
    reqs = make_requests(w, POOL)
    prompts, outputs = [len(r.prompt_ids) for r in reqs], [r.max_tokens for r in reqs]
    assert min(prompts) >= 8 and max(prompts) <= 200 and min(outputs) >= 8 and max(outputs) <= 100
    assert 50 <= statistics.median(prompts) <= 80 and len(set(prompts)) > 20


@pytest.mark.parametrize("arrival,cv_low,cv_high", [("poisson", 0.8, 1.2), ("bursty", 2.0, 4.5)])
def test_arrival_processes_have_their_rate_and_burstiness(arrival, cv_low, cv_high):
    w = Workload(num_requests=4000, arrival=arrival, rate=4.0, burst_cv=3.0)
    times = [r.arrival for r in make_requests(w, POOL)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.15)
    assert cv_low < statistics.stdev(gaps) / statistics.mean(gaps) < cv_high


def test_adapter_assignment_uniform_and_zipf():
    uniform = Counter(r.adapter for r in make_requests(Workload(num_requests=64, num_adapters=8, active_adapters=4), POOL))
    assert uniform == {f"bench-{i}": 16 for i in range(4)}
    zipf = Counter(r.adapter for r in make_requests(
        Workload(num_requests=2000, num_adapters=16, active_adapters=16, skew="zipf", zipf_s=1.1), POOL))
    weights = [1 / (k + 1) ** 1.1 for k in range(16)]
    assert zipf["bench-0"] / 2000 == pytest.approx(weights[0] / sum(weights), abs=0.03)
    assert zipf["bench-0"] > zipf["bench-3"] > zipf["bench-15"]


def test_a_shared_prefix_workload_starts_every_prompt_with_its_adapters_system_prompt():
    plain = Workload(num_requests=40, num_adapters=3, active_adapters=3, prompt_tokens=16, fixed_lengths=True)
    shared = make_requests(dataclasses.replace(plain, shared_prefix_tokens=100), POOL)
    prefixes = {}
    for r, own in zip(shared, make_requests(plain, POOL)):
        assert len(r.prompt_ids) == 116 and r.prompt_ids[100:] == own.prompt_ids  # the same requests after it
        prefixes.setdefault(r.adapter, set()).add(tuple(r.prompt_ids[:100]))
    assert all(len(p) == 1 for p in prefixes.values()) and len({p.pop() for p in prefixes.values()}) == 3


def test_bad_workloads_are_refused():
    for kwargs in ({"arrival": "sometimes"}, {"skew": "heavy"}, {"arrival": "bursty", "burst_cv": 0.5},
                   {"active_adapters": 5}, {"arrival": "poisson", "rate": 0}, {"shared_prefix_tokens": -1}):
        with pytest.raises(ValueError):
            Workload(**kwargs)


def test_summary_against_hand_computed_figures():
    records = [
        RequestRecord(0, "a", arrival=0.0, prompt_tokens=4, max_tokens=11, first_token=0.5, finished=1.5, output_tokens=11),  # tpot 0.1
        RequestRecord(1, "a", arrival=1.0, prompt_tokens=4, max_tokens=11, first_token=4.0, finished=5.0, output_tokens=6),  # ttft 3
        RequestRecord(2, None, arrival=2.0, prompt_tokens=4, max_tokens=11, first_token=2.2, finished=4.2, output_tokens=5),  # tpot 0.5
        RequestRecord(3, None, arrival=3.0, prompt_tokens=4, max_tokens=5, error="HTTP 500"),
    ]
    s = summarize(records, ttft_target=2.0, tpot_target=0.25)
    assert s["completed"] == 3 and s["errors"] == 1 and s["output_tokens"] == 22
    assert s["seconds"] == 5.0 and s["output_tokens_per_second"] == pytest.approx(22 / 5)
    assert s["slo_attainment"] == 0.25  # only request 0 meets both targets
    assert s["ttft_p50"] == pytest.approx(0.5) and s["tpot_p50"] == pytest.approx(0.2)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_training_records_are_a_sorting_task():
    r = training_records(3, words_per_sample=5, seed=1)
    assert len(r) == 3
    words = r[0]["prompt"].split(": ", 1)[1].split("\n")[0].split()
    assert r[0]["completion"].split() == sorted(words) and len(words) == 5


def _bench(tmp_path, setting: str, *extra: str) -> dict:
    out = tmp_path / setting
    proc = subprocess.run([sys.executable, "-m", "loramux.cli", "bench", setting, "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["setting"] == setting and report["config"]["quick"] is True
    assert report["roofline"]["matmul_gflop_s_float32"] > 0 and report["roofline"]["linears_bound_tokens_s_bfloat16"] > 0
    assert 0 <= report["load"]["other_cpu_share"] and report["machine"]["torch_threads"] >= 1
    md = (out / "report.md").read_text()
    assert "| system" in md or "| scenario" in md
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in md
    return report


def _assert_complete(records: list[dict]) -> None:
    """Every request finished without error with exactly its requested number of tokens."""
    assert records and all(r["error"] is None and r["finished"] is not None for r in records)
    assert all(r["first_token"] >= r["arrival"] - 1e-6 and r["finished"] >= r["first_token"] for r in records)
    assert all(r["output_tokens"] == r["max_tokens"] for r in records)


@pytest.mark.integration
def test_quick_inference_setting(tmp_path):
    report = _bench(tmp_path, "inference")
    summaries, records = report["results"]["summaries"], report["results"]["records"]
    rate = f"{report['config']['rates'][0]:g}"  # quick mode: the highest default rate only
    assert {"loramux", "loramux HTTP", "transformers + PEFT", "loramux, bare base model",
            "loramux, 16 of 64 adapters", "loramux, 1 of 64 adapters"} <= set(summaries)
    for system in ("loramux", "loramux HTTP", "transformers + PEFT"):
        assert set(summaries[system]) == {"offline", rate}
        for label, recs in records[system].items():
            _assert_complete(recs)
            assert summaries[system][label]["completed"] == 4
    assert "vLLM skipped: no --vllm-python" in (tmp_path / "inference" / "report.md").read_text()
    # the same workload went to every system: identical token counts per request
    counts = {s: sorted((r["index"], r["output_tokens"]) for r in records[s][rate]) for s in ("loramux", "loramux HTTP", "transformers + PEFT")}
    assert counts["loramux"] == counts["loramux HTTP"] == counts["transformers + PEFT"]


@pytest.mark.integration
def test_quick_finetune_setting(tmp_path):
    report = _bench(tmp_path, "finetune")
    scenarios = report["results"]["scenarios"]
    assert set(scenarios) == {"loramux-1", "loramux-2", "peft-1", "peft-2"}
    for name, r in scenarios.items():
        assert len(r["losses"]) == int(name[-1]) and all(len(c) == 2 and all(math.isfinite(x) for x in c) for c in r["losses"])
        assert r["tokens"] > 0 and r["peak_mb"] > r["training_peak_mb"] > 0
    # two adapters: PEFT trains both on the same batches, loramux's jobs shuffle by their own seeds
    assert scenarios["peft-2"]["tokens"] == 2 * scenarios["peft-1"]["tokens"]
    assert 1.5 < scenarios["loramux-2"]["tokens"] / scenarios["loramux-1"]["tokens"] < 2.5


def _assert_unified(report: dict, out, systems: set[str]) -> None:
    """Both reply lengths at the (one) quick rate, for every system: complete requests of their
    length, a solo training speed, and a training speed and share of solo beside the requests."""
    config, results = report["config"], report["results"]
    rate = config["rates"][0]
    lengths = {config["workload"]["output_tokens"], config["short_output_tokens"]}
    assert config["short_output_tokens"] == 16 and len(lengths) == 2  # the short replies are swept by default
    labels = {f"{n} tokens, {rate:g} req/s" for n in lengths}
    assert set(results["training"]) == set(results["summaries"]) == systems
    for system, t in results["training"].items():
        assert t["solo_tokens_per_second"] > 0 and len(t["solo_progress"]) >= 2
        assert set(t["rates"]) == set(results["summaries"][system]) == labels
        for label, r in t["rates"].items():
            assert r["tokens_per_second"] >= 0 or math.isnan(r["tokens_per_second"])  # a quick window may see no step end
            records = results["records"][system][label]
            _assert_complete(records)
            assert {rec["max_tokens"] for rec in records} <= set(range(4, 17))
    md = (out / "report.md").read_text()
    assert all(f"| {system} | {n} | {rate:g} |" in md for system in systems for n in lengths)


@pytest.mark.integration
def test_quick_unified_setting(tmp_path):
    report = _bench(tmp_path, "unified")
    _assert_unified(report, tmp_path / "unified", {"loramux", "transformers + PEFT"})
    for system, t in report["results"]["training"].items():
        # training went on while serving: in some window (a quick window on a busy machine may
        # see no optimizer step end, so not necessarily in every one)
        assert any(r["tokens_per_second"] > 0 for r in t["rates"].values()), t["rates"]


@pytest.mark.integration
def test_quick_unified_setting_through_the_server(tmp_path):
    """`--http`: `loramux serve` in a child process, a fine-tuning job of default settings made over
    the API, chat completions; the job is cancelled and the server stopped at the end."""
    report = _bench(tmp_path, "unified", "--http")
    assert report["config"]["through_server"] is True and report["config"]["peers"]["peft"] is False
    _assert_unified(report, tmp_path / "unified", {"loramux HTTP"})
    job = report["results"]["training"]["loramux HTTP"]["job"]
    assert job["status"] == "cancelled" and job["trained_tokens"] > 0
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert job["training"]["max_steps"] == 1_000_000 and job["training"]["checkpoint_every"] == 10
    for records in report["results"]["records"]["loramux HTTP"].values():  # chat: the template lengthens the prompt
        assert all(r["prompt_tokens"] > 16 for r in records)
    with pytest.raises(httpx.HTTPError):  # the server is gone
        httpx.get("http://127.0.0.1:8310/v1/models", timeout=2.0)


def test_many_adapters_through_the_server_under_a_resident_limit(tmp_path):
    """`--max-adapters`: 12 adapters on disk, at most 4 resident in `loramux serve` (the tiny model):
    before each workload the server holds 4 others, so each of the 4 active adapters is loaded from
    disk and evicts one, and the one-adapter reference loads its one; the report has the cold-load
    figures and the ratio."""
    model = tiny_model_dir(tmp_path / "tiny")
    report = _bench(tmp_path, "inference", "--model", str(model), "--adapters", "12", "--active", "4", "--max-adapters", "4")
    config, results = report["config"], report["results"]
    assert config["max_adapters"] == 4 and config["peers"]["peft"] is False
    assert set(results["summaries"]) == {"loramux HTTP", "loramux HTTP, 1 adapter"}  # nothing that holds all 12
    for by_label in results["records"].values():
        for records in by_label.values():
            _assert_complete(records)
    many = results["many_adapters"]
    for label, window in many["loads"]["loramux HTTP"].items():
        assert window["loads"] == window["evictions"] == 4, label
        assert many["loads"]["loramux HTTP, 1 adapter"][label]["loads"] == 1
        assert 0 < many["ratios"][label] < math.inf
    assert many["whole_run"]["loads"] > 4 and many["whole_run"]["resident"] == 4
    assert many["memory"]["adapters_added"] == 4 and many["adapter_tensor_bytes"] > 0
    md = (tmp_path / "inference" / "report.md").read_text()
    assert "Many adapters: 12 on disk, at most 4 resident" in md
    for row in ("cold loads in the measured workloads (both systems) | 10 |", "load time p50 ms", "load time p99 ms",
                "server RSS growth per resident adapter MB"):
        assert row in md


def test_load_quantiles_from_the_histogram_as_prometheus_estimates_them():
    earlier = ServerStats(2, 0.01, ((0.01, 2.0), (0.05, 2.0), (math.inf, 2.0)), evictions=1, resident=3, rss_bytes=10)
    later = ServerStats(10, 0.31, ((0.01, 4.0), (0.05, 8.0), (math.inf, 10.0)), evictions=5, resident=4, rss_bytes=20)
    window = later - earlier  # 8 loads: 2 up to 10 ms, 4 in (10, 50] ms, 2 above
    assert (window.loads, window.evictions, window.resident) == (8, 4, 4)
    assert window.buckets == ((0.01, 2.0), (0.05, 6.0), (math.inf, 8.0))
    assert window.load_quantile(0.5) == pytest.approx(0.01 + 0.04 * (4 - 2) / (6 - 2))  # rank 4 within (10, 50] ms
    assert window.load_quantile(0.1) == pytest.approx(0.01 * 0.8 / 2)
    assert window.load_quantile(0.99) == 0.05  # in +Inf: the highest finite bound
    assert window.mean_load_seconds == pytest.approx(0.3 / 8)
    assert (window + window).loads == 16 and math.isnan(ServerStats(0, 0.0, (), 0, 0, 0).load_quantile(0.5))


def test_the_llama_3_2_1b_shaped_model_loads(tmp_path):
    """scripts/random_llama.py at one layer (the full model is 16, 2 GB): Llama-3.2-1B's width,
    attention and RoPE, the default model's vocabulary; loramux loads it and generates."""
    engine = Engine.load(str(build_random_llama(tmp_path / "llama", layers=1)), dtype="bfloat16")
    c = engine.model.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == (1, 2048, 8192, 32, 8)
    assert (c.rope.type, c.rope.factor, c.rope.theta, c.vocab_size) == ("llama3", 32.0, 500000.0, 49152)
    assert c.max_position_embeddings == LLAMA_3_2_1B["max_position_embeddings"]
    [out] = engine.generate([[1, 2, 3]], [None], params=SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("argv,named", [
    (["inference", "--adapters", "12", "--max-adapters", "4"], "--active 12 must be between 1 and --max-adapters 4"),
    (["inference", "--adapters", "200"], "--active 200 must be between 1 and --max-adapters 128"),  # the default limit
    (["inference", "--adapters", "4", "--max-adapters", "4"], "--max-adapters 4 must be below --adapters 4"),
    (["inference", "--adapters", "12", "--active", "4", "--max-adapters", "4", "--no-http"], "cannot be used with --no-http"),
    (["finetune", "--adapters", "12", "--active", "4", "--max-adapters", "4"], "--max-adapters applies to the inference setting only"),
    (["unified", "--http", "--no-peft", "--train-batch", "4"], "--no-peft, --train-batch cannot be used with --http"),
    (["inference", "--http"], "--http applies to the unified setting only"),
    (["unified", "--http", "--ttft", "1"], "--ttft and --tpot must be those"),
    (["finetune", "--short-output-tokens", "16"], "--short-output-tokens applies to the unified setting only"),
    (["unified", "--shared-prefix-tokens", "100"], "--shared-prefix-tokens applies to the inference setting only"),
])
def test_options_that_would_be_ignored_are_refused(argv, named, capsys, monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # what main() would set, undone after the test
    assert main(["bench", *argv, "--quick"]) == 2
    assert named in capsys.readouterr().err


def test_demo_latency_summary_from_the_requests_metrics():
    def request(ttft: float, tokens: int, tpot: float) -> SimpleNamespace:
        return SimpleNamespace(metrics=RequestMetrics(arrival=10.0, first_token=10.0 + ttft, num_output_tokens=tokens,
                                                      finished=10.0 + ttft + tpot * (tokens - 1)))

    requests = [request(0.5, 11, 0.1), request(3.0, 11, 0.1), request(0.2, 5, 0.5), request(1.0, 1, 0.0)]
    line = _latency_summary(requests, SLO(ttft=2.0, tpot=0.25))
    # within both: the first and the one-token request; TPOTs 0.1, 0.1, 0.5 (p50 0.1, p90 0.42)
    assert "4 requests" in line and "2 (50%) within both latency targets (TTFT 2 s, 250 ms per token)" in line
    assert "TTFT p50 0.75 s" in line and "time per token p50 100 ms, p90 420 ms" in line
