"""Pre-packed bf16 base weights: the same results as F.linear, fresh after in-place changes, and
out of the way of autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_hf, ours_from_hf
from loramux.batch import Batch, Chunk, RowKind
from loramux.lora.prepacked import FrozenLinear, packing_unavailable

BF16 = torch.bfloat16
needs_onednn = pytest.mark.skipif(packing_unavailable() is not None, reason=f"no bf16 weight packing on this CPU: {packing_unavailable()}")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 32, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_equals_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=g).to(BF16)
    w = torch.randn(40, 48, generator=g).to(BF16)
    b = torch.randn(40, generator=g).to(BF16) if with_bias else None
    frozen = FrozenLinear()
    with torch.inference_mode():
        got = frozen(x, w, b)
    assert frozen._packed is not None, "bf16 on CPU without grad should use the packed copy"
    assert torch.equal(got, F.linear(x, w, b))


@needs_onednn
def test_in_place_weight_changes_are_seen():
    w = torch.randn(40, 48).to(BF16)
    x = torch.randn(5, 48).to(BF16)
    frozen = FrozenLinear()
    with torch.no_grad():
        before = frozen(x, w)
        w.mul_(2)
        after = frozen(x, w)
    assert torch.equal(after, F.linear(x, w)) and not torch.equal(after, before)


def test_rows_that_build_graphs_use_the_plain_weight():
    w = torch.randn(40, 48).to(BF16)
    x = torch.randn(5, 48).to(BF16).requires_grad_(True)
    frozen = FrozenLinear()
    frozen(x, w).float().sum().backward()
    assert frozen._packed is None
    assert torch.equal(x.grad, w.float().sum(0).to(BF16).expand(5, -1))


@needs_onednn
def test_bf16_model_logits_are_the_same_packed_or_not():
    ours = ours_from_hf(make_tiny_hf(seed=4, tie_word_embeddings=True), dtype=BF16)
    g = torch.Generator().manual_seed(0)
    batch = Batch.build([Chunk(torch.randint(0, 97, (n,), generator=g).tolist(), RowKind.EVAL) for n in (5, 1, 9)])
    with torch.inference_mode():
        ours.prepack_weights(False)
        plain = ours.logits(ours(batch))
        ours.prepack_weights(True)
        packed = ours.logits(ours(batch))
    assert torch.equal(plain, packed)
    assert all(f._packed is not None for f in [ours._lm_head] + [m.base for m in ours.modules() if hasattr(m, "base")])


def test_inference_rows_work_on_any_cpu():
    """Where the CPU cannot pack bf16 weights (AVX2 only), the same call falls back to F.linear."""
    x = torch.randn(6, 48).to(BF16)
    w = torch.randn(40, 48).to(BF16)
    frozen = FrozenLinear()
    with torch.inference_mode():
        got = frozen(x, w)
    assert torch.equal(got, F.linear(x, w))
    assert (frozen._packed is None) == (packing_unavailable() is not None)
