"""transformers + PEFT, used as PEFT users would: the peer of every setting.

- Inference: static batches fed from the arrival queue. Whenever the model is free it takes every
  request that has arrived (up to `max_batch`) and runs one mixed-adapter
  `generate(adapter_names=...)` over them, left-padded, until the batch's longest output is done.
  A logits processor stamps each generated position, so a request's first token and finish are
  the times its first and its last token were produced.
- Fine-tuning: a plain PyTorch loop over padded micro-batches, AdamW on the LoRA parameters.
- Unified: both in one process, taking turns: one training step, then one inference batch of what
  has arrived, and so on.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch

from loramux.bench.records import RequestRecord
from loramux.bench.workload import BenchRequest
from loramux.training.data import Sample

BASE = "__base__"  # PEFT's adapter name for rows that use the base model alone


def load_peft(model_dir: str | Path, adapter_dirs: dict[str, Path], dtype: torch.dtype, trainable: dict[str, dict] | None = None):
    """A PeftModel with `adapter_dirs` loaded for inference and, optionally, new trainable adapters
    (name -> LoraConfig kwargs). Returns the model in eval mode."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    names = list(adapter_dirs)
    trainable = trainable or {}
    if names:
        model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapter_dirs[name], adapter_name=name)
        for name, kwargs in trainable.items():
            model.add_adapter(name, LoraConfig(**kwargs))
    else:
        first, *rest = trainable
        model = get_peft_model(base, LoraConfig(**trainable[first]), adapter_name=first)
        for name in rest:
            model.add_adapter(name, LoraConfig(**trainable[name]))
    return model.eval()


class _Clock:
    """A logits processor that records when each generated position's logits are ready."""

    def __init__(self, start: float) -> None:
        self.start, self.stamps = start, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter() - self.start)
        return scores


def generate_batch(model, batch: list[BenchRequest], pad_id: int, start: float, records: dict[int, RequestRecord]) -> None:
    """One static batch; fills the batch's records. A batch with no adapter runs the bare base model."""
    from transformers import LogitsProcessorList

    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
    longest = max(r.max_tokens for r in batch)
    clock = _Clock(start)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id, min_new_tokens=longest,
                  max_new_tokens=longest, logits_processor=LogitsProcessorList([clock]))
    with torch.no_grad():
        if any(r.adapter for r in batch):
            model.generate(adapter_names=[r.adapter or BASE for r in batch], **kwargs)
        else:  # the base model alone: plain transformers generate, PEFT's layers switched off
            with model.disable_adapter():
                model.generate(**kwargs)
    for r in batch:
        record = records[r.index]
        record.first_token, record.finished = clock.stamps[0], clock.stamps[r.max_tokens - 1]
        record.output_tokens = r.max_tokens


def run_inference(model, requests: list[BenchRequest], pad_id: int, max_batch: int = 32) -> list[RequestRecord]:
    records = {r.index: RequestRecord.of(r) for r in requests}
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival > now:
            time.sleep(pending[0].arrival - now)
            continue
        batch = []
        while pending and pending[0].arrival <= now and len(batch) < max_batch:
            batch.append(pending.popleft())
        generate_batch(model, batch, pad_id, start, records)
    return list(records.values())


def collate(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 where no loss falls)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(s.loss_mask, dtype=torch.bool), torch.tensor(s.input_ids), -100)
    return ids, mask, labels


class PeftTrainer:
    """Trains one PEFT adapter: `step()` runs one optimizer step over the next `batch_size` samples."""

    def __init__(self, model, adapter: str, samples: list[Sample], batch_size: int, lr: float, pad_id: int) -> None:
        self.model, self.adapter, self.samples = model, adapter, samples
        self.batch_size, self.pad_id = batch_size, pad_id
        model.set_adapter(adapter)
        self.params = [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.steps = self.tokens = 0
        self.last_loss = float("nan")

    def step(self) -> None:
        self.model.set_adapter(self.adapter)
        self.model.train()
        n = len(self.samples)
        batch = [self.samples[(self.steps * self.batch_size + i) % n] for i in range(self.batch_size)]
        ids, mask, labels = collate(batch, self.pad_id)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.steps += 1
        self.tokens += int(mask.sum())
        self.last_loss = loss.item()


def run_take_turns(model, trainer: PeftTrainer, requests: list[BenchRequest], pad_id: int, max_batch: int = 32,
                   progress: list[tuple[float, int]] | None = None) -> list[RequestRecord]:
    """Unified as one PEFT process must do it: a training step, then a batch of the arrived requests,
    and again, until every request finished. progress gets (time, trained tokens) after each step."""
    records = {r.index: RequestRecord.of(r) for r in requests}
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    start = time.perf_counter()
    while pending:
        trainer.step()
        if progress is not None:
            progress.append((time.perf_counter() - start, trainer.tokens))
        now = time.perf_counter() - start
        batch = []
        while pending and pending[0].arrival <= now and len(batch) < max_batch:
            batch.append(pending.popleft())
        if batch:
            generate_batch(model, batch, pad_id, start, records)
    return list(records.values())
