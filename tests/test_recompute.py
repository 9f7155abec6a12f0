"""Activations recomputed in backward: the same gradients, bit for bit, for fewer saved bytes."""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch

from conftest import make_tiny_hf, ours_from_hf
from loramux.model.recompute import recomputed
from test_gradient_isolation import _samples, _saved_bytes, _train_loss, _with_adapters


def test_views_of_the_tensor_are_recomputed_and_not_kept():
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    calls = []

    def recompute():
        calls.append(1)
        return x * 2 + 1

    def loss(recompute_it: bool):
        y = x * 2 + 1  # nothing outside the block saves y
        ref = weakref.ref(y)
        with recomputed(y, recompute) if recompute_it else contextlib.nullcontext():
            out = (y[1:] @ w).sum() + (y.T[2:] ** 2).sum()  # two views of y saved
        return out, ref, y.untyped_storage().data_ptr()

    expected, plain_ref, _ = loss(False)
    gc.collect()
    assert plain_ref() is not None  # without recomputation the graph keeps y
    gx, gw = torch.autograd.grad(expected, (x, w))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t.detach(),
                                                  lambda t: t):
        got, ref, y_storage = loss(True)
    gc.collect()
    assert ref() is None, "the graph keeps y alive"
    assert saved and y_storage not in saved, "the outer hook saw views of y"
    assert not calls
    got_gx, got_gw = torch.autograd.grad(got, (x, w))
    assert len(calls) == 2  # once per saved view
    assert torch.equal(got_gx, gx) and torch.equal(got_gw, gw)


def test_model_gradients_are_bitwise_the_same_for_fewer_saved_bytes(monkeypatch):
    """Tiny model, two adapters trained: every LoRA gradient equal with and without recomputation;
    the saved bytes fall by exactly the rows of the normed inputs, the attention output and the MLP
    hidden that adapters read: X (14 rows) targets every linear, Y (7 rows) q, v and down only."""

    def run():
        model = ours_from_hf(make_tiny_hf(seed=0))
        registry, adapters = _with_adapters(model, ("X", "Y"))
        samples = _samples(model.config.vocab_size)
        result = {}

        def step():
            result["loss"], result["batch"] = _train_loss(model, registry, samples, ("X", "Y"), ())

        saved = _saved_bytes(step)
        result["loss"].backward()
        grads = [t.grad for name in ("X", "Y") for pair in adapters[name].weights.values() for t in pair]
        return model, result["batch"], saved, grads

    model, batch, saved, grads = run()
    monkeypatch.setattr("loramux.model.llama.recomputed", lambda tensor, fn: contextlib.nullcontext())
    _, _, saved_plain, grads_plain = run()
    assert all(g is not None for g in grads) and len(grads) == len(grads_plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_plain))
    cfg = model.config
    rows, rows_x = batch.num_rows, 14
    normed_inputs = rows * cfg.hidden_size + rows_x * cfg.hidden_size  # of q/k/v, of gate/up
    attention_output = rows_x * cfg.num_heads * cfg.head_dim  # of o
    per_layer = normed_inputs + attention_output + rows * cfg.intermediate_size
    assert saved_plain - saved == cfg.num_layers * per_layer * 4
