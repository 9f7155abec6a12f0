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
from loramux.training.objectives import WorkSequence
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
        live = [j for j in self.jobs.values() if not j.state.is_final]
        training = [j for j in live if job.adapter is j.adapter]
        if training:
            raise ValueError(f"adapter {job.adapter.name!r} is being trained by job {training[0].id}")
        # a DPO job's reference stays frozen: nobody trains it while the job runs
        referenced = [j for j in live if job.adapter is j.reference]
        if referenced:
            raise ValueError(f"adapter {job.adapter.name!r} is the reference of job {referenced[0].id}")
        moving = [j for j in live if job.reference is not None and job.reference is j.adapter]
        if moving:
            raise ValueError(f"adapter {job.reference.name!r} cannot be a reference: job {moving[0].id} is training it")
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
        """Whole examples (their rows within `max_tokens` in all) from the jobs that want work, starting
        with a different job each step."""
        jobs = [j for j in self.jobs.values() if j.wants_work]
        if not jobs or max_tokens <= 0:
            return []
        self._turn = (self._turn + 1) % len(jobs)
        items: list[WorkItem] = []
        for job in jobs[self._turn :] + jobs[: self._turn]:
            with _failing(job, "handing out its samples"):
                items += job.take(max_tokens - sum(i.num_rows for i in items))
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
        """hidden: the step's final hidden states (TRAIN rows carry autograd graphs); rows: the row
        range of every sequence of `items`, in order (items[0].sequences, then items[1]'s, ...).
        Backpropagates every TRAIN item's weighted loss (into its own adapter only) and reports each
        item's loss and metrics to its job."""
        starts = [0]
        for item in items:
            starts.append(starts[-1] + len(item.sequences))
        losses = torch.zeros(len(items), dtype=torch.float64)
        metrics: list[dict[str, float]] = [{} for _ in items]
        for kind in (RowKind.TRAIN, RowKind.EVAL):
            picked = [k for k, item in enumerate(items) if item.kind is kind]
            if not picked:
                continue
            try:
                item_rows = [rows[starts[k] : starts[k + 1]] for k in picked]
                losses[picked], picked_metrics = self._loss(hidden, item_rows, [items[k] for k in picked], kind is RowKind.TRAIN)
                for k, m in zip(picked, picked_metrics):
                    metrics[k] = m
            except Exception as e:
                log.exception("the %s loss of a step failed", kind.name)
                self.fail_all([items[k] for k in picked], f"the step's {kind.name.lower()} loss failed: {type(e).__name__}: {e}")
        for item, loss, item_metrics in zip(items, losses.tolist(), metrics):
            with _failing(item.job, "its update after the step (optimizer step, evaluation, snapshots)"):
                item.job.complete(item, loss, item_metrics)

    def _loss(
        self, hidden: torch.Tensor, rows: list[Sequence[range]], items: list[WorkItem], backward: bool
    ) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Per item: weight * its objective's loss of its sequences' summed target log-probabilities,
        and its metrics. With `backward`, the gradient of the summed losses flows into the TRAIN rows:
        each target row's gradient of its own log-probability, scaled by d loss / d (its sequence's sum)."""
        sequences = [(seq, r) for item, item_rows in zip(items, rows) for seq, r in zip(item.sequences, item_rows)]
        logps = torch.zeros(len(sequences), dtype=torch.float64)
        graph = [j for j, (seq, _) in enumerate(sequences) if backward and seq.kind is RowKind.TRAIN]
        rest = sorted(set(range(len(sequences))) - set(graph))
        if rest:
            logps[rest], _ = self._logprobs(hidden, [sequences[j] for j in rest], with_graph=False)
        if graph:
            logps[graph], (selected, row_grads, owners) = self._logprobs(hidden, [sequences[j] for j in graph], with_graph=True)
        leaf = logps.requires_grad_(backward)
        losses, metrics = [], []
        start = 0
        with torch.set_grad_enabled(backward):
            for item in items:
                loss, item_metrics = item.job.objective.loss(leaf[start : start + len(item.sequences)])
                losses.append(item.weight * loss)
                metrics.append({name: float(v) for name, v in item_metrics.items()})
                start += len(item.sequences)
            total = torch.stack(losses)
        if graph:
            total.sum().backward()
            scale = leaf.grad[graph][owners].float()  # d loss / d (logp sum of the row's sequence)
            selected.backward((row_grads * scale[:, None]).to(selected.dtype))
        return total.detach(), metrics

    def _logprobs(
        self, hidden: torch.Tensor, sequences: list[tuple[WorkSequence, range]], with_graph: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Each sequence's summed log-probability of its target tokens [n] (float64) and, with_graph,
        (the target rows' hidden states [R, hidden] (in the graph), d log p / d row [R, hidden]
        (float32), the index of each row's sequence [R]). The rows are projected through the
        vocabulary LOSS_CHUNK_ROWS at a time: each chunk's logits are made (and differentiated) and
        dropped before the next."""
        positions, targets, owners = [], [], []
        for j, (seq, r) in enumerate(sequences):
            ids, mask = seq.sample.input_ids, seq.sample.loss_mask
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    positions.append(r.start + t)
                    targets.append(ids[t + 1])
                    owners.append(j)
        device = hidden.device
        targets_t = torch.tensor(targets, dtype=torch.long, device=device)
        owners_t = torch.tensor(owners, dtype=torch.long, device=device)
        selected = hidden[torch.tensor(positions, dtype=torch.long, device=device)]
        # float32 leaf: the row gradients are scaled in float32 and rounded to the model's dtype once
        leaf = selected.detach().float().requires_grad_(with_graph)
        token_logps = []
        with torch.set_grad_enabled(with_graph):
            for s in range(0, len(positions), LOSS_CHUNK_ROWS):
                chunk = slice(s, s + LOSS_CHUNK_ROWS)
                logp = -F.cross_entropy(self.model.logits(leaf[chunk].to(hidden.dtype)), targets_t[chunk], reduction="none")
                if with_graph:
                    logp.sum().backward()
                token_logps.append(logp.detach())
        sums = torch.zeros(len(sequences), dtype=torch.float64, device=device)
        sums.index_add_(0, owners_t, torch.cat(token_logps).double())
        return sums.cpu(), ((selected, leaf.grad, owners_t) if with_graph else None)


@contextmanager
def _failing(job: TrainingJob, action: str) -> Iterator[None]:
    """Runs a part of `job`'s work; an exception there fails the job (logged with its traceback)
    instead of reaching the step, which goes on for everyone else."""
    try:
        yield
    except Exception as e:
        log.exception("job %s: %s failed", job.id, action)
        job.fail(f"{action} failed: {type(e).__name__}: {e}")
