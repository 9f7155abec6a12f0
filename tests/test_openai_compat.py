"""OpenAI and vLLM request compatibility over real HTTP on a tiny model, with the official openai
client (httpx where the client cannot send a body as is), against transformers on the same weights:
unknown fields refused naming them, null meaning the default, logit_bias, echo and scoring
(max_tokens 0) with logprobs and text offsets, prompt_logprobs, stop strings and special tokens in
the text, and /tokenize and /detokenize."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from live_server import KEY, Server, tiny_model_dir
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.training.config import TrainingConfig

MODEL = "tiny"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TRAINING = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}).encode() + b"\n" for w in ("yes", "no"))
PROMPT = "Hello world, how are you?"
# the tokens of PROMPT ("Hello", " world", ",", " how", " are", " you", "?") start at these characters
PROMPT_OFFSETS = [0, 5, 11, 12, 16, 20, 24]
CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    srv = Server(root / "data", "--model", str(tiny_model_dir(root / MODEL)), "--api-key", KEY)
    srv.model_dir = root / MODEL
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf(server):
    """transformers' model and tokenizer on the served weights, fp32."""
    return (AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(server.model_dir))


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=HEADERS, json=body, timeout=120)


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


# --- item 1: no silent ignores -----------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT_BODY = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
JOB = {"model": MODEL, "training_file": "file-unchecked"}  # the body is refused before the file is looked up


