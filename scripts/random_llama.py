"""A Llama-3.2-1B-shaped model with random weights, made here and saved as a Hugging Face directory,
for benchmarks where the GEMMs dominate (`loramux bench inference --model DIR`). Nothing is
downloaded.

The shape is Llama-3.2-1B's public config.json: hidden 2048, 16 layers, 32 attention heads of 64,
8 KV heads, MLP 8192, RoPE theta 500000 with llama3 scaling (factor 32, low/high frequency factors
1 and 4, original context 8192), a 131072-token context, tied embeddings, bfloat16 weights. One
difference: the vocabulary is the default model's, 49152 tokens, whose tokenizer and chat template
are copied beside the weights (as scripts/tiny_model.py does), not Llama 3's 128256, whose tokenizer
is not on this machine. So the embedding has 101M parameters instead of 263M, and the model 1.07B
instead of 1.24B: the 16 layers, where the GEMMs are, are Llama-3.2-1B's. The weights are drawn as
transformers initialises a Llama (normal, std 0.02), with norms in [0.5, 1.5] as in the tiny model.
About 2.1 GB on disk; loramux holds it in 4.3 GB in float32, 2.1 GB in bfloat16.

    python scripts/random_llama.py OUT_DIR [--layers N]   # prints OUT_DIR once written
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import write_random_llama  # noqa: E402  (the tiny model's writer, tokenizer files and all)

LLAMA_3_2_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=True,
)


def build_random_llama(target: str | Path, layers: int = LLAMA_3_2_1B["num_hidden_layers"], seed: int = 0) -> Path:
    """Writes the model to `target` (its directory name becomes the served model's name) and
    returns it; `layers` fewer than 16 makes a cheaper model of the same width (for tests)."""
    import torch
    from transformers import LlamaConfig

    from loramux.model.loader import resolve_model_dir

    tokens = json.loads((resolve_model_dir(None)[1] / "config.json").read_text())
    config = LlamaConfig(**(LLAMA_3_2_1B | {"num_hidden_layers": layers}), vocab_size=tokens["vocab_size"],
                         bos_token_id=tokens["bos_token_id"], eos_token_id=tokens["eos_token_id"])
    return write_random_llama(config, Path(target), seed, torch.bfloat16)  # made in bf16: no fp32 copy at 4.3 GB


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a Llama-3.2-1B-shaped model with random weights.")
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=LLAMA_3_2_1B["num_hidden_layers"], help="decoder layers (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_random_llama(args.out_dir, args.layers, args.seed))
