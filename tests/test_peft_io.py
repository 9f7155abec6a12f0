"""PEFT adapters on disk: loramux's logits against the real `peft` package, round trips, refusals
and atomic saving.

Every parity check compares loramux with PEFT / transformers running on the same weights; the only
loramux-against-loramux check is that reloading a saved adapter gives back identical tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_hf, ours_from_hf
from loramux.config import LORA_TARGETS
from loramux.batch import Batch, Chunk, RowKind
from loramux.engine.engine import Engine
from loramux.lora import peft_io
from loramux.lora.adapter import AdapterError, LoraAdapter, LoraConfig
from loramux.lora.peft_io import load_peft_adapter, save_peft_adapter
from loramux.lora.registry import AdapterRegistry
from loramux.model.loader import LoadedModel

peft = pytest.importorskip("peft")

TOL = 1e-4
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> peft.LoraConfig kwargs
TINY_PEFT_CONFIGS = {
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=32, target_modules=ALL_LINEARS, task_type="CAUSAL_LM"),
    # rsLoRA: scale alpha/sqrt(r) (= 3 here) instead of alpha/r (= 0.75); dropout must be off on EVAL rows.
    "r16-rslora": dict(r=16, lora_alpha=12, use_rslora=True, lora_dropout=0.1,
                       target_modules=["k_proj", "o_proj", "up_proj", "down_proj"]),
}


# --- helpers ----------------------------------------------------------------------------------------
def _sequences(vocab: int, lengths=(6, 1, 13, 9), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _randomize_lora_b(peft_model, seed: int, std: float) -> None:
    """PEFT initialises lora_B to zero (a no-op adapter); give it seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_adapter(base, config_kwargs: dict, directory: Path, *, seed: int, std: float = 0.1, **save_kwargs):
    """Wraps `base` (mutated in place) in a PEFT LoRA with non-zero B, saves it to `directory`."""
    pm = peft.get_peft_model(base, peft.LoraConfig(**config_kwargs))
    _randomize_lora_b(pm, seed, std)
    pm.eval()
    pm.save_pretrained(str(directory), **save_kwargs)
    return pm


def _our_logits(model, chunks: list[Chunk]) -> list[torch.Tensor]:
    batch = Batch.build(chunks)
    with torch.no_grad():
        logits = model.logits(model(batch))
    return [logits[r.start : r.stop] for r in batch.chunk_rows]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _adapter_entries(model) -> int:
    return sum(len(model.linear(layer, name).adapters) for layer in range(model.config.num_layers) for name in LORA_TARGETS)


# --- 1. PEFT -> loramux parity on a tiny random model ------------------------------------------------
@pytest.mark.parametrize(
    "name, model_type",
    [(name, "llama") for name in TINY_PEFT_CONFIGS] + [("r16-all", "qwen2")],
)
def test_peft_adapter_logits_match_peft(name, model_type, tmp_path):
    seed = 3
    pm = _peft_adapter(make_tiny_hf(seed, model_type), TINY_PEFT_CONFIGS[name], tmp_path / name, seed=11)
    base_hf = make_tiny_hf(seed, model_type)
    ours = ours_from_hf(make_tiny_hf(seed, model_type))
    registry = AdapterRegistry(ours)
    slot = registry.add(load_peft_adapter(tmp_path / name, ours.config, name))

    seqs = _sequences(base_hf.config.vocab_size, lengths=(7, 1, 15, 10))
    adapters = [slot, slot, None, slot]
    got = _our_logits(ours, [Chunk(s, RowKind.EVAL, adapter=a) for s, a in zip(seqs, adapters)])
    for i, (s, a) in enumerate(zip(seqs, adapters)):
        base_ref = _hf_logits(base_hf, s)
        if a is None:
            ref = base_ref
        else:
            ref = _hf_logits(pm, s)
            # The adapter must matter, or this comparison could not fail.
            assert _max_diff(ref, base_ref) > 1e-2, "the PEFT adapter barely changes the logits"
        diff = _max_diff(got[i], ref)
        assert diff <= TOL, f"{name}: sequence {i} ({'base' if a is None else 'adapter'}) differs by {diff}"


