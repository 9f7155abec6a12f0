"""The `loramux` command line.

Only the standard library and light loramux modules are imported at the top: each subcommand
imports what it runs (torch, the engine, the server), so `loramux --help`, `loramux serve --help`
and the client commands of a running server start without loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from loramux.bench.command import add_bench_parser
from loramux.config import CACHE_ENV
from loramux.model.dtype import AUTO, NAMED
from loramux.server.tool_parsers import DEFAULT_TOOL_PARSER, TOOL_PARSERS
from loramux.training.config import METHODS, TrainingConfig

BASE = "base"  # --use value meaning "no adapter"
DTYPE_HELP = ("auto: the model's own dtype where this CPU computes it fast (bfloat16 for a bf16, f16 or quantized "
              "model on a CPU with AVX512-BF16 or AMX), float32 otherwise; the choice is logged at start")


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def _add_model_options(p: argparse.ArgumentParser, dtype: str = AUTO, auto: bool = True) -> None:
    """--model, --cache-dir and --dtype, whose default is `dtype`. auto=False leaves auto out, for a
    run that must name its dtype (`loramux bench`: its peers run in the same one)."""
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="where converted models and compiled kernels are kept (env LORAMUX_CACHE_DIR)")
    p.add_argument("--dtype", default=dtype, choices=[AUTO, *NAMED] if auto else list(NAMED),
                   help=f"{DTYPE_HELP if auto else 'the dtype of loramux and its peers'} (default: {dtype})")


def _add_prefix_caching_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of a prompt's prefix computed for an earlier request of the same adapter "
                        "at the same weights (default: on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Fine-tune and serve many LoRA adapters on one shared base LLM, in the same forward passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts, with any adapters, in one mixed batch")
    _add_model_options(gen)
    gen.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                     help="load a PEFT LoRA adapter directory under NAME (repeatable)")
    gen.add_argument("--use", action="append", default=[], metavar="NAME",
                     help=f"adapter for the prompts: once for all, or once per prompt; '{BASE}' is the base model")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: lines of stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    _add_prefix_caching_option(gen)
    gen.set_defaults(run=_generate)

    ft = sub.add_parser("finetune", help="fine-tune a LoRA adapter on a JSONL file, with live progress")
    _add_model_options(ft, dtype="float32")  # a fine-tuning run's numbers stay float32's unless asked otherwise
    ft.set_defaults(dtype=None)  # float32 for local runs (`_engine`); None tells a --server run it was not given
    ft.add_argument("--data", required=True, help="training JSONL: {prompt, completion} or {messages: [...]} per line; "
                    "for --method dpo, {input: {messages}, preferred_output, non_preferred_output}")
    ft.add_argument("--val", default=None, help="validation JSONL, same format")
    ft.add_argument("--name", required=True, help="adapter name")
    ft.add_argument("--output-dir", default=None, help="where the adapter is written, in PEFT's format (local runs)")
    ft.add_argument("--server", default=None, metavar="URL", help="submit the job to a running `loramux serve` and follow it")
    ft.add_argument("--api-key", default=None, help="the server's API key (env LORAMUX_API_KEY)")
    ft.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT_DIR/checkpoints; a rerun resumes from the latest")
    ft.add_argument("--adapter-init", default=None, metavar="PATH",
                    help="start from this PEFT adapter (loaded as NAME-init; a copy is trained; with dpo it is the reference)")
    lora = ft.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--alpha", type=float, default=32.0)
    lora.add_argument("--dropout", type=float, default=0.0)
    lora.add_argument("--target-modules", default="all-linear", help="comma-separated, or all-linear")
    lora.add_argument("--rslora", action="store_true")
    hp = ft.add_argument_group("training")
    hp.add_argument("--method", default=TrainingConfig.method, choices=list(METHODS),
                    help="supervised fine-tuning, or DPO on preference pairs (default: %(default)s)")
    hp.add_argument("--beta", type=float, default=TrainingConfig.beta, help="dpo: the strength of the reference (default: %(default)s)")
    hp.add_argument("--epochs", type=int, default=3)
    hp.add_argument("--max-steps", type=int, default=None)
    hp.add_argument("--batch-size", type=int, default=8)
    hp.add_argument("--gradient-accumulation", type=int, default=1)
    hp.add_argument("--micro-batch-tokens", type=int, default=2048)
    hp.add_argument("--learning-rate", type=float, default=2e-4)
    hp.add_argument("--lr-schedule", default="linear", choices=["constant", "linear", "cosine"])
    hp.add_argument("--warmup-steps", type=int, default=0)
    hp.add_argument("--weight-decay", type=float, default=0.0)
    hp.add_argument("--max-grad-norm", type=float, default=1.0)
    hp.add_argument("--seed", type=int, default=0)
    hp.add_argument("--eval-every", type=int, default=0, help="optimizer steps between evaluations (0: at the end)")
    hp.add_argument("--checkpoint-every", type=int, default=TrainingConfig.checkpoint_every,
                    help="optimizer steps between checkpoints (default: %(default)s; 0: no step-based checkpoints)")
    hp.add_argument("--checkpoint-interval", type=float, default=TrainingConfig.checkpoint_interval, metavar="SECONDS",
                    help="seconds of training between checkpoints, whichever of the two comes first "
                         "(default: %(default)s; 0: no time-based checkpoints)")
    ft.set_defaults(run=_finetune)

    adapters = sub.add_parser("adapters", help="list, load or unload adapters of a running server")
    adapters.add_argument("action", choices=["list", "load", "unload"])
    adapters.add_argument("name", nargs="?", help="adapter name (load, unload)")
    adapters.add_argument("path", nargs="?", help="PEFT adapter directory on the server's machine (load)")
    adapters.add_argument("--server", required=True, metavar="URL")
    adapters.add_argument("--api-key", default=None, help="the server's API key (env LORAMUX_API_KEY)")
    adapters.set_defaults(run=_adapters)

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (inference and fine-tuning)")
    _add_model_options(serve)
    serve.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=PATH",
                       help="load a PEFT LoRA adapter directory under NAME at start (repeatable)")
    serve.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                       help="the base model's id in the API (default: the model's name); more names are aliases requests may use")
    serve.add_argument("--tool-call-parser", default=DEFAULT_TOOL_PARSER, choices=sorted(TOOL_PARSERS),
                       help="how tool calls are read from the model's output (default hermes: <tool_call>{...}</tool_call>, "
                            "SmolLM2's format; llama3_json: Llama 3's {\"name\", \"parameters\"} JSON)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default="./loramux-data", help="files, jobs, adapters and checkpoints (SQLite + files)")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 (env LORAMUX_API_KEY)")
    serve.add_argument("--allow-adapter-dir", action="append", default=[], metavar="DIR",
                       help="directories adapters may be loaded from over the API (the data dir always)")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="largest uploaded file")
    serve.add_argument("--kv-cache-mb", type=int, default=512, help="memory for the paged KV cache")
    serve.add_argument("--max-waiting", type=int, default=1024, help="queued requests beyond this get 429")
    _add_prefix_caching_option(serve)
    serve.add_argument("--max-adapters", type=int, default=0,
                       help="resident adapter limit; idle ones are evicted by LRU and reloaded on demand (0: none)")
    cluster = serve.add_argument_group("cluster (Ray Serve; needs `pip install loramux[ray]`, see README, Cluster)")
    cluster.add_argument("--replicas", type=int, default=0, metavar="N",
                         help="serve from N engine replicas on a Ray cluster behind one endpoint (default: one process, no Ray)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="join this Ray cluster (e.g. auto, or HEAD_IP:6379) instead of starting a local one")
    cluster.add_argument("--replica-cpus", type=float, default=None, metavar="C",
                         help="CPUs Ray reserves for each replica (default: this machine's CPUs / N, at least 1)")
    cluster.add_argument("--threads", type=int, default=None, metavar="T",
                         help="torch threads in each replica (default: --replica-cpus rounded down, at least 1)")
    cluster.add_argument("--max-ongoing-requests", type=int, default=None, metavar="M",
                         help="requests one replica takes at once before others get its adapters' requests too (default: 32)")
    serve.set_defaults(run=_serve)

    demo = sub.add_parser("demo", help="a tour on the default model")
    _add_model_options(demo)
    demo.set_defaults(run=_demo)

    add_bench_parser(sub, _add_model_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `loramux` command. It sets THP_MEM_ALLOC_ENABLE=1 (unless set) before anything imports
    torch, which reads it at its first CPU allocation: CPU tensors of 2 MB and more then sit on
    transparent huge pages, 2 MB-aligned, and go back to the operating system whole instead of
    fragmenting the C heap (a fine-tuning step's peak memory falls by about 200 MB of 1.7 GB at the
    same speed; docs/benchmarks.md). The processes a command starts inherit it. Set it to 0 to opt
    out. Importing loramux as a library sets nothing: its host decides (see README, Install)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "cache_dir", None):
        os.environ[CACHE_ENV] = args.cache_dir  # for the kernels, and the processes a command starts
    try:
        return args.run(args)
    # loramux's own errors derive from these: AdapterError, UnsupportedModelError, DataError, ServerError
    # (ValueError), UnknownAdapterError (LookupError); their messages are for the user, on one line.
    except (ValueError, LookupError) as e:
        print(f"loramux: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


def _engine(args, prefix_caching: bool = True):
    from loramux import Engine, EngineConfig, SchedulerConfig

    config = EngineConfig(scheduler=SchedulerConfig(enable_prefix_caching=prefix_caching))
    return Engine.load(args.model, cache=args.cache_dir, dtype=args.dtype or "float32", config=config)


def _generate(args) -> int:
    from loramux import SamplingParams

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT or write prompts on stdin, one per line")
    uses = args.use or [BASE]
    if len(uses) not in (1, len(prompts)):
        raise ValueError(f"--use given {len(uses)} times for {len(prompts)} prompts: give it once or once per prompt")
    adapters = [None if u == BASE else u for u in (uses * len(prompts) if len(uses) == 1 else uses)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = _engine(args, args.enable_prefix_caching)
    for name, path in args.adapter:
        engine.load_adapter(name, path)
    for prompt, out in zip(prompts, engine.generate(prompts, adapters, chat=args.chat, params=params)):
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": out.adapter, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}), flush=True)
        else:
            print(out.text, flush=True)
    return 0


def _serve(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.replicas:
        from loramux.cluster.launch import serve_cluster  # needs the loramux[ray] extra

        return serve_cluster(args)
    given = [f"--{n.replace('_', '-')}" for n in ("ray_address", "replica_cpus", "threads", "max_ongoing_requests")
             if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a cluster only: add --replicas N")
    from loramux.lora.peft_io import load_peft_adapter
    from loramux.server.app import create_app
    from loramux.server.process import serve
    from loramux.server.serve_options import given_adapter_record, serving_engine, serving_settings
    from loramux.server.store import DataDirLocked, Store

    settings = serving_settings(args)
    try:
        store = Store(args.data_dir)
    except DataDirLocked as e:
        raise ValueError(str(e)) from None
    engine = serving_engine(args)
    for name, path in args.adapter:
        load_peft_adapter(path, engine.model.config, name)  # refuse a bad one now, with its reason
        store.put_adapter(name, given_adapter_record(path))
    app = create_app(engine, store, settings)
    print(f"loramux serving {app.state.context.base_id} on http://{args.host}:{args.port}/v1 (data in {store.root})", flush=True)
    return serve(app, args.host, args.port)


def _client(args):
    from loramux.client import Client

    return Client(args.server, args.api_key or os.environ.get("LORAMUX_API_KEY"))


def _adapters(args) -> int:
    client = _client(args)
    if args.action == "list":
        for model in client.models():
            print(model["id"] + (f"  (adapter of {model['parent']})" if model.get("parent") else "  (base model)"))
        return 0
    if not args.name or (args.action == "load" and not args.path):
        raise ValueError(f"adapters {args.action} needs NAME" + (" and PATH" if args.action == "load" else ""))
    if args.action == "load":
        client.load_adapter(args.name, args.path)
    else:
        client.unload_adapter(args.name)
    print(f"{args.name}: {'loaded' if args.action == 'load' else 'unloaded'}")
    return 0


# Options of a local run that a server job has no use for: refused rather than ignored.
LOCAL_ONLY = {"output_dir": "--output-dir", "checkpoint_dir": "--checkpoint-dir", "adapter_init": "--adapter-init",
              "model": "--model", "cache_dir": "--cache-dir", "dtype": "--dtype"}


# TrainingConfig options the CLI passes as they are, locally and in a server job's `training` block
# (OpenAI's hyperparameters and the seed carry the rest).
TRAINING_OPTIONS = ("max_steps", "gradient_accumulation", "micro_batch_tokens", "lr_schedule", "warmup_steps",
                    "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every", "checkpoint_interval", "method", "beta")


def _training_options(args) -> dict:
    """The finetune command's TRAINING_OPTIONS; --max-grad-norm 0 means no clipping (None)."""
    return {name: getattr(args, name) for name in TRAINING_OPTIONS} | {"max_grad_norm": args.max_grad_norm or None}


