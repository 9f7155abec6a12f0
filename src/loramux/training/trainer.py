"""The training side of a step: hand out jobs' samples, turn hidden states into losses and gradients.

The loss needs logits only at target rows (the rows whose next token is a target), and those are
projected through the vocabulary in chunks: each chunk's logits are made, differentiated and
dropped before the next, and the gathered gradient of the hidden rows flows back through the model
in one backward. Peak memory is then one chunk of logits, not rows x vocabulary.

Faults stop at the job: an error in one job's part of a step (handing out its samples, its
optimizer step, a snapshot, a write) fails that job and no other. The loss and backward of a
step's TRAIN rows are one computation shared by the jobs in it: if that fails, those jobs fail.
Jobs in a final state leave `jobs` (what a step looks at) when the step ends; a `JobSummary` of
each of the latest FINISHED_KEPT stays in `finished`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loramux.batch import RowKind
from loramux.model.llama import LlamaModel
from loramux.training.job import JobSummary, TrainingJob, WorkItem
from loramux.training.writer import Writer

log = logging.getLogger("loramux.training")

# Logits and loss of this many target rows at a time ([rows, vocab] logits, their log-softmax and
# gradient live at once). Measured with two jobs on the default model: 128 -> 64 rows lowers the
# step's peak by about 90 MB at the same speed; 32 lowers it no further.
LOSS_CHUNK_ROWS = 64
FINISHED_KEPT = 1000


class Trainer:
    """jobs: the live jobs (not yet retired); finished: summaries of the latest finished ones.
    writer: the thread that writes every job's checkpoints and adapters. clock: the jobs' clock."""

    def __init__(self, model: LlamaModel, writer: Writer | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.writer = writer or Writer()
        self.clock = clock
        self.jobs: dict[str, TrainingJob] = {}
        self.finished: OrderedDict[str, JobSummary] = OrderedDict()
        self._turn = 0

    def add(self, job: TrainingJob) -> None:
        if job.id in self.jobs or job.id in self.finished:
            raise ValueError(f"job id {job.id!r} is in use")
        training = [j for j in self.jobs.values() if j.adapter is job.adapter and not j.state.is_final]
        if training:
            raise ValueError(f"adapter {job.adapter.name!r} is being trained by job {training[0].id}")
        self.jobs[job.id] = job
        job.start()

    def job(self, job_id: str) -> TrainingJob | JobSummary:
        found = self.jobs.get(job_id) or self.finished.get(job_id)
        if found is None:
            raise LookupError(f"unknown job {job_id!r}")
        return found

    @property
    def wants_work(self) -> bool:
        """Some job wants samples."""
        return any(j.wants_work for j in self.jobs.values())

    @property
    def has_work(self) -> bool:
        """Some job wants samples, or has writes whose results are still to be taken in."""
        return any(j.wants_work or j.writes_pending for j in self.jobs.values())

    def take_work(self, max_tokens: int) -> list[WorkItem]:
        """Whole samples from the jobs that want work, starting with a different job each step."""
        jobs = [j for j in self.jobs.values() if j.wants_work]
        if not jobs or max_tokens <= 0:
            return []
        self._turn = (self._turn + 1) % len(jobs)
        items: list[WorkItem] = []
        for job in jobs[self._turn :] + jobs[: self._turn]:
            with _failing(job, "handing out its samples"):
                items += job.take(max_tokens - sum(len(i.sample) for i in items))
        return items

    def poll(self) -> None:
        """After each step (engine thread): takes in finished writes, then retires final jobs."""
        for job in list(self.jobs.values()):
            with _failing(job, "taking in its writes"):
                job.poll_writes()
            if job.state.is_final:
                del self.jobs[job.id]
                self.finished[job.id] = job.summary()
                while len(self.finished) > FINISHED_KEPT:
                    self.finished.popitem(last=False)

    def fail_all(self, items: Sequence[WorkItem], error: str) -> None:
        """Fails every job that has an item among `items` (a shared part of their step failed)."""
        for job in {item.job.id: item.job for item in items}.values():
            job.fail(error)

    def apply(self, hidden: torch.Tensor, rows: Sequence[range], items: Sequence[WorkItem]) -> None:
        """hidden: the step's final hidden states (TRAIN rows carry autograd graphs); rows[k]: the
        rows of items[k]. Backpropagates every TRAIN item's weighted loss (into its own adapter only)
        and reports each item's loss to its job."""
        losses = torch.zeros(len(items), dtype=torch.float64)
        for kind in (RowKind.TRAIN, RowKind.EVAL):
            picked = [k for k, item in enumerate(items) if item.kind is kind]
            if not picked:
                continue
            try:
                losses[picked] = self._loss(hidden, [rows[k] for k in picked], [items[k] for k in picked], kind is RowKind.TRAIN)
            except Exception as e:
                log.exception("the %s loss of a step failed", kind.name)
                self.fail_all([items[k] for k in picked], f"the step's {kind.name.lower()} loss failed: {type(e).__name__}: {e}")
        for item, loss in zip(items, losses.tolist()):
            with _failing(item.job, "its update after the step (optimizer step, evaluation, snapshots)"):
                item.job.complete(item, loss)

    def _loss(self, hidden: torch.Tensor, rows: list[range], items: list[WorkItem], backward: bool) -> torch.Tensor:
        """Per item: weight * sum over its target tokens of the cross-entropy."""
        positions, targets, weights, owners = [], [], [], []
        for k, (r, item) in enumerate(zip(rows, items)):
            ids, mask = item.sample.input_ids, item.sample.loss_mask
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    positions.append(r.start + t)
                    targets.append(ids[t + 1])
                    weights.append(item.weight)
                    owners.append(k)
        device = hidden.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=device)
        targets_t = torch.tensor(targets, dtype=torch.long, device=device)
        weights_t = torch.tensor(weights, dtype=torch.float32, device=device)
        selected = hidden[positions_t]
        leaf = selected.detach().requires_grad_(backward)
        token_losses = []
        with torch.set_grad_enabled(backward):
            for s in range(0, len(positions), LOSS_CHUNK_ROWS):
                chunk = slice(s, s + LOSS_CHUNK_ROWS)
                ce = F.cross_entropy(self.model.logits(leaf[chunk]), targets_t[chunk], reduction="none") * weights_t[chunk]
                if backward:
                    ce.sum().backward()
                token_losses.append(ce.detach())
        if backward:
            selected.backward(leaf.grad)
        per_item = torch.zeros(len(items), dtype=torch.float64, device=device)
        per_item.index_add_(0, torch.tensor(owners, dtype=torch.long, device=device), torch.cat(token_losses).double())
        return per_item.cpu()


@contextmanager
def _failing(job: TrainingJob, action: str) -> Iterator[None]:
    """Runs a part of `job`'s work; an exception there fails the job (logged with its traceback)
    instead of reaching the step, which goes on for everyone else."""
    try:
        yield
    except Exception as e:
        log.exception("job %s: %s failed", job.id, action)
        job.fail(f"{action} failed: {type(e).__name__}: {e}")