def test_several_peft_adapters_in_one_batch_match_peft(tmp_path):
    """All three PEFT adapters and the base model in one batch (>= 3 segments: the tiled path)."""
    seed = 5
    peft_models = {}
    for k, (name, cfg) in enumerate(TINY_PEFT_CONFIGS.items()):
        peft_models[name] = _peft_adapter(make_tiny_hf(seed), cfg, tmp_path / name, seed=20 + k)
    base_hf = make_tiny_hf(seed)
    ours = ours_from_hf(make_tiny_hf(seed))
    registry = AdapterRegistry(ours)
    slots = {name: registry.add(load_peft_adapter(tmp_path / name, ours.config, name)) for name in peft_models}

    names = ["r16-all", None, "r8-qv", "r16-rslora", "r8-qv", "r16-all"]
    seqs = _sequences(base_hf.config.vocab_size, lengths=(9, 4, 12, 6, 1, 17), seed=1)
    got = _our_logits(ours, [Chunk(s, RowKind.EVAL, adapter=registry.slot(n)) for s, n in zip(seqs, names)])
    assert sorted(slots.values()) == [0, 1, 2]
    for i, (s, n) in enumerate(zip(seqs, names)):
        ref = _hf_logits(base_hf if n is None else peft_models[n], s)
        diff = _max_diff(got[i], ref)
        assert diff <= TOL, f"sequence {i} ({n or 'base'}) differs by {diff}"


def test_peft_regex_target_modules_load(tmp_path):
    """A string target_modules (a regex over module names, here only layer 1's o_proj and
    down_proj): the weights' keys say which linears and layers the adapter covers."""
    seed = 6
    cfg = dict(r=4, lora_alpha=8, target_modules=r".*layers\.1\.(self_attn\.o_proj|mlp\.down_proj)")
    pm = _peft_adapter(make_tiny_hf(seed), cfg, tmp_path / "regex", seed=7, std=0.3)
    ours = ours_from_hf(make_tiny_hf(seed))
    adapter = load_peft_adapter(tmp_path / "regex", ours.config, "regex")
    assert set(adapter.weights) == {(1, "o_proj"), (1, "down_proj")}
    slot = AdapterRegistry(ours).add(adapter)
    seqs = _sequences(ours.config.vocab_size, lengths=(8, 3), seed=2)
    got = _our_logits(ours, [Chunk(s, RowKind.EVAL, adapter=slot) for s in seqs])
    for i, s in enumerate(seqs):
        assert _max_diff(got[i], _hf_logits(pm, s)) <= TOL


# --- 2. loramux -> PEFT round trip ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=6, alpha=9.0, target_modules=("q_proj", "k_proj", "o_proj", "down_proj")),
        LoraConfig(r=4, alpha=3.0, target_modules=("v_proj", "gate_proj", "up_proj"), use_rslora=True, layers=(1,)),
    ],
    ids=["plain", "rslora-layer1"],
)
def test_loramux_adapter_round_trips_through_peft(config, tmp_path):
    seed = 8
    ours = ours_from_hf(make_tiny_hf(seed))
    adapter = LoraAdapter.create("mine", config, ours.config, generator=torch.Generator().manual_seed(4), init_b="random")
    directory = save_peft_adapter(adapter, tmp_path / "mine")
    assert directory == tmp_path / "mine"

    pm = peft.PeftModel.from_pretrained(make_tiny_hf(seed), str(directory)).eval()
    base_hf = make_tiny_hf(seed)
    slot = AdapterRegistry(ours).add(adapter)
    seqs = _sequences(ours.config.vocab_size, lengths=(5, 11, 2), seed=9)
    adapters = [slot, None, slot]
    got = _our_logits(ours, [Chunk(s, RowKind.EVAL, adapter=a) for s, a in zip(seqs, adapters)])
    for i, (s, a) in enumerate(zip(seqs, adapters)):
        ref = _hf_logits(base_hf if a is None else pm, s)
        if a is not None:
            assert _max_diff(ref, _hf_logits(base_hf, s)) > 1e-2, "PEFT did not apply the saved adapter"
        assert _max_diff(got[i], ref) <= TOL, f"sequence {i} differs"

    reloaded = load_peft_adapter(directory, ours.config, "again")
    assert reloaded.name == "again"
    assert reloaded.config == config
    assert set(reloaded.weights) == set(adapter.weights)
    for key, (A, B) in adapter.weights.items():
        rA, rB = reloaded.weights[key]
        assert torch.equal(rA, A) and torch.equal(rB, B), key
        assert rA.dtype == torch.float32


def test_load_uses_directory_name_when_no_name_given(tmp_path):
    ours = ours_from_hf(make_tiny_hf(0))
    adapter = LoraAdapter.create("x", LoraConfig(), ours.config, generator=torch.Generator().manual_seed(0))
    save_peft_adapter(adapter, tmp_path / "poet")
    assert load_peft_adapter(tmp_path / "poet", ours.config).name == "poet"