@pytest.mark.parametrize("path, body, param", [
    *[("/v1/completions", {**COMPLETION, name: value}, name) for name, value in [
        ("foo", 1), ("suffix", "x"), ("best_of", 2), ("service_tier", "auto"), ("store", True), ("metadata", {}),
        ("spaces_between_special_tokens", False)]],
    *[("/v1/chat/completions", {**CHAT_BODY, name: value}, name) for name, value in [
        ("service_tier", "auto"), ("store", True), ("metadata", {"a": "b"}), ("modalities", ["text"]),
        ("audio", {"voice": "alloy"}), ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "low"), ("web_search_options", {}), ("functions", [])]],
    ("/v1/completions", {**COMPLETION, "stream": True, "stream_options": {"include_usage": True, "bar": 1}}, "stream_options.bar"),
    ("/v1/completions", {**COMPLETION, "slo": {"ttft": 1, "deadline": 2}}, "slo.deadline"),
    ("/v1/fine_tuning/jobs", {**JOB, "method": {"type": "supervised", "supervised": {"hyperparameters": {"foo": 1}}}},
     "method.supervised.hyperparameters.foo"),
    ("/v1/fine_tuning/jobs", {**JOB, "method": {"type": "dpo", "dpo": {"beta": 0.1}}}, "method.dpo.beta"),
    ("/v1/fine_tuning/jobs", {**JOB, "method": {"type": "dpo", "trl": {}}}, "method.trl"),
    ("/v1/fine_tuning/jobs", {**JOB, "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ("/v1/fine_tuning/jobs", {**JOB, "hyperparameters": {"foo": 1}}, "hyperparameters.foo"),
    ("/v1/fine_tuning/jobs", {**JOB, "lora": {"rank": 4}}, "lora.rank"),
    ("/v1/fine_tuning/jobs", {**JOB, "training": {"epochs": 1}}, "training.epochs"),
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x", "load_inplace": True}, "load_inplace"),
    ("/v1/unload_lora_adapter", {"lora_name": "a", "force": True}, "force"),
    ("/tokenize", {"prompt": "hi", "foo": 1}, "foo"),
    ("/detokenize", {"tokens": [1], "foo": 1}, "foo"),
])
def test_unknown_fields_are_refused_naming_them(server, path, body, param):
    error = error_of(post(server, path, body))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize("body, param", [
    ({**COMPLETION, "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({**COMPLETION, "max_tokens": 0}, "max_tokens"),  # scoring needs echo
    ({**COMPLETION, "logprobs": 21}, "logprobs"),
    ({**COMPLETION, "prompt_logprobs": 21}, "prompt_logprobs"),
    ({**COMPLETION, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({**COMPLETION, "top_k": -2}, "top_k"),
    ({**COMPLETION, "min_p": 1.5}, "min_p"),
    ({**COMPLETION, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({**COMPLETION, "logit_bias": {"five": 1}}, "logit_bias.five"),
    ({**COMPLETION, "logit_bias": {"49152": 1}}, "logit_bias"),  # past the vocabulary
    ({**CHAT_BODY, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
])
def test_new_and_related_fields_are_validated_naming_them(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    assert error_of(post(server, path, body))["param"] == param


def optional_fields(model) -> list[str]:
    return [name for name, field in model.model_fields.items() if not field.is_required()]


@pytest.mark.parametrize("path, base, model", [
    ("/v1/completions", {"model": MODEL, "prompt": "Hi"}, CompletionRequest),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT}, ChatCompletionRequest),
])
def test_null_means_the_default_for_every_optional_field(server, path, base, model):
    nulls = dict.fromkeys(optional_fields(model))
    assert {"temperature", "max_tokens", "logit_bias", "top_k", "stream_options", "slo", "seed"} <= set(nulls)
    response = post(server, path, {**base, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    # the same draws as with the fields left out (the default temperature 1 samples)
    seeded = {**base, "seed": 7, "max_tokens": 6}
    left_out = post(server, path, seeded).json()["choices"][0]
    nulled = post(server, path, {**seeded, "temperature": None, "top_p": None, "top_k": None, "n": None}).json()["choices"][0]
    assert left_out == nulled


def test_null_means_the_default_on_fine_tuning_jobs(server):
    client = server.client()
    file = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    body = {"model": MODEL, "training_file": file.id, "validation_file": None, "suffix": None, "seed": None,
            "method": None, "metadata": None, "integrations": None,
            "hyperparameters": {"n_epochs": None, "batch_size": None, "learning_rate_multiplier": None},
            "lora": {"r": None, "alpha": None, "dropout": None, "target_modules": None, "use_rslora": None},
            "training": {"max_steps": 1, "warmup_steps": None, "lr_schedule": None, "checkpoint_every": None}}
    response = post(server, "/v1/fine_tuning/jobs", body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False}
    assert job["seed"] == 0 and job["user_provided_suffix"] is None and job["validation_file"] is None
    assert job["training"]["warmup_steps"] == TrainingConfig.warmup_steps
    assert job["training"]["checkpoint_every"] == TrainingConfig.checkpoint_every
    nested = post(server, "/v1/fine_tuning/jobs", {**body, "hyperparameters": None, "lora": None, "training": None})
    assert nested.status_code == 200, nested.text
    for created in (job, nested.json()):
        client.fine_tuning.jobs.cancel(created["id"])


# --- item 5: sampling -------------------------------------------------------------------------


def greedy_ranking(hf, ids: list[int]) -> list[int]:
    """transformers' token ids after `ids`, most probable first."""
    return torch.argsort(log_softmax(hf[0], ids)[-1], descending=True).tolist()


def first_token(server, prompt: list[int], **options) -> str:
    """The text of the first token greedy decoding gives after `prompt` over /v1/completions."""
    choice = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=0,
                                                **options).choices[0]
    return choice.logprobs.tokens[0]


def test_logit_bias_bans_and_forces_tokens(server, hf):
    ids = hf[1](PROMPT)["input_ids"]
    ranking = greedy_ranking(hf, ids)

    def text(token_id: int) -> str:
        return hf[1].decode([token_id])

    scores = log_softmax(hf[0], ids)[-1]
    assert float(scores[ranking[0]] - scores[ranking[1]]) > 1e-4  # a clear best, and a clear second
    assert first_token(server, ids) == text(ranking[0])
    assert first_token(server, ids, logit_bias={str(ranking[0]): -100}) == text(ranking[1])
    forced = ranking[5000]  # an unlikely token, forced at every step, also when sampling
    reply = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=1.0, seed=1,
                                               logit_bias={str(forced): 100})
    assert reply.choices[0].text == text(forced) * 3


def test_top_k_minus_one_is_off_and_min_p_is_accepted(server):
    client = server.client()
    base = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3)
    plain = client.completions.create(**base).choices[0].text
    assert client.completions.create(**base, extra_body={"top_k": -1}).choices[0].text == plain
    assert client.completions.create(**base, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].text == plain
    # min_p 1 keeps only the most probable token: greedy
    greedy = client.completions.create(**{**base, "temperature": 0}).choices[0].text
    assert client.completions.create(**base, extra_body={"min_p": 1.0}).choices[0].text == greedy


# --- item 5: echo, scoring and log-probabilities -------------------------------------------------


def test_echo_with_max_tokens_zero_scores_the_prompt_as_transformers_does(server, hf):
    ids = hf[1](PROMPT)["input_ids"]
    reference = log_softmax(hf[0], ids)
    reply = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=5)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [hf[1].decode([t]) for t in ids]
    assert lp.text_offset == PROMPT_OFFSETS
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([float(reference[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-3)
    for i in range(1, len(ids)):
        top = torch.topk(reference[i - 1], 5)
        expected = {hf[1].decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        expected[lp.tokens[i]] = float(reference[i - 1, ids[i]])  # the token itself is always among them
        assert set(lp.top_logprobs[i]) == set(expected) and lp.top_logprobs[i] == pytest.approx(expected, abs=1e-3)


def test_echo_with_generation_puts_the_prompt_first_in_text_and_logprobs(server, hf):
    ids = hf[1](PROMPT)["input_ids"]
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2).choices[0]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True).choices[0]
    assert echoed.text == PROMPT + plain.text
    n = len(ids)
    assert echoed.logprobs.tokens == [hf[1].decode([t]) for t in ids] + plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[n:] == plain.logprobs.token_logprobs
    # generated tokens start where the prompt ends; each offset is where its token's text starts
    assert echoed.logprobs.text_offset[:n] == PROMPT_OFFSETS
    assert echoed.logprobs.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]
    offsets = echoed.logprobs.text_offset + [len(echoed.text)]
    assert [echoed.text[a:b] for a, b in zip(offsets, offsets[1:])] == echoed.logprobs.tokens
    # streamed: the same text and log-probabilities, the echo in the first event
    events = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True,
                                            stream=True))
    assert events[0].choices[0].text.startswith(PROMPT)
    assert "".join(e.choices[0].text for e in events) == echoed.text
    assert sum((e.choices[0].logprobs.text_offset for e in events), []) == echoed.logprobs.text_offset
    assert sum((e.choices[0].logprobs.token_logprobs for e in events), []) == echoed.logprobs.token_logprobs


def test_text_offsets_count_characters_of_multibyte_text(server):
    prompt = "naïve café ☕ ok"
    reply = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    lp = reply.choices[0].logprobs
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(prompt)
    # each token's offset is the length of the text of the tokens before it (less a partial character)
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    ids = tokenizer(prompt)["input_ids"]
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # a character split across tokens
    assert offsets == [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_prompt_logprobs_have_vllms_shape_and_transformers_values(server, hf):
    ids = hf[1](PROMPT)["input_ids"]
    reference = log_softmax(hf[0], ids)
    client = server.client()
    choice = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 2}).choices[0]
    check_prompt_logprobs(choice.model_extra["prompt_logprobs"], ids, reference, 2, hf[1])
    chat_ids = hf[1](hf[1].apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, extra_body={"prompt_logprobs": 0})
    check_prompt_logprobs(reply.model_extra["prompt_logprobs"], chat_ids, log_softmax(hf[0], chat_ids), 0, hf[1])


def check_prompt_logprobs(got: list, ids: list[int], reference: torch.Tensor, k: int, tokenizer) -> None:
    """vLLM's shape: None, then per token {token id: {logprob, rank, decoded_token}} for the prompt's
    token and the k most probable (the tiny model's prompt tokens are never among those)."""
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        row, entry = reference[i - 1], dict(got[i])
        mine = entry.pop(str(ids[i]))
        x = float(row[ids[i]])
        assert mine["logprob"] == pytest.approx(x, abs=1e-3) and mine["decoded_token"] == tokenizer.decode([ids[i]])
        assert int((row > x + 1e-4).sum()) + 1 <= mine["rank"] <= int((row > x - 1e-4).sum()) + 1  # up to float32 noise
        assert mine["rank"] > k and [v["rank"] for v in entry.values()] == list(range(1, k + 1))
        top = torch.topk(row, k)
        assert [v["logprob"] for v in entry.values()] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [float(row[int(t)]) for t in entry] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [v["decoded_token"] for v in entry.values()] == [tokenizer.decode([int(t)]) for t in entry]


# --- item 5: text ----------------------------------------------------------------------------


def test_include_stop_str_in_output_keeps_the_stop_string(server, hf):
    world = hf[1](" world")["input_ids"]
    assert len(world) == 1
    client = server.client()
    base = dict(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(world[0]): 100}, stop=["orl"])
    assert client.completions.create(**base).choices[0].text == " w"
    kept = client.completions.create(**base, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == " worl" and kept.finish_reason == "stop"


def test_skip_special_tokens_false_shows_special_tokens(server, hf):
    start, end = hf[1].convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    client = server.client()
    base = dict(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(start): 100})
    assert client.completions.create(**base).choices[0].text == ""
    assert client.completions.create(**base, extra_body={"skip_special_tokens": False}).choices[0].text == "<|im_start|>" * 2
    # an end token's text appears only with include_stop_str_in_output (and special tokens shown)
    ending = dict(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(end): 100})
    assert client.completions.create(**ending, extra_body={"skip_special_tokens": False}).choices[0].text == ""
    shown = client.completions.create(**ending, extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True})
    assert shown.choices[0].text == "<|im_end|>" and shown.choices[0].finish_reason == "stop"


# --- item 5: /tokenize and /detokenize ------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_with_the_models_tokenizer(server, hf):
    tokenizer = hf[1]
    text = "Tokenize me, please: naïve ☕ <|im_start|>"
    out = post(server, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer(text)["input_ids"] and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    assert "token_strs" not in post(server, "/tokenize", {"prompt": text}).json()
    assert post(server, "/detokenize", {"model": MODEL, "tokens": out["tokens"]}).json() == {"prompt": text}
    for generation_prompt in (True, False):
        chat = post(server, "/tokenize", {"model": MODEL, "messages": CHAT, "add_generation_prompt": generation_prompt}).json()
        expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=generation_prompt, tokenize=False)
        assert chat["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # errors: the key, an unknown model, ids past the vocabulary
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [1]}).status_code == 401
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).json()["error"]["param"] == "model"
    assert error_of(post(server, "/detokenize", {"tokens": [49152]}))["param"] == "tokens"
    assert error_of(post(server, "/detokenize", {"tokens": [True]}))["param"].startswith("tokens")  # true is not token 1
    assert error_of(post(server, "/v1/completions", {**COMPLETION, "prompt": [1, False]}))["param"].startswith("prompt")
    assert error_of(post(server, "/tokenize", {"model": MODEL}))["param"] == "prompt"
