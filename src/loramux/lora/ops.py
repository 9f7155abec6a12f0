"""The segmented multi-LoRA matmul: add each adapter's low-rank delta to its own rows.

For every segment (start, end, slot) and every row r in [start, end):

    y[r] += scale[slot] * B[slot] @ (A[slot] @ dropout(x[r]))        A: [rank, in], B: [out, rank]

Four implementations in PyTorch compute the same thing (and, for bf16 inference rows, one native
kernel, lora/segmented_lora, reading a `PackedLora`):

- `add_lora_loop`: one pair of matmuls per segment. The plain reference.
- `add_lora_group`: the path for rows that build autograd graphs (few adapters with long
  segments, gradients into A and B only): one pair of matmuls per segment for a whole fused group
  of projections, against weights joined on the fly from the adapters' own tensors.
- `add_lora_stacked`: one pair of matmuls per segment against the weights stacked by slot (scale
  folded in); for a fused group of projections (q, k, v) the pair covers all of them at once.
- `add_lora_tiled`: every segment cut into equal tiles; two batched matmuls over all tiles against
  each tile's stacked weights (gathered by slot, padded to the largest rank). No Python loop over
  adapters.

The last two are for inference rows only (the stacked copy is not a leaf of the adapters' weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

import torch

from loramux.lora.segments import LoraSegments


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's pair for one linear. A: [rank, in], B: [out, rank]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: float = 0.0
    dropout_generator: torch.Generator | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class _SlotStack:
    """All adapters of one linear (or of a fused group of projections sharing one input, see
    `build_fused`) stacked by slot, padded to each projection's largest rank, scale folded into B;
    slots without an adapter on this linear are all zeros. Subclasses lay B out for their kernels.

    A_t: [num_slots, in, sum(ranks)]   (A transposed; projection i's in rank columns [k0_i, k0_i + ranks[i]))
    ranks: the rank columns each projection has (at least its largest adapter's rank).
    """

    A_t: torch.Tensor
    ranks: tuple[int, ...]

    @classmethod
    def build(cls, weights: Mapping[int, LoraWeights], in_features: int, out_features: int):
        return cls.build_fused([(weights, out_features)], in_features)

    @classmethod
    def build_fused(cls, projections: Sequence[tuple[Mapping[int, LoraWeights], int]], in_features: int):
        """Projections sharing one input, each (its adapters by slot, its out_features), output
        columns concatenated in this order. Projection i gets rank columns [k0_i, k0_i + ranks[i])
        of A_t, and B's rows of those columns are zero outside its own output columns:

        A_t[slot] = [A_0.T | A_1.T | ...]              [in, sum of max ranks]
        B[slot]   = blockdiag(s B_0.T, s B_1.T, ...)   [sum of max ranks, sum of out_features]
        """
        any_w = next(w for weights, _ in projections for w in weights.values())
        num_slots, ranks = _layout(projections)
        with torch.inference_mode(False):  # normal tensors: `write` updates them in place in any mode
            stacked = cls._allocate(num_slots, in_features, ranks, [out for _, out in projections],
                                    cls._dtype(any_w.A.dtype), any_w.A.device)
        stacked.write(projections, range(num_slots))
        return stacked

    def fits(self, projections: Sequence[tuple[Mapping[int, LoraWeights], int]]) -> bool:
        """Whether the projections' adapters fit this stack's slots and rank columns."""
        num_slots, ranks = _layout(projections)
        return num_slots <= self.A_t.shape[0] and all(r <= have for r, have in zip(ranks, self.ranks))

    def write(self, projections: Sequence[tuple[Mapping[int, LoraWeights], int]], slots: Iterable[int]) -> None:
        """Rewrites the rows of `slots` from the projections' adapters (zeros where a slot has none)."""
        slots = list(slots)
        with torch.no_grad():
            for slot in slots:
                self.A_t[slot].zero_()
                self._b_of(slot).zero_()
            k0 = c0 = off = 0
            for (weights, out), rank in zip(projections, self.ranks):
                for slot in slots:
                    w = weights.get(slot)
                    if w is not None:
                        self.A_t[slot, :, k0 : k0 + w.rank] = w.A.T
                        self._block(slot, k0, c0, off, rank, out)[: w.rank] = w.scale * w.B.T.to(torch.promote_types(w.B.dtype, torch.float32))
                k0, c0, off = k0 + rank, c0 + out, off + rank * out

    @classmethod
    def _dtype(cls, adapter_dtype: torch.dtype) -> torch.dtype:
        raise NotImplementedError

    @classmethod
    def _allocate(cls, num_slots: int, in_features: int, ranks: tuple[int, ...], outs: list[int], dtype: torch.dtype,
                  device: torch.device):
        raise NotImplementedError

    def _b_of(self, slot: int) -> torch.Tensor:
        """All of B[slot], as stored."""
        raise NotImplementedError

    def _block(self, slot: int, k0: int, c0: int, off: int, rank: int, out: int) -> torch.Tensor:
        """Projection i's block of B[slot], [rank_i, out_i], a view; k0, c0: its first rank row and
        output column in the block-diagonal B, off: rank_i * out_i summed over the projections before it."""
        raise NotImplementedError


@dataclass(frozen=True)
class StackedLora(_SlotStack):
    """The stack for the PyTorch paths (`add_lora_stacked`, `add_lora_tiled`): B whole, zeros and all.

    B_t: [num_slots, sum(ranks), out]   (scale * B transposed, block-diagonal for a fused group)

    Kept in float32 at least: for bf16 rows the deltas are computed in float32 and rounded once
    when added (on CPU, small bf16 matmuls cost about twice their float32 counterparts, and the
    result is closer to exact).
    """

    A_t: torch.Tensor
    B_t: torch.Tensor
    ranks: tuple[int, ...]

    @classmethod
    def _dtype(cls, adapter_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(adapter_dtype, torch.float32)

    @classmethod
    def _allocate(cls, num_slots, in_features, ranks, outs, dtype, device) -> StackedLora:
        return cls(torch.zeros(num_slots, in_features, sum(ranks), dtype=dtype, device=device),
                   torch.zeros(num_slots, sum(ranks), sum(outs), dtype=dtype, device=device), ranks)

    def _b_of(self, slot: int) -> torch.Tensor:
        return self.B_t[slot]

    def _block(self, slot, k0, c0, off, rank, out) -> torch.Tensor:
        return self.B_t[slot, k0 : k0 + rank, c0 : c0 + out]

    def tiles(self, segments: LoraSegments) -> TileWeights:
        """Every tile's weights, gathered (copied) by its slot."""
        return TileWeights(self.A_t[segments.tiles.tile_slots], self.B_t[segments.tiles.tile_slots])


@dataclass(frozen=True)
class PackedLora(_SlotStack):
    """The stack the native kernel reads by slot (lora/segmented_lora): in the adapters' dtype
    (float32 for float32 adapters, else bf16, the dtypes the kernel reads), and of B only the
    projections' blocks, so a slot costs its adapter's own bytes (plus rank padding).

    B: [num_slots, sum(rank_i * out_i)]: projection i's block (scale * B_i.T, [rank_i, out_i]),
       row-major at offset `off` of each slot's row
    blocks: [n, 5] long on the CPU, (k0, k1, c0, c1, off) per projection with rank columns: its rank
       rows and output columns in the block-diagonal B, and where its block lies.
    """

    A_t: torch.Tensor
    B: torch.Tensor
    ranks: tuple[int, ...]
    blocks: torch.Tensor

    @classmethod
    def _dtype(cls, adapter_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if adapter_dtype == torch.float32 else torch.bfloat16

    @classmethod
    def _allocate(cls, num_slots, in_features, ranks, outs, dtype, device) -> PackedLora:
        blocks, k0, c0, off = [], 0, 0, 0
        for rank, out in zip(ranks, outs):
            if rank:
                blocks.append((k0, k0 + rank, c0, c0 + out, off))
            k0, c0, off = k0 + rank, c0 + out, off + rank * out
        return cls(torch.zeros(num_slots, in_features, sum(ranks), dtype=dtype, device=device),
                   torch.zeros(num_slots, off, dtype=dtype, device=device), ranks,
                   torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), 5))

    def _b_of(self, slot: int) -> torch.Tensor:
        return self.B[slot]

    def _block(self, slot, k0, c0, off, rank, out) -> torch.Tensor:
        return self.B[slot, off : off + rank * out].view(rank, out)


def _layout(projections: Sequence[tuple[Mapping[int, LoraWeights], int]]) -> tuple[int, tuple[int, ...]]:
    """(slots needed, each projection's largest rank) for these adapters."""
    num_slots = max((slot + 1 for weights, _ in projections for slot in weights), default=0)
    return num_slots, tuple(max((w.rank for w in weights.values()), default=0) for weights, _ in projections)


@dataclass(frozen=True)
class TileWeights:
    """The stacked weights of each tile's slot: A [n_tiles, in, max_rank], B [n_tiles, max_rank, out]."""

    A: torch.Tensor
    B: torch.Tensor


def add_lora_loop(
    y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: Mapping[int, LoraWeights], training: bool = False
) -> torch.Tensor:
    """y: [T, out], x: [T, in]. Adds each segment's delta in place and returns y.
    With `training`, each adapter's dropout is applied to its rows' inputs (as PEFT does), drawn
    from the adapter's own generator so that its masks do not depend on other adapters' rows."""
    for start, end, slot in segments.segments:
        w = weights.get(slot)
        if w is not None:
            y[start:end] += _lora_delta(x[start:end], w, training)
    return y


def _lora_delta(xs: torch.Tensor, w: LoraWeights, training: bool) -> torch.Tensor:
    """scale * B @ A @ dropout(xs) for rows xs [n, in] -> [n, out]; the mask from the adapter's generator."""
    if training and w.dropout > 0:
        keep = torch.empty_like(xs).bernoulli_(1.0 - w.dropout, generator=w.dropout_generator)
        xs = xs * keep / (1.0 - w.dropout)
    return w.scale * ((xs @ w.A.T) @ w.B.T)


def add_lora_group(
    y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, projections: Sequence[Mapping[int, LoraWeights]],
    sizes: Sequence[int], training: bool = False,
) -> torch.Tensor:
    """Same result as `add_lora_loop` on each projection's columns, differentiable into every A and
    B. y: [T, sum(sizes)], x: [T, in]; projections[i]: the adapters of the projection whose output
    columns are the i-th `sizes` block. Returns y + delta (y itself is left as it is), where per
    segment

    delta[start:end] = (x[start:end] @ [A_0; A_1; ...].T) @ blockdiag(s_0 B_0, s_1 B_1, ...).T

    built from the adapters' own A and B (so autograd reaches them), with a zero block where the
    segment's adapter does not target a projection, and zero rows outside the segments. With
    `training` and dropout, each projection's input gets its own mask (as PEFT does), and the pairs
    run one per projection instead. One out-of-place add, not an in-place add per segment: the
    backward of an in-place add into rows of y copies y's whole gradient, for every group of every
    layer (with freshly allocated, page-faulting memory, 11% of a training step).
    """
    # x split into views, one per segment or gap: the backward of a split is one cat, where that of
    # each slice x[start:end] would zero-fill a gradient the size of all of x
    cuts = sorted({0, x.shape[0], *(b for start, end, _ in segments.segments for b in (start, end))})
    views = dict(zip(cuts, x.split([b - a for a, b in zip(cuts, cuts[1:])])))
    pieces: list[torch.Tensor] = []
    done = 0  # rows [0, done) have their piece
    for start, end, slot in segments.segments:
        ws = [weights.get(slot) for weights in projections]
        present = [w for w in ws if w is not None]
        if not present:
            continue
        xs = views[start]
        if training and any(w.dropout > 0 for w in present):
            delta = torch.cat([xs.new_zeros(end - start, size) if w is None else _lora_delta(xs, w, training)
                               for w, size in zip(ws, sizes)], dim=-1)
        else:
            # one adapter's projections share a scale: applied to h [n, R], not to every B
            scale = present[0].scale if len({w.scale for w in present}) == 1 else None
            A = torch.cat([w.A for w in present])
            B = torch.block_diag(*(xs.new_zeros(size, 0) if w is None else w.B if scale is not None else w.scale * w.B
                                   for w, size in zip(ws, sizes)))
            h = xs @ A.T
            delta = (h if scale is None else h * scale) @ B.T
        if start > done:
            pieces.append(delta.new_zeros(start - done, y.shape[1]))
        pieces.append(delta)
        done = end
    if not pieces:
        return y
    if done < y.shape[0]:
        pieces.append(pieces[0].new_zeros(y.shape[0] - done, y.shape[1]))
    return y + (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(y.dtype)


def add_lora_stacked(
    y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, stacked: StackedLora, slots: Collection[int]
) -> torch.Tensor:
    """Same result as `add_lora_loop` (no dropout) for the adapters of `slots` (those present in
    `stacked`); y: [T, out], x: [T, in]; returns y. Per segment (start, end, slot):

    y[start:end] += (x[start:end] @ A_t[slot]) @ B_t[slot]      [n, in] @ [in, R] @ [R, out]

    (in the stacked weights' dtype, rounded to y's when added).
    """
    xc = x.to(stacked.A_t.dtype)  # x itself when the dtypes agree
    for start, end, slot in segments.segments:
        if slot not in slots:
            continue
        h = xc[start:end] @ stacked.A_t[slot]
        if xc is x:
            y[start:end].addmm_(h, stacked.B_t[slot])
        else:  # addmm_ needs one dtype: the delta is rounded to y's as it is added
            y[start:end] += h @ stacked.B_t[slot]
    return y


def add_lora_tiled(y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, tiles: TileWeights) -> torch.Tensor:
    """Same result as `add_lora_loop` (no dropout). y: [T, out], x: [T, in]; returns y.
    `tiles` holds the stacked weights of each tile's slot (`StackedLora.tiles(segments)`).

    xt = x[tile_rows]                  [n_tiles, tile, in]   (a view of x when the plan is dense)
    h  = xt @ A[tile]                  [n_tiles, tile, max_rank]
    d  = h @ B[tile]                   [n_tiles, tile, out]
    y[valid_rows] += d.flat[valid]
    """
    plan, xc = segments.tiles, x.to(tiles.A.dtype)
    if plan.dense:
        h = torch.bmm(xc.view(*plan.tile_rows.shape, -1), tiles.A)
        if xc is x:
            y.view(*h.shape[:2], -1).baddbmm_(h, tiles.B)
            return y
        return y.add_(torch.bmm(h, tiles.B).view_as(y))
    h = torch.bmm(xc[plan.tile_rows], tiles.A)
    d = torch.bmm(h, tiles.B).reshape(-1, y.shape[1])
    return y.index_add_(0, plan.valid_rows, d[plan.valid].to(y.dtype))
