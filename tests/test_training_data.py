"""Fine-tuning data: JSONL validation (every error names its 1-based physical line), loss masks of
prompt/completion and chat examples with the real default tokenizer, and the engine refusing bad
data before any adapter or job exists. Expectations are computed with the tokenizer directly."""

from __future__ import annotations

import json
import re

import pytest

from loramux.training.data import DataError, load_samples, parse_jsonl, tokenize

MAX = 2048
GOOD_PC = {"prompt": "What is 2+2?", "completion": " It is 4."}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture(scope="module")
def tok():
    from loramux.model.loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(None)[1])


@pytest.fixture(scope="module")
def eos(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    return tok.eos_token_id


def line(obj) -> str:
    return json.dumps(obj)


def assert_names_line(excinfo, number: int) -> str:
    message = str(excinfo.value)
    found = [int(n) for n in re.findall(r"\bline (\d+)\b", message)]
    assert found == [number], f"expected the message to name line {number} only: {message!r}"
    return message


def write(tmp_path, content: bytes | str, name: str = "data.jsonl"):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- 1. validation ----------------------------------------------------------------------------

BAD_LINES = {
    "invalid JSON": '{"prompt": "a", "completion": "b"',
    "JSON array": '[{"prompt": "a", "completion": "b"}]',
    "JSON string": '"prompt"',
    "missing completion": line({"prompt": "a"}),
    "missing prompt": line({"completion": "b"}),
    "non-string prompt": line({"prompt": 5, "completion": "b"}),
    "null completion": line({"prompt": "a", "completion": None}),
    "empty completion": line({"prompt": "a", "completion": ""}),
    "neither format": line({"input": "a", "output": "b"}),
    "messages empty": line({"messages": []}),
    "messages not a list": line({"messages": "Hi"}),
    "messages an object": line({"messages": {"role": "user", "content": "Hi"}}),
    "unknown role": line({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello"}]}),
    "missing role": line({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
    "non-string content": line({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]}),
    "null content": line({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}),
    "message not an object": line({"messages": ["Hi", {"role": "assistant", "content": "Hello"}]}),
    "no assistant message": line({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]}),
}


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_line_is_named_by_its_number(bad):
    lines = [line(GOOD_PC), line(GOOD_CHAT), bad, line(GOOD_PC)]
    with pytest.raises(DataError) as excinfo:
        parse_jsonl(lines)
    assert_names_line(excinfo, 3)


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_bad_line_in_a_file_is_named_by_its_number(tmp_path, tok, eos, bad):
    path = write(tmp_path, "\n".join([line(GOOD_PC), line(GOOD_CHAT), bad, line(GOOD_PC)]) + "\n")
    with pytest.raises(DataError) as excinfo:
        load_samples(path, tok, eos, MAX)
    assert_names_line(excinfo, 3)


def test_good_lines_all_pass(tmp_path, tok, eos):
    """The control for the cases above: the good lines alone are accepted, in order."""
    records = parse_jsonl([line(GOOD_PC), line(GOOD_CHAT), line(GOOD_PC)])
    assert [r["_line"] for r in records] == [1, 2, 3]
    assert records[0]["prompt"] == GOOD_PC["prompt"] and records[1]["messages"] == GOOD_CHAT["messages"]
    path = write(tmp_path, "\n".join([line(GOOD_PC), line(GOOD_CHAT), line(GOOD_PC)]) + "\n")
    assert len(load_samples(path, tok, eos, MAX)) == 3


def test_messages_error_names_the_message_and_roles():
    bad = line({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello"}]})
    with pytest.raises(DataError) as excinfo:
        parse_jsonl([bad])
    message = assert_names_line(excinfo, 1)
    assert "messages[1]" in message and "assistant" in message


def test_invalid_utf8_is_named_by_its_line(tmp_path, tok, eos):
    content = line(GOOD_PC).encode() + b"\n" + b'{"prompt": "caf\xe9 \xff", "completion": "x"}\n' + line(GOOD_PC).encode() + b"\n"
    with pytest.raises(DataError) as excinfo:
        load_samples(write(tmp_path, content), tok, eos, MAX)
    assert "UTF-8" in assert_names_line(excinfo, 2)
    with pytest.raises(DataError) as excinfo:
        parse_jsonl(content.splitlines(keepends=True))
    assert_names_line(excinfo, 2)


def test_valid_utf8_non_ascii_is_accepted(tmp_path, tok, eos):
    content = line({"prompt": "café → ", "completion": "日本語 ✓"})  # json.dumps escapes non-ASCII
    assert content.isascii()
    raw = '{"prompt": "café → ", "completion": "日本語 ✓"}'  # raw UTF-8 bytes in the file
    samples = load_samples(write(tmp_path, content + "\n" + raw + "\n"), tok, eos, MAX)
    assert samples[0] == samples[1]


@pytest.mark.parametrize("content", ["", "\n", "\n\n   \n\t\n", "\r\n\r\n"], ids=["empty", "newline", "blank", "crlf"])
def test_only_blank_lines_is_no_examples(tmp_path, tok, eos, content):
    with pytest.raises(DataError, match="no examples"):
        parse_jsonl(content.splitlines(keepends=True))
    with pytest.raises(DataError, match="no examples"):
        load_samples(write(tmp_path, content), tok, eos, MAX)


def test_blank_lines_are_skipped_but_counted(tmp_path, tok, eos):
    lines = [line(GOOD_PC), "", "   ", line(GOOD_CHAT), "\t", line({"prompt": "a"}), line(GOOD_PC)]
    with pytest.raises(DataError) as excinfo:
        parse_jsonl(lines)
    assert_names_line(excinfo, 6)
    with pytest.raises(DataError) as excinfo:
        load_samples(write(tmp_path, "\n".join(lines) + "\n"), tok, eos, MAX)
    assert_names_line(excinfo, 6)
    # Without the bad line: blank lines give no records, the others keep their physical numbers.
    good = lines[:5] + lines[6:]
    assert [r["_line"] for r in parse_jsonl(good)] == [1, 4, 6]
    assert len(load_samples(write(tmp_path, "\n".join(good) + "\n"), tok, eos, MAX)) == 3


def test_crlf_line_endings_are_accepted(tmp_path, tok, eos):
    path = write(tmp_path, "\r\n".join([line(GOOD_PC), line(GOOD_CHAT)]) + "\r\n")
    crlf = load_samples(path, tok, eos, MAX)
    lf = load_samples(write(tmp_path, "\n".join([line(GOOD_PC), line(GOOD_CHAT)]) + "\n", "lf.jsonl"), tok, eos, MAX)
    assert crlf == lf


def test_too_long_example_names_its_line_and_both_numbers(tmp_path, tok, eos):
    long = {"prompt": "Count: " + " ".join(str(i) for i in range(40)), "completion": " forty"}
    n = len(tok(long["prompt"]).input_ids) + len(tok(long["completion"], add_special_tokens=False).input_ids) + 1
    limit = n - 3
    short = {"prompt": "a", "completion": "b"}
    lines = [line(short), "", line(long), line(short)]
    with pytest.raises(DataError) as excinfo:
        load_samples(write(tmp_path, "\n".join(lines) + "\n"), tok, eos, limit)
    message = assert_names_line(excinfo, 3)
    assert str(n) in message and str(limit) in message
    # Exactly at the limit it is accepted.
    assert len(load_samples(write(tmp_path, "\n".join(lines) + "\n"), tok, eos, n)[1]) == n


def test_too_long_chat_example_names_its_line(tok, eos):
    messages = [{"role": "user", "content": "tell me " * 30}, {"role": "assistant", "content": "no"}]
    n = len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids)
    records = parse_jsonl([line(GOOD_PC), line({"messages": messages})])
    tokenize(records[0], tok, eos, 50)
    with pytest.raises(DataError) as excinfo:
        tokenize(records[1], tok, eos, 50)
    message = assert_names_line(excinfo, 2)
    assert str(n) in message and "50" in message


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path_is_a_data_error(tmp_path, tok, eos, kind):
    path = tmp_path / "nope.jsonl" if kind == "missing" else tmp_path
    with pytest.raises(DataError) as excinfo:
        load_samples(path, tok, eos, MAX)
    assert not isinstance(excinfo.value, OSError)
    assert str(path) in str(excinfo.value)


# --- 2. prompt/completion masks ---------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, completion",
    [("What is 2+2?", " It is 4."), ("Translate to French: cheese", "\nfromage"), ("x", "y z")],
)
def test_prompt_completion_mask(tok, eos, prompt, completion):
    p = tok(prompt).input_ids
    c = tok(completion, add_special_tokens=False).input_ids
    assert p and c and eos not in c
    sample = tokenize(parse_jsonl([line({"prompt": prompt, "completion": completion})])[0], tok, eos, MAX)
    assert list(sample.input_ids) == p + c + [eos]
    assert list(sample.loss_mask) == [False] * len(p) + [True] * (len(c) + 1)
    assert sample.num_loss_tokens == len(c) + 1
    assert len(sample) == len(p) + len(c) + 1
    assert tok.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m], skip_special_tokens=False) == completion + "<|im_end|>"


def test_empty_prompt_first_token_is_never_a_target(tok, eos):
    completion = "Hello there, world"
    c = tok(completion, add_special_tokens=False).input_ids
    sample = tokenize({"prompt": "", "completion": completion, "_line": 1}, tok, eos, MAX)
    assert list(sample.input_ids) == c + [eos]
    assert sample.num_loss_tokens == len(c)  # every token but the first, which nothing predicts


def test_load_samples_matches_tokenize(tmp_path, tok, eos):
    path = write(tmp_path, line(GOOD_PC) + "\n" + line(GOOD_CHAT) + "\n")
    samples = load_samples(path, tok, eos, MAX)
    p = tok(GOOD_PC["prompt"]).input_ids
    c = tok(GOOD_PC["completion"], add_special_tokens=False).input_ids
    assert list(samples[0].input_ids) == p + c + [eos]
    rendered = tok.apply_chat_template(GOOD_CHAT["messages"], tokenize=False)
    assert tok.decode(samples[1].input_ids, skip_special_tokens=False) == rendered


# --- 3. chat masks ----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You answer like a pirate."},
    {"role": "user", "content": "Where is the treasure?"},
    {"role": "assistant", "content": "Arr, under the old oak tree!"},
    {"role": "user", "content": "And the map?"},
    {"role": "assistant", "content": "Burned it, matey."},
]