# --- 3. the real default model --------------------------------------------------------------------------
DEFAULT_CONFIGS = {
    "r16-all": dict(r=16, lora_alpha=32, target_modules=ALL_LINEARS, task_type="CAUSAL_LM"),
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(DEFAULT_CONFIGS))
def test_default_model_peft_adapter_matches_peft(name, default_engine, default_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(default_engine.loaded.path, dtype=torch.float32).eval()
    pm = _peft_adapter(fresh, DEFAULT_CONFIGS[name], tmp_path / name, seed=31, std=0.02)
    tok = default_engine.tokenizer
    seqs = [tok(p)["input_ids"] for p in ["The capital of France is", "Hi", "def add(a, b):\n    return"]]
    adapter_name = f"peft-{name}"
    model = default_engine.model
    entries = _adapter_entries(model)
    default_engine.load_adapter(adapter_name, tmp_path / name)
    try:
        slot = default_engine.adapters.slot(adapter_name)
        adapters = [slot, None, slot]
        got = _our_logits(model, [Chunk(s, RowKind.EVAL, adapter=a) for s, a in zip(seqs, adapters)])
        for i, (s, a) in enumerate(zip(seqs, adapters)):
            base_ref = _hf_logits(default_hf, s)
            if a is None:
                ref = base_ref
            else:
                ref = _hf_logits(pm, s)
                assert _max_diff(ref, base_ref) > 1e-2, "the PEFT adapter barely changes the logits"
            diff = _max_diff(got[i], ref)
            assert diff <= TOL, f"{name}: sequence {i} ({'base' if a is None else 'adapter'}) differs by {diff}"
    finally:
        default_engine.unload_adapter(adapter_name)
    assert _adapter_entries(model) == entries


# --- 4. refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_engine():
    """An Engine over a tiny model, already holding one valid adapter (so 'nothing added' is
    checked against a non-empty registry)."""
    ours = ours_from_hf(make_tiny_hf(0))
    engine = Engine(LoadedModel(name="tiny", path=Path("."), model=ours, tokenizer=None))
    engine.create_adapter("good", LoraConfig(r=4, target_modules="all-linear"), seed=1, init_b="random")
    return engine


@pytest.fixture
def valid_dir(tmp_path):
    """A valid PEFT adapter for the tiny model: r=8 on q_proj and v_proj of both layers."""
    directory = tmp_path / "valid"
    _peft_adapter(make_tiny_hf(0), dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), directory, seed=2)
    return directory


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "adapter_model.safetensors"
    state = load_file(path)
    state = edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _assert_refused(engine: Engine, directory: Path, *needles: str) -> str:
    names, entries = engine.adapters.names(), _adapter_entries(engine.model)
    version = engine.adapters.generations.version
    with pytest.raises(AdapterError) as info:
        engine.load_adapter("bad", directory)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "bad" not in engine.adapters
    assert engine.adapters.names() == names
    assert _adapter_entries(engine.model) == entries
    assert engine.adapters.generations.version == version
    return message


def test_valid_adapter_loads_into_tiny_engine(tiny_engine, valid_dir):
    """The control for the refusal tests: the unedited directory loads."""
    entries = _adapter_entries(tiny_engine.model)
    tiny_engine.load_adapter("bad", valid_dir)
    assert "bad" in tiny_engine.adapters
    assert _adapter_entries(tiny_engine.model) == entries + 2 * 2  # q_proj, v_proj of 2 layers


def test_refuses_wrong_shapes(tiny_engine, tmp_path):
    other = tmp_path / "other-hidden"
    _peft_adapter(make_tiny_hf(0, hidden_size=32), dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), other, seed=2)
    _assert_refused(tiny_engine, other, "q_proj", "32", "64")


def test_refuses_rank_mismatch_between_a_and_b(tiny_engine, valid_dir):
    _edit_weights(valid_dir, lambda s: {k: (v[:, :4].contiguous() if k.endswith("layers.1.self_attn.v_proj.lora_B.weight") else v)
                                        for k, v in s.items()})
    _assert_refused(tiny_engine, valid_dir, "layer 1", "v_proj")


