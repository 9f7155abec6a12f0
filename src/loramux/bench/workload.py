"""Benchmark workloads: adapters, prompts, lengths and arrival times, all from fixed seeds.

Every system in a run gets the same `BenchRequest` list: the same prompt token ids, output lengths,
adapters and arrival offsets. Nothing is downloaded: prompts are cut from a text the project makes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = (
    "the history of paper maps", "how bread rises", "tides and the moon", "the rules of chess",
    "why the sky is blue", "building a wooden boat", "the life of honey bees", "compound interest",
    "how a bicycle stays upright", "the water cycle", "learning a second language", "volcanoes",
    "the first printing press", "keeping a sourdough starter", "how vaccines train the body", "glaciers",
)
STYLES = ("Explain", "Write a short essay about", "Describe in detail", "Tell a student about", "Summarise what you know of")


@dataclass(frozen=True)
class Workload:
    """What a run sends. Lengths are fixed when `fixed_lengths`, else drawn from lognormal
    distributions with the given medians, clipped to [min, max]. `arrival`: "offline" (all at t=0),
    "poisson" (exponential gaps at `rate` requests/s) or "bursty" (Gamma gaps with coefficient of
    variation `burst_cv` > 1 at the same mean rate). `skew`: "uniform" or "zipf" (exponent
    `zipf_s`) over the first `active_adapters` of `num_adapters` registered ones.
    `shared_prefix_tokens`: every prompt starts with its adapter's system prompt of this many
    tokens (one per adapter, one for the base model; the prefix cache's workload), followed by
    its own `prompt_tokens`; 0: no system prompt."""

    num_requests: int = 32
    prompt_tokens: int = 64
    output_tokens: int = 64
    fixed_lengths: bool = True
    min_tokens: int = 8
    max_prompt_tokens: int = 512
    max_output_tokens: int = 256
    arrival: str = "offline"
    rate: float = 1.0
    burst_cv: float = 3.0
    num_adapters: int = 4
    active_adapters: int = 4
    rank: int = 16
    alpha: float = 32.0
    skew: str = "uniform"
    zipf_s: float = 1.1
    shared_prefix_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ("offline", "poisson", "bursty"):
            raise ValueError(f"arrival must be offline, poisson or bursty, not {self.arrival!r}")
        if self.skew not in ("uniform", "zipf"):
            raise ValueError(f"skew must be uniform or zipf, not {self.skew!r}")
        if self.arrival != "offline" and self.rate <= 0:
            raise ValueError("the arrival rate must be positive")
        if self.arrival == "bursty" and self.burst_cv <= 1:
            raise ValueError("a bursty arrival process needs a coefficient of variation above 1")
        if not 0 <= self.active_adapters <= self.num_adapters:
            raise ValueError("active_adapters must be between 0 and num_adapters")
        if self.num_requests < 1:
            raise ValueError("a workload needs at least one request")
        if self.shared_prefix_tokens < 0:
            raise ValueError("shared_prefix_tokens must not be negative")

    @property
    def adapter_names(self) -> list[str]:
        return [f"bench-{i}" for i in range(self.num_adapters)]

    def describe_lengths(self) -> str:
        lengths = (f"{self.prompt_tokens}-token prompts, {self.output_tokens} output tokens" if self.fixed_lengths else
                   f"prompts ~{self.prompt_tokens} and outputs ~{self.output_tokens} tokens (lognormal medians)")
        if self.shared_prefix_tokens:
            lengths += f", after a {self.shared_prefix_tokens}-token system prompt per adapter"
        return lengths

    def describe(self) -> str:
        lengths = self.describe_lengths()
        arrivals = "all at once" if self.arrival == "offline" else f"{self.arrival} at {self.rate:g} req/s"
        return (f"{self.num_requests} requests, {lengths}, {arrivals}; {self.active_adapters} of {self.num_adapters} "
                f"rank-{self.rank} adapters ({self.skew})")


@dataclass(frozen=True)
class BenchRequest:
    """arrival: seconds after the run starts. adapter: None for the base model."""

    index: int
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None
    arrival: float


def prompt_token_pool(tokenizer, size: int = 8192) -> list[int]:
    """A long, fixed token sequence that prompts are cut from."""
    rng = random.Random(1234)
    sentences: list[str] = []
    while True:
        sentences += [f"{rng.choice(STYLES)} {rng.choice(TOPICS)}, step by step, for reader number {rng.randrange(1000)}."
                      for _ in range(size // 8)]
        ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
        if len(ids) >= size:
            return list(ids[:size])


def _length(rng: random.Random, w: Workload, median: int, upper: int) -> int:
    if w.fixed_lengths:
        return median
    return max(w.min_tokens, min(upper, round(rng.lognormvariate(0.0, 0.6) * median)))


def _arrivals(rng: random.Random, w: Workload) -> list[float]:
    if w.arrival == "offline":
        return [0.0] * w.num_requests
    if w.arrival == "poisson":
        gaps = [rng.expovariate(w.rate) for _ in range(w.num_requests)]
    else:  # Gamma gaps: shape k = 1/cv^2, mean 1/rate
        shape = 1.0 / w.burst_cv**2
        gaps = [rng.gammavariate(shape, 1.0 / (w.rate * shape)) for _ in range(w.num_requests)]
    times, t = [], 0.0
    for gap in gaps:
        times.append(t)
        t += gap
    return times


def _adapter_choices(rng: random.Random, w: Workload) -> list[str | None]:
    names = w.adapter_names[: w.active_adapters]
    if not names:
        return [None] * w.num_requests
    if w.skew == "uniform":
        return [names[i % len(names)] for i in rng.sample(range(w.num_requests), w.num_requests)]
    weights = [1.0 / (k + 1) ** w.zipf_s for k in range(len(names))]
    return rng.choices(names, weights=weights, k=w.num_requests)


def system_prompt(w: Workload, adapter: str | None, pool: list[int]) -> list[int]:
    """The `shared_prefix_tokens` tokens every prompt of `adapter` starts with: a slice of `pool`
    at an offset of its own (the same in every workload of a run, whatever the seed)."""
    n = w.shared_prefix_tokens
    index = w.adapter_names.index(adapter) + 1 if adapter is not None else 0
    start = index * 7919 % max(len(pool) - n, 1)
    return pool[start : start + n]


def make_requests(w: Workload, pool: list[int]) -> list[BenchRequest]:
    """The run's requests, in arrival order. Prompts start at different offsets of `pool`, after
    their adapter's system prompt when `shared_prefix_tokens` is set."""
    rng = random.Random(w.seed)
    arrivals = _arrivals(rng, w)
    adapters = _adapter_choices(rng, w)
    out = []
    for i in range(w.num_requests):
        n = _length(rng, w, w.prompt_tokens, w.max_prompt_tokens)
        start = rng.randrange(0, max(len(pool) - n, 1))
        prompt = system_prompt(w, adapters[i], pool) + pool[start : start + n]
        out.append(BenchRequest(i, prompt, _length(rng, w, w.output_tokens, w.max_output_tokens), adapters[i], arrivals[i]))
    return out


WORDS = ("amber", "basil", "cedar", "delta", "ember", "fable", "garnet", "harbor", "iris", "juniper", "kettle", "lantern",
         "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "thistle", "umber", "velvet", "willow", "zephyr")


def training_records(num: int, words_per_sample: int = 40, seed: int = 0) -> list[dict]:
    """A fine-tuning set made by the project: sort a list of words alphabetically (prompt/completion
    records; about 3.3 tokens per word, so about 130 tokens per sample at 40 words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        words = [rng.choice(WORDS) for _ in range(words_per_sample)]
        out.append({"prompt": f"Sort these words alphabetically: {' '.join(words)}\nSorted:", "completion": " " + " ".join(sorted(words))})
    return out
