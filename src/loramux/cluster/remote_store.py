"""The Store's interface inside an engine replica: every read and write goes to the coordinator,
the one process that opens the data directory's SQLite catalog; paths are computed here, on the
same shared directory (`root`), so a replica reads training files and writes checkpoints and
adapters itself.

Calls block for one round trip to the coordinator (about a millisecond on one machine), as the
single-process server's SQLite calls block for a query; the coordinator's exceptions (a page after
an unknown cursor, a lost job lease) are raised here as their own types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from loramux.cluster.coordinator import STORE_METHODS
from loramux.server import store as local


class RemoteStore:
    def __init__(self, coordinator: ray.actor.ActorHandle, root: str, replica: str) -> None:
        self.coordinator, self.root, self.replica = coordinator, Path(root), replica

    def __getattr__(self, method: str):
        if method not in STORE_METHODS:
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return ray.get(self.coordinator.store_call.remote(self.replica, method, args, kwargs))
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None

        return call

    # the Store's own path helpers: they read only `root`
    file_path = local.Store.file_path
    job_dir = local.Store.job_dir