def test_refuses_unknown_module(tiny_engine, valid_dir):
    def add_foo(state):
        state = dict(state)
        state["base_model.model.model.layers.0.self_attn.foo_proj.lora_A.weight"] = torch.zeros(8, 64)
        state["base_model.model.model.layers.0.self_attn.foo_proj.lora_B.weight"] = torch.zeros(64, 8)
        return state

    _edit_weights(valid_dir, add_foo)
    _assert_refused(tiny_engine, valid_dir, "foo_proj")


def test_refuses_unsupported_tensor(tiny_engine, valid_dir):
    _edit_weights(valid_dir, lambda s: {**s, "base_model.model.lm_head.weight": torch.zeros(97, 64)})
    _assert_refused(tiny_engine, valid_dir, "lm_head")


def test_refuses_lone_half(tiny_engine, valid_dir):
    _edit_weights(valid_dir, lambda s: {k: v for k, v in s.items() if k != "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"})
    _assert_refused(tiny_engine, valid_dir, "layer 1", "q_proj", "lora_A")


def test_refuses_dora(tiny_engine, valid_dir):
    _edit_config(valid_dir, use_dora=True)
    _assert_refused(tiny_engine, valid_dir, "use_dora")


@pytest.mark.parametrize(
    "option, value",
    [("fan_in_fan_out", True), ("bias", "all"), ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 4}),
     ("alpha_pattern", {"v_proj": 4})],
)
def test_refuses_other_unsupported_options(tiny_engine, valid_dir, option, value):
    _edit_config(valid_dir, **{option: value})
    _assert_refused(tiny_engine, valid_dir, option)


def test_refuses_non_lora_peft_type(tiny_engine, valid_dir):
    _edit_config(valid_dir, peft_type="IA3")
    _assert_refused(tiny_engine, valid_dir, "IA3")


def test_refuses_missing_weights_file(tiny_engine, valid_dir):
    (valid_dir / "adapter_model.safetensors").unlink()
    _assert_refused(tiny_engine, valid_dir, "adapter_model.safetensors")


def test_refuses_bin_weights_with_a_hint(tiny_engine, tmp_path):
    directory = tmp_path / "bin"
    _peft_adapter(make_tiny_hf(0), dict(r=8, lora_alpha=16, target_modules=["q_proj"]), directory, seed=2,
                  safe_serialization=False)
    assert (directory / "adapter_model.bin").exists()
    _assert_refused(tiny_engine, directory, "adapter_model.safetensors", "safe_serialization")


def test_refuses_missing_config(tiny_engine, valid_dir):
    (valid_dir / "adapter_config.json").unlink()
    _assert_refused(tiny_engine, valid_dir, "adapter_config.json")


def test_refuses_layer_beyond_the_model(tiny_engine, valid_dir):
    _edit_weights(valid_dir, lambda s: {k.replace("layers.1.", "layers.5."): v for k, v in s.items()})
    _assert_refused(tiny_engine, valid_dir, "layer 5")


def test_refuses_config_rank_disagreeing_with_tensors(tiny_engine, valid_dir):
    _edit_config(valid_dir, r=4)
    _assert_refused(tiny_engine, valid_dir, "r=4", "rank 8")


def test_refuses_weights_outside_target_modules(tiny_engine, valid_dir):
    _edit_config(valid_dir, target_modules=["q_proj"])
    _assert_refused(tiny_engine, valid_dir, "v_proj", "target_modules")


def test_refuses_duplicate_name(tiny_engine, valid_dir):
    existing = tiny_engine.adapters.get("good")
    entries = _adapter_entries(tiny_engine.model)
    with pytest.raises(AdapterError, match="good"):
        tiny_engine.load_adapter("good", valid_dir)
    assert tiny_engine.adapters.get("good") is existing
    assert _adapter_entries(tiny_engine.model) == entries


