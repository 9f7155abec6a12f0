"""Fused projections (q/k/v, gate/up as one GEMM): equal to separate linears with each projection's
own LoRA deltas (the loop reference), on every path; Hugging Face state-dict names kept; the paged
KV gather into a reused workspace equals plain indexing."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_hf, ours_from_hf
from loramux.lora.generations import AdapterGenerations
from loramux.config import LORA_TARGETS
from loramux.kv.paged_cache import PagedKVCache
from loramux.lora.layer import FusedLoraLinear
from loramux.lora.ops import LoraWeights, StackedLora, add_lora_group, add_lora_loop, add_lora_stacked
from loramux.lora.segments import LoraSegments

IN = 24
OUTS = (("q_proj", 16), ("k_proj", 8), ("v_proj", 12))


def _group(seed: int = 0, dtype=torch.float32, scale_per_projection: bool = False):
    """A fused q/k/v linear with random weights and bias; adapters of differing ranks on differing
    subsets of its projections (slot 3 on none of them, slot 4 only on v); rows of slots 0..4 and
    some base rows. Returns the layer, x, segments, the separate weights and each projection's adapters."""
    g = torch.Generator().manual_seed(seed)
    layer = FusedLoraLinear(IN, OUTS, bias=True, layer_idx=0).to(dtype)
    separate = {name: (torch.randn(out, IN, generator=g), torch.randn(out, generator=g)) for name, out in OUTS}
    with torch.no_grad():
        layer.weight.copy_(torch.cat([w for w, _ in separate.values()]).to(dtype))
        layer.bias.copy_(torch.cat([b for _, b in separate.values()]).to(dtype))
    targets = {0: ("q_proj", "k_proj", "v_proj"), 1: ("q_proj", "v_proj"), 2: ("k_proj",), 4: ("v_proj",)}
    ranks = {0: 4, 1: 8, 2: 2, 4: 16}
    adapters: dict[str, dict[int, LoraWeights]] = {name: {} for name, _ in OUTS}
    outs = dict(OUTS)
    for slot, names in targets.items():
        for name in names:
            r = ranks[slot]
            w = LoraWeights(A=torch.randn(r, IN, generator=g).to(dtype), B=torch.randn(outs[name], r, generator=g).to(dtype),
                            scale=0.5 + slot + (0.25 * names.index(name) if scale_per_projection else 0.0))
            adapters[name][slot] = w
            layer.projections[name].set_adapter(slot, w)
    lengths = [5, 1, 7, 3, 2]  # slots 2, 0, 4, 3, 1 in this row order, then 4 base rows
    segments, start = [], 0
    for n, slot in zip(lengths, (2, 0, 4, 3, 1)):
        segments.append((start, start + n, slot))
        start += n
    x = torch.randn(start + 4, IN, generator=g).to(dtype)
    return layer, x, LoraSegments.from_segments(start + 4, segments), separate, adapters


def _separate_reference(x, segments, separate, adapters):
    """Each projection on its own: x @ W.T + b, then the loop reference of its own adapters."""
    outs = []
    for name, (W, b) in separate.items():
        y = (x.double() @ W.double().T + b.double())
        weights = {s: LoraWeights(w.A.double(), w.B.double(), w.scale) for s, w in adapters[name].items()}
        outs.append(add_lora_loop(y, x.double(), segments, weights))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("path", ["stacked-loop", "tiled", "graph"])