def _finetune_on_server(args) -> int:
    given = [flag for name, flag in LOCAL_ONLY.items() if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to local runs only; a server job uses the server's model and "
                         "data directory (the fine-tuned model is served as soon as it exists)")
    client = _client(args)
    train = client.upload(args.data)
    val = client.upload(args.val) if args.val else None
    targets = args.target_modules if args.target_modules == "all-linear" else [t.strip() for t in args.target_modules.split(",")]
    hyperparameters = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.learning_rate / 2e-4}
    if args.method == "dpo":
        hyperparameters["beta"] = args.beta
    job = client.create_job({
        "model": client.models()[0]["id"], "training_file": train["id"], "validation_file": val["id"] if val else None,
        "suffix": args.name, "seed": args.seed,
        "method": {"type": args.method, args.method: {"hyperparameters": hyperparameters}},  # OpenAI's method block
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": args.dropout, "target_modules": targets, "use_rslora": args.rslora},
        "training": {k: v for k, v in _training_options(args).items() if k not in ("method", "beta")},
    })
    print(f"job {job['id']} submitted to {args.server}", file=sys.stderr, flush=True)
    progress = ProgressLine(sys.stderr)
    eval_loss = None
    for job, events in client.follow(job["id"]):
        for event in events:
            eval_loss = (event.get("data") or {}).get("eval_loss", eval_loss)
            progress.update(event["message"], event.get("data") or {}, eval_loss)
    progress.close()
    if job["status"] != "succeeded":
        raise ValueError(f"job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}")
    print(f"fine-tuned model {job['fine_tuned_model']!r} is served by {args.server}", flush=True)
    return 0