# Options that PEFT saves and that change what the adapter computes: loramux must refuse them (or
# reproduce PEFT).
def test_activated_lora_is_refused_or_matches_peft(tmp_path):
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    pm = _peft_adapter(make_tiny_hf(0), cfg, tmp_path / "alora", seed=2)
    base_hf = make_tiny_hf(0)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # the invocation [5, 6] starts at row 4
    ref, base = _hf_logits(pm, ids), _hf_logits(base_hf, ids)
    # aLoRA in PEFT: rows before the invocation are the base model's, the others are not.
    assert _max_diff(ref[:4], base[:4]) <= TOL and _max_diff(ref[4:], base[4:]) > 1e-2
    ours = ours_from_hf(make_tiny_hf(0))
    try:
        adapter = load_peft_adapter(tmp_path / "alora", ours.config, "alora")
    except AdapterError as e:
        assert "alora_invocation_tokens" in str(e)
        return
    slot = AdapterRegistry(ours).add(adapter)
    (got,) = _our_logits(ours, [Chunk(ids, RowKind.EVAL, adapter=slot)])
    diff = _max_diff(got, ref)
    assert diff <= TOL, f"aLoRA adapter loaded but differs from PEFT by {diff} (rows before the invocation: {_max_diff(got[:4], base[:4])} from base)"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_modifying_init_is_refused_or_matches_peft(init, tmp_path):
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    pm = peft.get_peft_model(make_tiny_hf(0), peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: move B away from its initial value
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / init))
    # PEFT itself, given the untouched base and the saved directory:
    reloaded = peft.PeftModel.from_pretrained(make_tiny_hf(0), str(tmp_path / init)).eval()
    ids = [1, 2, 3, 4, 5, 6, 7]
    ref = _hf_logits(reloaded, ids)
    ours = ours_from_hf(make_tiny_hf(0))
    try:
        adapter = load_peft_adapter(tmp_path / init, ours.config, init)
    except AdapterError as e:
        assert "init_lora_weights" in str(e)
        return
    slot = AdapterRegistry(ours).add(adapter)
    (got,) = _our_logits(ours, [Chunk(ids, RowKind.EVAL, adapter=slot)])
    diff = _max_diff(got, ref)
    assert diff <= TOL, f"{init} adapter loaded but differs from PEFT by {diff}"


# --- 5. saving is atomic and overwrites ---------------------------------------------------------------------
def test_save_overwrites_atomically(tmp_path):
    ours = ours_from_hf(make_tiny_hf(0))
    first = LoraAdapter.create("a", LoraConfig(r=4, alpha=8.0, target_modules=("k_proj", "down_proj")), ours.config,
                               generator=torch.Generator().manual_seed(1), init_b="random")
    second = LoraAdapter.create("b", LoraConfig(r=8, alpha=4.0, target_modules=("q_proj", "v_proj"), use_rslora=True),
                                ours.config, generator=torch.Generator().manual_seed(2), init_b="random")
    parent = tmp_path / "adapters"
    target = parent / "mine"
    save_peft_adapter(first, target)
    (parent / "neighbour.txt").write_text("untouched")
    save_peft_adapter(second, target)

    assert sorted(os.listdir(parent)) == ["mine", "neighbour.txt"], "stray temporary entries left"
    assert (parent / "neighbour.txt").read_text() == "untouched"
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    # The files hold the second adapter, and nothing of the first (read with safetensors/json, not loramux).
    raw = json.loads((target / "adapter_config.json").read_text())
    assert raw["r"] == 8 and raw["lora_alpha"] == 4.0 and raw["use_rslora"] is True
    assert sorted(raw["target_modules"]) == ["q_proj", "v_proj"]
    state = load_file(target / "adapter_model.safetensors")
    expected = {}
    for (layer, module), (A, B) in second.weights.items():
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
        expected[f"{prefix}.lora_A.weight"], expected[f"{prefix}.lora_B.weight"] = A, B
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    # ... and it loads, in loramux and in PEFT.
    reloaded = load_peft_adapter(target, ours.config, "b2")
    assert reloaded.config == second.config
    assert peft.PeftModel.from_pretrained(make_tiny_hf(0), str(target)).peft_config["default"].r == 8


def test_failed_save_leaves_previous_adapter_and_no_temporaries(tmp_path, monkeypatch):
    ours = ours_from_hf(make_tiny_hf(0))
    first = LoraAdapter.create("a", LoraConfig(r=4), ours.config, generator=torch.Generator().manual_seed(1), init_b="random")
    second = LoraAdapter.create("b", LoraConfig(r=8), ours.config, generator=torch.Generator().manual_seed(2), init_b="random")
    target = tmp_path / "mine"
    save_peft_adapter(first, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(second, target)
    assert os.listdir(tmp_path) == ["mine"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_save_into_new_nested_directory(tmp_path):
    ours = ours_from_hf(make_tiny_hf(0))
    adapter = LoraAdapter.create("a", LoraConfig(r=2), ours.config, generator=torch.Generator().manual_seed(1), init_b="random")
    target = tmp_path / "x" / "y" / "a"
    save_peft_adapter(adapter, target)
    assert sorted(os.listdir(tmp_path / "x" / "y")) == ["a"]
    assert (target / "adapter_config.json").is_file()
