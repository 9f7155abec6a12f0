"""The HTTP API's contract on a tiny model, over real HTTP with the official openai client and
httpx: list paging, OpenAI's error shape for every error, chat template and hyperparameter errors,
and requests that fail inside the engine."""

from __future__ import annotations

import json
import math
import time

import httpx
import openai
import pytest
import torch

from live_server import KEY, Server, tiny_model_dir
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

MODEL = "tiny"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TRAINING = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}).encode() + b"\n" for w in ("yes", "no", "maybe"))
# the default model's template behind a check that roles alternate, as Llama 2's and Mistral's templates do
ALTERNATING = ("{%- for m in messages %}{%- if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{%- endif %}{%- endfor %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    source = tiny_model_dir(root / "source")  # the default template, to prepend the check to
    model = tiny_model_dir(root / MODEL, chat_template=ALTERNATING + (source / "chat_template.jinja").read_text())
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    broken = LoraAdapter.create("broken", LoraConfig(r=2), config, generator=torch.Generator().manual_seed(0), init_b="random")
    for a, b in broken.weights.values():  # its logits are NaN: sampling from them fails inside the engine
        b.fill_(math.nan)
    save_peft_adapter(broken, root / "adapters" / "broken")
    srv = Server(root / "data", "--model", str(model), "--api-key", KEY, "--max-body-mb", "1",
                 "--adapter", f"broken={root / 'adapters' / 'broken'}")
    yield srv
    srv.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    """The error object of a response that must be `status` in OpenAI's shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def finished_job(client: openai.OpenAI, file_id: str, **training) -> str:
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id, extra_body={"training": training})
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
    assert job.status == "succeeded", job
    return job.id


def test_every_list_pages_to_each_item_exactly_once(server):
    client = server.client()
    files = [client.files.create(file=(f"f{i}.jsonl", TRAINING), purpose="fine-tune").id for i in range(5)]
    jobs = [finished_job(client, files[0], max_steps=5, checkpoint_every=1) for _ in range(3)]

    newest_first = [f.id for f in client.files.list()]
    assert sorted(newest_first) == sorted(files)
    assert [f.id for f in client.files.list(limit=2)] == newest_first
    assert [f.id for f in client.files.list(limit=2, order="asc")] == newest_first[::-1]
    page = client.files.list(limit=2)
    assert (page.first_id, page.last_id, page.has_more) == (newest_first[0], newest_first[1], True)

    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == jobs[::-1]  # newest first
    for job in jobs:
        events = [e.id for e in client.fine_tuning.jobs.list_events(job, limit=100)]
        assert len(events) > 3 and [e.id for e in client.fine_tuning.jobs.list_events(job, limit=3)] == events
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job, limit=100)]
        assert len(steps) > 2 and steps == sorted(steps, reverse=True)  # latest first
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job, limit=2)] == steps
    first = client.fine_tuning.jobs.checkpoints.list(job, limit=len(steps) - 1)
    last = client.fine_tuning.jobs.checkpoints.list(job, limit=2, after=first.last_id)
    assert first.has_more and [c.step_number for c in last.data] == steps[-1:] and last.has_more is False

    # a limit past the maximum is clamped; an invalid one is refused naming it
    assert len(client.fine_tuning.jobs.list(limit=10_000).data) == 3
    for route in ("files", "fine_tuning/jobs", f"fine_tuning/jobs/{jobs[0]}/events", f"fine_tuning/jobs/{jobs[0]}/checkpoints"):
        for limit in ("0", "-1", "two"):
            assert error_of(httpx.get(f"{server.url}/v1/{route}", params={"limit": limit}, headers=HEADERS), 400)["param"] == "limit"
        error = error_of(httpx.get(f"{server.url}/v1/{route}", params={"after": "nope"}, headers=HEADERS), 400)
        assert error["param"] == "after" and "nope" in error["message"]
    # a cursor of another job's list is not one of this job's
    other = client.fine_tuning.jobs.list_events(jobs[1], limit=1).data[0].id
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list_events(jobs[0], after=other)


def test_routing_size_and_validation_errors_have_openais_shape(server):
    assert "GET /v1/nope" in error_of(httpx.get(f"{server.url}/v1/nope", headers=HEADERS), 404)["message"]
    wrong = httpx.get(f"{server.url}/v1/chat/completions", headers=HEADERS)
    assert "GET /v1/chat/completions" in error_of(wrong, 405)["message"] and wrong.headers["allow"] == "POST"
    error_of(httpx.post(f"{server.url}/v1/completions", headers=HEADERS, content=b"x" * (2 * 2**20)), 413)
    error_of(httpx.post(f"{server.url}/v1/completions", headers=HEADERS, content=b"{not json"), 400)
    assert error_of(httpx.post(f"{server.url}/v1/completions", headers=HEADERS, json={"model": MODEL}), 400)["param"] == "prompt"
    missing = httpx.post(f"{server.url}/v1/chat/completions", headers=HEADERS, json={"model": MODEL, "messages": [{"content": "hi"}]})
    assert error_of(missing, 400)["param"] == "messages.0.role"
    assert error_of(httpx.post(f"{server.url}/v1/files", headers=HEADERS, files={"file": ("a.jsonl", TRAINING)}), 400)["param"] == "purpose"
    with pytest.raises(openai.NotFoundError) as e:
        server.client().files.retrieve("file-missing")
    assert e.value.body["param"] == "file_id"


def test_a_chat_template_that_refuses_the_messages_is_a_400(server):
    client = server.client()
    twice = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=twice, max_tokens=2)
    assert e.value.body["param"] == "messages" and "roles must alternate" in e.value.body["message"]
    alternating = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert client.chat.completions.create(model=MODEL, messages=alternating, max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": -1}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": -0.5}}, "hyperparameters.learning_rate_multiplier"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"target_modules": ["q_proj", "attention"]}}, "lora.target_modules"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"training": {"max_steps": 0}}, "training.max_steps"),
    ({"training": {"lr_schedule": "exponential"}}, "training.lr_schedule"),
    ({"training": {"checkpoint_interval": -1}}, "training.checkpoint_interval"),
    ({"training": {"max_grad_norm": 0}}, "training.max_grad_norm"),
    ({"suffix": "a/b"}, "suffix"),
])
def test_bad_hyperparameters_are_refused_naming_them(server, body, param):
    client = server.client()
    file = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    hyperparameters = body.pop("hyperparameters", openai.omit)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=file.id, hyperparameters=hyperparameters,
                                       suffix=body.pop("suffix", openai.omit), extra_body=body)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"].startswith(f"{param}: ")


def test_a_request_that_fails_in_the_engine_is_an_error_not_a_finish_reason(server):
    client = server.client()
    question = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="broken", messages=question, max_tokens=4, temperature=1)
    assert e.value.body["type"] == "server_error" and e.value.body["message"]
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(model="broken", messages=question, max_tokens=4, temperature=1, stream=True):
            assert chunk.choices[0].finish_reason in (None, "stop", "length")
    assert e.value.body["type"] == "server_error" and e.value.body["code"] == 500
    raw = httpx.post(f"{server.url}/v1/completions", headers=HEADERS, timeout=60,
                     json={"model": "broken", "prompt": "Hi", "max_tokens": 4, "temperature": 1, "stream": True})
    events = [line[len("data: "):] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and set(json.loads(events[-2])) == {"error"}
    assert all(json.loads(e).get("choices", [{}])[0].get("finish_reason") in (None, "stop", "length") for e in events[:-2])
    # the other requests of the same steps are served
    assert client.chat.completions.create(model=MODEL, messages=question, max_tokens=3).choices[0].finish_reason == "length"
