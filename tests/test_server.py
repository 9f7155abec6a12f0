"""The HTTP server, live on a loopback port, driven by the official `openai` client and httpx."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from live_server import KEY, Server, free_port
from loramux.config import ModelConfig
from loramux.datasets import shipped
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter
from loramux.model.loader import resolve_model_dir

pytestmark = pytest.mark.integration
BASE = "SmolLM2-135M-Instruct"
ADAPTERS = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    config = ModelConfig.from_hf(json.loads((resolve_model_dir(None)[1] / "config.json").read_text()))
    root = tmp_path_factory.mktemp("adapters")
    import torch

    dirs = {}
    for i, name in enumerate(ADAPTERS):
        adapter = LoraAdapter.create(name, LoraConfig(r=8, alpha=16, target_modules="all-linear"), config,
                                     generator=torch.Generator().manual_seed(i), init_b="random")
        dirs[name] = save_peft_adapter(adapter, root / name)
    return dirs


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dirs):
    data = tmp_path_factory.mktemp("server") / "data"
    allowed = next(iter(adapter_dirs.values())).parent
    # float32, as the library's engine it is compared with (the default, auto, may be bf16 here)
    srv = Server(data, "--dtype", "float32", "--api-key", KEY, "--allow-adapter-dir", str(allowed),
                 *[a for name, path in adapter_dirs.items() for a in ("--adapter", f"{name}={path}")])
    yield srv
    srv.stop()


def test_models_and_a_chat_completion_per_adapter(server, default_engine, adapter_dirs):
    client = server.client()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *ADAPTERS}
    assert all(models[a].model_extra["parent"] == BASE for a in ADAPTERS)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for name in (BASE, *ADAPTERS):
        r = client.chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.model == name and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens > 0 and r.choices[0].message.content
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the server's greedy answer equals the library's for the same adapter
    default_engine.load_adapter("alpha", adapter_dirs["alpha"])
    try:
        local = default_engine.generate(["What is the capital of France?"], "alpha", chat=True, max_tokens=12)[0]
    finally:
        default_engine.unload_adapter("alpha")
    remote = client.chat.completions.create(model="alpha", messages=question, max_tokens=12, temperature=0)
    assert remote.choices[0].message.content == local.text
    assert remote.usage.completion_tokens == len(local.token_ids)


def test_streaming_equals_non_streaming(server):
    client = server.client()
    kwargs = dict(model="beta", messages=[{"role": "user", "content": "Name three animals."}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    completion = list(client.completions.create(model=BASE, prompt="One, two,", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in completion) == client.completions.create(model=BASE, prompt="One, two,", max_tokens=5, temperature=0).choices[0].text


def test_sampling_options_n_seed_logprobs(server):
    client = server.client()
    r = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5, n=3, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=5, n=3, logprobs=2)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) for c in r.choices)
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to
    # logprobs+1 elements"; the sampled token's entry is always among them
    assert all(len(top) <= 3 for c in r.choices for top in c.logprobs.top_logprobs)
    assert all(tok in top for c in r.choices for tok, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs))
    chat = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4,
                                          logprobs=True, top_logprobs=3, stop=["\n"], presence_penalty=0.5, frequency_penalty=0.5)
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in chat.choices[0].logprobs.content)


def test_bad_input_gets_clear_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="hi", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt=[1] * 8190, max_tokens=16)
    assert "8192" in e.value.body["message"] and "8190" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n'), purpose="fine-tune")
    assert "line 2" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-missing")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    raw = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{not json")
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in raw.text


def test_adapter_paths_are_confined(server, adapter_dirs, tmp_path):
    headers = {"Authorization": f"Bearer {KEY}"}
    outside = tmp_path / "outside"
    save_peft_adapter(LoraAdapter.create("o", LoraConfig(r=2), ModelConfig.from_hf(json.loads((resolve_model_dir(None)[1] / "config.json").read_text()))), outside)
    allowed = adapter_dirs["alpha"].parent
    (allowed / "escape").symlink_to(outside)
    for path in (str(outside), str(allowed / ".." / outside.parent.name / "outside"), str(allowed / "escape")):
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers, json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", path
    # found by the schema fuzzer: a lone surrogate (JSON's \ud925) or a NUL is no path, and a 400, not a 500
    for body in ('{"lora_name": "x", "lora_path": "~\\ud925x"}', '{"lora_name": "x", "lora_path": "a\\u0000b"}'):
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers={**headers, "Content-Type": "application/json"}, content=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (body, r.text)
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers, json={"lora_name": "alpha2", "lora_path": str(adapter_dirs["alpha"])})
    assert r.status_code == 200
    assert "alpha2" in {m.id for m in server.client().models.list().data}
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "alpha2"})
    assert r.status_code == 200 and "alpha2" not in {m.id for m in server.client().models.list().data}
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "alpha2"})
    assert r.status_code == 404


def test_fine_tuning_job_end_to_end_while_serving(server):
    """Upload, job, events, checkpoints, then the fine-tuned model answers; 32 streaming clients over
    four adapters are served meanwhile, every one completes exactly once."""
    client = server.client()
    train = client.files.create(file=shipped("reverse_words/train.jsonl").open("rb"), purpose="fine-tune")
    assert client.files.retrieve(train.id).bytes == shipped("reverse_words/train.jsonl").stat().st_size
    assert client.files.content(train.id).content == shipped("reverse_words/train.jsonl").read_bytes()
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, suffix="rev", hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 5},
        extra_body={"lora": {"r": 16, "alpha": 32},
                    "training": {"max_steps": 16, "checkpoint_every": 8, "checkpoint_interval": 0, "warmup_steps": 2}},
    )
    assert job.status in ("queued", "running") and job.model == BASE

    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            c = server.client()
            chunks = c.chat.completions.create(model=ADAPTERS[i % 4], messages=[{"role": "user", "content": f"Say {i}."}],
                                               max_tokens=12, stream=True, extra_body={"ignore_eos": True})
            results[i] = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and sorted(results) == list(range(32))
    assert all("".join(pieces) for pieces in results.values())

    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert job.status == "succeeded" and job.fine_tuned_model and job.trained_tokens > 0
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("train_loss" in (e.data or {}) for e in events) and events[0].message == "job succeeded"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [16, 8]
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10).data]
    answer = client.completions.create(model=job.fine_tuned_model, prompt="Reverse: apple river stone\nAnswer:", max_tokens=6, temperature=0)
    assert answer.choices[0].text.strip() == "stone river apple"


def test_cancel_a_running_job(server):
    client = server.client()
    train = client.files.create(file=shipped("reverse_words/train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters={"n_epochs": 3})
    time.sleep(1)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not any(m.id.endswith(job.id[-8:]) for m in client.models.list().data)


def test_metrics_and_disconnect_frees_blocks(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": BASE, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
                            "stream": True, "ignore_eos": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics").text
        used = [line for line in text.splitlines() if line.startswith("loramux_kv_blocks_used")]
        running = [line for line in text.splitlines() if line.startswith("loramux_requests_running")]
        if used and float(used[0].split()[-1]) == 0 and float(running[0].split()[-1]) == 0:
            break
        assert time.monotonic() < deadline, used + running
        time.sleep(0.2)
    assert "loramux_requests_total" in text and "loramux_time_to_first_token_seconds_bucket" in text


def test_limits_429_413_and_lock(tmp_path):
    srv = Server(tmp_path / "data", "--max-waiting", "1", "--max-body-mb", "0.01")
    try:
        second = subprocess.run([sys.executable, "-m", "loramux.cli", "serve", "--port", str(free_port()), "--data-dir",
                                 str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another loramux server" in second.stderr and "Traceback" not in second.stderr
        client = srv.client("anything")
        big = httpx.post(f"{srv.url}/v1/completions", json={"model": BASE, "prompt": "x" * 20000})
        assert big.status_code == 413 and big.json()["error"]["message"]
        statuses: list[int] = []

        def one() -> None:
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 30, "ignore_eos": True}, timeout=120)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert client.models.list().data
        logged = [json.loads(line[line.index('{"method"'):]) for line in srv.log.read_text().splitlines() if '{"method"' in line]
        completions = [e for e in logged if e["path"] == "/v1/completions"]  # one line per request, with its status
        assert sorted(e["status"] for e in completions) == sorted([413, *statuses])
        assert all(e["method"] == "POST" and e["ms"] >= 0 for e in completions)
    finally:
        srv.stop()


def test_restart_after_sigkill_keeps_everything_and_resumes_the_job(tmp_path, adapter_dirs):
    data = tmp_path / "data"
    srv = Server(data, "--allow-adapter-dir", str(adapter_dirs["alpha"].parent))
    try:
        client = srv.client("x")
        httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": str(adapter_dirs["alpha"])}).raise_for_status()
        train = client.files.create(file=shipped("reverse_words/train.jsonl").open("rb"), purpose="fine-tune")
        done = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, extra_body={"training": {"max_steps": 2}})
        while (done := client.fine_tuning.jobs.retrieve(done.id)).status != "succeeded":
            time.sleep(0.5)
        running = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                                 extra_body={"training": {"max_steps": 12, "checkpoint_every": 3}})
        while not client.fine_tuning.jobs.checkpoints.list(running.id).data:
            time.sleep(0.2)
        srv.kill()
    finally:
        srv.stop()
    srv = Server(data)
    try:
        client = srv.client("x")
        assert [f.id for f in client.files.list().data] == [train.id]
        models = {m.id for m in client.models.list().data}
        assert {"alpha", done.fine_tuned_model} <= models
        assert client.fine_tuning.jobs.retrieve(done.id).status == "succeeded"
        deadline = time.monotonic() + 600
        while (job := client.fine_tuning.jobs.retrieve(running.id)).status != "succeeded":
            assert job.status == "running" and time.monotonic() < deadline, job.status
            time.sleep(0.5)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(running.id, limit=100).data]
        assert any(m.startswith("resumed from") for m in messages)
        assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    finally:
        srv.stop()


def test_resident_limit_evicts_idle_adapters_by_lru_and_reloads_them(tmp_path, adapter_dirs):
    srv = Server(tmp_path / "data", "--max-adapters", "2", "--allow-adapter-dir", str(adapter_dirs["alpha"].parent),
                 *[a for name in ("alpha", "beta", "gamma") for a in ("--adapter", f"{name}={adapter_dirs[name]}")])
    try:
        client = srv.client("x")
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(adapter_dirs["delta"]), "pinned": True})
        assert r.status_code == 200
        question = [{"role": "user", "content": "Say something."}]
        first = {}
        for name in ("alpha", "beta", "gamma", "alpha", "beta", "gamma"):
            reply = client.chat.completions.create(model=name, messages=question, max_tokens=8, temperature=0).choices[0].message.content
            assert first.setdefault(name, reply) == reply  # reloaded from disk, same weights, same answer
            models = {m.id: m.model_extra["resident"] for m in client.models.list().data}
            assert sum(models[n] for n in ADAPTERS) <= 2 and models["delta"], models
            assert models[name]
        assert {m.id for m in client.models.list().data} == {BASE, *ADAPTERS}
    finally:
        srv.stop()
    # a restart loads no more of the catalog than the limit holds (the rest on demand): nothing to evict
    srv = Server(tmp_path / "data", "--max-adapters", "2")
    try:
        client = srv.client("x")
        models = {m.id: m.model_extra["resident"] for m in client.models.list().data}
        assert set(models) == {BASE, *ADAPTERS} and sum(models[n] for n in ADAPTERS) <= 2, models
        evictions = re.search(r"^loramux_adapter_evictions_total (\S+)$", httpx.get(f"{srv.url}/metrics").text, re.M)
        assert evictions is not None and float(evictions.group(1)) == 0
        reply = client.chat.completions.create(model="gamma", messages=question, max_tokens=8, temperature=0).choices[0].message.content
        assert reply == first["gamma"]
    finally:
        srv.stop()


def test_cli_commands_against_a_server(server, adapter_dirs):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loramux.cli", *args, "--server", server.url, "--api-key", KEY],
                              capture_output=True, text=True, timeout=600)

    listed = cli("adapters", "list")
    assert listed.returncode == 0 and all(name in listed.stdout for name in (BASE, *ADAPTERS))
    assert cli("adapters", "load", "alpha-cli", str(adapter_dirs["alpha"])).returncode == 0
    assert "alpha-cli" in cli("adapters", "list").stdout
    assert cli("adapters", "unload", "alpha-cli").returncode == 0
    missing = cli("adapters", "unload", "alpha-cli")
    assert missing.returncode == 2 and "404" in missing.stderr and "Traceback" not in missing.stderr
    job = cli("finetune", "--data", str(shipped("reverse_words/train.jsonl")), "--name", "clirev", "--max-steps", "3",
              "--batch-size", "4", "--rank", "4")
    assert job.returncode == 0, job.stderr
    assert "step 3/3" in job.stderr and "fine-tuned model 'ft:" in job.stdout