def _finetune(args) -> int:
    if args.server:
        return _finetune_on_server(args)
    if not args.output_dir:
        raise ValueError("--output-dir is required (or --server URL to train on a running server)")
    from loramux import LoraConfig, TrainingConfig

    targets = "all-linear" if args.target_modules == "all-linear" else tuple(t.strip() for t in args.target_modules.split(","))
    lora = LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets, use_rslora=args.rslora)
    training = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                              **_training_options(args))
    engine = _engine(args)
    start = f"{args.name}-init" if args.adapter_init else None
    if start:
        engine.load_adapter(start, args.adapter_init)
    job = engine.create_job(
        args.name, args.data, val=args.val, lora=None if start else lora, training=training, init_from=start,
        checkpoint_dir=args.checkpoint_dir or Path(args.output_dir) / "checkpoints", output_dir=args.output_dir,
    )
    progress = ProgressLine(sys.stderr)
    seen = 0
    while engine.has_work:
        engine.step()
        for event in job.events[seen:]:
            progress.update(event.message, event.data, job.last_eval_loss)
        seen = len(job.events)
    progress.close()
    if job.error:
        raise ValueError(job.error)
    print(f"adapter {args.name!r} written to {args.output_dir} ({job.step} steps, "
          f"train loss {job.last_train_loss:.4f}"
          + (f", eval loss {job.last_eval_loss:.4f}" if job.last_eval_loss is not None else "") + ")", flush=True)
    return 0


