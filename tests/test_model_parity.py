"""Our flat-batch forward against transformers' modeling code, on the same weights."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_hf, ours_from_hf
from loramux.batch import Batch, Chunk, RowKind
from loramux.kv.paged_cache import PagedKVCache

CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-llama3-rope": dict(
        num_key_value_heads=1,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    "linear-rope-bias": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
                             attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2"),
}


def _sequences(vocab: int, lengths=(5, 1, 17, 9), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flat_batch_logits_match_transformers(name):
    overrides = dict(CONFIGS[name])
    model_type = overrides.pop("model_type", "llama")
    hf = make_tiny_hf(seed=1, model_type=model_type, **overrides)
    ours = ours_from_hf(hf)
    seqs = _sequences(hf.config.vocab_size)
    batch = Batch.build([Chunk(s, RowKind.EVAL) for s in seqs])
    with torch.no_grad():
        logits = ours.logits(ours(batch))
    for i, s in enumerate(seqs):
        rows = batch.chunk_rows[i]
        diff = (logits[rows.start : rows.stop] - _hf_logits(hf, s)).abs().max().item()
        assert diff <= 1e-4, f"{name}: sequence {i} differs by {diff}"


def test_cached_prefill_chunks_and_decode_match_full_forward():
    """A prompt prefilled in two chunks and then decoded token by token through the paged KV cache
    gives the logits of one full forward, while another sequence shares every step. Block size 4 with
    shuffled block tables, so sequences span non-adjacent blocks."""
    hf = make_tiny_hf(seed=2)
    ours = ours_from_hf(hf)
    a, b = _sequences(hf.config.vocab_size, lengths=(12, 7), seed=3)
    reference_a, reference_b = _hf_logits(hf, a), _hf_logits(hf, b)
    kv = PagedKVCache(ours.config, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    blocks_a, blocks_b = [6, 1, 4], [0, 7]
    steps = [
        [Chunk(a[:5], RowKind.PREFILL, None, 0, blocks_a), Chunk(b[:4], RowKind.PREFILL, None, 0, blocks_b)],
        [Chunk(a[5:9], RowKind.PREFILL, None, 5, blocks_a), Chunk(b[4:], RowKind.PREFILL, None, 4, blocks_b)],
    ] + [[Chunk([a[p]], RowKind.DECODE, None, p, blocks_a)] for p in range(9, 12)]
    got_a, got_b = [], []
    with torch.no_grad():
        for chunks in steps:
            batch = Batch.build(chunks, kv)
            logits = ours.logits(ours(batch))
            for i, chunk in enumerate(chunks):
                rows = batch.chunk_rows[i]
                (got_a if chunk.block_table is blocks_a else got_b).append(logits[rows.start : rows.stop])
    assert (torch.cat(got_a) - reference_a).abs().max() <= 1e-4
    assert (torch.cat(got_b) - reference_b).abs().max() <= 1e-4


def test_batched_decode_over_different_context_lengths():
    """Decode rows of sequences with different cached lengths share one padded, masked attention call."""
    hf = make_tiny_hf(seed=6)
    ours = ours_from_hf(hf)
    seqs = _sequences(hf.config.vocab_size, lengths=(3, 11, 6, 1), seed=4)
    kv = PagedKVCache(ours.config, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
    tables = [[15, 2], [3, 9, 1], [5, 12], [8]]
    prefill = [Chunk(s[:-1], RowKind.PREFILL, None, 0, t) for s, t in zip(seqs, tables) if len(s) > 1]
    with torch.no_grad():
        ours(Batch.build(prefill, kv))
        decode = [Chunk(s[-1:], RowKind.DECODE if len(s) > 1 else RowKind.PREFILL, None, len(s) - 1, t) for s, t in zip(seqs, tables)]
        batch = Batch.build(decode, kv)
        assert batch.parts[0].attention.decode_rows.numel() == len(seqs)
        logits = ours.logits(ours(batch))
    for i, s in enumerate(seqs):
        assert (logits[batch.chunk_rows[i].start] - _hf_logits(hf, s)[-1]).abs().max() <= 1e-4


def test_bf16_logits_within_bf16_tolerance():
    hf = make_tiny_hf(seed=4)
    ours = ours_from_hf(hf, dtype=torch.bfloat16)
    seqs = _sequences(hf.config.vocab_size)
    batch = Batch.build([Chunk(s, RowKind.EVAL) for s in seqs])
    with torch.no_grad():
        logits = ours.logits(ours(batch))
    for i, s in enumerate(seqs):
        rows = batch.chunk_rows[i]
        ref = _hf_logits(hf, s)
        diff = (logits[rows.start : rows.stop] - ref).abs().max().item()
        assert diff <= 0.05 * ref.abs().max().item() + 0.05, diff
        assert (logits[rows.start : rows.stop].argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_base_weights_are_frozen():
    ours = ours_from_hf(make_tiny_hf())
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.integration
def test_default_model_logits_match_transformers(default_engine, default_hf):
    tok = default_engine.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Hi"]
    seqs = [tok(p)["input_ids"] for p in prompts]
    model = default_engine.model
    batch = Batch.build([Chunk(s, RowKind.EVAL) for s in seqs])
    with torch.no_grad():
        logits = model.logits(model(batch))
    for i, s in enumerate(seqs):
        rows = batch.chunk_rows[i]
        diff = (logits[rows.start : rows.stop] - _hf_logits(default_hf, s)).abs().max().item()
        assert diff <= 1e-4, f"prompt {prompts[i]!r} differs by {diff}"


def test_silu_and_mul_gradients_equal_autograds():
    from loramux.model.llama import SiluAndMul

    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(6, 10, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(6, 10, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SiluAndMul.apply, (gate, up))
    out = SiluAndMul.apply(gate, up)
    ref = torch.nn.functional.silu(gate) * up
    assert torch.allclose(out, ref)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad((out * w).sum(), (gate, up)),
                                                    torch.autograd.grad((ref * w).sum(), (gate, up))))
