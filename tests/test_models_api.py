"""Model names and cards over real HTTP with the official openai client, on a tiny model served as
`--served-model-name base-a alias-b`: the list and its cards, requests under either name, retrieving
one model, and deleting fine-tuned models (what is refused, what conflicts, what is left)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from live_server import KEY, Server, tiny_model_dir
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

BASE, ALIAS = "base-a", "alias-b"
TRAINING = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}).encode() + b"\n" for w in ("yes", "no", "maybe"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = tiny_model_dir(root / "tiny")
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    for name in ("cli", "api"):
        adapter = LoraAdapter.create(name, LoraConfig(r=2), config, generator=torch.Generator().manual_seed(0))
        save_peft_adapter(adapter, root / "adapters" / name)
    srv = Server(root / "data", "--model", str(model), "--api-key", KEY, "--served-model-name", BASE, ALIAS,
                 "--adapter", f"cli={root / 'adapters' / 'cli'}", "--allow-adapter-dir", str(root / "adapters"))
    srv.root, srv.context = root, config.max_position_embeddings
    yield srv
    srv.stop()


def fine_tune(client: openai.OpenAI, model: str = BASE, **training) -> openai.types.fine_tuning.FineTuningJob:
    """A job on the tiny training file, created under `model` and, unless told otherwise, finished."""
    file = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=file.id, extra_body={"training": training or {"max_steps": 2}})
    if training:
        return job
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
    assert job.status == "succeeded", job
    return job


def test_the_served_names_list_first_and_answer_under_the_name_asked(server):
    client = server.client()
    cards = client.models.list().data
    assert [c.id for c in cards] == [BASE, ALIAS, "cli"]
    for card in cards[:2]:
        assert card.model_extra["max_model_len"] == server.context and card.model_extra["parent"] is None
        assert Path(card.model_extra["root"]).resolve() == (server.root / "tiny").resolve()
    assert cards[2].model_extra["parent"] == BASE and cards[2].model_extra["max_model_len"] is None
    assert Path(cards[2].model_extra["root"]).resolve() == (server.root / "adapters" / "cli").resolve()

    question = [{"role": "user", "content": "Hi"}]
    for name in (BASE, ALIAS, "cli"):  # vLLM echoes the name the request gave
        assert client.completions.create(model=name, prompt="Hi", max_tokens=2).model == name
        assert client.chat.completions.create(model=name, messages=question, max_tokens=2).model == name
        chunks = list(client.chat.completions.create(model=name, messages=question, max_tokens=2, stream=True))
        assert {c.model for c in chunks} == {name}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2)  # the model's own name is not served


def test_adapter_cards_tell_rank_targets_size_and_pinning(server):
    """What the console shows of an adapter, read from the engine when resident and from its
    directory when not: rank, alpha and targets as written in adapter_config.json, the weights'
    size on disk, and whether it is pinned."""
    headers = {"Authorization": f"Bearer {KEY}"}
    directory = server.root / "adapters" / "api"
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                        json={"lora_name": "api", "lora_path": str(directory), "pinned": True})
    assert loaded.status_code == 200, loaded.text
    try:
        written = json.loads((directory / "adapter_config.json").read_text())
        cards = {c.id: c.model_extra for c in server.client().models.list().data}
        for name in ("cli", "api"):
            card = cards[name]
            assert (card["lora"]["r"], card["lora"]["alpha"]) == (written["r"], written["lora_alpha"])
            assert set(card["lora"]["target_modules"]) == set(written["target_modules"])
            assert card["size_bytes"] == (server.root / "adapters" / name / "adapter_model.safetensors").stat().st_size
        assert cards["api"]["pinned"] is True and cards["cli"]["pinned"] is False
        assert "lora" not in cards[BASE] or cards[BASE]["lora"] is None
    finally:
        httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "api"})


def test_retrieve_gives_one_card_and_404_in_openais_shape(server):
    client = server.client()
    listed = {c.id: c for c in client.models.list().data}
    for name in (BASE, ALIAS, "cli"):
        assert client.models.retrieve(name) == listed[name]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body == {"message": "the model 'nope' does not exist", "type": "not_found_error", "param": "model",
                            "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/nope")  # '/' in an id reaches the route, not the router's 404
    assert e.value.body["message"] == "the model 'org/nope' does not exist"


def test_a_deleted_fine_tuned_model_is_gone_and_its_job_stays(server):
    client = server.client()
    job = fine_tune(client, model=ALIAS)  # an alias names the base model: the job records its id
    name = job.fine_tuned_model
    assert job.model == BASE and name.startswith(f"ft:{BASE}:")
    card = client.models.retrieve(name)
    directory = Path(card.model_extra["root"])
    assert card.model_extra["parent"] == BASE and directory == (server.root / "data" / "adapters" / job.id).resolve() and directory.is_dir()
    assert client.completions.create(model=name, prompt="Hi", max_tokens=2).model == name

    deleted = client.models.delete(name)
    assert (deleted.id, deleted.object, deleted.deleted) == (name, "model", True)
    assert name not in [c.id for c in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    assert not directory.exists() and not list(directory.parent.glob(".deleted-*"))
    # the job is kept, and so are its checkpoints, models of their own ("ft:...:ckpt-step-N")
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(Path(client.models.retrieve(c.fine_tuned_model_checkpoint).model_extra["root"]).is_dir()
                               for c in checkpoints)
    assert client.completions.create(model=checkpoints[0].fine_tuned_model_checkpoint, prompt="Hi", max_tokens=2).choices


def test_the_base_model_and_given_adapters_are_not_deletable(server):
    client = server.client()
    headers = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                        json={"lora_name": "api", "lora_path": str(server.root / "adapters" / "api")})
    assert loaded.status_code == 200, loaded.text
    for name, reason in ((BASE, "base model"), (ALIAS, "base model"), ("cli", "--adapter"), ("api", "/v1/load_lora_adapter")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            client.models.delete(name)
        assert e.value.status_code == 403 and e.value.body["code"] == "model_not_deletable" and reason in e.value.body["message"]
        assert name in [c.id for c in client.models.list().data]
    assert (server.root / "adapters" / "api" / "adapter_config.json").is_file()
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "api"}).status_code == 200


def test_a_model_in_use_is_not_deleted(server):
    client = server.client()
    name = fine_tune(client).fine_tuned_model
    question = [{"role": "user", "content": "Tell a long story."}]
    stream = client.chat.completions.create(model=name, messages=question, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is in flight
    with pytest.raises(openai.ConflictError) as e:
        client.models.delete(name)
    assert e.value.body["code"] == "model_in_use" and "in flight" in e.value.body["message"]
    stream.close()  # the server aborts the request once it sees the client gone
    deadline = time.monotonic() + 60
    while True:
        try:
            assert client.models.delete(name).deleted
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline, "the aborted request kept the model in use"
            time.sleep(0.1)

    training = fine_tune(client, max_steps=100_000)  # the adapter being trained is listed and in use
    while not (names := [c.id for c in client.models.list().data if c.id.endswith(training.id[-8:])]):
        time.sleep(0.1)
    with pytest.raises(openai.ConflictError) as e:
        client.models.delete(names[0])
    assert "being trained" in e.value.body["message"]
    client.fine_tuning.jobs.cancel(training.id)
