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
from loramux.training.objectives import Example, WorkSequence, objective_for
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
    learning_rate, tokens_per_second, eta_seconds, and a DPO job's rewards/* and eval_rewards/*)."""

    created_at: float
    message: str
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkItem:
    """One example of a job in a step (a sample, or a DPO pair), run as `sequences` (whole, in that
    one step). kind: TRAIN (a part of an optimizer batch) or EVAL (evaluation). weight: the factor of
    its loss in its batch's (1 / the batch's units, its objective's `units`, for TRAIN; 1 for EVAL)."""

    job: TrainingJob
    example: Example
    kind: RowKind
    weight: float
    sequences: tuple[WorkSequence, ...]

    @property
    def num_rows(self) -> int:
        """The rows it adds to a step (every sequence's tokens, reference rows included)."""
        return sum(len(s.sample) for s in self.sequences)


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
    last_metrics: dict = field(default_factory=dict)


class TrainingJob:
    """train, val: Samples (method "supervised") or PreferencePairs ("dpo").
    reference: a DPO job's reference adapter (frozen; None: the base model).
    writer: where checkpoints and the final adapter are written (off the engine thread).
    clock: seconds, for `checkpoint_interval` and the job's running time; tests pass a fake one."""

    def __init__(
        self,
        job_id: str,
        adapter: LoraAdapter,
        train: list[Example],
        config: TrainingConfig,
        *,
        writer: Writer,
        val: list[Example] | None = None,
        reference: LoraAdapter | None = None,
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
        self.objective = objective_for(config.method, config.beta)
        self.reference = reference
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
        self.last_metrics: dict[str, float] = {}  # the objective's metrics of the last optimizer step (and eval)
        self._running_seconds = 0.0
        self._resumed_at: float | None = None
        self._batch: list[int] = []
        self._handed = 0  # samples of the current batch given out
        self._done = 0  # samples of the current batch completed
        self._batch_loss = 0.0
        self._batch_weight = 0.0
        self._batch_metrics: dict[str, float] = {}
        self._eval_queue: list[Example] = []
        self._eval_loss = 0.0
        self._eval_units = 0
        self._eval_metrics: dict[str, float] = {}
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
            self.last_train_loss, self.last_eval_loss, self.error, tuple(self.checkpoints), dict(self.last_metrics),
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
        self._batch_metrics = {}
        self._batch_weight = 1.0 / max(sum(self.objective.units(self.train[i]) for i in self._batch), 1)

    # --- work -------------------------------------------------------------------------------------
    @property
    def wants_work(self) -> bool:
        if self.state is not JobState.RUNNING or self._finishing:
            return False
        if self._eval_pending:
            return bool(self._eval_queue)
        return self._handed < len(self._batch)

    def take(self, max_tokens: int) -> list[WorkItem]:
        """Whole examples (all rows of a DPO pair together), in order, up to batch_size examples and
        `max_tokens` rows. Evaluation runs before training resumes; examples of two optimizer batches
        never share a step."""
        items: list[WorkItem] = []
        rows = 0
        limit = min(max_tokens, self.config.micro_batch_tokens)
        while self.wants_work and len(items) < self.config.batch_size:
            if self._eval_pending:
                example, kind, weight = self._eval_queue[0], RowKind.EVAL, 1.0
            else:
                example, kind, weight = self.train[self._batch[self._handed]], RowKind.TRAIN, self._batch_weight
            item = WorkItem(self, example, kind, weight, self.objective.sequences(example, kind, self.adapter, self.reference))
            if rows + item.num_rows > limit:
                break
            if kind is RowKind.EVAL:
                self._eval_queue.pop(0)
            else:
                self._handed += 1
            items.append(item)
            rows += item.num_rows
        return items

    def complete(self, item: WorkItem, loss_sum: float, metrics: dict[str, float]) -> None:
        """loss_sum: the item's loss (already multiplied by its weight for TRAIN: for a supervised
        sample its summed token losses); metrics: the objective's figures of the item, unweighted.
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
            self._eval_units += self.objective.units(item.example)
            for name, value in metrics.items():  # summed here, a mean over the evaluated examples at the end
                self._eval_metrics[name] = self._eval_metrics.get(name, 0.0) + value
            self._eval_pending -= 1
            if not self._eval_pending:
                self._finish_eval()
            return
        self._batch_loss += loss_sum
        for name, value in metrics.items():  # the mean over the batch's examples
            self._batch_metrics[name] = self._batch_metrics.get(name, 0.0) + value / len(self._batch)
        self.train_tokens += len(item.example)
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
        self.last_metrics.update(self._batch_metrics)
        seconds = self.running_seconds
        self.emit(
            f"step {self.step}/{self.total_steps}: train loss {self._batch_loss:.4f}",
            step=self.step, total_steps=self.total_steps, train_loss=self._batch_loss, learning_rate=lr,
            grad_norm=grad_norm, tokens_per_second=self.train_tokens / max(seconds, 1e-9),
            eta_seconds=seconds / self.step * (self.total_steps - self.step), **self._batch_metrics,
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
        self._eval_loss, self._eval_units, self._eval_metrics = 0.0, 0, {}

    def _finish_eval(self) -> None:
        """The eval loss is the mean over the validation set's units (target tokens, or pairs), as
        the train loss is over a batch's; metrics are means over its examples, named eval_* (TRL's names)."""
        self.last_eval_loss = self._eval_loss / max(self._eval_units, 1)
        metrics = {f"eval_{name}": total / len(self.val) for name, total in self._eval_metrics.items()}
        self.last_metrics.update(metrics)
        self.emit(f"step {self.step}: eval loss {self.last_eval_loss:.4f}", step=self.step, eval_loss=self.last_eval_loss,
                  **metrics)
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
        for example in self.train:
            h.update(self.objective.identity(example).encode())
        return h.hexdigest()
