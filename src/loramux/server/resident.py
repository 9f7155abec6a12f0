"""Which adapters of the catalog are resident in the engine, under a count limit, by LRU.

The catalog (the store) knows every adapter and where it lies on disk; the engine holds the
resident ones. When a request names an adapter that is not resident, its files are read off the
engine thread and it is admitted between two steps; if that would pass the limit, the least recently
used adapter that is idle (no request in flight, not training, not pinned, not reserved by a request
being admitted, not the frozen reference or the starting adapter (`init_from`) of an unfinished
fine-tuning job) is evicted first. Evicting only unregisters it: its files stay in the catalog.
Deleting a fine-tuned model (`delete`) unregisters it and drops it from the catalog, unless it is
in use in any of those ways.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from loramux.engine.engine import Engine
from loramux.server.jobs import UNFINISHED
from loramux.server.metrics import Metrics
from loramux.server.protocol import APIError
from loramux.server.store import Store

log = logging.getLogger("loramux.server")

class ResidentAdapters:
    """`metrics` observes each load (`loramux_adapter_load_seconds`) and eviction."""

    def __init__(self, engine: Engine, store: Store, metrics: Metrics, max_resident: int = 0) -> None:
        self.engine, self.store, self.metrics, self.max_resident = engine, store, metrics, max_resident
        self.last_used: dict[str, float] = {}
        self.added_at: dict[str, float] = {}  # when each adapter was registered (time.monotonic)
        self._reserved: Counter[str] = Counter()  # engine thread only

    def known(self, name: str) -> bool:
        return name in self.engine.adapters or name in self.store.adapters()

    async def reserve(self, name: str, loop) -> None:
        """Makes `name` resident and keeps it from eviction until `release(name)` (engine thread)."""
        self.last_used[name] = time.monotonic()
        if await loop.call(lambda e: self._reserve_if_resident(name)):
            return
        info = self.store.adapters().get(name)
        if info is None:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        # read on the engine's thread: torch on any other thread would cost the engine (engine_loop.py)
        await loop.call(lambda e: self._admit(name, info["path"]))

    def release(self, name: str) -> None:
        """Engine thread."""
        self._reserved[name] -= 1
        if self._reserved[name] <= 0:
            del self._reserved[name]

    def _reserve_if_resident(self, name: str) -> bool:
        if name in self.engine.adapters:
            self._reserved[name] += 1
            return True
        return False

    def _admit(self, name: str, path: str) -> None:
        """Engine thread: reserves `name`, reading it from `path` first unless a request since made
        it resident; 404 if it left the catalog meanwhile (deleted or unloaded)."""
        if not self._reserve_if_resident(name):
            if name not in self.store.adapters():
                raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
            self.add(name, path)
            self._reserved[name] += 1

    def add(self, name: str, path: str | Path) -> None:
        """Engine thread: reads the adapter at `path` and registers it as `name`, evicting idle
        adapters if the limit needs it; read first, so that a refused adapter evicts nothing. The
        whole of it, disk to servable, is observed as one adapter load."""
        start = time.perf_counter()
        adapter = self.engine.read_adapter(name, path)
        self.make_room(1)
        self.engine.adapters.add(adapter)
        self.added_at[name] = time.monotonic()
        self.metrics.adapter_loads.observe(time.perf_counter() - start)

    def preload(self) -> None:
        """Engine thread, after a restart (once the unfinished jobs hold their adapters): loads the
        catalog's adapters in order while they fit under the limit, all of them without one; the
        rest, and checkpoints, load on demand, so a catalog of thousands never sits in memory at
        once. An adapter that cannot be read is logged and left to load on demand."""
        for name, info in self.store.adapters().items():
            if self.max_resident and len(self.engine.adapters) >= self.max_resident:
                return
            if info.get("source") == "checkpoint" or name in self.engine.adapters:
                continue
            try:
                self.add(name, info["path"])
            except Exception as e:  # a missing or broken adapter must not keep the server down
                log.error("adapter %s from the catalog could not be loaded: %s", name, e)

    def retain_cataloged(self, catalog: set[str], grace_seconds: float) -> list[str]:
        """Engine thread, in a cluster: unregisters the idle resident adapters that are not in
        `catalog` (the adapters' names as the coordinator last gave them: unloaded or deleted through
        another replica) and returns their names. An adapter registered within `grace_seconds` is
        kept: the route that loaded it may not have written it to the catalog yet, or the names may
        predate it."""
        busy, now = self._in_use(), time.monotonic()
        gone = [n for n in self.engine.adapters.names()
                if n not in catalog and n not in busy and now - self.added_at.get(n, 0.0) >= grace_seconds]
        for name in gone:
            self.engine.adapters.remove(name)
            self.last_used.pop(name, None)
            self.added_at.pop(name, None)
        return gone

    def make_room(self, extra: int) -> None:
        """Evicts idle adapters until `extra` more fit under the limit (engine thread)."""
        if not self.max_resident:
            return
        while len(self.engine.adapters) + extra > self.max_resident:
            busy = self._in_use()
            pinned = {n for n, info in self.store.adapters().items() if info.get("pinned")}
            idle = [n for n in self.engine.adapters.names() if n not in busy and n not in pinned]
            if not idle:
                raise APIError(429, f"all {self.max_resident} resident adapters are busy or pinned; retry later", code="adapters_busy")
            victim = min(idle, key=lambda n: self.last_used.get(n, 0.0))
            self.engine.adapters.remove(victim)
            self.metrics.adapter_evictions.inc()

    def delete(self, name: str) -> str | None:
        """Engine thread: unregisters the fine-tuned model `name` and drops it from the catalog;
        returns its directory, for the caller to remove (None if it has none yet). 404 if unknown;
        403 for an adapter the server was given (--adapter, /v1/load_lora_adapter), not one it made;
        409 while it is in use."""
        info = self.store.adapters().get(name)
        if info is None and name not in self.engine.adapters:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        source = (info or {}).get("source")
        if source == "--adapter":
            raise APIError(403, f"the adapter {name!r} was given to the server with --adapter, not fine-tuned here; "
                                "unload it with /v1/unload_lora_adapter, or restart the server without it", param="model",
                           code="model_not_deletable")
        if source == "checkpoint":
            raise APIError(403, f"{name!r} is a checkpoint of fine-tuning job {info.get('job')}; it goes with its job",
                           param="model", code="model_not_deletable")
        if source == "loaded":
            raise APIError(403, f"the adapter {name!r} was loaded with /v1/load_lora_adapter, not fine-tuned here; "
                                "unload it with /v1/unload_lora_adapter (its files are left alone)", param="model",
                           code="model_not_deletable")
        why = self._in_use().get(name)
        if why is not None:
            raise APIError(409, f"the model {name!r} {why}", param="model", code="model_in_use")
        if name in self.engine.adapters:
            self.engine.adapters.remove(name)
        self.store.remove_adapter(name)
        self.last_used.pop(name, None)
        return None if info is None else info["path"]

    def _in_use(self) -> dict[str, str]:
        """Engine thread: the adapters that must stay resident now, each with why."""
        uses = {n: "is held by a request being admitted; retry later" for n, count in self._reserved.items() if count > 0}
        uses |= {j.adapter.name: "is being trained; cancel its job first" for j in self.engine.trainer.jobs.values()
                 if not j.state.is_final}
        uses |= {r.adapter: "has requests in flight; retry when they finish" for r in self.engine.requests.values()
                 if r.adapter is not None}
        uses |= {j.reference.name: f"is the frozen reference of fine-tuning job {j.id}; cancel it first"
                 for j in self.engine.trainer.jobs.values() if not j.state.is_final and j.reference is not None}
        # an unfinished job's starting adapter: a restart recreates the job from it
        uses |= {r["init_from"]: f"is the starting point of fine-tuning job {r['id']}; cancel it first"
                 for r in self.store.jobs_with_status(*UNFINISHED) if r.get("init_from")}
        return uses
