"""Adapters by name: each gets a slot, and its weights are installed into the model's linears."""

from __future__ import annotations

from typing import Protocol

import torch

from loramux.config import ModelConfig
from loramux.lora.adapter import AdapterError, LoraAdapter, UnknownAdapterError
from loramux.lora.generations import AdapterGenerations
from loramux.lora.layer import LoraProjection


class AdapterHost(Protocol):
    """What the registry needs of a model (model/llama.py's LlamaModel): its shape, dtype and
    device, each projection by (layer, name), and the generations its linears read."""

    config: ModelConfig
    adapter_generations: AdapterGenerations

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def linear(self, layer_idx: int, name: str) -> LoraProjection: ...


class AdapterRegistry:
    """Owns the name -> slot map and the slots' generations. Adding or removing an adapter touches
    only that adapter's entries in the linears; the base weights are never touched. Slots are
    reused after removal; every change to a slot moves its generation (lora/generations.py)."""

    def __init__(self, model: AdapterHost) -> None:
        self.model = model
        self.generations = model.adapter_generations
        self._adapters: dict[str, LoraAdapter] = {}
        self._slots: dict[str, int] = {}
        self.layout_version = 0  # moves when an adapter is installed or removed (not on in-place updates)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> LoraAdapter:
        self._check_known(name)
        return self._adapters[name]

    def slot(self, name: str | None) -> int | None:
        """The slot of adapter `name`; None (the base model) stays None."""
        if name is None:
            return None
        self._check_known(name)
        return self._slots[name]

    def add(self, adapter: LoraAdapter) -> int:
        if adapter.name in self._adapters:
            raise AdapterError(f"an adapter named {adapter.name!r} is already loaded")
        adapter.check_fits(self.model.config)
        for A, B in adapter.weights.values():
            if A.dtype != self.model.dtype or A.device != self.model.device:
                raise AdapterError(f"adapter {adapter.name!r} is {A.dtype} on {A.device}; the model is {self.model.dtype} on {self.model.device}")
        used = set(self._slots.values())
        slot = next(s for s in range(len(used) + 1) if s not in used)
        if any(slot in self.model.linear(*key).adapters for key in adapter.weights):
            raise RuntimeError("the model's linears hold adapters this registry did not add: one model, one registry")
        for key in adapter.weights:
            self.model.linear(*key).set_adapter(slot, adapter.layer_weights(key))
        self._adapters[adapter.name], self._slots[adapter.name] = adapter, slot
        self.generations.bump(slot)
        self.layout_version += 1
        return slot

    def remove(self, name: str) -> LoraAdapter:
        self._check_known(name)
        adapter, slot = self._adapters.pop(name), self._slots.pop(name)
        for key in adapter.weights:
            self.model.linear(*key).remove_adapter(slot)
        self.generations.bump(slot)
        self.layout_version += 1
        return adapter

    def mark_updated(self, name: str) -> None:
        """Call after changing adapter `name`'s weights in place (an optimizer step, a restored
        checkpoint): the linears' cached copies of that slot are rewritten at the next step."""
        self.generations.bump(self.slot(name))

    def _check_known(self, name: str) -> None:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded adapters: {known}")
