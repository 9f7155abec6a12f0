"""The one object that carries a step's metadata from the scheduler to the model.

A step is a flat batch of rows (tokens) from many sequences. Each sequence contributes one `Chunk`:
a fine-tuning sample (TRAIN), a held-out sample (EVAL), a piece of a prompt (PREFILL) or one new
token (DECODE), for one adapter or the base model.

`Batch.build` lays the rows out in two parts:

    [ TRAIN rows (build autograd graphs) | EVAL, PREFILL, DECODE rows (build none) ]

and, inside each part, groups rows by adapter so that every adapter owns one contiguous segment
(the layout the segmented LoRA matmul needs). The model runs each part with its own grad mode, so
rows that do not train keep no activations for backward (ARCHITECTURE.md, invariant 3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from loramux.lora.segments import LoraSegments

if TYPE_CHECKING:
    from loramux.kv.sequence_cache import SequenceKV


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

    token_ids: the new tokens (a whole sample for TRAIN/EVAL, a prompt piece for PREFILL, one token for DECODE).
    adapter:   adapter slot from the registry, or None for the base model.
    start_pos: how many tokens of this sequence precede the chunk (already in `cache`).
    cache:     the sequence's KV cache; required for PREFILL/DECODE, absent for TRAIN/EVAL.
    """

    token_ids: Sequence[int]
    kind: RowKind
    adapter: int | None = None
    start_pos: int = 0
    cache: SequenceKV | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) == 0:
            raise ValueError("a chunk needs at least one token")
        if self.kind.uses_cache != (self.cache is not None):
            raise ValueError(f"{self.kind.value} chunks {'need' if self.kind.uses_cache else 'take no'} KV cache")
        if not self.kind.uses_cache and self.start_pos:
            raise ValueError(f"{self.kind.value} chunks start at position 0")


@dataclass(frozen=True)
class Span:
    """Rows [start, end) of one sequence inside a part; attention stays within a span (and its cache)."""

    start: int
    end: int
    start_pos: int
    cache: SequenceKV | None

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BatchPart:
    """Rows that share a grad mode. Shapes: input_ids, positions [T] (long)."""

    builds_graph: bool
    input_ids: torch.Tensor
    positions: torch.Tensor
    spans: tuple[Span, ...]
    lora: LoraSegments

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Batch:
    """A step: its parts (graph-building part first) and where each input chunk's rows landed.

    chunk_rows[i] is the row range of the i-th chunk given to `build`, in the concatenation of the
    parts' rows (the order of `model.forward`'s output).
    """

    parts: tuple[BatchPart, ...]
    chunk_rows: tuple[range, ...]

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    @classmethod
    def build(cls, chunks: Sequence[Chunk], device: torch.device | str = "cpu") -> Batch:
        if not chunks:
            raise ValueError("a batch needs at least one chunk")
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
            ids: list[int] = []
            positions: list[int] = []
            spans = []
            adapters = []
            for i in members:
                c = chunks[i]
                start = len(ids)
                ids.extend(c.token_ids)
                positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
                spans.append(Span(start, len(ids), c.start_pos, c.cache))
                adapters.append(c.adapter)
                chunk_rows[i] = range(offset + start, offset + len(ids))
            parts.append(
                BatchPart(
                    builds_graph=builds_graph,
                    input_ids=torch.tensor(ids, dtype=torch.long, device=device),
                    positions=torch.tensor(positions, dtype=torch.long, device=device),
                    spans=tuple(spans),
                    lora=LoraSegments.from_spans([(s.start, s.end) for s in spans], adapters, device),
                )
            )
            offset += len(ids)
        return cls(parts=tuple(parts), chunk_rows=tuple(chunk_rows))
