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

import inspect
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from loramux.engine.sampling import SamplingParams, TokenLogprob, adjusted_scores, choose_tokens, chosen_logprobs, token_logprobs
from loramux.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import load_peft_adapter, save_peft_adapter
from loramux.lora.registry import AdapterRegistry
from loramux.model.loader import LoadedModel, load_model
from loramux.training.checkpoint import latest_checkpoint, restore_checkpoint
from loramux.training.config import TrainingConfig
from loramux.training.data import DataError, PreferencePair, Sample, parse_jsonl, read_jsonl, tokenize_records
from loramux.training.job import JobSummary, TrainingJob, WorkItem
from loramux.training.trainer import Trainer
from loramux.training.writer import Writer

if TYPE_CHECKING:
    from loramux.structured.grammars import GrammarCache

log = logging.getLogger("loramux.engine")

# When a step has nothing to compute but writes are in flight, it waits this long at most for one
# to finish (the server's loop runs calls between steps, so this bounds their delay too).
IDLE_WRITE_WAIT = 0.02

# rows of prompt logits [rows, vocab] computed at a time for prompt log-probabilities (bounds memory)
PROMPT_LOGPROB_ROWS = 128


@dataclass(frozen=True)
class EngineConfig:
    """kv_cache_memory: bytes for the paged KV pool (its block count follows). block_size: tokens per block.
    prepack_weights: bf16 models on CPU keep a pre-packed copy of the base weights for inference
    rows (lora/prepacked.py): faster decode steps, for that much more memory.
    merge_parts: a step with training and inference rows runs each base GEMM once for both parts
    (model/llama.py); off, once per part (the benchmark's comparison)."""

    kv_cache_memory: int = 512 * 2**20
    block_size: int = 16
    prepack_weights: bool = True
    merge_parts: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class StepRecord:
    """What one step carried: rows of each kind (RowKind's values) and its wall time in seconds."""

    rows: dict[str, int]
    seconds: float


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
    # with params.prompt_logprobs: one entry per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
        self.model.merge_parts = self.config.merge_parts
        self.tokenizer = loaded.tokenizer
        self.adapters = AdapterRegistry(self.model)
        self.kv = PagedKVCache.from_memory(
            self.model.config, self.config.kv_cache_memory, self.config.block_size, self.model.dtype, self.model.device
        )
        self.scheduler = Scheduler(self.config.scheduler, self.kv, generations=self.adapters.generations)
        self.trainer = Trainer(self.model, writer, clock)
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self._sampled_layout: int | None = None  # the adapters' layout version of the last step
        self.last_step: StepRecord | None = None  # what the latest step carried (None: it computed nothing)
        eos = set(loaded.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        cache: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        config: EngineConfig | None = None,
    ) -> Engine:
        """Loads a base model: None for the default SmolLM2-135M-Instruct, a HF directory, or a .gguf.
        dtype: "float32", "bfloat16", or "auto" (as vLLM's default): the model's own dtype where this
        CPU computes it fast, else float32 (model/dtype.py)."""
        return cls(load_model(model, cache=cache, dtype=dtype, device=device), config)

    @property
    def grammars(self) -> GrammarCache:
        """The compiled grammars of structured outputs, shared by all requests (made on first use:
        xgrammar reads the vocabulary once). Thread-safe: the server compiles in handler threads."""
        with self._grammars_lock:
            if self._grammars is None:
                from loramux.structured.grammars import GrammarCache  # xgrammar: only once outputs are constrained

                self._grammars = GrammarCache(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
            return self._grammars

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
        if any(j.reference is not None and j.reference.name == name and not j.state.is_final for j in self.trainer.jobs.values()):
            raise ValueError(f"adapter {name!r} is the reference of a DPO job; cancel the job first")
        self.adapters.remove(name)

    # --- fine-tuning ----------------------------------------------------------------------------
    def load_data(
        self, data: str | os.PathLike | Sequence[dict], max_tokens: int, method: str = "supervised"
    ) -> list[Sample] | list[PreferencePair]:
        """A JSONL path or a list of records, validated and tokenized for `method` (TrainingConfig's):
        {prompt, completion} or {messages} for "supervised", preference pairs for "dpo".
        max_tokens: the rows one example may take in a step (TrainingConfig.micro_batch_tokens)."""
        if isinstance(data, (str, os.PathLike)):
            records = read_jsonl(data)
        else:
            lines = []
            for number, record in enumerate(data, start=1):
                try:
                    lines.append(json.dumps(record))
                except (TypeError, ValueError) as e:
                    raise DataError(f"line {number}: not JSON data ({e})") from None
            records = parse_jsonl(lines)
        return tokenize_records(records, self.tokenizer, self.eos_token_ids[0], max_tokens, method)

    def create_job(
        self,
        adapter: str,
        train: str | os.PathLike | Sequence[dict],
        *,
        val: str | os.PathLike | Sequence[dict] | None = None,
        lora: LoraConfig | None = None,
        training: TrainingConfig | None = None,
        init_from: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        job_id: str | None = None,
    ) -> TrainingJob:
        """Starts fine-tuning `adapter`: new, with `lora`; new, as a copy of the loaded adapter
        `init_from` (its weights and LoRA config); or a loaded one, to continue it (supervised only).
        `training.method` picks supervised fine-tuning or DPO (TrainingConfig). A DPO job's reference
        is `init_from` itself (which the job never changes; it stays loaded, frozen, while the job
        runs), or the base model. Data is validated before anything starts. With a checkpoint_dir,
        checkpoints are written there as `training` says (TrainingConfig: by default every 10 steps
        or 60 s), and a job whose checkpoint_dir holds checkpoints resumes from the latest. The
        adapter serves requests with its latest weights throughout; the job succeeds once its
        adapter is in output_dir."""
        training = training or TrainingConfig()
        train_examples = self.load_data(train, training.micro_batch_tokens, training.method)
        val_examples = self.load_data(val, training.micro_batch_tokens, training.method) if val is not None else None
        dpo = training.method == "dpo"
        created = adapter not in self.adapters
        if not created and (lora is not None or init_from is not None):
            raise ValueError(f"adapter {adapter!r} exists; to continue training it, give no LoRA config or init_from")
        if not created and dpo:
            raise ValueError(f"a DPO job trains a new adapter against a frozen reference; to start from adapter {adapter!r}, "
                             "give it as init_from and a new name")
        reference = None
        if init_from is not None:
            if lora is not None:
                raise ValueError(f"an adapter made from {init_from!r} takes its LoRA config; give no LoRA config")
            start = self.adapters.get(init_from)
            # in one order however `start` came to be (made here, or read from files after a restart):
            # a checkpoint's optimizer state is matched to the parameters by position
            self.adapters.add(LoraAdapter(adapter, start.config, {k: (A.detach().clone(), B.detach().clone())
                                                                  for k, (A, B) in sorted(start.weights.items())}))
            reference = start if dpo else None
        elif created:
            self.create_adapter(adapter, lora or LoraConfig(), seed=training.seed)
        try:
            job = TrainingJob(
                job_id or f"ftjob-{next(self._order)}", self.adapters.get(adapter), train_examples, training,
                val=val_examples, reference=reference,
                checkpoint_dir=checkpoint_dir, output_dir=output_dir, base_model=self.model_name,
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

    def encode_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, by default ready for
        the reply. tools: OpenAI-style tool definitions, for templates that render them.
        continue_final_message: the last (assistant) message is left open for the reply to continue
        (vLLM's semantics; then add_generation_prompt must be False). chat_template_kwargs: more
        variables for the template (e.g. a model's `enable_thinking`). ValueError (or jinja2's
        TemplateError) for a conversation the template refuses."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        extra = dict(chat_template_kwargs or {})
        taken = sorted(set(extra) & set(inspect.signature(self.tokenizer.apply_chat_template).parameters))
        if taken:  # they are apply_chat_template's own arguments, not the template's variables
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)}")
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **extra,
        )
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
        params.check_vocab(vocab)
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
            text=TextStream(self.tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                            skip_special_tokens=params.skip_special_tokens),
            generator=params.generator(),
            constraint=None if params.structured is None else self.grammars.constraint(params.structured),
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
        self.last_step = None
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
            chunks += [Chunk(seq.sample.input_ids, seq.kind, self.adapters.slot(seq.adapter.name if seq.adapter else None))
                       for item in work for seq in item.sequences]
            batch = Batch.build(chunks, self.kv, self.model.device)
            # Without training rows, inference mode (less per-op bookkeeping: 3-6% per decode step);
            # with them, the model turns autograd on for their part only.
            with torch.no_grad() if work else torch.inference_mode():
                hidden = self.model(batch)
                rows = torch.tensor([batch.chunk_rows[i].stop - 1 for i in sampled], dtype=torch.long, device=hidden.device)
                logits = self.model.logits(hidden[rows]) if sampled else None
        except Exception as e:
            log.exception("the forward pass of a step failed")
            return self._fail_step(scheduled.chunks, work, f"the step's forward pass failed: {type(e).__name__}: {e}")
        if work:
            self.trainer.apply(hidden, batch.chunk_rows[len(scheduled.chunks) :], work)
        self.scheduler.mark_computed(scheduled)
        # prompt log-probabilities from the prompt rows just computed; a failure ends its request alone
        outputs = [out for i, c in enumerate(scheduled.chunks) if c.request.params.prompt_logprobs is not None
                   and (out := self._score_prompt(c, hidden, batch.chunk_rows[i])) is not None]
        if sampled:
            outputs += self._sample([scheduled.chunks[i].request for i in sampled], logits)
        self.trainer.poll()
        for seq in (seq for item in work for seq in item.sequences):
            row_counts[seq.kind] += len(seq.sample)
        seconds = time.perf_counter() - started
        self.last_step = StepRecord({kind.value: n for kind, n in row_counts.items()}, seconds)
        self.scheduler.note_step(sum(item.num_rows for item in work), wants_training)
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

    def _score_prompt(self, chunk: ScheduledChunk, hidden: torch.Tensor, rows: range) -> RequestOutput | None:
        """Appends to request.prompt_logprobs the prompt tokens that the chunk's rows predict (the
        row of position p predicts token p + 1), from hidden [batch rows, hidden] and the chunk's
        `rows` in it, PROMPT_LOGPROB_ROWS rows of logits at a time. Positions whose log-probabilities
        are known (a prefill recomputed after preemption) are skipped. Returns None, or the failed
        request's final output."""
        request = chunk.request
        computed, n = len(request.prompt_logprobs), len(request.prompt_ids)  # tokens 0..computed-1 have theirs
        if computed >= n:
            return None
        try:
            if chunk.start + 1 > computed:  # only a KV cache hit skips rows; such requests must bypass it
                raise RuntimeError(f"prompt positions {computed - 1}..{chunk.start - 1} were never computed")
            with torch.inference_mode():
                for first in range(computed, min(chunk.end + 1, n), PROMPT_LOGPROB_ROWS):
                    last = min(first + PROMPT_LOGPROB_ROWS, chunk.end + 1, n)
                    row = rows.start + first - 1 - chunk.start  # the row predicting token `first`
                    logits = self.model.logits(hidden[row : row + last - first])
                    targets = torch.tensor(request.prompt_ids[first:last], dtype=torch.long, device=logits.device)
                    request.prompt_logprobs += token_logprobs(logits, targets, request.params.prompt_logprobs)
        except Exception as e:
            log.exception("request %s failed while scoring its prompt", request.id)
            return self._finish(request, "error", f"computing the prompt's log-probabilities failed: {type(e).__name__}: {e}")
        return None

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Each request's next token and text, from its row of logits [len(requests), vocab] (or,
        for max_tokens=0, its end after the prompt). The rows' tokens are chosen together
        (`choose_tokens`); a failure in one request's scores or text finishes that request alone,
        one in the shared choice finishes the requests it was choosing for."""
        outputs: list[RequestOutput] = []
        rows: list[tuple[int, Request]] = []  # (row of logits, request) of the requests that sample
        adjusted: dict[int, torch.Tensor] = {}  # index in rows -> that row's own scores
        for j, request in enumerate(requests):
            if request.id not in self.requests:  # finished while scoring its prompt
                continue
            if request.params.max_tokens == 0:  # scoring only: the prompt's log-probabilities are the result
                self._close(request, "length", time.perf_counter())
                outputs.append(RequestOutput(request.id, (), "", True, "length", metrics=request.metrics,
                                             prompt_logprobs=tuple(request.prompt_logprobs)))
                continue
            try:
                scores = adjusted_scores(logits[j], request.params, request.prompt_ids, request.output_ids, *self._limits(request))
            except Exception as e:
                outputs.append(self._sampling_failed(request, e))
                continue
            if scores is not None:
                adjusted[len(rows)] = scores
            rows.append((j, request))
        if not rows:
            return outputs
        chosen = [request for _, request in rows]
        try:
            scores = logits if len(rows) == len(logits) and not adjusted else logits[[j for j, _ in rows]]
            for i, row in adjusted.items():
                scores[i] = row
            tokens = choose_tokens(scores, [r.params for r in chosen], [r.generator for r in chosen])
            logprobs = chosen_logprobs(logits, [j for j, _ in rows], tokens, [r.params.logprobs for r in chosen])
        except Exception as e:
            return outputs + [self._sampling_failed(request, e) for request in chosen]
        for request, token, logprob in zip(chosen, tokens, logprobs):
            try:
                outputs.append(self._append_token(request, token, logprob))
            except Exception as e:
                outputs.append(self._sampling_failed(request, e))
        return outputs

    def _sampling_failed(self, request: Request, error: Exception) -> RequestOutput:
        log.exception("request %s failed while sampling its next token", request.id, exc_info=error)
        return self._finish(request, "error", f"sampling or decoding the next token failed: {type(error).__name__}: {error}")

    def _limits(self, request: Request) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """(ids the request may not emit now, its grammar's allowed tokens or None): its end ids
        while min_tokens is not reached, unless its grammar allows nothing but an end."""
        params = request.params
        blocked = self._end_ids(params) if len(request.output_ids) < params.min_tokens else ()
        allowed = None if request.constraint is None else request.constraint.allowed()
        if allowed is not None and blocked and not allowed.index_fill(0, torch.tensor(blocked), False).any():
            blocked = ()  # min_tokens yields to a complete output, whose grammar allows nothing but its end
        return blocked, allowed

    def _end_ids(self, params: SamplingParams) -> tuple[int, ...]:
        return params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)

    def _append_token(self, request: Request, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        params = request.params
        ends = self._end_ids(params)
        constraint = request.constraint
        if constraint is not None:
            constraint.accept(token)
        now = time.perf_counter()
        request.output_ids.append(token)
        request.metrics.num_output_tokens = len(request.output_ids)
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        reason = None
        new_text = ""
        if token in ends or (constraint is not None and constraint.terminated):  # an end, or the grammar's
            reason = "stop"
            if params.include_stop_str_in_output:  # the end token's text (none if special and skipped)
                new_text, _ = request.text.push(token)
        else:
            new_text, stopped = request.text.push(token)
            if stopped:
                reason = "stop"
            elif len(request.output_ids) >= params.max_tokens:
                reason = "length"
        if reason is not None:
            new_text += request.text.finish()
            self._close(request, reason, now)
        first = params.prompt_logprobs is not None and len(request.output_ids) == 1
        return RequestOutput(
            request.id, (token,), new_text, reason is not None, reason,
            (logprob,) if logprob is not None else (), request.metrics,
            prompt_logprobs=tuple(request.prompt_logprobs) if first else None,
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
        Structured outputs: `params=SamplingParams(structured=StructuredSpec.json_schema({...}))`
        (or .regex, .choice, .grammar; loramux.structured) constrains each output to the spec, per
        row, beside unconstrained rows in the same steps; an invalid spec raises ValueError.
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
            prompt_logprobs=list(request.prompt_logprobs) if request.params.prompt_logprobs is not None else None,
        )
