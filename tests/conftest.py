"""Shared fixtures: tiny random Llama-family models (built in code) and the real default model."""

from __future__ import annotations

import pytest
import torch

from loramux.config import ModelConfig
from loramux.model.loader import build_model

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def make_tiny_hf(seed: int = 0, model_type: str = "llama", **overrides):
    """A random transformers model of the Llama family, in fp32 eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if model_type == "qwen2":
        hf = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**kwargs))
    # Random non-trivial norms so that a wrong norm placement shows up in the logits.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf.float().eval()


def ours_from_hf(hf, dtype=torch.float32):
    """Our model over the same weights as a transformers model."""
    config = ModelConfig.from_hf(hf.config.to_dict())
    return build_model(config, dict(hf.state_dict()), dtype=dtype)


class FakeClock:
    """Seconds that pass only when the test says so (for the scheduler's and training's clocks)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def default_engine():
    """The real default model (SmolLM2-135M-Instruct), fp32, loaded once per test session."""
    from loramux import Engine

    return Engine.load(dtype="float32")


@pytest.fixture(scope="session")
def default_hf(default_engine):
    """transformers' own model over the same converted weights: the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_engine.loaded.path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer, without loading its weights."""
    from loramux.model.loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(None)[1])


@pytest.fixture
def tiny_engine(default_tokenizer):
    """A factory of engines over a tiny random Llama with the real tokenizer's vocabulary (fast
    enough to train in unit tests). Same seed, same weights."""
    from loramux.engine.engine import Engine, EngineConfig
    from loramux.model.loader import LoadedModel, resolve_model_dir

    def make(seed: int = 0, config: EngineConfig | None = None) -> Engine:
        hf = make_tiny_hf(seed=seed, vocab_size=49152, tie_word_embeddings=True)
        loaded = LoadedModel(name="tiny", path=resolve_model_dir(None)[1], model=ours_from_hf(hf), tokenizer=default_tokenizer)
        return Engine(loaded, config or EngineConfig(kv_cache_memory=16 * 2**20))

    return make
