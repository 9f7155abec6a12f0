"""The user-facing engine: one frozen base model, many adapters, mixed-adapter generation.

    engine = Engine.load()                        # the default model
    engine.load_adapter("poet", "path/to/peft_dir")
    outs = engine.generate(["Hi", "Hello"], adapters=[None, "poet"], max_tokens=16)

`generate` runs whole steps over a flat mixed batch: one PREFILL step for every prompt, then DECODE
steps for the sequences still running; each sequence has its own KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from loramux.engine.batch import Batch, Chunk, RowKind
from loramux.engine.sampling import SamplingParams, sample_next
from loramux.kv.sequence_cache import SequenceKV
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import load_peft_adapter, save_peft_adapter
from loramux.lora.registry import AdapterRegistry
from loramux.model.loader import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Generation:
    """One prompt's result. token_ids are the generated ids only."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or stop token) or "length" (max_tokens)
    adapter: str | None


class Engine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapters = AdapterRegistry(self.model)
        eos = set(loaded.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        cache: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
    ) -> Engine:
        """Loads a base model: None for the default SmolLM2-135M-Instruct, a HF directory, or a .gguf."""
        return cls(load_model(model, cache=cache, dtype=parse_dtype(dtype), device=device))

    @property
    def model_name(self) -> str:
        return self.loaded.name

    # --- adapters -------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | os.PathLike) -> LoraAdapter:
        """Loads a PEFT LoRA directory under `name`; refused adapters leave nothing behind."""
        adapter = load_peft_adapter(path, self.model.config, name, dtype=self.model.dtype, device=self.model.device)
        self.adapters.add(adapter)
        return adapter

    def create_adapter(self, name: str, config: LoraConfig, *, seed: int = 0, init_b: str = "zeros") -> LoraAdapter:
        """A new adapter initialised as PEFT does (B = 0 unless init_b="random")."""
        generator = torch.Generator().manual_seed(seed)
        adapter = LoraAdapter.create(
            name, config, self.model.config, generator=generator, init_b=init_b, dtype=self.model.dtype, device=self.model.device
        )
        self.adapters.add(adapter)
        return adapter

    def save_adapter(self, name: str, path: str | os.PathLike) -> None:
        save_peft_adapter(self.adapters.get(name), path, base_model=self.model_name)

    def unload_adapter(self, name: str) -> None:
        self.adapters.remove(name)

    # --- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    # --- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        adapters: str | None | Sequence[str | None] = None,
        *,
        chat: bool = False,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **sampling: object,
    ) -> list[Generation]:
        """Generates for every prompt (text, or token ids) in one mixed-adapter batch.

        adapters: one name (or None: the base model) for all prompts, or one per prompt.
        params: SamplingParams for all or per prompt; or pass max_tokens=..., temperature=..., etc.
        """
        n = len(prompts)
        names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        if len(names) != n:
            raise ValueError(f"got {n} prompts but {len(names)} adapters")
        if params is None:
            params = SamplingParams(**sampling)
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * n
        prompt_ids = [p if not isinstance(p, str) else self.encode(p, chat) for p in prompts]
        slots = [self.adapters.slot(name) for name in names]
        for ids in prompt_ids:
            if not ids:
                raise ValueError("a prompt must have at least one token")
        limit = self.model.config.max_position_embeddings
        for ids, sp in zip(prompt_ids, per_prompt):
            if len(ids) + sp.max_tokens > limit:
                raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {sp.max_tokens} exceeds the context of {limit}")

        caches = [SequenceKV(self.model.config, len(ids) + sp.max_tokens, self.model.dtype, self.model.device)
                  for ids, sp in zip(prompt_ids, per_prompt)]
        generators = [sp.generator() for sp in per_prompt]
        outputs: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        chunks = {i: Chunk(prompt_ids[i], RowKind.PREFILL, slots[i], 0, caches[i]) for i in range(n)}
        with torch.inference_mode():
            while chunks:
                order = list(chunks)
                batch = Batch.build([chunks[i] for i in order], self.model.device)
                hidden = self.model(batch)
                last_rows = torch.tensor([batch.chunk_rows[j].stop - 1 for j in range(len(order))], device=hidden.device)
                logits = self.model.logits(hidden[last_rows])
                chunks = {}
                for j, i in enumerate(order):
                    token = sample_next(logits[j], per_prompt[i], generators[i])
                    outputs[i].append(token)
                    finish[i] = self._finish_reason(token, len(outputs[i]), per_prompt[i])
                    if finish[i] is None:
                        pos = len(prompt_ids[i]) + len(outputs[i]) - 1
                        chunks[i] = Chunk([token], RowKind.DECODE, slots[i], pos, caches[i])
        return [
            Generation(
                text=self.tokenizer.decode(outputs[i], skip_special_tokens=True),
                token_ids=outputs[i],
                prompt_token_ids=list(prompt_ids[i]),
                finish_reason=finish[i] or "length",
                adapter=names[i],
            )
            for i in range(n)
        ]

    def _finish_reason(self, token: int, num_generated: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if num_generated >= params.max_tokens:
            return "length"
        return None
