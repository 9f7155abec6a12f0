"""Which rows of a batch part use which adapter: the segment layout of the multi-LoRA matmul."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_TILE, MAX_TILE = 4, 64


@dataclass(frozen=True)
class TilePlan:
    """The batched (tiled) PyTorch path's layout of a step's segments: every segment cut into tiles
    of `tile` rows; one tile per segment (`tile` = the longest segment) when that at most doubles
    the rows, as in decode steps where every adapter has a similar number of sequences; else tiles
    of a power of two near the mean segment length.

    tile_rows:  [n_tiles, tile] long, row index of each tile position; padding positions repeat the
                tile's first row (so gathers stay in bounds) and are left out by `valid`.
    tile_slots: [n_tiles] long, the adapter slot of each tile; `tile_slot_key` the same as a tuple:
                every layer compares it with the tiles its kept weights are for.
    valid:      [n_valid] long, flat positions of tile_rows that hold real rows.
    valid_rows: [n_valid] long, tile_rows.flatten()[valid].
    dense:      tile_rows is every row of the batch, in order, without padding (x needs no gather).
    """

    tile: int
    tile_rows: torch.Tensor
    tile_slots: torch.Tensor
    valid: torch.Tensor
    valid_rows: torch.Tensor
    tile_slot_key: tuple[int, ...]
    dense: bool

    @classmethod
    def of(cls, num_rows: int, segments: Sequence[tuple[int, int, int]], device: torch.device | str) -> TilePlan:
        covered = sum(e - s for s, e, _ in segments)
        longest = max((e - s for s, e, _ in segments), default=1)
        if longest <= MAX_TILE and longest * len(segments) <= 2 * covered:
            tile = longest
        else:
            mean = -(-covered // max(len(segments), 1))
            tile = min(MAX_TILE, max(MIN_TILE, 1 << max(mean - 1, 0).bit_length()))
        tile_rows: list[list[int]] = []
        tile_slots: list[int] = []
        is_real: list[bool] = []
        for start, end, slot in segments:
            for t in range(start, end, tile):
                rows = list(range(t, min(t + tile, end)))
                tile_rows.append(rows + [t] * (tile - len(rows)))
                tile_slots.append(slot)
                is_real.extend([True] * len(rows) + [False] * (tile - len(rows)))
        flat = torch.tensor(tile_rows, dtype=torch.long).reshape(-1)
        valid = torch.tensor(is_real, dtype=torch.bool).nonzero().flatten()
        return cls(
            tile=tile,
            tile_rows=flat.reshape(len(tile_rows), tile).to(device),
            tile_slots=torch.tensor(tile_slots, dtype=torch.long, device=device),
            valid=valid.to(device),
            valid_rows=flat[valid].to(device),
            tile_slot_key=tuple(tile_slots),
            dense=all(is_real) and flat.tolist() == list(range(num_rows)),
        )


@dataclass(frozen=True)
class LoraSegments:
    """Rows grouped by adapter, computed once per step and shared by every linear.

    segments:   (start, end, slot) triples: rows [start, end) use adapter `slot`. Segments are
                disjoint and sorted; rows in no segment get the base output alone.
    slots:      the set of slots of `segments`.
    spans:      [n_segments, 3] long on the CPU, `segments` as a tensor (the native kernel's,
                lora/segmented_lora).
    tiles:      the tiled PyTorch path's layout (TilePlan), made the first time a linear asks for
                it: a step whose linears all take the native kernel never builds it.
    """

    num_rows: int
    segments: tuple[tuple[int, int, int], ...]
    spans: torch.Tensor
    slots: frozenset[int]
    device: torch.device | str

    @functools.cached_property
    def tiles(self) -> TilePlan:
        return TilePlan.of(self.num_rows, self.segments, self.device)

    @property
    def one_tile_per_segment(self) -> bool:
        """No slot repeats in the tiles' slots (each adapter's stacked weights are gathered once)."""
        return len(self.tiles.tile_slot_key) == len(self.segments)

    def spans_of(self, slots: frozenset[int]) -> torch.Tensor:
        """`spans` of the segments whose slot is in `slots`."""
        if slots.issuperset(self.slots):
            return self.spans
        return torch.tensor([s for s in self.segments if s[2] in slots], dtype=torch.long).reshape(-1, 3)

    @classmethod
    def from_spans(
        cls,
        spans: Sequence[tuple[int, int]],
        adapters: Sequence[int | None],
        device: torch.device | str = "cpu",
    ) -> LoraSegments:
        """Merges consecutive row spans of the same adapter into segments. Spans must be sorted and
        contiguous-by-adapter (Batch.build guarantees it); an adapter may not appear in two segments."""
        segments: list[list[int]] = []
        for (start, end), slot in zip(spans, adapters):
            if slot is None:
                continue
            if segments and segments[-1][2] == slot and segments[-1][1] == start:
                segments[-1][1] = end
            else:
                segments.append([start, end, slot])
        num_rows = spans[-1][1] if spans else 0
        return cls.from_segments(num_rows, [tuple(s) for s in segments], device)

    @classmethod
    def from_segments(
        cls, num_rows: int, segments: Sequence[tuple[int, int, int]], device: torch.device | str = "cpu"
    ) -> LoraSegments:
        slots = [slot for _, _, slot in segments]
        if len(set(slots)) != len(slots):
            raise ValueError("each adapter's rows must form one contiguous segment")
        return cls(
            num_rows=num_rows,
            segments=tuple(tuple(s) for s in segments),
            spans=torch.tensor(segments, dtype=torch.long).reshape(len(segments), 3),
            slots=frozenset(slots),
            device=device,
        )
