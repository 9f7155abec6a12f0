"""Job checkpoints: the adapter in PEFT's format beside the trainer state, written atomically.

    <checkpoint_dir>/step-000010/
        adapter_config.json, adapter_model.safetensors   (loads as an adapter anywhere)
        trainer_state.pt                                 (optimizer, step, RNG, data fingerprint)

A checkpoint directory appears complete or not at all (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramux.config import ModelConfig
from loramux.lora.peft_io import load_peft_adapter, write_peft_files

if TYPE_CHECKING:
    from loramux.training.job import TrainingJob

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


def save_checkpoint(job: TrainingJob, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{job.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=directory))
    try:
        write_peft_files(job.adapter, tmp)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(job.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