class ProgressLine:
    """A one-line progress bar redrawn in place on a terminal; one line per event otherwise."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.live = stream.isatty()

    def update(self, message: str, data: dict, eval_loss: float | None) -> None:
        """One job event: a progress line for step metrics, the message itself otherwise."""
        if "total_steps" not in data:
            self._print(message)
            return
        d = data
        done = d["step"] / d["total_steps"]
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        eval_loss = f" eval {eval_loss:.4f}" if eval_loss is not None else ""
        eta = int(d["eta_seconds"])
        line = (f"step {d['step']}/{d['total_steps']} [{bar}] loss {d['train_loss']:.4f}{eval_loss} "
                f"| {d['tokens_per_second']:.0f} tok/s | ETA {eta // 60}:{eta % 60:02d}")
        if self.live:
            self.stream.write("\r" + line)
            self.stream.flush()
        else:
            self._print(line)

    def _print(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _latency_summary(requests: list, slo) -> str:
    """How the demo's requests (all finished) fared against `slo`, the latency targets the engine
    scheduled them for, from their own metrics: the share within both targets (TTFT and mean time
    per output token after the first), TTFT p50 and time per token p50/p90 (of requests of two or
    more tokens)."""
    from loramux.bench.records import percentile

    met = sum(r.metrics.meets(slo) for r in requests)
    ttfts = [r.metrics.ttft for r in requests if r.metrics.ttft is not None]
    tpots = [r.metrics.tpot for r in requests if r.metrics.tpot is not None]
    return (f"Meanwhile {len(requests)} requests were served to base/poet/coder: {met} ({100 * met / len(requests):.0f}%) "
            f"within both latency targets (TTFT {slo.ttft:g} s, {slo.tpot * 1000:.0f} ms per token); TTFT p50 "
            f"{percentile(ttfts, 50):.2f} s, time per token p50 {percentile(tpots, 50) * 1000:.0f} ms, "
            f"p90 {percentile(tpots, 90) * 1000:.0f} ms.")


def _demo(args) -> int:
    """The main job on the default model: serve requests on two adapters and the base model while
    fine-tuning a third adapter in the same steps, then answer with the new adapter."""
    from loramux import LoraConfig, SamplingParams, TrainingConfig
    from loramux.datasets import shipped

    say = lambda s="": print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    engine = _engine(args)
    say(f"Loaded {engine.model_name} ({engine.model.config.num_parameters() / 1e6:.0f}M parameters, "
        f"{str(engine.model.dtype).removeprefix('torch.')}) "
        f"in {time.perf_counter() - t0:.1f}s from {engine.loaded.path}")
    for i, name in enumerate(("poet", "coder")):
        engine.create_adapter(name, LoraConfig(r=16, alpha=32, target_modules="all-linear"), seed=i, init_b="random")
    held_out = [json.loads(line) for line in shipped("reverse_words/val.jsonl").read_text().splitlines()]
    task = held_out[0]["prompt"].replace("\n", " / ")
    base = engine.generate([held_out[0]["prompt"]], max_tokens=8)[0].text
    say("\nServing adapters 'poet' and 'coder' (rank 16, all linears) and the base model.")
    say(f"The task to learn: {task!r} -> {held_out[0]['completion'].strip()!r}; the base model says {base.strip()!r}.")
    say("Fine-tuning adapter 'reverser' on the shipped reverse_words dataset (256 examples) in the same")
    say("forward passes that serve the requests:\n")

    job = engine.create_job("reverser", shipped("reverse_words/train.jsonl"), val=shipped("reverse_words/val.jsonl"),
                            lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                            training=TrainingConfig(epochs=1, batch_size=8, learning_rate=1e-3, warmup_steps=2, eval_every=16))
    prompts = ["Write a line about the sea.", "What is a Python list?", "Name three colors.", "Say something kind."]
    users = [None, "poet", "coder"]
    progress = ProgressLine(sys.stdout)
    served: list = []
    seen = 0
    while engine.has_work:
        while job.wants_work and sum(1 for r in served if r.finish_reason is None) < 4:
            n = len(served)
            served.append(engine.add_request(prompts[n % 4], users[n % 3], SamplingParams(max_tokens=16), chat=True))
        engine.step()
        for event in job.events[seen:]:
            progress.update(event.message, event.data, job.last_eval_loss)
        seen = len(job.events)
    progress.close()
    if served:
        say("\n" + _latency_summary(served, engine.config.scheduler.default_slo))

    outs = engine.generate([r["prompt"] for r in held_out], "reverser", max_tokens=8)
    exact = sum(o.text.strip() == r["completion"].strip() for o, r in zip(outs, held_out))
    say(f"\nThe new adapter, served at once with no reload: {exact}/{len(held_out)} held-out examples exactly right.")
    for r, o in list(zip(held_out, outs))[:3]:
        say(f"  {r['prompt'].splitlines()[0]!r} -> {o.text.strip()!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
