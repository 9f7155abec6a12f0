"""A step with training and inference rows reads each base weight once: the parts' base GEMMs run
as one (FusedLoraLinear.base_parts), with the same gradients, the same inference outputs and the
same saved bytes as one GEMM per part (fp32)."""

from __future__ import annotations

import torch

from loramux.batch import Batch, Chunk, RowKind
from loramux.lora.prepacked import FrozenLinear
from test_gradient_isolation import _fresh, _samples, _saved_bytes, _train_loss


def _base_gemms(model, fn) -> int:
    """How many base GEMMs of the decoder's linears `fn` runs (the lm_head's not counted)."""
    calls = 0
    bases = {id(m.base) for m in model.modules() if hasattr(m, "base_parts")}
    original = FrozenLinear.__call__

    def counting(self, *args, **kwargs):
        nonlocal calls
        calls += id(self) in bases
        return original(self, *args, **kwargs)

    FrozenLinear.__call__ = counting
    try:
        fn()
    finally:
        FrozenLinear.__call__ = original
    return calls


def _step(model, registry, samples, merge: bool):
    """A mixed step's loss, its backward done; the forward under no_grad, as the engine runs steps
    (the model sets each part's grad mode itself)."""
    model.merge_parts = merge
    forward = type(model).forward
    model.forward = torch.no_grad()(lambda batch: forward(model, batch))
    try:
        loss, batch = _train_loss(model, registry, samples, ("X", "Y"), ("Z", None))
    finally:
        del model.forward
    loss.backward()
    return loss.detach()


def test_merged_parts_run_one_gemm_per_linear_with_the_same_results():
    model, registry, adapters = _fresh()
    samples = _samples(model.config.vocab_size)
    linears = 4 * model.config.num_layers  # qkv, o, gate_up, down per layer
    assert _base_gemms(model, lambda: _step(model, registry, samples, merge=True)) == linears
    assert _base_gemms(model, lambda: _step(model, registry, samples, merge=False)) == 2 * linears

    results = {}
    for merge in (False, True):
        for a in adapters.values():
            for A, B in a.weights.values():
                A.grad = B.grad = None
        loss = _step(model, registry, samples, merge)
        grads = [t.grad.clone() for a in (adapters["X"], adapters["Y"]) for pair in a.weights.values() for t in pair]
        assert all(g is not None for g in grads)
        eval_chunks = [Chunk(s, RowKind.EVAL, registry.slot(n)) for n in ("Z", None) for s in samples[n]]
        train_chunks = [Chunk(s, RowKind.TRAIN, registry.slot(n)) for n in ("X",) for s in samples[n]]
        batch = Batch.build(train_chunks + eval_chunks)
        hidden = model(batch)
        eval_rows = torch.cat([torch.arange(r.start, r.stop) for r in batch.chunk_rows[len(train_chunks):]])
        results[merge] = loss, grads, model.logits(hidden[eval_rows].detach())
    (loss0, grads0, logits0), (loss1, grads1, logits1) = results[False], results[True]
    # bitwise: every GEMM here has enough rows that BLAS computes each row the same in any row count
    assert torch.equal(loss1, loss0)
    assert all(torch.equal(g1, g0) for g0, g1 in zip(grads0, grads1))
    assert torch.equal(logits1, logits0)


def test_merged_parts_save_what_a_training_only_step_saves():
    model, registry, adapters = _fresh()
    samples = _samples(model.config.vocab_size)
    train_only = _saved_bytes(lambda: _train_loss(model, registry, samples, ("X", "Y"), ()))
    for merge in (True, False):
        model.merge_parts = merge
        assert _saved_bytes(lambda: _train_loss(model, registry, samples, ("X", "Y"), ("Z", None))) == train_only
