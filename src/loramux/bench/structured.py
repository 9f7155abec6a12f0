"""`loramux bench structured`: what grammar-constrained decoding costs, engine-level.

The same run serves `--requests` concurrent chat requests (default 32) over `--adapters` random
adapters twice, alternately, `--repeats` times: free (unconstrained, ignore_eos, so every request
runs `--output-tokens`) and with response_format json_schema (a typical schema of nested objects,
an enum, an array, bounded and free strings). The figure that compares them is steady decode
throughput: tokens sampled per second over the steps in which every request was decoding (so that
a constrained request ending early does not count as a cost); end-to-end tokens/s is printed
too. Each mode's best repeat is kept (the machine's noise only slows runs down). The target
(issue 15) is a ratio of at least 0.85.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["street", "city"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "active"],
}


@dataclass
class Pass:
    """One pass of one mode: every request from arrival to finish."""

    mode: str  # "free" or "json_schema"
    tokens: int  # sampled over the pass
    seconds: float
    steady_tokens: int  # sampled in steps where every request decoded
    steady_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def steady_tokens_per_second(self) -> float:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds else 0.0


def run_pass(engine, prompts: list[list[int]], adapters: list[str], params) -> tuple[int, float, int, float]:
    """Adds every request at once and steps until all finish: (tokens, seconds, steady tokens, steady seconds)."""
    ids = [engine.add_request(p, a, params).id for p, a in zip(prompts, adapters)]
    started_tokens: set[str] = set()
    tokens = steady_tokens = 0
    steady_seconds = 0.0
    start = time.perf_counter()
    while any(i in engine.requests for i in ids):
        all_decoding = len(started_tokens) == len(ids)
        t = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t
        sampled = sum(len(o.new_token_ids) for o in outs)
        tokens += sampled
        started_tokens.update(o.request_id for o in outs if o.new_token_ids)
        if all_decoding and sampled == len(ids):
            steady_tokens += sampled
            steady_seconds += seconds
    return tokens, time.perf_counter() - start, steady_tokens, steady_seconds


def run_structured(args) -> int:
    from loramux.engine.engine import Engine, EngineConfig
    from loramux.engine.sampling import SamplingParams
    from loramux.lora.adapter import LoraConfig
    from loramux.structured import StructuredSpec

    n, tokens = (8, 16) if args.quick else (args.requests, args.output_tokens)
    repeats = 1 if args.quick else args.repeats
    engine = Engine.load(args.model, cache=args.cache_dir, dtype=args.dtype, config=EngineConfig(kv_cache_memory=1024 * 2**20))
    names = [f"adapter-{i}" for i in range(max(args.adapters, 1))]
    for i, name in enumerate(names):
        engine.create_adapter(name, LoraConfig(r=args.rank, alpha=2.0 * args.rank), seed=args.seed + i, init_b="random")
    prompts = [engine.encode(f"Invent person number {i} and describe them as JSON: name, age, email, role, tags, address "
                             "(street, city) and whether they are active.", chat=True) for i in range(n)]
    adapters = [names[i % len(names)] for i in range(n)]
    modes = {"free": SamplingParams(max_tokens=tokens, ignore_eos=True),
             "json_schema": SamplingParams(max_tokens=tokens, structured=StructuredSpec.json_schema(SCHEMA))}
    for params in modes.values():  # warm-up: weight packing, stacked adapters, the grammar's compilation
        run_pass(engine, prompts[:2], adapters[:2], params)
    passes = [Pass(mode, *run_pass(engine, prompts, adapters, params)) for _ in range(repeats) for mode, params in modes.items()]
    best = {mode: max((p for p in passes if p.mode == mode), key=lambda p: p.steady_tokens_per_second) for mode in modes}
    ratio = best["json_schema"].steady_tokens_per_second / best["free"].steady_tokens_per_second
    print(f"[bench structured] {n} concurrent requests over {len(names)} adapters, {tokens} output tokens, "
          f"{engine.model_name} {args.dtype}, best of {repeats}")
    print(f"{'mode':<12} {'steady tok/s':>12} {'e2e tok/s':>10} {'tokens':>7}")
    for mode, p in best.items():
        print(f"{mode:<12} {p.steady_tokens_per_second:>12.1f} {p.tokens_per_second:>10.1f} {p.tokens:>7}")
    print(f"json_schema / free, steady decode tokens/s: {ratio:.3f} (target >= 0.85)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"requests": n, "output_tokens": tokens, "adapters": len(names), "model": engine.model_name, "dtype": args.dtype,
                  "schema": SCHEMA, "passes": [{**asdict(p), "tokens_per_second": p.tokens_per_second,
                                                "steady_tokens_per_second": p.steady_tokens_per_second} for p in passes],
                  "ratio": ratio}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(f"[bench] report: {out / 'report.json'}")
    return 0
