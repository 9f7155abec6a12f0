"""A fine-tuning job: its data order, its adapter's optimizer, its state machine and its events.

The engine asks a running job for work (`take`), runs it inside a step beside everyone else's rows,
and reports back (`complete`). The job steps its optimizer when its optimizer batch is done, runs
evaluation and takes checkpoints on schedule, and finishes after its last step.

States: queued -> running <-> paused -> succeeded | failed | cancelled.

Checkpoints and the final adapter are snapshots handed to the trainer's `Writer`: the disk work
runs on the writer thread, and `poll_writes` (engine thread, every step) takes the results in. A
job succeeds only once its final adapter (and any checkpoint still in flight) is on disk; a failed
write fails the job. A job that fails for any reason (a write, a non-finite loss or gradient, an
error in its part of a step) keeps the weights of its last optimizer step, which stay finite.
Reaching a final state frees what training needed (optimizer state, gradients, data).
"""

from __future__ import annotations

import copy
import enum
import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.batch import RowKind
from loramux.lora.adapter import LoraAdapter
from loramux.training.checkpoint import AdapterSnapshot, CheckpointSnapshot
from loramux.training.config import TrainingConfig
from loramux.training.data import Sample
from loramux.training.optim import learning_rate, make_optimizer
from loramux.training.writer import Snapshot, Writer


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    """created_at: unix seconds. data holds figures for metrics events (step, train_loss, eval_loss,
    learning_rate, tokens_per_second, eta_seconds, ...)."""

    created_at: float
    message: str
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkItem:
    """One sample of a job in a step. weight: the factor of its summed token losses in the loss
    (1 / target tokens of its optimizer batch for TRAIN; 1 for EVAL)."""

    job: TrainingJob
    sample: Sample
    kind: RowKind
    weight: float


@dataclass(frozen=True)
class JobSummary:
    """What remains of a finished job in the trainer: its outcome, without its adapter, optimizer or data."""

    id: str
    adapter_name: str
    state: JobState
    step: int
    total_steps: int
    train_tokens: int
    last_train_loss: float | None
    last_eval_loss: float | None
    error: str | None
    checkpoints: tuple[Path, ...]