def runs(sample, value: bool) -> list[list[int]]:
    """Maximal runs of consecutive tokens whose mask is `value`."""
    out, current = [], []
    for token, m in zip(sample.input_ids, sample.loss_mask):
        if m == value:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


@pytest.fixture(scope="module")
def turn_end(tok):
    """What the template renders right after an assistant's content (its end-of-turn marker)."""
    sentinel = "QQSENTINELQQ"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    end = rendered.split(sentinel, 1)[1]
    assert end.startswith("<|im_end|>") and end != "<|im_end|>"  # the end token plus the template's newline
    return end


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def test_chat_input_ids_decode_to_the_template(tok, eos):
    sample = tokenize({"messages": CONVERSATION, "_line": 1}, tok, eos, MAX)
    assert decode(tok, sample.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert len(sample.input_ids) == len(sample.loss_mask)
    assert sample.loss_mask[0] is False


def test_chat_targets_are_exactly_the_assistant_turns(tok, eos, turn_end):
    sample = tokenize({"messages": CONVERSATION, "_line": 1}, tok, eos, MAX)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [decode(tok, r) for r in runs(sample, True)] == [a + turn_end for a in assistant]
    targets = decode(tok, [t for t, m in zip(sample.input_ids, sample.loss_mask) if m])
    assert targets == "".join(a + turn_end for a in assistant)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] not in targets
    assert "<|im_start|>" not in targets and "user" not in targets and "system" not in targets
    # Each end-of-turn token is a target; the context is everything else, in order.
    assert sum(1 for t, m in zip(sample.input_ids, sample.loss_mask) if m and t == eos) == 2
    context = [decode(tok, r) for r in runs(sample, False)]
    assert len(context) == 2
    assert context[0] == tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    full3 = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert context[1] == tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)[len(full3):]
    assert sample.num_loss_tokens == sum(sample.loss_mask)


