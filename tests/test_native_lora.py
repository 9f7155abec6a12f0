"""The native segmented LoRA kernel (lora/segmented_lora): on bf16 rows it adds the deltas the loop
reference defines, rounded once as torch rounds, on float32 rows the same deltas within float32
summation error, in every layout the layer hands it, reading the packed stack by slot; the layer
takes it for bf16 and float32 inference rows, decode and prefill (where the PyTorch paths, which
round twice, stay within bf16 tolerance of the same reference)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from loramux.lora.generations import AdapterGenerations
from loramux import native
from loramux.lora.layer import FusedLoraLinear
from loramux.lora.ops import LoraWeights, PackedLora, StackedLora, add_lora_loop
from loramux.lora.segments import LoraSegments
from loramux.lora import segmented_lora

needs_kernel = pytest.mark.skipif(native.library() is None, reason="the native kernel cannot run on this machine")

IN = 40
# Output widths that are not multiples of the kernel's 16 lanes; stack ranks 8 + 24 + 40 = 72, more
# than the 64 rank columns the kernel keeps in registers at once.
OUTS = (("q_proj", 50), ("k_proj", 30), ("v_proj", 20))
RANKS = {"q_proj": 8, "k_proj": 24, "v_proj": 40}
# slot -> (projections it targets, its rank on each: up to the projection's stack rank)
ADAPTERS = {0: ("q_proj", "k_proj", "v_proj"), 1: ("k_proj",), 2: ("q_proj", "v_proj")}


def _adapters(seed: int = 0, dtype: torch.dtype = torch.bfloat16, in_features: int = IN) -> dict[str, dict[int, LoraWeights]]:
    """Adapters of `dtype` (bf16 values either way) on inputs of `in_features`; powers-of-two
    scales, so folding the scale into B is exact."""
    g = torch.Generator().manual_seed(seed)
    adapters: dict[str, dict[int, LoraWeights]] = {name: {} for name, _ in OUTS}
    outs = dict(OUTS)
    for slot, names in ADAPTERS.items():
        for name in names:
            r = RANKS[name] if slot == 0 else max(1, RANKS[name] // 2 - slot)
            adapters[name][slot] = LoraWeights(A=(torch.randn(r, in_features, generator=g) / in_features**0.5).bfloat16().to(dtype),
                                               B=torch.randn(outs[name], r, generator=g).bfloat16().to(dtype), scale=2.0 ** (slot - 1))
    return adapters


def _expected(y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, adapters) -> torch.Tensor:
    """y + each projection's deltas (the loop reference in float64), rounded once to y's dtype."""
    columns = []
    for (name, _), y_part in zip(OUTS, y.double().split([out for _, out in OUTS], dim=-1)):
        weights = {s: LoraWeights(w.A.double(), w.B.double(), w.scale) for s, w in adapters[name].items()}
        columns.append(add_lora_loop(y_part.clone(), x.double(), segments, weights))
    return torch.cat(columns, dim=-1).to(y.dtype)


def assert_rounded_once(got: torch.Tensor, expected: torch.Tensor, min_equal: float = 0.97) -> None:
    """Equal but for float32 summation order: bf16, at most one bf16 step apart, and more than
    `min_equal` of the elements exactly equal; float32, within a few float32 steps."""
    assert got.dtype == expected.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(got.double(), expected.double(), rtol=2**-7, atol=1e-6)
    assert (got == expected).double().mean().item() > min_equal


LAYOUTS = {
    # gaps and trailing rows without an adapter; a segment of 12 rows (two 8-row chunks)
    "segments-with-gaps": (21, [(0, 3, 2), (5, 17, 0), (17, 18, 1)]),
    # decode: one row per sequence, one tile per adapter
    "decode": (6, [(0, 3, 0), (3, 5, 1), (5, 6, 2)]),
    # a prefill chunk: a long segment of many 8-row chunks
    "long-segment": (110, [(0, 100, 0), (100, 103, 1), (103, 110, 2)]),
    # slots out of order, and one the stack has no adapter in on some projections
    "slots-out-of-order": (9, [(0, 2, 2), (2, 7, 1), (7, 9, 0)]),
}


@needs_kernel
@pytest.mark.parametrize("in_features", [IN, 300])  # 300: more than the 256 input elements the kernel converts at a time
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("isa", ["this CPU's", "avx2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_adds_the_reference_deltas_rounded_once(layout, isa, dtype, in_features):
    """In the build for this CPU, and in the AVX2 build (8 lanes, other register blocking) that an
    AVX2-only CPU runs; bf16 rows with a bf16 stack, float32 rows with a float32 one."""
    num_rows, segments = LAYOUTS[layout]
    seg = LoraSegments.from_segments(num_rows, segments)
    adapters = _adapters(dtype=dtype, in_features=in_features)
    packed = PackedLora.build_fused([(adapters[name], out) for name, out in OUTS], in_features)
    assert packed.A_t.dtype == packed.B.dtype == dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_rows, in_features, generator=g).to(dtype)
    y = torch.randn(num_rows, sum(out for _, out in OUTS), generator=g).to(dtype)
    assert segmented_lora.accepts(y, x)
    with contextlib.ExitStack() as stack:
        if isa == "avx2":
            stack.enter_context(mock.patch.object(native, "cpu_isa", return_value="avx2"))
        kernel = stack.enter_context(mock.patch.object(segmented_lora, "_kernel", wraps=segmented_lora._kernel))
        got = segmented_lora.add_lora_native(y.clone(), x, seg.spans, packed)
    assert isa != "avx2" or "loramux-avx2-" in kernel.call_args.args[0]._name
    assert_rounded_once(got, _expected(y, x, seg, adapters))
    covered = torch.zeros(num_rows, dtype=torch.bool)
    for start, end, _ in segments:
        covered[start:end] = True
    assert torch.equal(got[~covered], y[~covered])  # rows of no adapter: untouched, bit for bit


def test_the_packed_stack_holds_the_blocks_of_the_block_diagonal_stack_and_nothing_else():
    """PackedLora keeps, per slot, exactly the nonzero blocks of StackedLora's B (the float32 stack
    the PyTorch paths read), in bf16: rank rows k0..k1 and columns c0..c1, row-major at `off`."""
    projections = [(_adapters()[name], out) for name, out in OUTS]
    packed, stacked = PackedLora.build_fused(projections, IN), StackedLora.build_fused(projections, IN)
    assert packed.blocks.tolist() == [[0, 8, 0, 50, 0], [8, 32, 50, 80, 400], [32, 72, 80, 100, 1120]]
    assert packed.B.shape == (3, 8 * 50 + 24 * 30 + 40 * 20) and packed.A_t.dtype == packed.B.dtype == torch.bfloat16
    assert torch.equal(packed.A_t, stacked.A_t.bfloat16())
    for slot in range(3):
        rebuilt = torch.zeros_like(stacked.B_t[slot])
        for k0, k1, c0, c1, off in packed.blocks.tolist():
            rebuilt[k0:k1, c0:c1] = packed.B[slot, off : off + (k1 - k0) * (c1 - c0)].view(k1 - k0, c1 - c0).float()
        assert torch.equal(rebuilt, stacked.B_t[slot].bfloat16().float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["decode", "long-segment"])
def test_layer_takes_the_kernel_for_inference_rows_and_agrees_with_the_pytorch_path(layout, dtype):
    layer = FusedLoraLinear(IN, OUTS, bias=True, layer_idx=0).to(dtype)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    adapters = _adapters(dtype=dtype)
    for name, by_slot in adapters.items():
        for slot, w in by_slot.items():
            layer.projections[name].set_adapter(slot, w)
    num_rows, segments = LAYOUTS[layout]
    seg = LoraSegments.from_segments(num_rows, segments)
    x = torch.randn(num_rows, IN, generator=g).to(dtype)
    calls = mock.Mock(wraps=segmented_lora.add_lora_native)
    with torch.no_grad(), mock.patch("loramux.lora.layer.add_lora_native", calls):
        got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
        assert calls.call_count == 1
        assert "tiles" not in vars(seg)  # the PyTorch path's tile plan is never built for the kernel
        with mock.patch.object(segmented_lora, "accepts", lambda *a: False):
            pytorch_path = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
        assert calls.call_count == 1
    expected = _expected(torch.nn.functional.linear(x, layer.weight, layer.bias), x, seg, adapters)
    assert_rounded_once(got, expected)
    if dtype == torch.float32:
        torch.testing.assert_close(pytorch_path, expected, rtol=1e-5, atol=1e-5)
        return
    # the PyTorch paths round the base output and the deltas to bf16 apart before adding them
    torch.testing.assert_close(pytorch_path.double(), expected.double(), rtol=2**-6, atol=2**-8 * expected.abs().max().item())


@needs_kernel
def test_a_batch_with_adapters_that_skip_this_linear_reads_only_the_stack_slots_it_has():
    """Slot 5's adapter targets other linears: its rows get the base output alone, and the kernel
    never reads past the stack (which has slots 0-2 only)."""
    layer = FusedLoraLinear(IN, OUTS, bias=False, layer_idx=0).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)))
    adapters = _adapters()
    for name, by_slot in adapters.items():
        for slot, w in by_slot.items():
            layer.projections[name].set_adapter(slot, w)
    seg = LoraSegments.from_segments(8, [(0, 3, 5), (3, 6, 0), (6, 8, 1)])
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        got = layer(x, seg, builds_graph=False, generations=AdapterGenerations())
    base = torch.nn.functional.linear(x, layer.weight)
    assert layer.stacked(AdapterGenerations(), PackedLora).A_t.shape[0] == 3
    assert torch.equal(got[:3], base[:3])
    assert_rounded_once(got, _expected(base, x, seg, adapters))


def test_other_dtypes_keep_the_pytorch_path_and_a_stack_of_another_dtype_is_refused():
    half, f32, bf16 = torch.zeros(2, IN, dtype=torch.float16), torch.zeros(2, IN), torch.zeros(2, IN, dtype=torch.bfloat16)
    assert not segmented_lora.accepts(half, half)
    assert not segmented_lora.accepts(bf16, f32) and not segmented_lora.accepts(f32, bf16)
    packed = PackedLora.build_fused([(_adapters()[name], out) for name, out in OUTS], IN)  # bf16
    with pytest.raises(ValueError, match="the packed stack is torch.bfloat16, the rows torch.float32"):
        segmented_lora.add_lora_native(torch.zeros(2, 100), f32, torch.tensor([[0, 2, 0]]), packed)
