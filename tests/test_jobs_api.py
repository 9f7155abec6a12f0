"""Issue 17's job surface over real HTTP with the official openai client, on the tiny model (one
server for the module, restarted once at the end): OpenAI's `method` block (supervised and DPO),
jobs that start from a fine-tuned model, pause and resume, checkpoints that are servable models,
metadata and integrations, and a paused DPO job that survives a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from live_server import KEY, Server, tiny_model_dir

MODEL = "tiny"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "quiet")
SFT = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}).encode() + b"\n" for w in ("yes", "no", "maybe"))
DPO = b"".join(json.dumps({
    "input": {"messages": [{"role": "user", "content": f"Is {w} a word?"}]},
    "preferred_output": [{"role": "assistant", "content": "yes"}],
    "non_preferred_output": [{"role": "assistant", "content": "no"}]}).encode() + b"\n" for w in WORDS)
PROMPTS = ["Say yes.", "Is apple a word?", "The river"]
FINAL = ("succeeded", "failed", "cancelled")


class Live:
    """The module's server, restartable on the same data directory."""

    def __init__(self, root) -> None:
        self.root, self.model = root, tiny_model_dir(root / MODEL)
        self.srv = self._start()

    def _start(self) -> Server:
        return Server(self.root / "data", "--model", str(self.model), "--api-key", KEY,
                      "--allow-adapter-dir", str(self.root / "data"))

    def restart(self) -> None:
        self.srv.stop()
        self.srv = self._start()

    def client(self) -> openai.OpenAI:
        return self.srv.client()

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.srv.url}{path}", json=body, headers=HEADERS, timeout=300)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Live(tmp_path_factory.mktemp("jobs"))
    yield server
    server.srv.stop()


@pytest.fixture(scope="module")
def files(live):
    client = live.client()
    return {name: client.files.create(file=(f"{name}.jsonl", data), purpose="fine-tune").id
            for name, data in (("sft", SFT), ("dpo", DPO))}


def wait(client: openai.OpenAI, job_id: str, statuses=FINAL):
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        time.sleep(0.1)
    return job


def events(client: openai.OpenAI, job_id: str) -> list:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def scores(live: Live, model: str) -> list[float]:
    """The prompt tokens' log-probabilities under `model` (echo, nothing generated): a fingerprint
    of its weights."""
    out = []
    for prompt in PROMPTS:
        r = live.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        out += [x for x in r.json()["choices"][0]["logprobs"]["token_logprobs"] if x is not None]
    return out


def greedy(client: openai.OpenAI, model: str) -> list[str]:
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=8,
                                           temperature=0).choices[0].message.content for p in PROMPTS]


def error_of(exc: openai.APIStatusError, status: int = 400) -> dict:
    assert exc.status_code == status, exc.response.text
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture(scope="module")
def sft_model(live, files):
    """A finished supervised job's model, trained enough to differ from the base model."""
    client = live.client()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], suffix="start",
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 20}}})
    job = wait(client, job.id)
    assert job.status == "succeeded", job
    return job.fine_tuned_model


# --- method -------------------------------------------------------------------------------------

def test_a_dpo_job_with_openais_method_block(live, files):
    client = live.client()
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=files["dpo"], method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
        metadata={"team": "prefs", "run": "1"}, integrations=[])
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 1 and job.method.dpo.hyperparameters.batch_size == 8  # "auto"
    assert job.hyperparameters.n_epochs == 1
    assert job.metadata == {"team": "prefs", "run": "1"}
    job = wait(client, job.id)
    assert job.status == "succeeded", job
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.metadata == {"team": "prefs", "run": "1"}
    metrics = [e.data for e in events(client, job.id) if e.type == "metrics"]
    assert metrics and all("rewards/margins" in d for d in metrics)
    assert all(isinstance(text, str) for text in greedy(client, job.fine_tuned_model))


def test_the_legacy_hyperparameters_still_work_and_a_disagreement_with_method_is_refused(live, files):
    client = live.client()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], hyperparameters={"n_epochs": 1},
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}})
    assert job.method.supervised.hyperparameters.n_epochs == 1 and job.method.supervised.hyperparameters.batch_size == 2
    client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], hyperparameters={"n_epochs": 2},
                                       method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert error_of(e.value)["param"] == "hyperparameters"


