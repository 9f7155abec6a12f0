"""The unified setting: a fine-tuning job runs while inference requests arrive, swept over rates.

- loramux: one engine; the job's TRAIN rows share every step with the requests' PREFILL and DECODE
  rows, sized by the scheduler against the latency targets.
- transformers + PEFT, as one PEFT process must do it: a training step and an inference batch of the
  arrived requests take turns (peft_peer.run_take_turns).
Each system first trains alone for a while (its solo training tokens/s), then serves each rate's
requests while training. Reported per rate: SLO attainment, inference throughput, and training
tokens/s as a share of the solo figure.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from loramux.bench import peft_peer
from loramux.bench.engine_driver import run_engine, warm_up
from loramux.bench.finetune import LEARNING_RATE, peft_lora_kwargs
from loramux.bench.options import BenchOptions, EngineBench
from loramux.bench.records import RequestRecord, record_dicts, summarize
from loramux.bench.report import Table, line_plot
from loramux.bench.workload import make_requests, training_records
from loramux.engine.engine import parse_dtype
from loramux.lora.adapter import LoraConfig
from loramux.training.config import TrainingConfig

TRAINING_ADAPTER = "bench-train"


def _rate(tokens_over_time: list[tuple[float, int]]) -> float:
    """Tokens/s between the first and the last sample of a (seconds, cumulative tokens) series."""
    if len(tokens_over_time) < 2:
        return float("nan")
    (t0, n0), (t1, n1) = tokens_over_time[0], tokens_over_time[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


class UnifiedBench(EngineBench):
    def __init__(self, o: BenchOptions) -> None:
        super().__init__(o)
        self.requests = {label: make_requests(w, self.pool) for label, w in o.swept_workloads().items()}
        self.data = training_records(256, seed=o.workload.seed)
        self.samples = self.engine.load_data(self.data, 2048)  # the same samples for PEFT
        self.solo_seconds = 3.0 if o.quick else 20.0
        self.records: dict[str, dict[str, list[RequestRecord]]] = {}
        self.training: dict[str, dict] = {}

    def measure_loramux(self) -> None:
        engine = self.engine
        config = TrainingConfig(max_steps=100_000, batch_size=self.o.train_batch, learning_rate=LEARNING_RATE,
                                lr_schedule="constant")
        lora = LoraConfig(r=self.o.workload.rank, alpha=self.o.workload.alpha, target_modules="all-linear")
        job = engine.create_job(TRAINING_ADAPTER, self.data, lora=lora, training=config)
        # Alone means no request yet: outside the scheduler's serving window, as in a quiet server.
        self._train_alone("loramux", engine.step, lambda: job.train_tokens)
        warm_up(engine, self.o.workload.adapter_names[: self.o.workload.active_adapters], self.pool[:32])
        for label, requests in self.requests.items():
            progress = [(0.0, job.train_tokens)]
            self.records["loramux"][label] = run_engine(engine, requests, self.o.slo,
                                                        on_step=lambda t: progress.append((t, job.train_tokens)))
            self._report_rate("loramux", label, progress)
        job.cancel()
        del self.engine  # free its memory before the peer loads
        gc.collect()

    def measure_peft(self) -> None:
        model = peft_peer.load_peft(self.model_dir, self.adapter_dirs, parse_dtype(self.o.dtype),
                                    trainable={TRAINING_ADAPTER: peft_lora_kwargs(self.o.workload)})
        trainer = peft_peer.PeftTrainer(model, TRAINING_ADAPTER, self.samples, self.o.train_batch, LEARNING_RATE, self.pad_id)
        peft_peer.run_inference(model, self.requests[next(iter(self.requests))][:2], self.pad_id)  # warm-up
        self._train_alone("transformers + PEFT", trainer.step, lambda: trainer.tokens)
        for label, requests in self.requests.items():
            progress = [(0.0, trainer.tokens)]
            self.records["transformers + PEFT"][label] = peft_peer.run_take_turns(model, trainer, requests, self.pad_id,
                                                                                  progress=progress)
            self._report_rate("transformers + PEFT", label, progress)

    def _train_alone(self, system: str, step: Callable[[], object], tokens: Callable[[], int]) -> None:
        """Trains for `solo_seconds` with nothing else to do: the system's solo training tokens/s."""
        start = time.perf_counter()
        solo = [(0.0, tokens())]
        while time.perf_counter() - start < self.solo_seconds:
            step()
            solo.append((time.perf_counter() - start, tokens()))
        print(f"[bench] {system} training alone: {_rate(solo):.0f} tokens/s", flush=True)
        self.training[system] = {"solo_tokens_per_second": _rate(solo), "solo_progress": solo, "rates": {}}
        self.records[system] = {}

    def _report_rate(self, system: str, label: str, progress: list[tuple[float, int]]) -> None:
        s = summarize(self.records[system][label], self.o.ttft, self.o.tpot)
        share = _rate(progress) / self.training[system]["solo_tokens_per_second"]
        self.training[system]["rates"][label] = {"tokens_per_second": _rate(progress), "share_of_solo": share,
                                                 "progress": progress}
        print(f"[bench]   {system} at {label} req/s: SLO {100 * s['slo_attainment']:.0f}%, {s['output_tokens_per_second']:.1f} "
              f"output tok/s, training at {100 * share:.0f}% of solo", flush=True)

    def run_all(self) -> Path:
        self.measure_loramux()
        if self.o.peft:
            self.measure_peft()
        self.tabulate()
        path = self.run.finish()
        self.tmp.cleanup()
        return path

    def tabulate(self) -> None:
        o, run = self.o, self.run
        summaries = {s: {l: summarize(r, o.ttft, o.tpot) for l, r in by.items()} for s, by in self.records.items()}
        run.results = {"summaries": summaries, "training": self.training,
                       "records": {s: {l: record_dicts(r) for l, r in by.items()} for s, by in self.records.items()}}
        table = Table(f"Unified: a fine-tuning job (LoRA r={o.workload.rank}, {o.train_batch} samples/step) while "
                      f"{o.workload.num_requests} requests arrive ({o.workload.arrival}); targets TTFT {o.ttft:g} s, "
                      f"TPOT {1e3 * o.tpot:g} ms",
                      ["system", "rate req/s", "SLO attainment %", "output tok/s", "TTFT p90 s", "TPOT p90 ms",
                       "training tok/s", "% of solo training"])
        for system, by in summaries.items():
            for label, s in by.items():
                t = self.training[system]["rates"][label]
                table.rows.append([system, float(label), 100 * s["slo_attainment"], s["output_tokens_per_second"],
                                   s["ttft_p90"], 1e3 * s["tpot_p90"], t["tokens_per_second"], 100 * t["share_of_solo"]])
        solo = ", ".join(f"{s}: {t['solo_tokens_per_second']:.0f}" for s, t in self.training.items())
        table.note = f"Training tokens/s alone: {solo}."
        run.tables.append(table)
        rates = [float(l) for l in self.requests]
        run.plots.append(line_plot(run.plot("unified_slo_vs_rate.png"), "SLO attainment while fine-tuning",
                                   "arrival rate (req/s)", "% of requests",
                                   {s: (rates, [100 * by[f"{r:g}"]["slo_attainment"] for r in rates]) for s, by in summaries.items()}))
        run.plots.append(line_plot(run.plot("unified_throughput_vs_rate.png"), "Inference throughput while fine-tuning",
                                   "arrival rate (req/s)", "output tokens/s",
                                   {s: (rates, [by[f"{r:g}"]["output_tokens_per_second"] for r in rates]) for s, by in summaries.items()}))
        top = f"{max(rates):g}"
        series = {}
        for system, t in self.training.items():
            progress = t["rates"][top]["progress"]
            series[system] = ([p[0] for p in progress], _windowed_rate(progress))
        run.plots.append(line_plot(run.plot("unified_training_over_time.png"), f"Fine-tuning tokens/s at {top} req/s",
                                   "seconds", "training tokens/s (last 2 s)", series))


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
