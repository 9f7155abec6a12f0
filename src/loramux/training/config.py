"""Hyperparameters of a fine-tuning job."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")
METHODS = ("supervised", "dpo")


@dataclass(frozen=True)
class TrainingConfig:
    """One optimizer step covers batch_size * gradient_accumulation samples (the optimizer batch);
    a step of the engine carries at most batch_size samples and micro_batch_tokens tokens of a job
    (fewer when serving leaves less room). The loss is the mean over the target tokens of the whole
    optimizer batch, however the batch is spread over engine steps.

    max_steps, when set, overrides epochs. eval_every counts optimizer steps (0: only at the end).

    Checkpoints (of a job with a checkpoint directory) are on by default: one is taken after an
    optimizer step once `checkpoint_every` steps or `checkpoint_interval` seconds of training have
    passed since the last (whichever comes first), and one after the last step, so that a crash
    loses at most that much training. 0 turns either trigger off; both 0 turn checkpoints off.

    The learning rate warms up linearly over warmup_steps (step s < warmup gets (s + 1) / warmup
    of it), then follows `lr_schedule` toward 0 as transformers' schedules do:
    linear gives step s of T the share (T - s) / (T - warmup); cosine the cosine of that progress.

    method: "supervised" (prompt/completion or chat examples; the loss is the mean token
    cross-entropy) or "dpo" (preference pairs; the loss is the mean over the optimizer batch's
    pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), training/objectives.py). For
    dpo, batch_size counts pairs, and a pair's chosen and rejected sequences, with the reference's
    rows of both, run in one step: they must fit micro_batch_tokens together."""

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation: int = 1
    micro_batch_tokens: int = 2048
    learning_rate: float = 2e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 10
    checkpoint_interval: float = 60.0
    method: str = "supervised"
    beta: float = 0.1

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.gradient_accumulation >= 1, f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}"),
            (self.micro_batch_tokens >= 2, f"micro_batch_tokens must be at least 2, got {self.micro_batch_tokens}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must be >= 0"),
            (self.checkpoint_interval >= 0, f"checkpoint_interval must be >= 0 seconds, got {self.checkpoint_interval}"),
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (math.isfinite(self.beta) and self.beta > 0, f"beta must be positive and finite, got {self.beta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation
