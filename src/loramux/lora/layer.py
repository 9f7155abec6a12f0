"""The virtualized linear: frozen base weights shared by any number of LoRA adapters.

`FusedLoraLinear` computes several projections that read the same input (q, k, v; or gate, up) as
one GEMM over their concatenated frozen weights, and adds each projection's LoRA deltas to its own
slice of the output. Each projection keeps its Hugging Face name and its own adapters in a
`LoraProjection`, the unit the adapter registry installs weights into, so adapters may target any
subset of the projections with any rank. `MultiLoraLinear` is the one-projection case (o, down).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from loramux.lora.generations import AdapterGenerations
from loramux.lora.ops import LoraWeights, PackedLora, StackedLora, TileWeights, add_lora_group, add_lora_stacked, add_lora_tiled
from loramux.lora.segments import LoraSegments
from loramux.lora.prepacked import FrozenLinear
from loramux.lora import segmented_lora
from loramux.lora.segmented_lora import add_lora_native

# Inference rows take the tiled path when every segment is one tile (decode steps), or from this
# many segments on. Below it, segments of several tiles (prefill chunks) take the per-segment
# stacked path: the tiled path would copy an adapter's weights once per tile, and its gathered
# weights change with every prefill layout (measured with per-call gathers, 16 of 64 adapters in
# one batch: stacked 151 vs tiled 125 tokens/s in fp32, 176 vs 154 in bf16; docs/benchmarks.md).
TILED_MIN_SEGMENTS = 64


class LoraProjection:
    """One named projection of a fused linear: output columns [offset, offset + out_features) and
    the adapters installed on it (slot -> LoraWeights, A: [rank, in_features], B: [out_features, rank]).
    The tensors are the adapter's own (shared, not copied), so an optimizer step on them is seen at once."""

    def __init__(self, owner: FusedLoraLinear, name: str, layer_idx: int, in_features: int, out_features: int, offset: int) -> None:
        self.name, self.layer_idx = name, layer_idx
        self.in_features, self.out_features, self.offset = in_features, out_features, offset
        self.adapters: dict[int, LoraWeights] = {}
        self._owner = owner

    def set_adapter(self, slot: int, weights: LoraWeights) -> None:
        self.adapters[slot] = weights
        self._owner.adapters_changed(slot)

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)
        self._owner.adapters_changed(slot)


