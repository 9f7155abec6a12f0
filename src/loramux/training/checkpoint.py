"""Job checkpoints: the adapter in PEFT's format beside the trainer state, written atomically.

    <checkpoint_dir>/step-000010/
        adapter_config.json, adapter_model.safetensors   (loads as an adapter anywhere)
        trainer_state.pt                                 (optimizer, step, RNG, data fingerprint)

A checkpoint is taken in two halves: `CheckpointSnapshot.take` copies the adapter and the trainer
state on the engine thread, at an optimizer-step boundary; `write` puts the copy on disk (on the
writer thread, training meanwhile going on) as one directory that appears complete or not at all
(`loramux.atomic.replace_dir_atomic`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramux.atomic import replace_dir_atomic
from loramux.config import ModelConfig
from loramux.lora.peft_io import (
    PeftFiles,
    load_peft_adapter,
    peft_files,
    write_peft_dir,
)

if TYPE_CHECKING:
    from loramux.training.job import TrainingJob

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointSnapshot:
    """A job's adapter and trainer state at optimizer step `step`, copied away from the live tensors."""

    directory: Path
    step: int
    adapter: PeftFiles
    trainer_state: dict

    @classmethod
    def take(cls, job: TrainingJob, directory: Path) -> CheckpointSnapshot:
        return cls(directory, job.step, peft_files(job.adapter, job.base_model), job.state_dict())

    @property
    def label(self) -> str:
        return f"checkpoint at step {self.step}"

    def write(self) -> Path:
        def fill(tmp: Path) -> None:
            self.adapter.write(tmp)
            torch.save(self.trainer_state, tmp / STATE_FILE)

        return replace_dir_atomic(self.directory / f"step-{self.step:06d}", fill)


@dataclass(frozen=True)
class AdapterSnapshot:
    """A job's final adapter, to be written in PEFT's format to `directory` (its output_dir)."""

    directory: Path
    adapter: PeftFiles

    @classmethod
    def take(cls, job: TrainingJob, directory: Path) -> AdapterSnapshot:
        return cls(directory, peft_files(job.adapter, job.base_model))

    @property
    def label(self) -> str:
        return f"the adapter to {self.directory}"

    def write(self) -> Path:
        return write_peft_dir(self.adapter, self.directory)


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, if any."""
    if directory is None or not Path(directory).is_dir():
        return None
    found = [(int(m[1]), p) for p in Path(directory).iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def restore_checkpoint(job: TrainingJob, path: Path, model: ModelConfig) -> None:
    """Loads a checkpoint's adapter weights (in place: the served tensors change) and trainer state."""
    saved = load_peft_adapter(path, model, job.adapter.name, dtype=job.params[0].dtype, device=job.params[0].device)
    if set(saved.weights) != set(job.adapter.weights):
        raise ValueError(f"checkpoint {path} covers other modules than adapter {job.adapter.name!r}")
    with torch.no_grad():
        for key, (A, B) in saved.weights.items():
            job.adapter.weights[key][0].copy_(A)
            job.adapter.weights[key][1].copy_(B)
    job.load_state_dict(torch.load(path / STATE_FILE, weights_only=False))
    job.on_weights_changed()
