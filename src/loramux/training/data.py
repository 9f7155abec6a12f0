"""Fine-tuning data: JSONL files in prompt/completion or OpenAI chat format, validated up front.

Each line is one example:

    {"prompt": "2+2=", "completion": " 4"}                      loss on the completion (+ end of sequence)
    {"messages": [{"role": "user", "content": "Hi"},            loss on assistant messages (with their
                  {"role": "assistant", "content": "Hello"}]}    end-of-turn tokens); the chat template
                                                                 comes with the model

Any bad line (invalid JSON, a missing or mistyped field, an example longer than allowed) raises a
DataError naming its line number; nothing is returned unless every line is good.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A fine-tuning file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Sample:
    """input_ids [L]; loss_mask[t] says whether token t is a training target (predicted from t-1)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


def parse_jsonl(lines: Iterable[str | bytes]) -> list[dict]:
    """Parses and checks the shape of every line. Blank lines are skipped; line numbers are 1-based."""
    records = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"line {number}: not valid UTF-8") from None
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
        _check_record(record, number)
        records.append({**record, "_line": number})
    if not records:
        raise DataError("the file has no examples")
    return records


def _check_record(record: object, number: int) -> None:
    where = f"line {number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}] needs a 'role' in {list(ROLES)} and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message to learn from")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string")
        if not record["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
    else:
        raise DataError(f"{where}: expected {{'prompt', 'completion'}} or {{'messages': [...]}}")


def tokenize(record: dict, tokenizer, eos_id: int, max_tokens: int) -> Sample:
    number = record.get("_line", "?")
    if "messages" in record:
        ids, mask = _tokenize_chat(record["messages"], tokenizer)
    else:
        prompt = list(tokenizer(record["prompt"])["input_ids"]) if record["prompt"] else []
        completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"]) + [eos_id]
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if len(ids) > max_tokens:
        raise DataError(f"line {number}: example has {len(ids)} tokens, more than the limit of {max_tokens}")
    if not any(mask[1:]):
        raise DataError(f"line {number}: example has nothing to learn (no target tokens after the first)")
    return Sample(tuple(ids), tuple(mask))


def _tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """Renders the conversation with the chat template one message at a time; of an assistant
    message's rendering, the content and what follows it (the end-of-turn) are targets, the header
    before it (and any default system prompt the template adds) is context."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, message in enumerate(clean):
        full = tokenizer.apply_chat_template(clean[: i + 1], tokenize=False)
        piece = full[len(rendered) :]
        split = piece.rfind(message["content"]) if message["role"] == "assistant" and message["content"] else len(piece)
        _extend(ids, mask, tokenizer, piece[:split], False)
        _extend(ids, mask, tokenizer, piece[split:], True)
        rendered = full
    return ids, mask


def _extend(ids: list[int], mask: list[bool], tokenizer, text: str, is_target: bool) -> None:
    if text:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(piece)
        mask.extend([is_target] * len(piece))


def load_samples(path: str | os.PathLike, tokenizer, eos_id: int, max_tokens: int) -> list[Sample]:
    """Reads, validates and tokenizes a JSONL file; a DataError names the first bad line."""
    try:
        with open(path, "rb") as f:
            records = parse_jsonl(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return [tokenize(r, tokenizer, eos_id, max_tokens) for r in records]