class TrainingJob:
    """writer: where checkpoints and the final adapter are written (off the engine thread).
    clock: seconds, for `checkpoint_interval` and the job's running time; tests pass a fake one."""

    def __init__(
        self,
        job_id: str,
        adapter: LoraAdapter,
        train: list[Sample],
        config: TrainingConfig,
        *,
        writer: Writer,
        val: list[Sample] | None = None,
        checkpoint_dir: str | Path | None = None,
        output_dir: str | Path | None = None,
        base_model: str = "",
        on_weights_changed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not train:
            raise ValueError("a job needs at least one training sample")
        self.id = job_id
        self.adapter = adapter
        self.train, self.val = train, val or []
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.base_model = base_model
        self.on_weights_changed = on_weights_changed
        self.writer = writer
        self.clock = clock
        self.steps_per_epoch = math.ceil(len(train) / config.samples_per_step)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.params = adapter.requires_grad_(True).parameters()
        self.optimizer: torch.optim.AdamW | None = make_optimizer(self.params, config)
        self.dropout_generator = adapter.dropout_generator.manual_seed(config.seed)
        self.state = JobState.QUEUED
        self.error: str | None = None
        self.events: list[JobEvent] = []
        self.checkpoints: list[Path] = []
        self.step = 0  # optimizer steps done
        self.train_tokens = 0
        self.last_train_loss: float | None = None
        self.last_eval_loss: float | None = None
        self._running_seconds = 0.0
        self._resumed_at: float | None = None
        self._batch: list[int] = []
        self._handed = 0  # samples of the current batch given out
        self._done = 0  # samples of the current batch completed
        self._batch_loss = 0.0
        self._batch_weight = 0.0
        self._eval_queue: list[Sample] = []
        self._eval_loss = 0.0
        self._eval_tokens = 0
        self._eval_pending = 0
        self._writes: list[tuple[Snapshot, Future]] = []  # submitted, results not yet taken in
        self._finishing = False  # trained to the end; waiting for its writes before succeeding
        self._last_checkpoint_step = 0
        self._last_checkpoint_at = 0.0

    # --- state machine --------------------------------------------------------------------------
    def start(self) -> None:
        self._last_checkpoint_step, self._last_checkpoint_at = self.step, self.clock()
        self._transition(JobState.RUNNING, "job started")
        if self.step >= self.total_steps:  # resumed from its final checkpoint
            self._finish()
        else:
            self._new_batch()

    def pause(self) -> None:
        if self.state is JobState.RUNNING:
            self._transition(JobState.PAUSED, "job paused")

    def resume(self) -> None:
        if self.state is JobState.PAUSED:
            self._transition(JobState.RUNNING, "job resumed")

    def cancel(self) -> None:
        """Stops the job; writes already handed to the writer still complete, unrecorded."""
        if not self.state.is_final:
            self._transition(JobState.CANCELLED, "job cancelled")

    def fail(self, error: str) -> None:
        """Fails the job with `error`. A job already in a final state keeps it: a second fault in the
        same step (another of its samples, say) does not overwrite the first."""
        if self.state.is_final:
            return
        self.error = error
        self._transition(JobState.FAILED, f"job failed: {error}")

    def _finish(self) -> None:
        """Training is done: write the final adapter (if there is an output_dir); succeed once written."""
        self._finishing = True
        if self.output_dir is not None:
            self._submit(AdapterSnapshot.take(self, self.output_dir))
        self._succeed_if_written()

    def _succeed_if_written(self) -> None:
        if self._finishing and not self._writes and self.state is JobState.RUNNING:
            self._transition(JobState.SUCCEEDED, "job succeeded")

    def _transition(self, state: JobState, message: str) -> None:
        now = self.clock()
        if self._resumed_at is not None:
            self._running_seconds += now - self._resumed_at
        self._resumed_at = now if state is JobState.RUNNING else None
        self.state = state
        if state.is_final:
            self._release()
        self.emit(message, state=state.value)

    def _release(self) -> None:
        """Frees what only training needs: gradients, optimizer state, data, the results of writes
        still in flight (a failed or cancelled job ignores them). The adapter stays as it is."""
        for t in self.params:
            t.grad = None
        self.adapter.requires_grad_(False)
        self.optimizer = None
        self.train, self.val = [], []
        self._batch, self._eval_queue, self._writes = [], [], []

    def summary(self) -> JobSummary:
        return JobSummary(
            self.id, self.adapter.name, self.state, self.step, self.total_steps, self.train_tokens,
            self.last_train_loss, self.last_eval_loss, self.error, tuple(self.checkpoints),
        )

    # --- writes -----------------------------------------------------------------------------------
    def _submit(self, snapshot: Snapshot) -> None:
        self._writes.append((snapshot, self.writer.submit(snapshot)))

    @property
    def writes_pending(self) -> bool:
        return bool(self._writes)

    def poll_writes(self) -> None:
        """Engine thread: takes in the writes that finished, in order. A failed one fails the job;
        the last one of a finished job lets it succeed."""
        while self._writes and self._writes[0][1].done():
            snapshot, future = self._writes.pop(0)
            error = future.exception()
            if error is not None:
                self.fail(f"writing {snapshot.label} failed: {error}")
                return
            path = future.result()
            if isinstance(snapshot, CheckpointSnapshot):
                self.checkpoints.append(path)
                self.emit(f"checkpoint written at step {snapshot.step}", step=snapshot.step, checkpoint=str(path))
            else:
                self.emit(f"adapter written to {path}", output_dir=str(path))
        self._succeed_if_written()

    def emit(self, message: str, **data) -> None:
        self.events.append(JobEvent(time.time(), message, data))

    @property
    def running_seconds(self) -> float:
        extra = self.clock() - self._resumed_at if self._resumed_at is not None else 0.0
        return self._running_seconds + extra

    # --- data order -------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """Sample indices of optimizer step `step`: epochs are seeded permutations of the data."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
        n = self.config.samples_per_step
        return order[index * n : (index + 1) * n]

    def _new_batch(self) -> None:
        self._batch = self.batch_indices(self.step)
        self._handed = self._done = 0
        self._batch_loss = 0.0
        self._batch_weight = 1.0 / max(sum(self.train[i].num_loss_tokens for i in self._batch), 1)

    # --- work -------------------------------------------------------------------------------------
    @property
    def wants_work(self) -> bool:
        if self.state is not JobState.RUNNING or self._finishing:
            return False
        if self._eval_pending:
            return bool(self._eval_queue)
        return self._handed < len(self._batch)

    def take(self, max_tokens: int) -> list[WorkItem]:
        """Whole samples, in order, up to batch_size samples and `max_tokens` tokens. Evaluation runs
        before training resumes; samples of two optimizer batches never share a step."""
        items: list[WorkItem] = []
        tokens = 0
        limit = min(max_tokens, self.config.micro_batch_tokens)
        while self.wants_work and len(items) < self.config.batch_size:
            if self._eval_pending:
                sample, kind, weight = self._eval_queue[0], RowKind.EVAL, 1.0
            else:
                sample, kind, weight = self.train[self._batch[self._handed]], RowKind.TRAIN, self._batch_weight
            if tokens + len(sample) > limit:
                break
            if kind is RowKind.EVAL:
                self._eval_queue.pop(0)
            else:
                self._handed += 1
            items.append(WorkItem(self, sample, kind, weight))
            tokens += len(sample)
        return items

    def complete(self, item: WorkItem, loss_sum: float) -> None:
        """loss_sum: the sample's summed token losses (already multiplied by its weight for TRAIN).
        A non-finite loss fails the job before its optimizer step can spread it into the weights."""
        if self.state.is_final:
            return
        if not math.isfinite(loss_sum):
            what = "training" if item.kind is RowKind.TRAIN else "evaluation"
            self.fail(f"the {what} loss is not finite ({loss_sum}) in optimizer step {self.step + 1}; "
                      f"the adapter keeps its weights of step {self.step}")
            return
        if item.kind is RowKind.EVAL:
            self._eval_loss += loss_sum
            self._eval_tokens += item.sample.num_loss_tokens
            self._eval_pending -= 1
            if not self._eval_pending:
                self._finish_eval()
            return
        self._batch_loss += loss_sum
        self.train_tokens += len(item.sample)
        self._done += 1
        if self._done == len(self._batch):
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        lr = learning_rate(self.config, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([t.grad for t in self.params if t.grad is not None]))
        if not math.isfinite(grad_norm):
            self.fail(f"the gradients are not finite (norm {grad_norm}) in optimizer step {self.step + 1}; "
                      f"the adapter keeps its weights of step {self.step}")
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.on_weights_changed()
        self.step += 1
        self.last_train_loss = self._batch_loss
        seconds = self.running_seconds
        self.emit(
            f"step {self.step}/{self.total_steps}: train loss {self._batch_loss:.4f}",
            step=self.step, total_steps=self.total_steps, train_loss=self._batch_loss, learning_rate=lr,
            grad_norm=grad_norm, tokens_per_second=self.train_tokens / max(seconds, 1e-9),
            eta_seconds=seconds / self.step * (self.total_steps - self.step),
        )
        finished = self.step >= self.total_steps
        if self._checkpoint_due(finished):
            self._submit(CheckpointSnapshot.take(self, self.checkpoint_dir))
            self._last_checkpoint_step, self._last_checkpoint_at = self.step, self.clock()
        if self.val and ((self.config.eval_every and self.step % self.config.eval_every == 0) or finished):
            self._start_eval()
        elif finished:
            self._finish()
            return
        if not finished:
            self._new_batch()

    def _checkpoint_due(self, finished: bool) -> bool:
        """After an optimizer step: `checkpoint_every` steps or `checkpoint_interval` seconds since the
        last checkpoint, and always after the last step (when either is on). While a checkpoint is
        still being written, the next one waits (a slow disk does not pile snapshots up in memory);
        the final one never waits."""
        every, interval = self.config.checkpoint_every, self.config.checkpoint_interval
        if self.checkpoint_dir is None or not (every or interval):
            return False
        if finished:
            return True
        if any(isinstance(snapshot, CheckpointSnapshot) and not future.done() for snapshot, future in self._writes):
            return False
        return bool(every and self.step - self._last_checkpoint_step >= every) or bool(
            interval and self.clock() - self._last_checkpoint_at >= interval
        )

    def _start_eval(self) -> None:
        self._eval_queue = list(self.val)
        self._eval_pending = len(self.val)
        self._eval_loss, self._eval_tokens = 0.0, 0

    def _finish_eval(self) -> None:
        self.last_eval_loss = self._eval_loss / max(self._eval_tokens, 1)
        self.emit(f"step {self.step}: eval loss {self.last_eval_loss:.4f}", step=self.step, eval_loss=self.last_eval_loss)
        if self.step >= self.total_steps:
            self._finish()

    # --- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer state, copied: later optimizer steps do not change the returned tensors."""
        return {
            "step": self.step,
            "train_tokens": self.train_tokens,
            "running_seconds": self.running_seconds,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "dropout_rng": self.dropout_generator.get_state(),
            "data_fingerprint": self.data_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["data_fingerprint"] != self.data_fingerprint():
            raise ValueError("the checkpoint was made with other training data or batch settings; cannot resume")
        self.step = state["step"]
        self.train_tokens = state["train_tokens"]
        self._running_seconds = state["running_seconds"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.dropout_generator.set_state(state["dropout_rng"])

    def data_fingerprint(self) -> str:
        h = hashlib.sha256(repr((self.config.seed, self.config.samples_per_step, len(self.train))).encode())
        for s in self.train:
            h.update(repr(s.input_ids).encode())
        return h.hexdigest()
