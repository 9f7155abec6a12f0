"""Small fine-tuning datasets made by the project (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """Path of a shipped file, e.g. shipped("reverse_words/train.jsonl")."""
    path = HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"no shipped dataset file {name!r}")
    return path