@pytest.mark.parametrize("method, param", [
    ({"type": "reinforcement"}, "method.type"),
    ({"type": "reinforcement", "reinforcement": {"hyperparameters": {}}}, "method.type"),
    ({"type": "dpo", "supervised": {"hyperparameters": {}}}, "method.supervised"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}, "method.supervised.hyperparameters.beta"),
])
def test_bad_methods_are_refused_naming_them(live, files, method, param):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().fine_tuning.jobs.create(model=MODEL, training_file=files["dpo"], method=method)
    assert error_of(e.value)["param"] == param


def test_a_file_that_does_not_fit_the_method_is_refused_naming_the_line(live, files):
    client = live.client()
    for file, method in ((files["sft"], {"type": "dpo"}), (files["dpo"], {"type": "supervised"})):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model=MODEL, training_file=file, method=method)
        error = error_of(e.value)
        assert error["code"] == "invalid_file" and "line 1" in error["message"], error


def test_metadata_is_bounded_and_integrations_are_refused(live, files):
    client = live.client()
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], metadata=metadata)
        assert error_of(e.value)["param"].startswith("metadata"), metadata
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"],
                                       integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert error_of(e.value)["param"] == "integrations"


def test_the_cli_sends_openais_method_block(live, tmp_path):
    data = tmp_path / "dpo.jsonl"
    data.write_bytes(DPO)
    run = subprocess.run([sys.executable, "-m", "loramux.cli", "finetune", "--server", live.srv.url, "--api-key", KEY,
                          "--data", str(data), "--name", "clidpo", "--method", "dpo", "--beta", "0.25", "--epochs", "1",
                          "--batch-size", "4", "--rank", "4"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    job = next(j for j in live.client().fine_tuning.jobs.list(limit=100) if j.user_provided_suffix == "clidpo")
    assert job.status == "succeeded" and job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    assert job.method.dpo.hyperparameters.batch_size == 4 and job.lora["r"] == 4


# --- starting from a fine-tuned model -------------------------------------------------------------

def test_a_job_starts_from_a_fine_tuned_model(live, files, sft_model):
    client = live.client()
    before, base = scores(live, sft_model), scores(live, MODEL)
    assert max(abs(a - b) for a, b in zip(before, base)) > 1e-2  # the starting model is not the base model
    # one step at a negligible learning rate: the new adapter is the starting one's copy
    job = client.fine_tuning.jobs.create(model=sft_model, training_file=files["sft"], suffix="copy",
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 1, "batch_size": 3, "learning_rate_multiplier": 1e-6}}})
    assert job.model == sft_model
    job = wait(client, job.id)
    assert job.status == "succeeded" and job.model == sft_model, job
    assert job.fine_tuned_model != sft_model
    copy = scores(live, job.fine_tuned_model)
    assert max(abs(a - b) for a, b in zip(copy, before)) < 1e-4
    assert greedy(client, job.fine_tuned_model) == greedy(client, sft_model)
    assert scores(live, sft_model) == before  # the starting model serves unchanged

    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=sft_model, training_file=files["sft"], extra_body={"lora": {"r": 4}})
    assert error_of(e.value)["param"] == "lora"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="ft:nothing:here", training_file=files["sft"])


