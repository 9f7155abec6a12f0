"""What a job's examples run as in a step, and the loss of their log-probabilities: one class per
training method (TrainingConfig.method).

An example becomes one `WorkItem` (training/job.py) made of `WorkSequence`s, each a token sequence
run by one adapter (or the base model) either with a graph (TRAIN rows: the job's adapter, whose
gradients it builds) or without (EVAL rows). The trainer sums each sequence's log-probabilities of
its target tokens, logps [n_sequences], and the objective turns them into the item's loss (a
scalar, differentiable in logps) and its metrics. The gradient of the loss with respect to logps
scales each target row's gradient, so an objective never sees logits.

- supervised: one sequence; loss = -logp, the summed cross-entropy of its target tokens.
- dpo: four sequences, [policy chosen, policy rejected, reference chosen, reference rejected]; the
  policy ones run with the job's adapter (TRAIN rows in training), the reference ones with the
  job's reference (the starting adapter, or the base model) without a graph, in the same step.
  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) (TRL's loss_type="sigmoid"), and
  TRL's metrics rewards/chosen = beta * (pi_c - ref_c), rewards/rejected, rewards/accuracies
  (chosen reward > rejected reward), rewards/margins (their difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramux.batch import RowKind
from loramux.lora.adapter import LoraAdapter
from loramux.training.data import PreferencePair, Sample

Example = Sample | PreferencePair


@dataclass(frozen=True)
class WorkSequence:
    """One sequence of a work item. kind: TRAIN (rows build a graph into `adapter`) or EVAL (no
    graph). adapter: whose weights run it; None for the base model."""

    sample: Sample
    kind: RowKind
    adapter: LoraAdapter | None


class Supervised:
    """Next-token cross-entropy on the target tokens; a batch's loss is the mean over its target tokens."""

    name = "supervised"

    def sequences(self, sample: Sample, kind: RowKind, adapter: LoraAdapter, reference: LoraAdapter | None) -> tuple[WorkSequence, ...]:
        return (WorkSequence(sample, kind, adapter),)

    def units(self, sample: Sample) -> int:
        """What a batch's loss is the mean over: target tokens."""
        return sample.num_loss_tokens

    def identity(self, sample: Sample) -> str:
        """The example's tokens, for the data fingerprint of checkpoints."""
        return repr(sample.input_ids)

    def loss(self, logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return -logps[0], {}


class DirectPreference:
    """DPO with the sigmoid loss; a batch's loss is the mean over its pairs."""

    name = "dpo"
    METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def sequences(
        self, pair: PreferencePair, kind: RowKind, adapter: LoraAdapter, reference: LoraAdapter | None
    ) -> tuple[WorkSequence, ...]:
        return (
            WorkSequence(pair.chosen, kind, adapter),
            WorkSequence(pair.rejected, kind, adapter),
            WorkSequence(pair.chosen, RowKind.EVAL, reference),
            WorkSequence(pair.rejected, RowKind.EVAL, reference),
        )

    def units(self, pair: PreferencePair) -> int:
        return 1

    def identity(self, pair: PreferencePair) -> str:
        return repr((pair.chosen.input_ids, pair.rejected.input_ids))

    def loss(self, logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
        chosen = self.beta * (policy_chosen - ref_chosen)
        rejected = self.beta * (policy_rejected - ref_rejected)
        loss = -F.logsigmoid(chosen - rejected)
        margin = (chosen - rejected).detach()
        return loss, dict(zip(self.METRICS, (chosen.detach(), rejected.detach(), (margin > 0).double(), margin)))


def objective_for(method: str, beta: float) -> Supervised | DirectPreference:
    return DirectPreference(beta) if method == "dpo" else Supervised()