def test_chat_default_system_prompt_is_context(tok, eos, turn_end):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    # The template adds a default system prompt when the conversation has none.
    assert rendered.startswith("<|im_start|>system\n") and len(rendered.split("<|im_end|>")[0]) > len("<|im_start|>system\n")
    system_text = rendered.split("<|im_end|>")[0][len("<|im_start|>system\n"):]

    sample = tokenize({"messages": messages, "_line": 1}, tok, eos, MAX)
    assert decode(tok, sample.input_ids) == rendered
    assert [decode(tok, r) for r in runs(sample, True)] == ["Hello!" + turn_end]
    [context] = [decode(tok, r) for r in runs(sample, False)]
    assert system_text in context and "Hi" in context
    assert context == tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)


def test_chat_with_trailing_user_turn_and_tool_role(tok, eos, turn_end):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    sample = tokenize({"messages": messages, "_line": 1}, tok, eos, MAX)
    assert decode(tok, sample.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert [decode(tok, r) for r in runs(sample, True)] == ["Checking." + turn_end, "It is sunny." + turn_end]


def test_chat_extra_message_keys_are_ignored(tok, eos):
    plain = tokenize({"messages": CONVERSATION, "_line": 1}, tok, eos, MAX)
    extra = [{**m, "name": "x", "weight": 1} for m in CONVERSATION]
    assert tokenize({"messages": extra, "_line": 1}, tok, eos, MAX) == plain


def test_chat_starting_with_assistant_targets_only_the_assistant_turn(tok, eos, turn_end):
    messages = [{"role": "assistant", "content": "Welcome aboard!"}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "Anytime."}]
    sample = tokenize({"messages": messages, "_line": 1}, tok, eos, MAX)
    assert decode(tok, sample.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert [decode(tok, r) for r in runs(sample, True)] == ["Welcome aboard!" + turn_end, "Anytime." + turn_end]


# --- 4. engine: bad data is refused before anything starts ------------------------------------

@pytest.fixture
def engine(tok):
    from conftest import make_tiny_hf, ours_from_hf

    from loramux.engine.engine import Engine, EngineConfig
    from loramux.model.loader import LoadedModel, resolve_model_dir

    hf = make_tiny_hf(vocab_size=49152, tie_word_embeddings=True)
    loaded = LoadedModel(name="tiny", path=resolve_model_dir(None)[1], model=ours_from_hf(hf), tokenizer=tok)
    return Engine(loaded, EngineConfig(kv_cache_memory=4 * 2**20))


GOOD_FILE = "\n".join([line(GOOD_PC), line(GOOD_CHAT), line(GOOD_PC)]) + "\n"
BAD_FILE = "\n".join([line(GOOD_PC), line({"prompt": "a", "completion": 3}), line(GOOD_PC)]) + "\n"


def snapshot(engine):
    return list(engine.adapters.names()), dict(engine.trainer.jobs)


def spy_create_adapter(engine, monkeypatch) -> list:
    calls = []
    original = engine.create_adapter

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "create_adapter", spy)
    return calls