def test_a_dpo_job_from_a_fine_tuned_model_has_it_as_its_reference(live, files, sft_model):
    client = live.client()
    job = client.fine_tuning.jobs.create(model=sft_model, training_file=files["dpo"],
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    assert job.method.dpo.hyperparameters.beta == 0.1  # "auto"
    job = wait(client, job.id)
    assert job.status == "succeeded", job
    first = next(e.data for e in events(client, job.id) if e.type == "metrics")
    # its first step's policy is the starting adapter itself, so the rewards against it are 0
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6, first


# --- pause and resume ---------------------------------------------------------------------------

def test_pause_stops_training_and_resume_continues_it(live, files):
    client = live.client()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], hyperparameters={"batch_size": 1},
                                         extra_body={"training": {"max_steps": 150, "checkpoint_every": 0,
                                                                  "checkpoint_interval": 0}})
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    seen = events(client, paused.id)
    assert seen[-1].message == "job paused"
    tokens = client.fine_tuning.jobs.retrieve(job.id).trained_tokens
    for _ in range(4):  # dozens of engine steps while it is paused
        client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0)
    still = client.fine_tuning.jobs.retrieve(job.id)
    assert still.status == "paused" and still.trained_tokens == tokens
    assert [e.id for e in events(client, job.id)] == [e.id for e in seen]  # no step was taken

    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.pause(job.id)  # already paused
    assert error_of(e.value)["code"] == "invalid_job_state"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "running"
    done = wait(client, job.id)
    assert done.status == "succeeded" and done.trained_tokens > tokens
    steps = [e.data["step"] for e in events(client, job.id) if e.type == "metrics"]
    assert steps[-1] == 150
    for action in (client.fine_tuning.jobs.pause, client.fine_tuning.jobs.resume):
        with pytest.raises(openai.BadRequestError) as e:
            action(job.id)  # a finished job
        error = error_of(e.value)
        assert error["code"] == "invalid_job_state" and "succeeded" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.pause("ftjob-nope")


# --- checkpoints are models -----------------------------------------------------------------------

def test_a_checkpoint_is_a_servable_model(live, files):
    client = live.client()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=files["sft"], suffix="ckpt",
                                         hyperparameters={"batch_size": 1, "learning_rate_multiplier": 20},
                                         extra_body={"training": {"max_steps": 3, "checkpoint_every": 1}})
    job = wait(client, job.id)
    assert job.status == "succeeded", job
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    # newest first: the first (nothing in flight) and the final one always; step 2's is skipped when
    # step 1's is still being written (a slow disk does not pile snapshots up, TrainingJob._checkpoint_due)
    steps = [c.step_number for c in checkpoints]
    assert steps in ([3, 2, 1], [3, 1]), steps
    first = checkpoints[-1].fine_tuned_model_checkpoint
    assert first == f"{job.fine_tuned_model}:ckpt-step-1"
    card = client.models.retrieve(first)
    assert card.id == first and card.parent == MODEL
    assert first not in [m.id for m in client.models.list()]  # listed by the job's checkpoints, as OpenAI does

    loaded = live.post("/v1/load_lora_adapter", {"lora_name": "ckpt-copy", "lora_path": card.root})
    assert loaded.status_code == 200, loaded.text
    assert greedy(client, first) == greedy(client, "ckpt-copy")
    assert scores(live, first) == scores(live, "ckpt-copy")
    assert scores(live, first) != scores(live, job.fine_tuned_model)  # step 1, not the final weights
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(first)


# --- restart ------------------------------------------------------------------------------------

def test_a_paused_dpo_job_from_a_fine_tuned_model_survives_a_restart(live, files, sft_model):
    client = live.client()
    job = client.fine_tuning.jobs.create(model=sft_model, training_file=files["dpo"], metadata={"k": "v"},
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "batch_size": 1}}},
                                         extra_body={"training": {"max_steps": 60, "checkpoint_every": 1}})
    # paused once it has a checkpoint: after the restart it is recreated from it, however fast it ran
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        time.sleep(0.05)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    with pytest.raises(openai.ConflictError):  # its reference stays
        client.models.delete(sft_model)
    live.restart()
    client = live.client()
    back = client.fine_tuning.jobs.retrieve(job.id)
    assert back.status == "paused" and back.model == sft_model and back.metadata == {"k": "v"}
    assert back.method.type == "dpo" and back.method.dpo.hyperparameters.beta == 0.3
    seen = events(client, job.id)
    since = seen[max(i for i, e in enumerate(seen) if e.message == "job paused"):]
    assert not any(e.type == "metrics" for e in since)  # recreated paused: no step since
    assert any(e.message.startswith("resumed from") for e in seen), [e.message for e in seen]  # recreated from its checkpoint
    assert client.fine_tuning.jobs.resume(job.id).status == "running"
    done = wait(client, job.id)
    assert done.status == "succeeded", done
    metrics = [e.data for e in events(client, job.id) if e.type == "metrics"]
    assert metrics[-1]["step"] == 60 and "rewards/margins" in metrics[-1]
