"""Fine-tuning data: JSONL files in prompt/completion, OpenAI chat or OpenAI preference (DPO)
format, validated up front.

Each line is one example:

    {"prompt": "2+2=", "completion": " 4"}                      loss on the completion (+ end of sequence)
    {"messages": [{"role": "user", "content": "Hi"},            loss on assistant messages (with their
                  {"role": "assistant", "content": "Hello"}]}    end-of-turn tokens); the chat template
                                                                 comes with the model
    {"input": {"messages": [...], "tools"?: [...],              a preference pair (method "dpo"): the
               "parallel_tool_calls"?: bool},                    conversation, then each reply appended
     "preferred_output": [{"role": "assistant", "content": ..}], as an assistant turn; loss on the reply
     "non_preferred_output": [{"role": "assistant", ...}]}       (with its end-of-turn tokens)

`parse_jsonl` accepts any of the formats (a file's shape is checked before its use is known);
`tokenize` makes a `Sample` of a supervised example, `tokenize_pair` a `PreferencePair` of a
preference pair, and each refuses the other's lines. Any bad line (invalid JSON, a missing or
mistyped field, an example longer than allowed) raises a DataError naming its line number; nothing
is returned unless every line is good.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: the same prompt tokens followed by the preferred (chosen) and the
    non-preferred (rejected) reply; each loss_mask marks its reply (and end-of-turn) tokens only."""

    chosen: Sample
    rejected: Sample

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


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
    if "input" in record or "preferred_output" in record or "non_preferred_output" in record:
        _check_pair(record, where)
    elif "messages" in record:
        _check_messages(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise DataError(f"{where}: no assistant message to learn from")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string")
        if not record["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
    else:
        raise DataError(f"{where}: expected {{'prompt', 'completion'}}, {{'messages': [...]}} or "
                        f"{{'input', 'preferred_output', 'non_preferred_output'}}")


def _check_messages(messages: object, where: str, name: str) -> None:
    """The field `name` of the record at `where` ("line 3") must be a non-empty list of {role, string content}."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{name}' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {name}[{i}] needs a 'role' in {list(ROLES)} and a string 'content'")


def _check_pair(record: dict, where: str) -> None:
    """OpenAI's preference format: input {messages, tools?, parallel_tool_calls?}, then one assistant
    message with non-empty content in each of preferred_output and non_preferred_output, not the same."""
    prompt = record.get("input")
    if not isinstance(prompt, dict):
        raise DataError(f"{where}: 'input' must be an object with 'messages'")
    _check_messages(prompt.get("messages"), where, "input.messages")
    if "tools" in prompt and not (isinstance(prompt["tools"], list) and all(isinstance(t, dict) for t in prompt["tools"])):
        raise DataError(f"{where}: 'input.tools' must be a list of objects")
    if "parallel_tool_calls" in prompt and not isinstance(prompt["parallel_tool_calls"], bool):
        raise DataError(f"{where}: 'input.parallel_tool_calls' must be true or false")
    for key in ("preferred_output", "non_preferred_output"):
        reply = record.get(key)
        if not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict) and reply[0].get("role") == "assistant"
                and isinstance(reply[0].get("content"), str) and reply[0]["content"]):
            raise DataError(f"{where}: '{key}' must be a list of one assistant message with non-empty string 'content'")
    if record["preferred_output"][0]["content"] == record["non_preferred_output"][0]["content"]:
        raise DataError(f"{where}: 'preferred_output' and 'non_preferred_output' are the same reply")


def is_pair(record: dict) -> bool:
    """A checked record is a preference pair (else a supervised example)."""
    return "input" in record


def tokenize(record: dict, tokenizer, eos_id: int, max_tokens: int) -> Sample:
    """A supervised example's Sample."""
    number = record.get("_line", "?")
    if is_pair(record):
        raise DataError(f"line {number}: a preference pair (input, preferred_output, non_preferred_output); "
                        "supervised fine-tuning needs {prompt, completion} or {messages}, or use method 'dpo'")
    if "messages" in record:
        ids, mask = _tokenize_chat(record["messages"], tokenizer, lambda i, m: m["role"] == "assistant")
    else:
        prompt = list(tokenizer(record["prompt"])["input_ids"]) if record["prompt"] else []
        completion = list(tokenizer(record["completion"], add_special_tokens=False)["input_ids"]) + [eos_id]
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if len(ids) > max_tokens:
        raise DataError(f"line {number}: example has {len(ids)} tokens, more than the limit of {max_tokens}")
    if not any(mask[1:]):
        raise DataError(f"line {number}: example has nothing to learn (no target tokens after the first)")
    return Sample(tuple(ids), tuple(mask))


def tokenize_pair(record: dict, tokenizer, max_tokens: int) -> PreferencePair:
    """A preference pair's chosen and rejected Samples: input.messages + the reply as the last
    assistant turn, rendered by `_tokenize_chat` (so the two share the prompt's tokens, and the
    prompt ends with the template's assistant header, as a generation prompt does); targets are the
    reply and its end-of-turn. max_tokens bounds both sequences together: a pair runs in one step."""
    number = record.get("_line", "?")
    if not is_pair(record):
        raise DataError(f"line {number}: method 'dpo' needs preference pairs "
                        "{input: {messages}, preferred_output, non_preferred_output}")
    prompt = record["input"]["messages"]
    last = len(prompt)
    chosen, rejected = (
        Sample(*map(tuple, _tokenize_chat(prompt + record[key], tokenizer, lambda i, m: i == last, record["input"].get("tools"))))
        for key in ("preferred_output", "non_preferred_output")
    )
    pair = PreferencePair(chosen, rejected)
    if len(pair) > max_tokens:
        raise DataError(f"line {number}: the pair has {len(chosen)} + {len(rejected)} tokens, more than the limit of "
                        f"{max_tokens} for both together (a pair and its reference rows run in one step)")
    return pair


def tokenize_records(records: list[dict], tokenizer, eos_id: int, max_rows: int, method: str) -> list[Sample] | list[PreferencePair]:
    """The examples of checked records for `method` (TrainingConfig.method). max_rows: the rows one
    example may take in a step: a sample's tokens; a pair's tokens twice (the adapter's rows and
    the reference's)."""
    if method == "dpo":
        return [tokenize_pair(r, tokenizer, max_rows // 2) for r in records]
    return [tokenize(r, tokenizer, eos_id, max_rows) for r in records]


def _tokenize_chat(
    messages: list[dict], tokenizer, learn: Callable[[int, dict], bool], tools: list[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """Renders the conversation (with `tools`, if any) with the chat template one message at a time;
    of the rendering of a message that `learn(index, message)` picks (an assistant message), the
    content and what follows it (the end-of-turn) are targets, the header before it (and any
    default system prompt the template adds) is context."""
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, message in enumerate(clean):
        full = tokenizer.apply_chat_template(clean[: i + 1], tools=tools, tokenize=False)
        piece = full[len(rendered) :]
        split = piece.rfind(message["content"]) if learn(i, message) and message["content"] else len(piece)
        _extend(ids, mask, tokenizer, piece[:split], False)
        _extend(ids, mask, tokenizer, piece[split:], True)
        rendered = full
    return ids, mask


def _extend(ids: list[int], mask: list[bool], tokenizer, text: str, is_target: bool) -> None:
    if text:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(piece)
        mask.extend([is_target] * len(piece))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads and validates a JSONL file (`parse_jsonl`); a DataError names the first bad line."""
    try:
        with open(path, "rb") as f:
            return parse_jsonl(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def load_samples(path: str | os.PathLike, tokenizer, eos_id: int, max_tokens: int) -> list[Sample]:
    """Reads, validates and tokenizes a JSONL file of supervised examples."""
    return [tokenize(r, tokenizer, eos_id, max_tokens) for r in read_jsonl(path)]