def test_engine_good_file_creates_adapter_and_job(engine, tmp_path):
    """The control: the same call with good data does create an adapter and a job."""
    job = engine.create_job("ok", write(tmp_path, GOOD_FILE), val=write(tmp_path, GOOD_FILE, "val.jsonl"))
    assert engine.adapters.names() == ["ok"]
    assert list(engine.trainer.jobs.values()) == [job]


def test_engine_bad_training_file_leaves_nothing(engine, tmp_path, monkeypatch):
    before = snapshot(engine)
    calls = spy_create_adapter(engine, monkeypatch)
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", write(tmp_path, BAD_FILE))
    assert_names_line(excinfo, 2)
    assert snapshot(engine) == before == ([], {})
    assert "poet" not in engine.adapters and calls == []


def test_engine_bad_validation_file_leaves_nothing(engine, tmp_path, monkeypatch):
    before = snapshot(engine)
    calls = spy_create_adapter(engine, monkeypatch)
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", write(tmp_path, GOOD_FILE), val=write(tmp_path, BAD_FILE, "val.jsonl"))
    assert_names_line(excinfo, 2)
    assert snapshot(engine) == before == ([], {})
    assert calls == []


def test_engine_missing_file_leaves_nothing(engine, tmp_path):
    with pytest.raises(DataError):
        engine.create_job("poet", tmp_path / "missing.jsonl")
    assert snapshot(engine) == ([], {})


