"""The one object that carries a step's metadata from the scheduler to the model.

A step is a flat batch of rows (tokens) from many sequences. Each sequence contributes one `Chunk`:
a fine-tuning sample (TRAIN), a held-out sample (EVAL), a piece of a prompt (PREFILL) or one new
token (DECODE), for one adapter or the base model.

`Batch.build` lays the rows out in two parts:

    [ TRAIN rows (build autograd graphs) | EVAL, PREFILL, DECODE rows (build none) ]

and, inside each part, groups rows by adapter so that every adapter owns one contiguous segment
(the layout the segmented LoRA matmul needs). The model runs each part with its own grad mode, so
rows that do not train keep no activations for backward (ARCHITECTURE.md, invariant 3). Every
index tensor the layers need (LoRA segments, KV slots, decode gathers) is built here, once per step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from loramux.lora.segments import LoraSegments

if TYPE_CHECKING:
    from loramux.kv.paged_cache import PagedKVCache


class RowKind(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
    PREFILL = "prefill"
    DECODE = "decode"

    @property
    def builds_graph(self) -> bool:
        return self is RowKind.TRAIN

    @property
    def uses_cache(self) -> bool:
        return self in (RowKind.PREFILL, RowKind.DECODE)


@dataclass(frozen=True)
class Chunk:
    """One sequence's rows in a step.

    token_ids:   the new tokens (a whole sample for TRAIN/EVAL, a prompt piece for PREFILL, one token for DECODE).
    adapter:     adapter slot from the registry, or None for the base model.
    start_pos:   how many tokens of this sequence precede the chunk (already in its KV blocks).
    block_table: the sequence's KV blocks, covering positions [0, start_pos + len(token_ids));
                 required for PREFILL/DECODE, absent for TRAIN/EVAL.
    """

    token_ids: Sequence[int]
    kind: RowKind
    adapter: int | None = None
    start_pos: int = 0
    block_table: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) == 0:
            raise ValueError("a chunk needs at least one token")
        if self.kind.uses_cache != (self.block_table is not None):
            raise ValueError(f"{self.kind.value} chunks {'need' if self.kind.uses_cache else 'take no'} KV blocks")
        if not self.kind.uses_cache and self.start_pos:
            raise ValueError(f"{self.kind.value} chunks start at position 0")

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class Span:
    """Rows [start, end) of one sequence inside a part, at positions [start_pos, start_pos + length).
    context_slots: KV slots of positions [0, start_pos + length) for cached sequences, else None
    (attention then runs over the span's own keys)."""

    start: int
    end: int
    start_pos: int
    context_slots: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """What attention reads and writes, per part.

    write_rows [W], write_slots [W]: rows whose K/V go into the cache, and where.
    decode_rows [B]: single-token rows of cached sequences, attended in one batched call over
    decode_slots [B, C] (each sequence's context slots, padded) with decode_mask [B, 1, 1, C].
    spans: every other sequence (multi-token prefill chunks, TRAIN and EVAL samples), one call each.
    writes_all_rows: write_rows is every row of the part, in order (no gather of K/V rows needed).
    decodes_all_rows: decode_rows is every row of the part, in order (a pure decode step).
    """

    write_rows: torch.Tensor
    write_slots: torch.Tensor
    decode_rows: torch.Tensor
    decode_slots: torch.Tensor
    decode_mask: torch.Tensor
    spans: tuple[Span, ...]
    writes_all_rows: bool = False
    decodes_all_rows: bool = False


@dataclass(frozen=True)
class BatchPart:
    """Rows that share a grad mode. input_ids, positions: [T] long."""

    builds_graph: bool
    input_ids: torch.Tensor
    positions: torch.Tensor
    lora: LoraSegments
    attention: AttentionPlan

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Batch:
    """A step: its parts (graph-building part first), the KV cache its cached rows use, and where
    each input chunk's rows landed: chunk_rows[i] is the row range of the i-th chunk given to
    `build`, in the concatenation of the parts' rows (the order of `model.forward`'s output)."""

    parts: tuple[BatchPart, ...]
    chunk_rows: tuple[range, ...]
    kv: PagedKVCache | None = None

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    @classmethod
    def build(cls, chunks: Sequence[Chunk], kv: PagedKVCache | None = None, device: torch.device | str = "cpu") -> Batch:
        if not chunks:
            raise ValueError("a batch needs at least one chunk")
        if kv is None and any(c.block_table is not None for c in chunks):
            raise ValueError("PREFILL/DECODE chunks need the KV cache their blocks belong to")
        # Stable sort: graph-building first, then by adapter (base-model rows last).
        order = sorted(
            range(len(chunks)),
            key=lambda i: (not chunks[i].kind.builds_graph, chunks[i].adapter is None, chunks[i].adapter or 0),
        )
        chunk_rows: list[range] = [range(0)] * len(chunks)
        parts = []
        offset = 0
        for builds_graph in (True, False):
            members = [i for i in order if chunks[i].kind.builds_graph == builds_graph]
            if not members:
                continue
            part = _build_part([chunks[i] for i in members], builds_graph, kv, device)
            starts = [0]
            for i in members:
                starts.append(starts[-1] + len(chunks[i].token_ids))
            for j, i in enumerate(members):
                chunk_rows[i] = range(offset + starts[j], offset + starts[j + 1])
            parts.append(part)
            offset += part.num_rows
        return cls(parts=tuple(parts), chunk_rows=tuple(chunk_rows), kv=kv)


def _build_part(chunks: list[Chunk], builds_graph: bool, kv: PagedKVCache | None, device) -> BatchPart:
    ids: list[int] = []
    positions: list[int] = []
    bounds: list[tuple[int, int]] = []
    write_rows: list[int] = []
    write_slots: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[Sequence[int]] = []
    decode_lengths: list[int] = []
    spans: list[Span] = []
    for c in chunks:
        start = len(ids)
        ids.extend(c.token_ids)
        positions.extend(range(c.start_pos, c.end_pos))
        bounds.append((start, len(ids)))
        if c.block_table is None:
            spans.append(Span(start, len(ids), 0))
            continue
        write_rows.extend(range(start, len(ids)))
        write_slots.extend(kv.slots(list(c.block_table), c.start_pos, c.end_pos))
        if len(c.token_ids) == 1:
            decode_rows.append(start)
            decode_tables.append(c.block_table)
            decode_lengths.append(c.end_pos)
        else:
            context, _ = kv.context_slots([c.block_table], [c.end_pos], device)
            spans.append(Span(start, len(ids), c.start_pos, context[0]))
    if decode_rows:
        decode_slots, decode_mask = kv.context_slots(decode_tables, decode_lengths, device)
    else:
        decode_slots, decode_mask = torch.zeros(0, 0, dtype=torch.long, device=device), torch.zeros(0, 0, dtype=torch.bool, device=device)
    long = dict(dtype=torch.long, device=device)
    attention = AttentionPlan(
        write_rows=torch.tensor(write_rows, **long),
        write_slots=torch.tensor(write_slots, **long),
        decode_rows=torch.tensor(decode_rows, **long),
        decode_slots=decode_slots,
        decode_mask=decode_mask.reshape(len(decode_rows), 1, 1, decode_mask.shape[1]),
        spans=tuple(spans),
        writes_all_rows=write_rows == list(range(len(ids))),
        decodes_all_rows=decode_rows == list(range(len(ids))),
    )
    return BatchPart(
        builds_graph=builds_graph,
        input_ids=torch.tensor(ids, **long),
        positions=torch.tensor(positions, **long),
        lora=LoraSegments.from_spans(bounds, [c.adapter for c in chunks], device),
        attention=attention,
    )
