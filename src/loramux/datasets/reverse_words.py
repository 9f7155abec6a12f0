"""reverse_words: "Reverse: apple river stone\\nAnswer:" -> " stone river apple". The base model
cannot do it (0% exact match); a rank-16 LoRA learns it in a few dozen steps. Shipped as
`reverse_words/train.jsonl` (256 examples) and `reverse_words/val.jsonl` (32), regenerated with
`python -m loramux.datasets.reverse_words`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lemon piano candle forest silver rocket garden window dragon "
    "pepper marble violin castle orange planet bridge mirror pencil basket"
).split()
HERE = Path(__file__).resolve().parent


def reverse_words(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        records.append({"prompt": f"Reverse: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(reversed(words))})
    return records


def _write() -> None:
    for split, n, seed in (("train", 256, 0), ("val", 32, 1)):
        out = HERE / "reverse_words" / f"{split}.jsonl"
        out.parent.mkdir(exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in reverse_words(n, seed)))


if __name__ == "__main__":
    _write()