def test_engine_too_long_example_leaves_nothing(engine, tok):
    from loramux.training.config import TrainingConfig

    long = {"prompt": "word " * 40, "completion": " end"}
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", [GOOD_PC, long], training=TrainingConfig(micro_batch_tokens=16))
    assert_names_line(excinfo, 2)
    assert snapshot(engine) == ([], {})


def test_engine_bad_data_for_existing_adapter_leaves_it_alone(engine, tmp_path):
    from loramux.lora.adapter import LoraConfig

    adapter = engine.create_adapter("poet", LoraConfig())
    with pytest.raises(DataError):
        engine.create_job("poet", write(tmp_path, BAD_FILE))
    assert engine.adapters.names() == ["poet"] and engine.adapters.get("poet") is adapter
    assert engine.trainer.jobs == {}


def test_engine_records_list_is_validated(engine, monkeypatch):
    calls = spy_create_adapter(engine, monkeypatch)
    bad = [GOOD_PC, {"prompt": "a"}, GOOD_CHAT]
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", bad)
    assert_names_line(excinfo, 2)
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", [GOOD_PC], val=[GOOD_CHAT, {"messages": [{"role": "user", "content": "Hi"}]}])
    assert_names_line(excinfo, 2)
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", [GOOD_PC, GOOD_CHAT, ["not", "a", "dict"]])
    assert_names_line(excinfo, 3)
    with pytest.raises(DataError, match="no examples"):
        engine.create_job("poet", [])
    assert snapshot(engine) == ([], {}) and calls == []
    # Control: good records do start a job, tokenized as from a file.
    job = engine.create_job("poet", [GOOD_PC, GOOD_CHAT])
    assert engine.adapters.names() == ["poet"] and list(engine.trainer.jobs.values()) == [job]


def test_engine_load_data_list_matches_file(engine, tmp_path):
    from_list = engine.load_data([GOOD_PC, GOOD_CHAT, GOOD_PC], MAX)
    from_file = engine.load_data(write(tmp_path, GOOD_FILE), MAX)
    assert from_list == from_file
    assert engine.eos_token_ids[0] == 2 and from_list[0].input_ids[-1] == 2


def test_engine_records_with_non_json_values_are_a_data_error(engine):
    with pytest.raises(DataError) as excinfo:
        engine.create_job("poet", [GOOD_PC, {"prompt": b"2+2=", "completion": " 4"}])
    assert_names_line(excinfo, 2)
    assert snapshot(engine) == ([], {})
