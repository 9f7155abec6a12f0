"""A tiny random Llama saved as a Hugging Face directory, for soaks and live-server tests.

`loramux serve --model DIR` then loads it in about a second and serves it fast on a busy CPU, with
the default model's real tokenizer and chat template (so prompts, chat and fine-tuning data behave
as on the real model). The weights are random: answers are noise, which a soak does not mind. The
layout matches tests/conftest.py `make_tiny_hf(vocab_size=49152, tie_word_embeddings=True)`.

    python scripts/tiny_model.py OUT_DIR      # prints OUT_DIR once written
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

TINY = dict(
    vocab_size=49152,  # the default model's tokenizer
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,  # room for the chat template's system prompt plus a reply
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_tiny_model(target: str | Path, seed: int = 0) -> Path:
    """Writes the tiny model to `target` (its directory name becomes the served model's name) and
    returns it. An existing complete directory is reused as is."""
    from transformers import LlamaConfig

    target = Path(target)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    return write_random_llama(LlamaConfig(**TINY), target, seed)


def write_random_llama(config, target: Path, seed: int = 0, dtype=None) -> Path:
    """A Llama of `config` (a transformers LlamaConfig) with random weights, as transformers
    initialises one, and norms in [0.5, 1.5] (as in tests/conftest.py), in `dtype` (default
    float32), saved to `target` with the default model's tokenizer files beside it."""
    import torch
    from transformers import LlamaForCausalLM

    from loramux.model.loader import resolve_model_dir

    torch.manual_seed(seed)
    hf = LlamaForCausalLM._from_config(config, dtype=dtype or torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.eval().save_pretrained(target)
    source = resolve_model_dir(None)[1]
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_model.py OUT_DIR")
    print(build_tiny_model(sys.argv[1]))
