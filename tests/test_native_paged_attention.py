"""The native decode attention over the paged KV cache (native/paged_attention): what the gather and
masked SDPA of `Attention._decode` give, and what the float64 definition gives rounded once, for
MHA, GQA and MQA heads, contexts of one position, a partial block, several blocks (more than the
kernel's 64-position chunks) over scattered blocks of the pool, in float32 and bf16; the model takes
it for decode rows without autograd, greedy decoding is the same with it or without, and a CPU
without AVX-512 runs its AVX2 build (or, without AVX2, the PyTorch path)."""

from __future__ import annotations

import contextlib
import logging
import random
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from loramux import SamplingParams, native
from loramux.batch import Batch, Chunk, RowKind
from loramux.config import ModelConfig
from loramux.kv.paged_cache import PagedKVCache
from loramux.model.llama import Attention, StepContext
from loramux.native import paged_attention
from test_native_lora import assert_rounded_once

needs_kernel = pytest.mark.skipif(native.library() is None, reason="the native kernel cannot run on this machine")

BLOCK = 16
# (heads, kv heads, head_dim): GQA as SmolLM2's, Llama-3.2-1B's and Llama-3-8B's (head shapes the
# kernel is compiled for with constants), MHA and MQA (shapes it takes as they come)
HEADS = {"gqa": (9, 3, 64), "gqa-64x4": (8, 2, 64), "gqa-128x4": (8, 2, 128), "mha": (4, 4, 16), "mqa": (8, 1, 128)}
# one position, a partial block, one full block, several blocks with a partial one, more than three
# of the kernel's 64-position chunks; batched together, the rows are padded to the longest
LENGTHS = [1, 7, 16, 50, 203]


