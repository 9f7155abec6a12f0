"""The engine: one frozen base model, many adapters, continuous batching over a paged KV cache.

    engine = Engine.load()                                   # the default model
    engine.load_adapter("poet", "path/to/peft_dir")
    outs = engine.generate(["Hi", "Hello"], adapters=[None, "poet"], max_tokens=16)
    for out in engine.stream("Tell me a story", adapter="poet", max_tokens=64):
        print(out.new_text, end="")

Every `step()` runs the scheduler, one forward pass over a flat batch of PREFILL and DECODE rows of
any adapters, samples the next token of every sequence that reached its end, and returns what each
request produced. Requests join (`add_request`) and leave (finish, `abort`) between any two steps.

Faults stay within what they belong to (see `step`): a failure in one request's sampling or text
finishes that request with finish_reason "error"; a failure in a training job's part fails that job
(training/trainer.py); only a failure of the shared forward pass is the whole step's, and even then
the engine goes on with the next step.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from loramux.batch import Batch, Chunk, RowKind
from loramux.engine.detokenizer import TextStream
from loramux.engine.requests import (
    SLO,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestState,
)
from loramux.engine.sampling import SamplingParams, TokenLogprob, sample_next
from loramux.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import load_peft_adapter, save_peft_adapter
from loramux.lora.registry import AdapterRegistry
from loramux.model.loader import LoadedModel, load_model
from loramux.training.checkpoint import latest_checkpoint, restore_checkpoint
from loramux.training.config import TrainingConfig
from loramux.training.data import DataError, Sample, load_samples, parse_jsonl, tokenize
from loramux.training.job import JobSummary, TrainingJob, WorkItem
from loramux.training.trainer import Trainer
from loramux.training.writer import Writer

log = logging.getLogger("loramux.engine")

# When a step has nothing to compute but writes are in flight, it waits this long at most for one
# to finish (the server's loop runs calls between steps, so this bounds their delay too).
IDLE_WRITE_WAIT = 0.02

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    """kv_cache_memory: bytes for the paged KV pool (its block count follows). block_size: tokens per block.
    prepack_weights: bf16 models on CPU keep a pre-packed copy of the base weights for inference
    rows (lora/prepacked.py): faster decode steps, for that much more memory."""

    kv_cache_memory: int = 512 * 2**20
    block_size: int = 16
    prepack_weights: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class Generation:
    """One prompt's result. token_ids are the generated ids only."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence, stop token or stop string), "length" or "error"
    adapter: str | None
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # why, when finish_reason is "error"


