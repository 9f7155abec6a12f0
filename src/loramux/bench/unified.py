"""The unified setting: a fine-tuning job runs while inference requests arrive, swept over rates
and over reply lengths (the workload's, and short replies: `short_output_tokens`, 16 by default).

- loramux: one engine; the job's TRAIN rows share every step with the requests' PREFILL and DECODE
  rows, sized by the scheduler against the latency targets.
- loramux DPO (`dpo`): the same with a DPO job on preference pairs made from the same data (the
  sorted words preferred to another sample's); its training tokens are the chosen and rejected
  sequences the adapter trains on, each of which also runs once more as the reference's rows.
- transformers + PEFT, as one PEFT process must do it: a training step and an inference batch of the
  arrived requests take turns (peft_peer.run_take_turns).
Each system first trains alone for a while (its solo training tokens/s), then serves each
workload's requests while training. Reported per workload: SLO attainment, inference throughput,
and training tokens/s as a share of the solo figure.

With `through_server` (`--http`) the one system is loramux as users run it (issue 19's promise):
`loramux serve` in a child process, the shipped reverse_words data uploaded and a fine-tuning job
created over the API with default settings, and the requests sent as streamed chat completions.
The job's speed is read from its `trained_tokens`, polled, between the optimizer steps seen in
each window.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from loramux.bench import peft_peer
from loramux.bench.engine_driver import run_engine, warm_up
from loramux.bench.finetune import LEARNING_RATE, peft_lora_kwargs
from loramux.bench.http_driver import JobProgress, loramux_server, run_http, served_models
from loramux.bench.options import BenchOptions, EngineBench, reply_label
from loramux.bench.records import RequestRecord, record_dicts, summarize
from loramux.bench.report import Table, line_plot
from loramux.bench.workload import make_requests, training_records
from loramux.client import Client
from loramux.datasets import shipped
from loramux.lora.adapter import LoraConfig
from loramux.model.dtype import parse_dtype
from loramux.training.config import TrainingConfig

TRAINING_ADAPTER = "bench-train"
DPO = "loramux DPO"
SERVER = "loramux HTTP"
SERVER_DATA = "reverse_words/train.jsonl"  # the shipped data the demo trains on
SERVER_MAX_STEPS = 1_000_000  # the server's job trains until the run cancels it


def _rate(tokens_over_time: list[tuple[float, int]]) -> float:
    """Tokens/s between the first and the last sample of a (seconds, cumulative tokens) series."""
    if len(tokens_over_time) < 2:
        return float("nan")
    (t0, n0), (t1, n1) = tokens_over_time[0], tokens_over_time[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


class UnifiedBench(EngineBench):
    def __init__(self, o: BenchOptions) -> None:
        super().__init__(o)
        self.workloads = o.reply_workloads()
        self.requests = {label: make_requests(w, self.pool) for label, w in self.workloads.items()}
        self.solo_seconds = 3.0 if o.quick else 20.0
        self.records: dict[str, dict[str, list[RequestRecord]]] = {}
        self.training: dict[str, dict] = {}

    def measure_loramux(self) -> list:
        """The engine in-process with the bench's job (and, with `dpo`, then with a DPO job); returns
        the supervised job's samples, tokenized, for PEFT."""
        data = training_records(256, seed=self.o.workload.seed)
        samples = self.engine.load_data(data, 2048)
        self._measure_job("loramux", data, "supervised")
        if self.o.dpo:
            self._measure_job(DPO, _preference_pairs(data), "dpo")
        del self.engine  # free its memory before the peer loads
        gc.collect()
        return samples

    def _measure_job(self, system: str, data: list[dict], method: str) -> None:
        """Trains alone, then serves each workload while training, with a new job of `method`."""
        engine = self.engine
        config = TrainingConfig(max_steps=100_000, batch_size=self.o.train_batch, learning_rate=LEARNING_RATE,
                                lr_schedule="constant", method=method)
        lora = LoraConfig(r=self.o.workload.rank, alpha=self.o.workload.alpha, target_modules="all-linear")
        job = engine.create_job(f"{TRAINING_ADAPTER}-{method}", data, lora=lora, training=config)
        # Alone means no request yet: outside the scheduler's serving window, as in a quiet server.
        self._train_alone(system, engine.step, lambda: job.train_tokens)
        warm_up(engine, self.o.workload.adapter_names[: self.o.workload.active_adapters], self.pool[:32])
        for label, requests in self.requests.items():
            progress = [(0.0, job.train_tokens)]
            self.records[system][label] = run_engine(engine, requests, self.o.slo,
                                                     on_step=lambda t: progress.append((t, job.train_tokens)))
            self._report_rate(system, label, progress)
        job.cancel()

    def measure_peft(self, samples: list) -> None:
        model = peft_peer.load_peft(self.model_dir, self.adapter_dirs, parse_dtype(self.o.dtype),
                                    trainable={TRAINING_ADAPTER: peft_lora_kwargs(self.o.workload)})
        trainer = peft_peer.PeftTrainer(model, TRAINING_ADAPTER, samples, self.o.train_batch, LEARNING_RATE, self.pad_id)
        peft_peer.run_inference(model, self.requests[next(iter(self.requests))][:2], self.pad_id)  # warm-up
        self._train_alone("transformers + PEFT", trainer.step, lambda: trainer.tokens)
        for label, requests in self.requests.items():
            progress = [(0.0, trainer.tokens)]
            self.records["transformers + PEFT"][label] = peft_peer.run_take_turns(model, trainer, requests, self.pad_id,
                                                                                  progress=progress)
            self._report_rate("transformers + PEFT", label, progress)

    def measure_server(self) -> None:
        """loramux as users run it: `loramux serve` with the workload's adapters; the shipped
        reverse_words data uploaded through /v1/files and a job created through /v1/fine_tuning/jobs
        with default settings but max_steps (so that it trains until the run cancels it). Its solo
        speed first, with no request yet (outside the server's serving window); then each
        workload's requests as streamed chat completions. The job is cancelled at the end."""
        decode = self.engine.tokenizer.decode
        del self.engine  # free its memory for the server's
        gc.collect()
        data_dir = Path(self.tmp.name) / "server-data"
        with loramux_server(self.o, self.adapter_dirs, data_dir, self.run.plot("loramux-serve.log")) as url:
            client = Client(url)
            models = served_models(url, self.adapter_dirs)
            upload = client.upload(str(shipped(SERVER_DATA)))
            job = client.create_job({"model": models[None], "training_file": upload["id"],
                                     "training": {"max_steps": SERVER_MAX_STEPS}})
            try:
                with JobProgress(client, job["id"]) as solo:
                    solo.wait(self.solo_seconds)
                self._solo(SERVER, solo.progress)
                run_http(url, self.requests[next(iter(self.requests))][:2], models, decode)  # warm-up
                for label, requests in self.requests.items():
                    with JobProgress(client, job["id"]) as watch:
                        self.records[SERVER][label] = run_http(url, requests, models, decode)
                    self._report_rate(SERVER, label, watch.progress)
            finally:
                cancelled = client.cancel_job(job["id"])
            self.training[SERVER]["job"] = cancelled  # the job object as the API shows it, settings included

    def _train_alone(self, system: str, step: Callable[[], object], tokens: Callable[[], int]) -> None:
        """Trains for `solo_seconds` with nothing else to do: the system's solo training tokens/s."""
        start = time.perf_counter()
        solo = [(0.0, tokens())]
        while time.perf_counter() - start < self.solo_seconds:
            step()
            solo.append((time.perf_counter() - start, tokens()))
        self._solo(system, solo)

    def _solo(self, system: str, progress: list[tuple[float, int]]) -> None:
        """Records a system's solo training progress and opens its results."""
        print(f"[bench] {system} training alone: {_rate(progress):.0f} tokens/s", flush=True)
        self.training[system] = {"solo_tokens_per_second": _rate(progress), "solo_progress": progress, "rates": {}}
        self.records[system] = {}

    def _report_rate(self, system: str, label: str, progress: list[tuple[float, int]]) -> None:
        s = summarize(self.records[system][label], self.o.ttft, self.o.tpot)
        share = _rate(progress) / self.training[system]["solo_tokens_per_second"]
        self.training[system]["rates"][label] = {"tokens_per_second": _rate(progress), "share_of_solo": share,
                                                 "progress": progress}
        print(f"[bench]   {system}, {label}: SLO {100 * s['slo_attainment']:.0f}%, TPOT p50/p90 {1e3 * s['tpot_p50']:.0f}/"
              f"{1e3 * s['tpot_p90']:.0f} ms, {s['output_tokens_per_second']:.1f} output tok/s, training at "
              f"{100 * share:.0f}% of solo", flush=True)

    def run_all(self) -> Path:
        if self.o.through_server:
            self.measure_server()
        else:
            samples = self.measure_loramux()
            if self.o.peft:
                self.measure_peft(samples)
        self.tabulate()
        path = self.run.finish()
        self.tmp.cleanup()
        return path

    def _title(self) -> str:
        o = self.o
        arrivals = f"{o.workload.num_requests} requests per workload arrive ({o.workload.arrival})"
        targets = f"targets TTFT {o.ttft:g} s, TPOT {1e3 * o.tpot:g} ms"
        if o.through_server:
            return (f"Unified through `loramux serve`: a fine-tuning job with default settings on {SERVER_DATA} while "
                    f"{arrivals} as streamed chat completions; {targets}")
        job = "a fine-tuning job" + (" (and, for loramux DPO, a DPO job of pairs)" if o.dpo else "")
        return f"Unified: {job} (LoRA r={o.workload.rank}, {o.train_batch} samples/step) while {arrivals}; {targets}"

    def tabulate(self) -> None:
        o, run = self.o, self.run
        summaries = {s: {l: summarize(r, o.ttft, o.tpot) for l, r in by.items()} for s, by in self.records.items()}
        run.results = {"summaries": summaries, "training": self.training,
                       "records": {s: {l: record_dicts(r) for l, r in by.items()} for s, by in self.records.items()}}
        table = Table(self._title(), ["system", "reply tokens", "rate req/s", "SLO attainment %", "output tok/s",
                                      "TTFT p90 s", "TPOT p50 ms", "TPOT p90 ms", "training tok/s", "% of solo training"])
        for system, by in summaries.items():
            for label, s in by.items():
                w, t = self.workloads[label], self.training[system]["rates"][label]
                table.rows.append([system, w.output_tokens, w.rate, 100 * s["slo_attainment"], s["output_tokens_per_second"],
                                   s["ttft_p90"], 1e3 * s["tpot_p50"], 1e3 * s["tpot_p90"], t["tokens_per_second"],
                                   100 * t["share_of_solo"]])
        solo = ", ".join(f"{s}: {t['solo_tokens_per_second']:.0f}" for s, t in self.training.items())
        lengths = "exactly" if o.workload.fixed_lengths else "the median of lognormal lengths"
        table.note = (f"Reply tokens: each request's output length, {lengths}. SLO attainment: the share of requests within "
                      f"both targets. Training tokens/s alone: {solo}.")
        if o.dpo:
            table.note += (" loramux DPO's training tokens are its pairs' chosen and rejected sequences (each also runs as "
                           "the reference's rows, which are not counted).")
        if o.through_server:
            table.note += (" The job's tokens/s are read from its trained_tokens, polled every 0.2 s, between the first "
                           "and the last optimizer step seen in each window.")
        run.tables.append(table)
        rates = list(o.rates)

        def series(figure: Callable[[dict], float]) -> dict[str, tuple[list, list]]:
            return {_series(s, n): (rates, [figure(by[reply_label(n, r)]) for r in rates])
                    for s, by in summaries.items() for n in o.reply_lengths}

        run.plots.append(line_plot(run.plot("unified_slo_vs_rate.png"), "SLO attainment while fine-tuning",
                                   "arrival rate (req/s)", "% of requests", series(lambda s: 100 * s["slo_attainment"])))
        run.plots.append(line_plot(run.plot("unified_throughput_vs_rate.png"), "Inference throughput while fine-tuning",
                                   "arrival rate (req/s)", "output tokens/s", series(lambda s: s["output_tokens_per_second"])))
        top = max(rates)
        progress = {_series(s, n): t["rates"][reply_label(n, top)]["progress"]
                    for s, t in self.training.items() for n in o.reply_lengths}
        run.plots.append(line_plot(run.plot("unified_training_over_time.png"), f"Fine-tuning tokens/s at {top:g} req/s",
                                   "seconds", "training tokens/s (last 2 s)",
                                   {k: ([p[0] for p in v], _windowed_rate(v)) for k, v in progress.items()}))


def _preference_pairs(records: list[dict]) -> list[dict]:
    """Preference pairs (OpenAI's DPO format) from prompt/completion records: each prompt as a user
    message, its completion preferred to the next record's."""
    return [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
             "preferred_output": [{"role": "assistant", "content": r["completion"].strip()}],
             "non_preferred_output": [{"role": "assistant", "content": records[(i + 1) % len(records)]["completion"].strip()}]}
            for i, r in enumerate(records)]


def _series(system: str, reply_tokens: int) -> str:
    return f"{system}, {reply_tokens}-token replies"

def _windowed_rate(progress: list[tuple[float, int]], window: float = 2.0) -> list[float]:
    """Tokens/s over the `window` seconds before each sample of a (seconds, cumulative tokens) series."""
    out, j = [], 0
    for t, n in progress:
        while progress[j][0] < t - window:
            j += 1
        t0, n0 = progress[j] if progress[j][0] < t else (t - window, n)
        out.append((n - n0) / (t - t0) if t > t0 else 0.0)
    return out


def run(options: BenchOptions) -> Path:
    return UnifiedBench(options).run_all()
