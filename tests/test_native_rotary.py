"""The native rotary embedding with the KV write (native/rotary): bit for bit what
`rope.apply_rotary` and `PagedKVCache.write` give, in bf16 and float32, for GQA and MHA heads, a
head size whose half is not a whole number of vectors, rows further apart than their heads, and
enough rows to be split over threads; in the AVX2 build too; the model takes it for rows without
autograd and greedy decoding is the same with it or without."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from loramux import SamplingParams, native
from loramux.config import ModelConfig, RopeConfig
from loramux.kv.paged_cache import PagedKVCache
from loramux.model.rope import apply_rotary, inverse_frequencies, rotary_tables
from loramux.native import rotary

needs_kernel = pytest.mark.skipif(native.library() is None, reason="the native kernel cannot run on this machine")

# (heads, kv heads, head_dim): SmolLM2's GQA, MHA with a half of 10 (not a whole vector), Llama-3-8B's
HEADS = {"gqa": (9, 3, 64), "mha-odd-half": (4, 4, 20), "gqa-128": (8, 2, 128)}


def _case(shape: str, dtype: torch.dtype, rows: int, extra_heads: int = 0, seed: int = 0):
    """A pool, random fused q/k/v rows [rows, heads, D] (with `extra_heads` more heads after each
    row's, so rows lie further apart than their heads), llama3 rope tables at scattered positions,
    and distinct random slots."""
    heads, kv_heads, head_dim = HEADS[shape]
    config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=32,
                         num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    kv = PagedKVCache(config, num_blocks=-(-rows // 16) + 3, block_size=16, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    wide = torch.randn(rows, heads + 2 * kv_heads + extra_heads, head_dim, generator=g).to(dtype)
    qkv = wide[:, : heads + 2 * kv_heads]
    positions = torch.randint(0, 8000, (rows,), generator=g)
    rope = RopeConfig(theta=500000.0, type="llama3", factor=32.0)
    cos, sin = rotary_tables(positions, inverse_frequencies(rope, head_dim), dtype)
    slots = torch.randperm(kv.k.shape[1], generator=g)[:rows]
    return kv, qkv, cos, sin, slots, heads


def _reference(kv, qkv, cos, sin, slots, heads, layer):
    """What `Attention._attend` computes without the kernel: q and k rotated, K and V written."""
    kv_heads = (qkv.shape[1] - heads) // 2
    qk = apply_rotary(qkv[:, : heads + kv_heads], cos, sin)
    kv.write(layer, slots, qk[:, heads:], qkv[:, heads + kv_heads :])
    return torch.cat([qk, qkv[:, heads + kv_heads :]], dim=1)


@needs_kernel
@pytest.mark.parametrize("isa", ["this CPU's", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", HEADS)
@pytest.mark.parametrize("rows", [1, 37, 600])  # 600: split over threads
def test_rotated_rows_and_written_cache_are_the_pytorch_ops_bit_for_bit(rows, shape, dtype, isa):
    kv, qkv, cos, sin, slots, heads = _case(shape, dtype, rows, extra_heads=2)
    expected_kv, expected_qkv = _case(shape, dtype, rows, extra_heads=2)[:2]  # the same case again, for the reference
    expected = _reference(expected_kv, expected_qkv, cos, sin, slots, heads, layer=1)
    assert rotary.accepts(qkv, cos, sin, kv) and (rows == 1 or not qkv.is_contiguous())
    with mock.patch.object(native, "cpu_isa", return_value="avx2") if isa == "avx2" else contextlib.nullcontext():
        rotary.rotary_native(qkv, heads, cos, sin, kv, layer=1, slots=slots)
    assert torch.equal(qkv, expected)
    assert torch.equal(kv.k, expected_kv.k) and torch.equal(kv.v, expected_kv.v)


@needs_kernel
def test_without_slots_only_the_rows_are_rotated():
    kv, qkv, cos, sin, slots, heads = _case("gqa", torch.bfloat16, 20)
    k, v = kv.k.clone(), kv.v.clone()
    expected = torch.cat([apply_rotary(qkv[:, : heads + 3], cos, sin), qkv[:, heads + 3 :]], dim=1)
    rotary.rotary_native(qkv, heads, cos, sin)
    assert torch.equal(qkv, expected) and torch.equal(kv.k, k) and torch.equal(kv.v, v)
    with pytest.raises(ValueError, match="contiguous long tensor of 20 slots"):
        rotary.rotary_native(qkv, heads, cos, sin, kv, 0, slots.int())


def test_inputs_it_does_not_take():
    kv, qkv, cos, sin, _, _ = _case("gqa", torch.float32, 4)
    assert rotary.accepts(qkv, cos, sin, kv) == (native.library() is not None)
    assert not rotary.accepts(qkv.half(), cos.half(), sin.half(), None)  # float16
    assert not rotary.accepts(qkv, cos.bfloat16(), sin.bfloat16(), kv)  # tables of another dtype
    assert not rotary.accepts(qkv.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, kv)  # heads not contiguous
    bf16_kv = _case("gqa", torch.bfloat16, 4)[0]
    assert not rotary.accepts(qkv, cos, sin, bf16_kv)  # a pool of another dtype


@needs_kernel
def test_greedy_decoding_is_the_same_with_the_kernel_or_without(tiny_engine):
    """The tiny fp32 model, prompts of different lengths: prefill chunks and decode steps, rows that
    write their K and V with the kernel, 40 tokens each."""
    prompts = ["One two three", "The cat sat on the mat and then it", "A"]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    calls = mock.Mock(wraps=rotary.rotary_native)
    with mock.patch("loramux.model.llama.rotary_native", calls):
        with_kernel = [g.token_ids for g in tiny_engine().generate(prompts, params=params)]
        assert calls.call_count > 0 and all(c.args[6] is not None for c in calls.call_args_list)  # every call wrote
        calls.reset_mock()
        with mock.patch.object(rotary, "takes_tables", lambda *args: False):
            without = [g.token_ids for g in tiny_engine().generate(prompts, params=params)]
        assert calls.call_count == 0
    assert with_kernel == without and all(len(t) == 40 for t in with_kernel)