def _config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=32, num_layers=2,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def _case(shape: str, dtype: torch.dtype, lengths=LENGTHS, q_scale: float = 1.0, seed: int = 0):
    """A pool with random K/V and spare blocks, one DECODE row per length over blocks drawn from a
    shuffled pool (scattered, out of order), its plan from `Batch.build`, and random queries [B, H, D]."""
    config = _config(*HEADS[shape])
    need = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(need) + 5
    kv = PagedKVCache(config, num_blocks, BLOCK, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    chunks, taken = [], 0
    for n, nb in zip(lengths, need):
        chunks.append(Chunk([0], RowKind.DECODE, start_pos=n - 1, block_table=ids[taken: taken + nb]))
        taken += nb
    plan = Batch.build(chunks, kv).parts[0].attention
    q = (q_scale * torch.randn(len(lengths), config.num_heads, config.head_dim, generator=g)).to(dtype)
    return config, kv, plan, q


def _decode(config: ModelConfig, kv: PagedKVCache, plan, q: torch.Tensor, native_on: bool = True, layer: int = 1) -> torch.Tensor:
    """`Attention._decode` of the model: through the kernel (checked), or through its gather and SDPA."""
    ctx = StepContext(SimpleNamespace(attention=plan), kv, None, None, None)
    calls = mock.Mock(wraps=paged_attention.paged_attention_native)
    off = mock.patch.object(paged_attention, "reads_in_place", lambda *args: False)
    with torch.inference_mode(), mock.patch("loramux.model.llama.paged_attention_native", calls), contextlib.nullcontext() if native_on else off:
        out = Attention(config, layer)._decode(q, ctx)
    assert calls.call_count == int(native_on)
    return out


def _definition(kv: PagedKVCache, plan, q: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """softmax(q k / sqrt(D)) v per row and head in float64 over the row's context, read slot by
    slot from the pool, rounded once to q's dtype."""
    H, D = q.shape[1], q.shape[2]
    group = H // kv.k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        slots = plan.decode_slots[b][plan.decode_mask[b, 0, 0]]
        for h in range(H):
            k, v = kv.k[layer][slots, h // group].double(), kv.v[layer][slots, h // group].double()
            out[b, h] = torch.softmax(k @ q[b, h].double() / D**0.5, dim=0) @ v
    return out.to(q.dtype)


@needs_kernel
@pytest.mark.parametrize("shape", HEADS)
def test_float32_is_the_gather_and_sdpa_up_to_summation_order(shape):
    config, kv, plan, q = _case(shape, torch.float32)
    got = _decode(config, kv, plan, q)
    torch.testing.assert_close(got, _decode(config, kv, plan, q, native_on=False), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, _definition(kv, plan, q), rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", HEADS)
def test_bf16_is_the_definition_rounded_once(shape):
    config, kv, plan, q = _case(shape, torch.bfloat16)
    got = _decode(config, kv, plan, q)
    definition = _definition(kv, plan, q)
    assert_rounded_once(got, definition, min_equal=0.99)
    # SDPA also rounds its probabilities to bf16 before the product with V: about a bf16 step of
    # the values apart, and further from the definition
    reference = _decode(config, kv, plan, q, native_on=False)
    torch.testing.assert_close(got.double(), reference.double(), rtol=2**-7, atol=2**-7)
    assert (got.double() - definition.double()).abs().mean() < (reference.double() - definition.double()).abs().mean()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_scores_stay_finite_and_right(dtype):
    """Queries 30x larger: scores spread over hundreds, the max rises from chunk to chunk, a naive
    exp would overflow."""
    config, kv, plan, q = _case("gqa", dtype, q_scale=30.0, seed=3)
    got = _decode(config, kv, plan, q)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, _definition(kv, plan, q), rtol=0, atol=1e-5)
    else:
        assert_rounded_once(got, _definition(kv, plan, q), min_equal=0.99)


@needs_kernel
def test_queries_as_a_view_of_the_fused_rows():
    """A pure decode step hands `_decode` q as a view of the q/k/v rows (rows further apart than
    the heads)."""
    config, kv, plan, q = _case("gqa", torch.float32)
    fused = torch.cat([q, torch.randn(q.shape[0], 2 * config.num_kv_heads, config.head_dim)], dim=1)
    view = fused[:, : config.num_heads]
    assert not view.is_contiguous() and paged_attention.accepts(view, kv, plan.decode_slots, plan.decode_mask)
    assert torch.equal(_decode(config, kv, plan, view), _decode(config, kv, plan, q))


@needs_kernel
def test_the_model_takes_it_only_without_autograd():
    config, kv, plan, q = _case("mha", torch.float32)
    ctx = StepContext(SimpleNamespace(attention=plan), kv, None, None, None)
    attention = Attention(config, 1)
    calls = mock.Mock(wraps=paged_attention.paged_attention_native)
    with mock.patch("loramux.model.llama.paged_attention_native", calls):
        with torch.no_grad():
            without_grad = attention._decode(q, ctx)
        assert calls.call_count == 1
        with_grad = attention._decode(q.requires_grad_(), ctx)
        assert calls.call_count == 1 and with_grad.requires_grad
    torch.testing.assert_close(without_grad, with_grad.detach(), rtol=0, atol=1e-5)


def test_inputs_it_does_not_take():
    config, kv, plan, q = _case("mha", torch.float32, lengths=[3, 20])

    def ok(q=q, kv=kv):
        return paged_attention.accepts(q, kv, plan.decode_slots, plan.decode_mask)

    assert ok() == (native.library() is not None)
    assert not ok(q=q.half())  # float16 queries
    assert not ok(q=q.transpose(1, 2).contiguous().transpose(1, 2))  # heads not contiguous
    bf16_pool = PagedKVCache(config, kv.num_blocks, BLOCK, torch.bfloat16, "cpu")
    assert not ok(kv=bf16_pool)  # a pool in another dtype than q
    config_72 = _config(2, 1, 72)
    pool_72 = PagedKVCache(config_72, 4, BLOCK, torch.float32, "cpu")
    assert not paged_attention.accepts(torch.zeros(2, 2, 72), pool_72, plan.decode_slots, plan.decode_mask)  # D % 16


@needs_kernel
def test_greedy_decoding_is_the_same_with_the_kernel_or_without(tiny_engine):
    """Prompts of different lengths, 40 tokens each: contexts cross blocks and the rows' padded
    widths differ, in every decode step of the tiny fp32 model."""
    prompts = ["One two three", "The cat sat on the mat and then it", "A"]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    calls = mock.Mock(wraps=paged_attention.paged_attention_native)
    with mock.patch("loramux.model.llama.paged_attention_native", calls):
        with_kernel = [g.token_ids for g in tiny_engine().generate(prompts, params=params)]
        assert calls.call_count > 0
        calls.reset_mock()
        with mock.patch.object(paged_attention, "reads_in_place", lambda *args: False):
            without = [g.token_ids for g in tiny_engine().generate(prompts, params=params)]
        assert calls.call_count == 0
    assert with_kernel == without and all(len(t) == 40 for t in with_kernel)


def _probe(avx512: bool, avx2: bool):
    """A stand-in for the library built from cpu.c, answering as such a CPU would."""
    return SimpleNamespace(loramux_cpu_has_avx512=lambda: int(avx512), loramux_cpu_has_avx2=lambda: int(avx2))


def test_the_probe_names_the_best_instruction_set_the_cpu_has(caplog, monkeypatch):
    monkeypatch.delenv("LORAMUX_NATIVE_ISA", raising=False)
    for avx512, avx2, isa in [(True, True, "avx512"), (False, True, "avx2"), (False, False, None)]:
        with mock.patch.object(native, "_load", return_value=_probe(avx512, avx2)), caplog.at_level(logging.INFO, "loramux.native"):
            assert native.cpu_isa.__wrapped__() == isa
    assert "neither AVX-512 nor AVX2" in caplog.text
    monkeypatch.setenv("LORAMUX_NATIVE_ISA", "avx2")  # an AVX-512 CPU made to run what an AVX2 one runs
    with mock.patch.object(native, "_load", return_value=_probe(True, True)):
        assert native.cpu_isa.__wrapped__() == "avx2"


@needs_kernel
@pytest.mark.parametrize("shape", ["gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_avx2_cpu_runs_the_avx2_build(dtype, shape):
    config, kv, plan, q = _case(shape, dtype)
    with mock.patch.object(native, "cpu_isa", return_value="avx2"), \
            mock.patch.object(paged_attention, "_kernels", wraps=paged_attention._kernels) as kernels:
        got = _decode(config, kv, plan, q)
    assert "loramux-avx2-" in kernels.call_args.args[0]._name
    if dtype == torch.float32:
        torch.testing.assert_close(got, _definition(kv, plan, q), rtol=0, atol=1e-5)
    else:
        assert_rounded_once(got, _definition(kv, plan, q), min_equal=0.99)


def test_a_cpu_with_neither_keeps_the_gather_and_sdpa():
    config, kv, plan, q = _case("gqa", torch.float32, lengths=[5, 40])
    with mock.patch.object(native, "cpu_isa", return_value=None):
        assert native.library() is None
        assert not paged_attention.accepts(q, kv, plan.decode_slots, plan.decode_mask)
        got = _decode(config, kv, plan, q, native_on=False)
    torch.testing.assert_close(got, _definition(kv, plan, q), rtol=0, atol=1e-5)