def test_fused_group_equals_separate_projections_with_their_own_adapters(path, monkeypatch):
    layer, x, seg, separate, adapters = _group()
    if path == "tiled":
        monkeypatch.setattr("loramux.lora.layer.TILED_MIN_SEGMENTS", 1)
        # the tiled path needs every slot of the batch on the group: drop the rows of slot 3
        keep = [s for s in seg.segments if s[2] != 3]
        seg = LoraSegments.from_segments(seg.num_rows, keep)
    expected = _separate_reference(x, seg, separate, adapters)
    if path == "graph":
        for per_slot in adapters.values():
            for w in per_slot.values():
                w.A.requires_grad_(True)
                w.B.requires_grad_(True)
        got = layer(x, seg, builds_graph=True, generations=AdapterGenerations())
        got.square().sum().backward()
        # gradients reach exactly the adapters whose rows are in the batch
        for name, per_slot in adapters.items():
            for slot, w in per_slot.items():
                assert w.B.grad is not None and w.B.grad.abs().sum() > 0, (name, slot)
        assert layer.weight.grad is None and not layer.weight.requires_grad
    else:
        with torch.no_grad():
            got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
    assert (got.double() - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    for part, (name, out) in zip(layer.split(got), OUTS):
        assert part.shape == (x.shape[0], out)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("scale_per_projection", [False, True], ids=["adapter-scale", "projection-scales"])
def test_graph_path_gradients_equal_the_loop_reference(dropout, scale_per_projection):
    """The group path (one matmul pair per segment for q/k/v together) gives x and every adapter's A
    and B the gradients of the per-projection loop, in float64; with dropout, the same masks (each
    adapter's generator draws one mask per projection, in projection order, either way)."""
    _, x0, seg, _, adapters = _group(scale_per_projection=scale_per_projection)
    W = torch.randn(sum(out for _, out in OUTS), IN, dtype=torch.float64)

    def run(group: bool) -> tuple[torch.Tensor, dict]:
        x = x0.double().requires_grad_()
        leaves = {}
        for name, per_slot in adapters.items():
            for slot, w in per_slot.items():
                g = torch.Generator().manual_seed(slot)
                leaves[name, slot] = LoraWeights(w.A.double().requires_grad_(), w.B.double().requires_grad_(), w.scale,
                                                 dropout, g)
        per_projection = [{s: leaves[name, s] for s in adapters[name]} for name, _ in OUTS]
        if group:
            y = add_lora_group(x @ W.T, x, seg, per_projection, [out for _, out in OUTS], training=True)
        else:
            y = torch.cat([add_lora_loop(part.clone(), x, seg, weights, training=True)
                           for part, weights in zip((x @ W.T).split([out for _, out in OUTS], dim=-1), per_projection)], dim=-1)
        (y.sin().sum()).backward()
        return y, {k: (w.A.grad, w.B.grad) for k, w in leaves.items()} | {"x": (x.grad, x.grad)}

    y_group, grads_group = run(True)
    y_loop, grads_loop = run(False)
    assert torch.allclose(y_group, y_loop, rtol=1e-10, atol=1e-10)
    for key, (gA, gB) in grads_loop.items():
        assert torch.allclose(grads_group[key][0], gA, rtol=1e-10, atol=1e-10), key
        assert torch.allclose(grads_group[key][1], gB, rtol=1e-10, atol=1e-10), key
        assert gB.abs().sum() > 0, key


def test_stacked_group_in_bf16_is_within_bf16_tolerance():
    layer, x, seg, separate, adapters = _group(dtype=torch.bfloat16)
    expected = _separate_reference(x.float(), seg, {n: (w.bfloat16().float(), b.bfloat16().float()) for n, (w, b) in separate.items()},
                                   {n: {s: LoraWeights(w.A.float(), w.B.float(), w.scale) for s, w in a.items()} for n, a in adapters.items()})
    with torch.no_grad():
        got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
    assert (got.double() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def test_stacked_weights_are_block_diagonal_over_projections():
    _, _, _, _, adapters = _group()
    stacked = StackedLora.build_fused([(adapters[name], out) for name, out in OUTS], IN)
    # ranks: q max 8 (slots 0, 1), k max 4 (slots 0, 2), v max 16 (slots 0, 1, 4)
    assert stacked.A_t.shape == (5, IN, 8 + 4 + 16) and stacked.B_t.shape == (5, 28, 36)
    assert stacked.A_t[3].abs().sum() == 0 and stacked.B_t[3].abs().sum() == 0  # slot 3: no adapter here
    w = adapters["k_proj"][2]
    assert torch.equal(stacked.A_t[2, :, 8:10], w.A.T)
    assert torch.allclose(stacked.B_t[2, 8:10, 16:24], w.scale * w.B.T)
    assert stacked.B_t[2, 8:12, :16].abs().sum() == 0 and stacked.B_t[2, 8:12, 24:].abs().sum() == 0


def test_stacked_loop_skips_slots_not_given():
    layer, x, seg, separate, adapters = _group()
    stacked = layer.stacked(AdapterGenerations())
    base = x @ layer.weight.T
    y = add_lora_stacked(base.clone(), x, seg, stacked, slots={0})
    start, end = next((s, e) for s, e, slot in seg.segments if slot == 0)
    assert torch.equal(y[:start], base[:start]) and torch.equal(y[end:], base[end:])
    assert not torch.equal(y[start:end], base[start:end])


def test_adapter_changes_and_generations_invalidate_the_stack():
    layer, x, seg, separate, adapters = _group()
    generations = AdapterGenerations()
    with torch.no_grad():
        before = layer(x, seg, builds_graph=False, generations=generations)
        layer.projections["v_proj"].remove_adapter(4)  # structural change: rewritten at once
        removed = layer(x, seg, builds_graph=False, generations=generations)
        adapters["k_proj"][2].B.mul_(3)  # in-place update: seen once its slot's generation moves
        stale = layer(x, seg, builds_graph=False, generations=generations)
        generations.bump(2)
        fresh = layer(x, seg, builds_graph=False, generations=generations)
    del adapters["v_proj"][4]
    assert not torch.equal(before, removed)
    assert torch.equal(removed, stale)
    expected = _separate_reference(x, seg, separate, adapters)
    assert (fresh.double() - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_state_dict_keeps_hugging_face_names_and_round_trips():
    hf = make_tiny_hf(0)
    ours = ours_from_hf(hf)
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    attn = ours.model.layers[1].self_attn
    assert torch.equal(attn.qkv_proj.weight, torch.cat([theirs[f"model.layers.1.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]))
    for name in LORA_TARGETS:  # every PEFT module name maps to its projection
        proj = ours.linear(1, name)
        assert proj.name == name and proj.layer_idx == 1


def test_kv_gather_into_the_workspace_equals_indexing():
    config = ours_from_hf(make_tiny_hf(0)).config
    kv = PagedKVCache(config, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    kv.k.normal_()
    kv.v.normal_()
    for shape in ((3, 5), (7,), (2, 16)):  # growing and shrinking reuse the same workspace
        slots = torch.randint(0, 32, shape)
        with torch.no_grad():
            k, v = kv.gather(1, slots)
        assert torch.equal(k, kv.k[1][slots]) and torch.equal(v, kv.v[1][slots])