class FusedLoraLinear(nn.Module):
    """Projections sharing one input x [T, in], as one GEMM, each with its own LoRA adapters:

        y = x @ W.T (+ b)                    W: [sum(out_i), in] = [W_q; W_k; W_v] (frozen, never requires grad)
        y[seg, cols_i] += scale * (x[seg] @ A.T) @ B.T    for each adapter (A, B) on projection i,
                                                            on that adapter's row segment only

    outputs: (name, out_features) of each projection, in the order of their output columns.
    projections: name -> LoraProjection. `split(y)` gives each projection's output, as views.

    Rows that build graphs join the group's adapters on the fly from their own A and B, so that
    autograd reaches them (`add_lora_group`). Other rows use one stacked copy of all adapters of
    the group (A of all projections concatenated, B block-diagonal, scale folded in). Either way
    each segment costs two matmuls for the whole group. bf16 and float32 rows on x86-64 CPUs
    (AVX-512 or AVX2) take one call of the native kernel (`lora/segmented_lora`), which reads a
    `PackedLora` of their dtype in place by slot; other rows (other CPUs or devices, other dtypes) a
    float32 `StackedLora`: with one tile per segment or many segments, two
    batched matmuls serve all of them, against the tiles' weights gathered from the stack and kept
    while the tiles' slots stay the same. A linear holds one stack, of the kind its rows take.
    """

    def __init__(self, in_features: int, outputs: Sequence[tuple[str, int]], bias: bool, layer_idx: int) -> None:
        super().__init__()
        self.in_features, self.layer_idx = in_features, layer_idx
        self.sizes = tuple(size for _, size in outputs)
        self.out_features = sum(self.sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.base = FrozenLinear()
        self.projections: dict[str, LoraProjection] = {}
        offset = 0
        for name, size in outputs:
            self.projections[name] = LoraProjection(self, name, layer_idx, in_features, size, offset)
            offset += size
        self.projection_list = tuple(self.projections.values())
        self._slots: frozenset[int] = frozenset()  # slots with an adapter on any projection
        self._stacked: StackedLora | PackedLora | None = None
        self._stacked_version = -1  # the generations' version the stack is current at
        self._stacked_from: dict[int, int] = {}  # slot -> the generation its stacked rows were written from
        self._changed: set[int] = set()  # slots installed or removed here since the stack was written
        self._tiles: tuple[tuple, TileWeights] | None = None  # (latest generation of the tiles' slots, tile slots), weights

    def adapters_changed(self, slot: int) -> None:
        """A projection's adapter in `slot` was installed or removed: its stacked rows are rewritten
        at the next call, whatever the generations say."""
        self._slots = frozenset(s for p in self.projections.values() for s in p.adapters)
        self._changed.add(slot)
        self._stacked_version = -1  # the next `stacked` compares every slot
        self._tiles = None

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """y [T, out_features] -> each projection's output [T, out_i], views in `outputs` order."""
        return y.split(self.sizes, dim=-1)

    def stacked(self, generations: AdapterGenerations, kind: type[StackedLora | PackedLora] = StackedLora) -> StackedLora | PackedLora:
        """The group's adapters stacked by slot, as `kind` lays them out. Only the slots installed
        or removed here, or whose generation moved (weights updated in place), are rewritten: with
        64 adapters, a rebuild of every slot stalled the next step by seconds after any adapter
        load or optimizer step. The stack is rebuilt whole when adapters outgrow it (or for
        another kind, which a model whose rows keep one dtype never asks for)."""
        current = type(self._stacked) is kind
        if current and self._stacked_version == generations.version:
            return self._stacked
        projections = [(p.adapters, p.out_features) for p in self.projection_list]
        sources = {slot: generations.of(slot) for slot in self._slots}
        if not current or not self._stacked.fits(projections):
            self._stacked = kind.build_fused(projections, self.in_features)
            self._tiles = None
        else:
            self._stacked.write(projections, [s for s in sources.keys() | self._stacked_from.keys()
                                              if s in self._changed or sources.get(s) != self._stacked_from.get(s)])
        self._stacked_from, self._stacked_version = sources, generations.version
        self._changed.clear()
        return self._stacked

    def tiles(self, segments: LoraSegments, generations: AdapterGenerations) -> TileWeights:
        """Each tile's weights from the float32 stack, kept for the next step: from one decode step
        to the next the tiles' slots rarely change, and gathering them costs more than the deltas
        themselves. They are kept across changes to other slots (an optimizer step on an adapter no
        tile uses leaves them current)."""
        key = (generations.latest(segments.slots), segments.tiles.tile_slot_key)
        if self._tiles is None or self._tiles[0] != key:
            self._tiles = key, self.stacked(generations).tiles(segments)
        return self._tiles[1]

    def base_parts(self, xs: Sequence[torch.Tensor], builds_graph: Sequence[bool]) -> list[torch.Tensor]:
        """Each part's x @ W.T (+ b), from one GEMM over all their rows: a step with training and
        inference rows reads W once instead of once per part (the paper's merged computation flow).
        The GEMM builds no graph (so bf16 rows of every part take the pre-packed weights); a
        graph-building part gets its rows as a copy that autograd joins to its x (W is frozen: x's
        gradient is grad @ W), so what its backward keeps never holds another part's rows."""
        with torch.no_grad():
            y = self.base(torch.cat([x.detach() for x in xs]), self.weight, self.bias)
        outs = y.split([x.shape[0] for x in xs])
        with torch.enable_grad():  # whatever the caller's mode (the engine steps under no_grad)
            return [_FrozenBase.apply(x, self.weight, out) if graph else out for x, out, graph in zip(xs, outs, builds_graph)]

    def forward(self, x: torch.Tensor, segments: LoraSegments, builds_graph: bool, generations: AdapterGenerations,
                base: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, in] -> y [T, out_features].

        builds_graph: rows of adapters being trained; deltas are built from the adapters' own A and
        B so that autograd reaches them (with dropout). `generations` tells which slots' weights
        changed since the stacked copy was made (lora/generations.py). base: x @ W.T (+ b) if
        already computed (`base_parts`); the adapters' deltas are added to it.
        """
        y = self.base(x, self.weight, self.bias) if base is None else base
        if self._slots.isdisjoint(segments.slots):
            return y
        if builds_graph or torch.is_grad_enabled():
            return add_lora_group(y, x, segments, [p.adapters for p in self.projection_list], self.sizes, training=builds_graph)
        if segmented_lora.accepts(y, x):
            return add_lora_native(y, x, segments.spans_of(self._slots), self.stacked(generations, PackedLora))
        tiled = segments.one_tile_per_segment or len(segments.segments) >= TILED_MIN_SEGMENTS
        if tiled and self._slots.issuperset(segments.slots):
            return add_lora_tiled(y, x, segments, self.tiles(segments, generations))
        return add_lora_stacked(y, x, segments, self.stacked(generations), self._slots)


class _FrozenBase(torch.autograd.Function):
    """`out` (x @ W.T + b, computed without autograd) as a function of x: backward gives grad @ W,
    as F.linear's does for a frozen W, and keeps only W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


class MultiLoraLinear(FusedLoraLinear):
    """A fused linear of one projection: y = x @ W.T (+ b), W: [out, in], plus each adapter's delta
    on its own row segment. `adapters`, `set_adapter` and `remove_adapter` are the projection's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str, layer_idx: int) -> None:
        super().__init__(in_features, ((name, out_features),), bias, layer_idx)
        self.name = name
        self.projection = self.projections[name]

    @property
    def adapters(self) -> dict[int, LoraWeights]:
        return self.projection.adapters

    def set_adapter(self, slot: int, weights: LoraWeights) -> None:
        self.projection.set_adapter(slot, weights)

    def remove_adapter(self, slot: int) -> None:
        self.projection.remove_adapter(slot)
