"""The segmented multi-LoRA matmul: loop reference, tiled fast path and the layer that picks one,
over adapter mixes in the style of punica's tests (distinct, uniform, skewed, identical, mixed ranks)."""

from __future__ import annotations

import pytest
import torch

from loramux.lora.generations import AdapterGenerations
from loramux.lora.layer import MultiLoraLinear
from loramux.lora.ops import LoraWeights, StackedLora, add_lora_loop, add_lora_tiled
from loramux.lora.segments import LoraSegments

IN, OUT, ROWS = 48, 40, 96


def _segment_lengths(mix: str, rows: int, g: torch.Generator) -> list[int]:
    if mix == "distinct":  # every row its own adapter
        return [1] * rows
    if mix == "uniform":
        return [rows // 8] * 8
    if mix == "zipf":
        weights = 1.0 / torch.arange(1, 13, dtype=torch.float64) ** 1.5
        lengths = (weights / weights.sum() * rows).floor().long().clamp(min=1).tolist()
        lengths[0] += rows - sum(lengths)
        return lengths
    if mix == "identical":
        return [rows]
    raise ValueError(mix)


def _setup(mix: str, ranks: tuple[int, ...], dtype=torch.float32, base_rows: int = 7, seed: int = 0):
    """Random rows; segments per `mix` followed by `base_rows` rows with no adapter; one adapter
    per segment with ranks cycling through `ranks` (slots shuffled so slot order != row order)."""
    g = torch.Generator().manual_seed(seed)
    lengths = _segment_lengths(mix, ROWS, g)
    slots = torch.randperm(len(lengths), generator=g).tolist()
    segments, start = [], 0
    for n, slot in zip(lengths, slots):
        segments.append((start, start + n, slot))
        start += n
    total = start + base_rows
    weights = {}
    for slot in slots:
        r = ranks[slot % len(ranks)]
        weights[slot] = LoraWeights(
            A=(torch.randn(r, IN, generator=g) / IN**0.5).to(dtype),
            B=(torch.randn(OUT, r, generator=g) / r**0.5).to(dtype),
            scale=0.5 + slot % 3,
        )
    x = torch.randn(total, IN, generator=g).to(dtype)
    W = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(dtype)
    return x, W, LoraSegments.from_segments(total, segments), weights


def _per_row_reference(x, W, segments, weights):
    """The definition, one row at a time in float64."""
    y = (x.double() @ W.double().T)
    for start, end, slot in segments.segments:
        w = weights[slot]
        for r in range(start, end):
            y[r] += w.scale * (w.B.double() @ (w.A.double() @ x[r].double()))
    return y


MIXES = ["distinct", "uniform", "zipf", "identical"]
RANKS = [(8,), (1, 4, 16, 64, 256)]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("ranks", RANKS, ids=["rank8", "mixed-ranks"])
def test_loop_matches_per_row_definition(mix, ranks):
    x, W, seg, weights = _setup(mix, ranks)
    y = add_lora_loop(x @ W.T, x, seg, weights)
    assert torch.allclose(y.double(), _per_row_reference(x, W, seg, weights), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("ranks", RANKS, ids=["rank8", "mixed-ranks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_rows", [7, 0], ids=["base-rows", "adapter-rows-only"])
def test_tiled_matches_loop(mix, ranks, dtype, base_rows):
    x, W, seg, weights = _setup(mix, ranks, dtype, base_rows)
    loop = add_lora_loop(x @ W.T, x, seg, weights)
    tiled = add_lora_tiled(x @ W.T, x, seg, StackedLora.build(weights, IN, OUT).tiles(seg))
    tol = 1e-4 if dtype == torch.float32 else 0.05 * loop.abs().max().item()
    assert (tiled.float() - loop.float()).abs().max().item() <= tol


def test_rows_without_adapter_get_the_base_output_alone():
    x, W, seg, weights = _setup("uniform", (8,), base_rows=11)
    first_base_row = seg.segments[-1][1]
    for y in (add_lora_loop(x @ W.T, x, seg, weights), add_lora_tiled(x @ W.T, x, seg, StackedLora.build(weights, IN, OUT).tiles(seg))):
        assert torch.equal(y[first_base_row:], (x @ W.T)[first_base_row:])


@pytest.fixture
def always_tiled(monkeypatch):
    """The layer picks the tiled path for any number of segments."""
    monkeypatch.setattr("loramux.lora.layer.TILED_MIN_SEGMENTS", 1)


@pytest.mark.parametrize("mix", MIXES)
def test_layer_paths_agree_and_skip_adapters_not_on_this_linear(mix, always_tiled):
    x, W, seg, weights = _setup(mix, (2, 8))
    layer = MultiLoraLinear(IN, OUT, bias=False, name="q_proj", layer_idx=0)
    with torch.no_grad():
        layer.weight.copy_(W)
    for slot, w in weights.items():
        layer.set_adapter(slot, w)
    # one adapter does not target this linear: its rows get the base output
    missing = seg.segments[0][2]
    layer.remove_adapter(missing)
    expected = add_lora_loop(x @ W.T, x, seg, {s: w for s, w in weights.items() if s != missing})
    with torch.no_grad():
        got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
    assert (got - expected).abs().max().item() <= 1e-4


def test_layer_sees_in_place_weight_updates_through_generations(always_tiled):
    x, W, seg, weights = _setup("uniform", (4,))
    layer = MultiLoraLinear(IN, OUT, bias=False, name="q_proj", layer_idx=0)
    generations = AdapterGenerations()
    with torch.no_grad():
        layer.weight.copy_(W)
        for slot, w in weights.items():
            layer.set_adapter(slot, w)
        before = layer(x, seg, builds_graph=False, generations=generations)
        for w in weights.values():
            w.B.mul_(2)
        stale = layer(x, seg, builds_graph=False, generations=generations)  # no generation moved: cached stack
        for slot in weights:
            generations.bump(slot)
        fresh = layer(x, seg, builds_graph=False, generations=generations)
    assert torch.equal(before, stale)
    assert (fresh - add_lora_loop(x @ W.T, x, seg, weights)).abs().max() <= 1e-4
    assert not torch.allclose(fresh, before)


def test_tiles_are_one_per_segment_when_segments_are_alike():
    even = LoraSegments.from_segments(32, [(0, 8, 3), (8, 16, 1), (16, 24, 0), (24, 32, 2)])
    assert (even.tiles.tile, even.tiles.tile_slot_key, even.one_tile_per_segment, even.tiles.dense) == (8, (3, 1, 0, 2), True, True)
    assert torch.equal(even.tiles.tile_rows.flatten(), torch.arange(32))
    ragged = LoraSegments.from_segments(32, [(0, 7, 0), (7, 15, 1), (15, 20, 2)])  # 3 x 8 rows for 20
    assert (ragged.tiles.tile, ragged.one_tile_per_segment, ragged.tiles.dense) == (8, True, False)
    skewed = LoraSegments.from_segments(32, [(0, 20, 0), (20, 26, 1), (26, 30, 2), (30, 32, 3)])
    assert skewed.tiles.tile == 8 and skewed.tiles.tile_slot_key == (0, 0, 0, 1, 2, 3) and not skewed.one_tile_per_segment


def test_layer_regathers_tile_weights_when_the_layout_changes():
    """The layer keeps each tile's weights from one call to the next; another layout at the same
    weights version must not reuse them."""
    x, W, _, weights = _setup("uniform", (4, 8), base_rows=0)
    layer = MultiLoraLinear(IN, OUT, bias=False, name="q_proj", layer_idx=0)
    with torch.no_grad():
        layer.weight.copy_(W)
        for slot, w in weights.items():
            layer.set_adapter(slot, w)
        layouts = [LoraSegments.from_segments(ROWS, [(12 * i, 12 * i + 12, slot) for i, slot in enumerate(order)])
                   for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7])]
        for seg in layouts:
            got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
            assert (got - add_lora_loop(x @ W.T, x, seg, weights)).abs().max().item() <= 1e-4


def test_layer_keeps_tile_weights_while_only_other_slots_change(always_tiled):
    """An optimizer step on an adapter no tile uses (a job training beside decode steps of other
    adapters) leaves the tiles' gathered weights current; a step on one the tiles use does not."""
    x, W, _, weights = _setup("uniform", (4, 8), base_rows=0)
    layer = MultiLoraLinear(IN, OUT, bias=False, name="q_proj", layer_idx=0)
    generations = AdapterGenerations()
    served = [0, 1, 2, 3]
    trained = next(s for s in weights if s not in served)
    seg = LoraSegments.from_segments(ROWS, [(24 * i, 24 * i + 24, slot) for i, slot in enumerate(served)])
    with torch.no_grad():
        layer.weight.copy_(W)
        for slot, w in weights.items():
            layer.set_adapter(slot, w)
        layer(x, seg, builds_graph=False, generations=generations)
        kept = layer.tiles(seg, generations)
        weights[trained].B.mul_(2)
        generations.bump(trained)
        assert layer.tiles(seg, generations) is kept
        weights[served[1]].B.mul_(2)
        generations.bump(served[1])
        got = layer(x, seg, builds_graph=False, generations=generations)
    assert layer.tiles(seg, generations) is not kept
    assert (got - add_lora_loop(x @ W.T, x, seg, weights)).abs().max().item() <= 1e-4


def test_layer_rewrites_only_what_changed_in_its_stack():
    """After an in-place update or a removal the stack is updated where it stands (the same tensors,
    equal to a fresh build); an adapter past its slots makes a new one."""
    _, _, _, weights = _setup("uniform", (4, 8))
    layer = MultiLoraLinear(IN, OUT, bias=False, name="q_proj", layer_idx=0)
    for slot, w in weights.items():
        layer.set_adapter(slot, w)

    def assert_fresh(stacked):
        fresh = StackedLora.build(layer.adapters, IN, OUT)
        n = fresh.A_t.shape[0]
        assert torch.equal(stacked.A_t[:n], fresh.A_t) and torch.equal(stacked.B_t[:n], fresh.B_t)
        assert not stacked.A_t[n:].any() and not stacked.B_t[n:].any()

    generations = AdapterGenerations()
    first = layer.stacked(generations)
    with torch.no_grad():
        weights[5].B.mul_(2)  # what an optimizer step does; the registry then bumps the slot
    generations.bump(5)
    assert layer.stacked(generations) is first
    assert_fresh(first)
    layer.remove_adapter(2)
    assert layer.stacked(generations) is first and not first.A_t[2].any()
    assert_fresh(first)
    layer.set_adapter(20, weights[5])
    grown = layer.stacked(generations)
    assert grown is not first and grown.A_t.shape[0] == 21
    assert_fresh(grown)


def test_segments_reject_an_adapter_in_two_segments():
    with pytest.raises(ValueError, match="contiguous"):
        LoraSegments.from_segments(10, [(0, 3, 1), (3, 5, 2), (5, 8, 1)])