class Engine:
    """writer: the thread that writes jobs' checkpoints and adapters (default: a new one).
    clock: seconds for training's time-based checkpoints and running times (tests pass a fake)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        writer: Writer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.model = loaded.model
        self.model.prepack_weights(self.config.prepack_weights)
        self.tokenizer = loaded.tokenizer
        self.adapters = AdapterRegistry(self.model)
        self.kv = PagedKVCache.from_memory(
            self.model.config, self.config.kv_cache_memory, self.config.block_size, self.model.dtype, self.model.device
        )
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        self.trainer = Trainer(self.model, writer, clock)
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self._sampled_layout: int | None = None  # the adapters' layout version of the last step
        eos = set(loaded.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        cache: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        config: EngineConfig | None = None,
    ) -> Engine:
        """Loads a base model: None for the default SmolLM2-135M-Instruct, a HF directory, or a .gguf."""
        return cls(load_model(model, cache=cache, dtype=parse_dtype(dtype), device=device), config)

    @property
    def model_name(self) -> str:
        return self.loaded.name

    # --- adapters -------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """Loads a PEFT LoRA directory under `name`; refused adapters leave nothing behind."""
        adapter = self.read_adapter(name, path)
        self.adapters.add(adapter)
        return adapter

    def read_adapter(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """A PEFT LoRA directory read and checked against this engine's model, not yet registered."""
        return load_peft_adapter(path, self.model.config, name, dtype=self.model.dtype, device=self.model.device)

    def create_adapter(self, name: str, config: LoraConfig, *, seed: int = 0, init_b: str = "zeros") -> LoraAdapter:
        """A new adapter initialised as PEFT does (B = 0 unless init_b="random")."""
        generator = torch.Generator().manual_seed(seed)
        adapter = LoraAdapter.create(
            name, config, self.model.config, generator=generator, init_b=init_b, dtype=self.model.dtype, device=self.model.device
        )
        self.adapters.add(adapter)
        return adapter

    def save_adapter(self, name: str, path: str | os.PathLike) -> None:
        save_peft_adapter(self.adapters.get(name), path, base_model=self.model_name)

    def unload_adapter(self, name: str) -> None:
        if any(r.adapter == name for r in self.requests.values()):
            raise ValueError(f"adapter {name!r} has requests in flight; abort or finish them first")
        if any(j.adapter.name == name and not j.state.is_final for j in self.trainer.jobs.values()):
            raise ValueError(f"adapter {name!r} is being trained; cancel its job first")
        self.adapters.remove(name)

    # --- fine-tuning ----------------------------------------------------------------------------
    def load_data(self, data: str | os.PathLike | Sequence[dict], max_tokens: int) -> list[Sample]:
        """A JSONL path or a list of records ({prompt, completion} or {messages}), validated and tokenized."""
        eos = self.eos_token_ids[0]
        if isinstance(data, (str, os.PathLike)):
            return load_samples(data, self.tokenizer, eos, max_tokens)
        lines = []
        for number, record in enumerate(data, start=1):
            try:
                lines.append(json.dumps(record))
            except (TypeError, ValueError) as e:
                raise DataError(f"line {number}: not JSON data ({e})") from None
        return [tokenize(r, self.tokenizer, eos, max_tokens) for r in parse_jsonl(lines)]

    def create_job(
        self,
        adapter: str,
        train: str | os.PathLike | Sequence[dict],
        *,
        val: str | os.PathLike | Sequence[dict] | None = None,
        lora: LoraConfig | None = None,
        training: TrainingConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        job_id: str | None = None,
    ) -> TrainingJob:
        """Starts fine-tuning `adapter` (new, with `lora`; or a loaded one, to continue it). Data is
        validated before anything starts. With a checkpoint_dir, checkpoints are written there as
        `training` says (TrainingConfig: by default every 10 steps or 60 s), and a job whose
        checkpoint_dir holds checkpoints resumes from the latest. The adapter serves requests with
        its latest weights throughout; the job succeeds once its adapter is in output_dir."""
        training = training or TrainingConfig()
        train_samples = self.load_data(train, training.micro_batch_tokens)
        val_samples = self.load_data(val, training.micro_batch_tokens) if val is not None else None
        created = adapter not in self.adapters
        if created:
            self.create_adapter(adapter, lora or LoraConfig(), seed=training.seed)
        elif lora is not None:
            raise ValueError(f"adapter {adapter!r} exists; to continue training it, give no LoRA config")
        try:
            job = TrainingJob(
                job_id or f"ftjob-{next(self._order)}", self.adapters.get(adapter), train_samples, training,
                val=val_samples, checkpoint_dir=checkpoint_dir, output_dir=output_dir, base_model=self.model_name,
                on_weights_changed=lambda: self.adapters.mark_updated(adapter),
                writer=self.trainer.writer, clock=self.trainer.clock,
            )
            checkpoint = latest_checkpoint(checkpoint_dir)
            if checkpoint is not None:
                restore_checkpoint(job, checkpoint, self.model.config)
                job.emit(f"resumed from {checkpoint}", step=job.step, checkpoint=str(checkpoint))
            self.trainer.add(job)
        except Exception:
            if created:
                self.adapters.remove(adapter)
            raise
        return job

    def job(self, job_id: str) -> TrainingJob | JobSummary:
        """A live job, or the summary of a finished one (the trainer keeps the latest 1000)."""
        return self.trainer.job(job_id)

    @property
    def has_work(self) -> bool:
        """Requests in flight, or jobs that still want to train or have writes in flight."""
        return self.has_unfinished or self.trainer.has_work

    # --- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with `chat`, of a one-message user conversation in the chat template."""
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        *,
        chat: bool = False,
        slo: SLO | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queues a request; it joins the running batch at a coming step. Raises ValueError for a bad
        request (unknown adapter, too long, empty) and QueueFullError when the queue is at its bound."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt, chat) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        limit = self.model.config.max_position_embeddings
        if len(prompt_ids) + params.max_tokens > limit:
            raise ValueError(
                f"this model's context is {limit} tokens; the prompt has {len(prompt_ids)} and max_tokens is {params.max_tokens}"
            )
        order = next(self._order)
        request_id = request_id or f"req-{order}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is in use")
        request = Request(
            id=request_id,
            order=order,
            prompt_ids=prompt_ids,
            adapter=adapter,
            slot=self.adapters.slot(adapter),
            params=params,
            slo=slo or self.config.scheduler.default_slo,
            metrics=RequestMetrics(arrival=time.perf_counter()),
            text=TextStream(self.tokenizer, params.stop),
            generator=params.generator(),
        )
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancels a request at once: its KV blocks are free before this returns."""
        request = self.requests.get(request_id)
        return None if request is None else self._finish(request, "abort")

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        """Finishes a request with finish_reason "error" and `error` as the reason, freeing its blocks."""
        request = self.requests.get(request_id)
        return None if request is None else self._finish(request, "error", error)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> RequestOutput:
        """Finishes a request that emits nothing more (aborted, or failed)."""
        self._close(request, reason, time.perf_counter(), error)
        return RequestOutput(request.id, (), "", True, reason, metrics=request.metrics, error=error)

    def _close(self, request: Request, reason: str, now: float, error: str | None = None) -> None:
        """A request leaves the engine: its blocks are freed, its finish reason set."""
        self.requests.pop(request.id, None)
        self.scheduler.remove(request)
        request.state, request.finish_reason, request.error = RequestState.FINISHED, reason, error
        request.metrics.finished = now

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled inference rows and as many training rows as the
        latency targets leave room for; returns what each request that produced a token emitted.

        Where a failure lands: sampling and text of one request finish that request alone
        (finish_reason "error", the message in `error`); a job's part (its samples, loss, optimizer
        step, snapshots, writes) fails that job alone. A failure of the forward pass (building the
        batch, the model, the sampled rows' logits) is every participant's: the step's requests
        finish with "error" and its jobs fail (they are not retried: a job whose samples break the
        forward would break every step it joined); the engine is ready for the next step. Errors
        of the scheduler itself are engine bugs and propagate (the server's loop then fails every
        request in flight, see server/engine_loop.py)."""
        scheduled = self.scheduler.schedule()
        started, layout = time.perf_counter(), self.adapters.layout_version
        chunks = [
            Chunk(
                c.request.tokens(c.start, c.end),
                RowKind.DECODE if c.end - c.start == 1 and c.start > 0 else RowKind.PREFILL,
                c.request.slot,
                c.start,
                c.request.block_table,
            )
            for c in scheduled.chunks
        ]
        row_counts = Counter()
        for chunk in chunks:
            row_counts[chunk.kind] += len(chunk.token_ids)
        wants_training = self.trainer.wants_work
        work = self.trainer.take_work(self.scheduler.training_budget(row_counts)) if wants_training else []
        if not chunks and not work:
            self.scheduler.note_step(0, wants_training)  # training's credit still grows
            if self.trainer.writer.busy:  # only writes to wait for: wait for one, briefly
                self.trainer.writer.wait_any(timeout=IDLE_WRITE_WAIT)
            self.trainer.poll()
            return []
        sampled = [i for i, c in enumerate(scheduled.chunks) if c.samples]
        try:
            chunks += [Chunk(item.sample.input_ids, item.kind, self.adapters.slot(item.job.adapter.name)) for item in work]
            batch = Batch.build(chunks, self.kv, self.model.device)
            # Without training rows, inference mode (less per-op bookkeeping: 3-6% per decode step);
            # with them, the model turns autograd on for their part only.
            with torch.no_grad() if work else torch.inference_mode():
                hidden = self.model(batch)
                rows = torch.tensor([batch.chunk_rows[i].stop - 1 for i in sampled], dtype=torch.long, device=hidden.device)
                logits = self.model.logits(hidden[rows]) if sampled else None
            argmaxes = logits.max(-1).indices.tolist() if sampled else []  # first of ties, as argmax; 2.5x faster
        except Exception as e:
            log.exception("the forward pass of a step failed")
            return self._fail_step(scheduled.chunks, work, f"the step's forward pass failed: {type(e).__name__}: {e}")
        if work:
            self.trainer.apply(hidden, batch.chunk_rows[len(scheduled.chunks) :], work)
        for c in scheduled.chunks:
            c.request.num_computed = c.end
        outputs = [self._sample(scheduled.chunks[i].request, logits[j], argmaxes[j]) for j, i in enumerate(sampled)]
        self.trainer.poll()
        for item in work:
            row_counts[item.kind] += len(item.sample)
        seconds = time.perf_counter() - started
        self.scheduler.note_step(sum(len(item.sample) for item in work), wants_training)
        # The engine's first step, and the first after adapters were installed or removed, pay
        # one-time costs (weight packing, page faults, stacking the adapters): no sample. Steps
        # after an optimizer step are samples: rewriting the trained slot is part of what training
        # costs, and training's rows must be measured for the scheduler to price them.
        if layout == self._sampled_layout:
            self.scheduler.cost.record(row_counts, seconds)
        self._sampled_layout = layout
        return outputs

    def _fail_step(self, chunks: list[ScheduledChunk], work: list[WorkItem], error: str) -> list[RequestOutput]:
        """The forward pass failed: the step's requests finish with `error`, its jobs fail."""
        self.trainer.fail_all(work, error)
        self.trainer.poll()
        requests = {c.request.id: c.request for c in chunks}
        return [self._finish(r, "error", error) for r in requests.values() if r.id in self.requests]

    def _sample(self, request: Request, logits: torch.Tensor, argmax: int) -> RequestOutput:
        """The request's next token and text; a failure there finishes this request alone."""
        try:
            return self._append_token(request, logits, argmax)
        except Exception as e:
            log.exception("request %s failed while sampling its next token", request.id)
            return self._finish(request, "error", f"sampling or decoding the next token failed: {type(e).__name__}: {e}")

    def _append_token(self, request: Request, logits: torch.Tensor, argmax: int) -> RequestOutput:
        params = request.params
        ends = params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)
        blocked = ends if len(request.output_ids) < params.min_tokens else ()
        token, logprob = sample_next(logits, params, request.generator, request.prompt_ids, request.output_ids, blocked, argmax)
        now = time.perf_counter()
        request.output_ids.append(token)
        request.metrics.num_output_tokens = len(request.output_ids)
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        reason = None
        new_text = ""
        if token in ends:
            reason = "stop"
        else:
            new_text, stopped = request.text.push(token)
            if stopped:
                reason = "stop"
            elif len(request.output_ids) >= params.max_tokens:
                reason = "length"
        if reason is not None:
            new_text += request.text.finish()
            self._close(request, reason, now)
        return RequestOutput(
            request.id, (token,), new_text, reason is not None, reason,
            (logprob,) if logprob is not None else (), request.metrics,
        )

    # --- conveniences ---------------------------------------------------------------------------
    def stream(
        self, prompt: str | Sequence[int], adapter: str | None = None, *, chat: bool = False, slo: SLO | None = None, **sampling
    ) -> Iterator[RequestOutput]:
        """Yields one request's outputs as they are produced, stepping the engine (other requests
        progress too). Closing the iterator early aborts the request."""
        request = self.add_request(prompt, adapter, SamplingParams(**sampling), chat=chat, slo=slo)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == request.id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(request.id)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        adapters: str | None | Sequence[str | None] = None,
        *,
        chat: bool = False,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **sampling: object,
    ) -> list[Generation]:
        """Generates for every prompt (text, or token ids), all sharing the engine's steps.

        adapters: one name (or None: the base model) for all prompts, or one per prompt.
        params: SamplingParams for all or per prompt; or pass max_tokens=..., temperature=..., etc.
        """
        n = len(prompts)
        names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(names) != n:
            raise ValueError(f"got {n} prompts but {len(names)} adapters")
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams(**sampling)] * n
        for name in names:
            self.adapters.slot(name)  # unknown names fail before anything runs
        requests: list[Request | None] = [None] * n
        results: dict[str, list[RequestOutput]] = {}
        next_prompt = 0
        while next_prompt < n or any(r is not None and r.id in self.requests for r in requests):
            while next_prompt < n and len(self.scheduler.waiting) < self.config.scheduler.max_waiting:
                requests[next_prompt] = self.add_request(prompts[next_prompt], names[next_prompt], per_prompt[next_prompt], chat=chat)
                results[requests[next_prompt].id] = []
                next_prompt += 1
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].append(out)
        return [self._generation(r, results[r.id]) for r in requests]

    def _generation(self, request: Request, outputs: list[RequestOutput]) -> Generation:
        logprobs = [lp for o in outputs for lp in o.new_logprobs] if request.params.logprobs is not None else None
        return Generation(
            text="".join(o.new_text for o in outputs),
            token_ids=list(request.output_ids),
            prompt_token_ids=list(request.prompt_ids),
            finish_reason=request.finish_reason or "length",
            adapter=request.adapter,
            logprobs=logprobs,
            metrics=request.metrics,
            error=request.error,
        )
