"""Per-adapter optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from loramux.training.config import TrainingConfig


def learning_rate(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    decay_steps = max(total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    if config.lr_schedule == "linear":
        return config.learning_rate * (1.0 - progress)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.Tensor], config: TrainingConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8)
