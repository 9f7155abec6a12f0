"""The writer thread: checkpoints and adapters go to disk off the step loop.

A job copies what it wants written on the engine thread (a snapshot: CPU clones of its adapter and,
for a checkpoint, its trainer state) and hands it to the `Writer`, whose one thread writes
snapshots in submission order while steps go on; a slow or full disk then delays only the write.
The result (the written path, or the error) comes back as a Future that the job reads on the
engine thread (`TrainingJob.poll_writes`), so job state only ever changes there.

The thread runs no torch computation: snapshots are cloned before they arrive, and writing one is
serialization (safetensors, torch.save) and file I/O. That matters because every thread that runs
a parallel torch op keeps a libgomp team that slows the engine's own (see server/engine_loop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol


class Snapshot(Protocol):
    """Something to write: `write()` puts it on disk atomically and returns where; `label` names
    it in messages ("checkpoint at step 10")."""

    label: str

    def write(self) -> Path: ...


def write_snapshot(snapshot: Snapshot) -> Path:
    return snapshot.write()


class Writer:
    """One background thread that runs `write(snapshot)` for each submitted snapshot, in order.

    write: how a snapshot reaches the disk; the default is the snapshot's own atomic write. A test
    passes a function that fails as a full disk does, to check what a failed write does to a job.
    """

    def __init__(self, write: Callable[[Snapshot], Path] = write_snapshot) -> None:
        self._write = write
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-writer")
        self._pending: set[Future] = set()

    def submit(self, snapshot: Snapshot) -> Future:
        """Queues the snapshot; the Future gives the written path or raises the write's error."""
        future = self._executor.submit(self._write, snapshot)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def wait_any(self, timeout: float) -> None:
        """Blocks until some pending write finishes, or `timeout` seconds (the engine's idle wait)."""
        pending = set(self._pending)
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def wait_all(self, timeout: float | None = None) -> bool:
        """Blocks until every write submitted so far has finished; False if `timeout` ran out first."""
        pending = set(self._pending)
        return not wait(pending, timeout=timeout).not_done if pending else True
