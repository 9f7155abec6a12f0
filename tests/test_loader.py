"""Finding and loading base models: HF directories, GGUF conversion into the cache, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_hf
from loramux.config import UnsupportedModelError
from loramux.batch import Batch, Chunk, RowKind
from loramux.model.loader import default_gguf_path, load_model, resolve_model_dir


def _save_tiny_dir(tmp_path, **overrides):
    hf = make_tiny_hf(seed=5, **overrides)
    hf.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    return hf, tmp_path / "tiny"


def test_hf_directory_loads_with_its_weights(tmp_path, monkeypatch):
    hf, path = _save_tiny_dir(tmp_path)
    monkeypatch.setattr("loramux.model.loader.load_tokenizer", lambda directory: None)  # tiny model has none
    loaded = load_model(path, cache=tmp_path / "cache")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ours = loaded.model.logits(loaded.model(Batch.build([Chunk(ids, RowKind.EVAL)])))
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4
    assert loaded.name == "tiny"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope type 'yarn'"),
        (lambda c: c.update(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    ],
)
def test_unsupported_configs_are_refused_with_what_is_supported(tmp_path, edit, message):
    _, path = _save_tiny_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(path, cache=tmp_path / "cache")


def test_wrong_weights_are_refused_naming_the_keys(tmp_path):
    _, path = _save_tiny_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"missing \['model.layers.2"):
        load_model(path, cache=tmp_path / "cache")


def test_paths_that_are_not_models_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        resolve_model_dir(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnsupportedModelError, match="Llama family"):
        resolve_model_dir(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match="no \\*.safetensors"):
        resolve_model_dir(tmp_path / "empty")


@pytest.mark.integration
def test_gguf_path_is_converted_once_into_the_given_cache(tmp_path, default_engine):
    """A .gguf path converts into --cache-dir; the second load reads the cache as it is (no file
    is written again) and gives the same weights as the default model."""
    gguf = default_gguf_path()
    first = load_model(gguf, cache=tmp_path)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    second = load_model(gguf, cache=tmp_path)
    assert first.path == second.path and first.path.is_relative_to(tmp_path)
    assert written and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written
    assert second.tokenizer.chat_template
    for (name, a), b in zip(second.model.state_dict().items(), default_engine.model.state_dict().values()):
        assert torch.equal(a, b), name
