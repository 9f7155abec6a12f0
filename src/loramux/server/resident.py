"""Which adapters of the catalog are resident in the engine, under a count limit, by LRU.

The catalog (the store) knows every adapter and where it lies on disk; the engine holds the
resident ones. When a request names an adapter that is not resident, its files are read off the
engine thread and it is admitted between two steps; if that would pass the limit, the least recently
used adapter that is idle (no request in flight, not training, not pinned, not reserved by a request
being admitted) is evicted first. Evicting only unregisters it: its files stay in the catalog.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from loramux.engine.engine import Engine
from loramux.server.protocol import APIError
from loramux.server.store import Store


class ResidentAdapters:
    def __init__(self, engine: Engine, store: Store, max_resident: int = 0) -> None:
        self.engine, self.store, self.max_resident = engine, store, max_resident
        self.last_used: dict[str, float] = {}
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
        it resident."""
        if not self._reserve_if_resident(name):
            self.add(name, path)
            self._reserved[name] += 1

    def add(self, name: str, path: str | Path) -> None:
        """Engine thread: reads the adapter at `path` and registers it as `name`, evicting idle
        adapters if the limit needs it; read first, so that a refused adapter evicts nothing."""
        adapter = self.engine.read_adapter(name, path)
        self.make_room(1)
        self.engine.adapters.add(adapter)

    def make_room(self, extra: int) -> None:
        """Evicts idle adapters until `extra` more fit under the limit (engine thread)."""
        if not self.max_resident:
            return
        while len(self.engine.adapters) + extra > self.max_resident:
            busy = {r.adapter for r in self.engine.requests.values()}
            busy |= {j.adapter.name for j in self.engine.trainer.jobs.values() if not j.state.is_final}
            pinned = {n for n, info in self.store.adapters().items() if info.get("pinned")}
            idle = [n for n in self.engine.adapters.names() if n not in busy | pinned and not self._reserved[n]]
            if not idle:
                raise APIError(429, f"all {self.max_resident} resident adapters are busy or pinned; retry later", code="adapters_busy")
            victim = min(idle, key=lambda n: self.last_used.get(n, 0.0))
            self.engine.adapters.remove(victim)
