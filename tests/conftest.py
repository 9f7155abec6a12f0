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


@pytest.fixture(scope="session")
def default_engine():
    """The real default model (SmolLM2-135M-Instruct), fp32, loaded once per test session."""
    from loramux import Engine

    return Engine.load()


@pytest.fixture(scope="session")
def default_hf(default_engine):
    """transformers' own model over the same converted weights: the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_engine.loaded.path, dtype=torch.float32).eval()
