"""Generations of adapter weights: which version of each slot's weights a cached copy was made from.

Layers keep derived copies of their adapters' weights (the stacked copy, each tile's gathered
weights: lora/layer.py) and must know when those copies are stale. The adapter registry is the only
writer: it bumps a slot when it installs an adapter there, removes one, or is told the adapter's
weights changed in place (an optimizer step, a restored checkpoint). Every bump takes the next
number of one counter, so a slot freed and reused by another adapter never shows a generation it
had before, whether or not a step ran in between; nothing depends on tensor ids, which Python
reuses once a tensor is freed.
"""

from __future__ import annotations


class AdapterGenerations:
    """version: the counter, moved by every bump (a cache made at `version` is current for every
    slot). of(slot): the version at which `slot` last changed (0: never). latest(slots): the
    newest of those slots' generations; since every bump draws a new number, a copy made from
    `slots` is current exactly while latest(slots) is what it was when the copy was made."""

    def __init__(self) -> None:
        self.version = 0
        self._by_slot: dict[int, int] = {}
        self._latest: dict[frozenset[int], int] = {}  # latest(slots) at `version`, asked by every layer

    def bump(self, slot: int) -> None:
        self.version += 1
        self._by_slot[slot] = self.version
        self._latest.clear()

    def of(self, slot: int) -> int:
        return self._by_slot.get(slot, 0)

    def latest(self, slots: frozenset[int]) -> int:
        if slots not in self._latest:
            self._latest[slots] = max((self.of(s) for s in slots), default=0)
        return self._latest[slots]
