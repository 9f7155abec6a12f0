"""`loramux serve --replicas 2` on a local Ray cluster, a tiny model, over real HTTP with the
official openai client: adapter affinity and spill (counted from x-loramux-replica), greedy answers
equal to one engine's, streaming and client disconnects, a job trained on one replica and served by
the other, a training replica killed with SIGKILL whose job resumes elsewhere from its checkpoint,
and no process left once the service stops. Skipped with a message where Ray is not installed."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch

from live_server import KEY, Server, tiny_model_dir
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

pytest.importorskip("ray.serve", reason="the cluster needs Ray Serve: pip install 'loramux[ray]'")
pytestmark = pytest.mark.cluster

MODEL = "tiny"
ADAPTERS = ("alpha", "beta")
HEADERS = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):")
TRAINING = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w} {w}"}).encode() + b"\n"
                    for w in ("yes", "no", "maybe", "never"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    model = tiny_model_dir(root / MODEL)
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    adapters = {}
    for seed, name in enumerate(ADAPTERS):
        adapter = LoraAdapter.create(name, LoraConfig(r=4, target_modules="all-linear"), config,
                                     generator=torch.Generator().manual_seed(seed), init_b="random")
        adapters[name] = save_peft_adapter(adapter, root / "adapters" / name)
    srv = Server(root / "data", "--replicas", "2", "--model", str(model), "--api-key", KEY, "--max-ongoing-requests", "4",
                 "--allow-adapter-dir", str(root / "adapters"),
                 *[a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")])
    srv.model_dir, srv.adapters = model, adapters
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(cluster):
    """Greedy answers of one engine in this process, on the same model and adapters."""
    from loramux import Engine, SamplingParams

    engine = Engine.load(cluster.model_dir, dtype="float32")
    for name, path in cluster.adapters.items():
        engine.load_adapter(name, path)

    def answers(model: str, max_tokens: int = 8) -> list[str]:
        adapter = None if model == MODEL else model
        outs = engine.generate(list(PROMPTS), [adapter] * len(PROMPTS), params=SamplingParams(max_tokens=max_tokens))
        return [out.text for out in outs]

    return answers


def complete(cluster, model: str, prompt: str, max_tokens: int = 8) -> tuple[str, str]:
    """(text, replica) of a greedy completion through the openai client."""
    raw = cluster.client().completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return raw.parse().choices[0].text, raw.headers["x-loramux-replica"]


def replicas(cluster) -> list[dict]:
    r = httpx.get(f"{cluster.url}/cluster", headers=HEADERS, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


def test_cluster_lists_its_replicas_behind_the_api_key(cluster):
    assert httpx.get(f"{cluster.url}/cluster", timeout=30).status_code == 401
    live = wait_for(lambda: len(replicas(cluster)) == 2 and replicas(cluster), 60, "two replicas")
    assert len({r["id"] for r in live}) == 2 and all(psutil.pid_exists(r["pid"]) for r in live)
    assert all(r["base"] == [MODEL] and r["running"] == 0 and r["jobs"] == [] for r in live)
    for _ in range(3):  # the console's serving series: one replica's, the oldest live one
        stats = httpx.get(f"{cluster.url}/v1/loramux/stats", headers=HEADERS, timeout=30)
        assert stats.status_code == 200 and stats.headers["x-loramux-replica"] == live[0]["id"]


def test_greedy_answers_equal_one_engines_and_each_adapter_stays_on_one_replica(cluster, reference):
    for model in (*ADAPTERS, MODEL):
        expected = reference(model)
        seen = []
        for _ in range(2):
            for prompt, want in zip(PROMPTS, expected):
                text, replica = complete(cluster, model, prompt)
                assert text == want, (model, prompt)
                seen.append(replica)
        if model != MODEL:
            assert len(set(seen)) == 1, (model, seen)  # sequential requests: where its weights are
            # as the replica reports it (every second)
            wait_for(lambda: model in next(r for r in replicas(cluster) if r["id"] == seen[0])["resident"], 30, f"{model} resident")


def test_load_spills_to_the_second_replica(cluster, reference):
    # 4 requests in flight per replica (--max-ongoing-requests 4): 8 at once cannot all wait for one
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: complete(cluster, "alpha", PROMPTS[i % 3], max_tokens=48), range(8)))
    assert len({replica for _, replica in results}) == 2
    want = reference("alpha", max_tokens=48)
    assert all(text == want[i % 3] for i, (text, _) in enumerate(results))


def test_every_request_the_replicas_can_take_is_in_flight_at_once(cluster):
    """8 long streams at once, 4 per replica: each gets its first token before any of them ends (an
    ingress that took fewer at a time would hold some back until another finished)."""
    def stream(i: int) -> tuple[float, float]:
        body = {"model": MODEL, "prompt": PROMPTS[i % 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
        first = None
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, headers=HEADERS, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic()
        return first, time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        spans = list(pool.map(stream, range(8)))
    assert max(first for first, _ in spans) < min(end for _, end in spans), spans


def test_streaming_through_the_openai_client(cluster, reference):
    client = cluster.client()
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0)
    assert text == whole.choices[0].message.content and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def aborted(cluster, model: str) -> int:
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    pattern = rf'^loramux_requests_total\{{replica="[^"]+",model="{model}",status="aborted"\}} (\S+)$'
    return int(sum(float(m) for m in re.findall(pattern, text, flags=re.M)))


def test_a_client_that_disconnects_aborts_its_request(cluster):
    before = aborted(cluster, "beta")
    body = {"model": "beta", "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-loramux-replica"]
        next(r.iter_lines())  # it runs; then the client goes away
    wait_for(lambda: aborted(cluster, "beta") == before + 1, 60, "the request to be aborted")
    wait_for(lambda: all(r["running"] == 0 for r in replicas(cluster)), 60, "no request running")


def test_unload_and_load_act_on_every_replica(cluster, reference):
    assert all("alpha" in r["resident"] for r in replicas(cluster))  # the spill test put it on both
    r = httpx.post(f"{cluster.url}/v1/unload_lora_adapter", headers=HEADERS, json={"lora_name": "alpha"})
    assert r.status_code == 200, r.text
    wait_for(lambda: not any("alpha" in r["resident"] for r in replicas(cluster)), 60, "every replica to drop alpha")
    r = httpx.post(f"{cluster.url}/v1/completions", headers=HEADERS, json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{cluster.url}/v1/load_lora_adapter", headers=HEADERS,
                   json={"lora_name": "alpha", "lora_path": str(cluster.adapters["alpha"])})
    assert r.status_code == 200, r.text
    assert complete(cluster, "alpha", PROMPTS[1])[0] == reference("alpha")[1]


def upload(cluster) -> str:
    return cluster.client().files.create(file=("train.jsonl", TRAINING), purpose="fine-tune").id


def finished(cluster, job_id: str, timeout: float = 240):
    client = cluster.client()
    return wait_for(lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and job,
                    timeout, f"job {job_id} to finish")


def test_a_job_trains_on_one_replica_and_the_other_serves_its_result(cluster):
    raw = cluster.client().fine_tuning.jobs.with_raw_response.create(
        model=MODEL, training_file=upload(cluster), suffix="c1", hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 10})
    trainer = raw.headers["x-loramux-replica"]  # the replica that created the job trains it
    job = finished(cluster, raw.parse().id)
    assert job.status == "succeeded", job.error
    # requests at once: the trainer holds the model, the other replica loads it from the shared directory
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: complete(cluster, job.fine_tuned_model, PROMPTS[0], max_tokens=32), range(6)))
    assert {replica for _, replica in results} == {r["id"] for r in replicas(cluster)} and trainer in {r for _, r in results}
    assert len({text for text, _ in results}) == 1  # the same weights on both
    cluster.finetuned = (job.fine_tuned_model, results[0][0])


def test_a_killed_training_replica_is_replaced_and_its_job_resumes_elsewhere(cluster):
    client = cluster.client()
    raw = client.fine_tuning.jobs.with_raw_response.create(model=MODEL, training_file=upload(cluster), suffix="c2",
                                                           hyperparameters={"n_epochs": 50, "batch_size": 1},
                                                           extra_body={"training": {"max_steps": 200, "checkpoint_every": 10}})
    job = raw.parse()
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 120, "a checkpoint")
    victim = next(r for r in replicas(cluster) if r["id"] == raw.headers["x-loramux-replica"])
    name = f"ft:{MODEL}:c2:{job.id[-8:]}"
    # a stream on the adapter in training runs on its replica (the only one with its live weights)
    body = {"model": name, "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, headers=HEADERS, timeout=120) as r:
        assert r.headers["x-loramux-replica"] == victim["id"]
        lines = r.iter_lines()
        next(lines)
        os.kill(victim["pid"], signal.SIGKILL)
        tail = [line for line in lines if line.startswith("data: ")]
    error = json.loads(tail[-1][len("data: "):])
    assert error["error"]["code"] == "replica_unavailable", tail[-3:]
    # requests not yet started go to the live replica meanwhile
    assert complete(cluster, MODEL, PROMPTS[0])[1] != victim["id"]
    job = finished(cluster, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
    assert any(m.startswith("resumed from") for m in messages), messages
    live = wait_for(lambda: len(replicas(cluster)) == 2 and replicas(cluster), 180, "Ray to replace the killed replica")
    assert victim["id"] not in {r["id"] for r in live}
    assert complete(cluster, job.fine_tuned_model, PROMPTS[0])[0]


def stop_leaving_nothing(server) -> None:
    service = psutil.Process(server.proc.pid)
    processes = [service, *service.children(recursive=True)]
    assert len(processes) > 4  # the ingress, two replicas, the coordinator, Ray's own
    server.stop()
    assert server.proc.returncode == 0
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_a_restart_recovers_the_catalog_and_the_unfinished_jobs(cluster):
    client = cluster.client()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload(cluster), suffix="c3",
                                         hyperparameters={"n_epochs": 50, "batch_size": 1}, extra_body={"training": {"max_steps": 200}})
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # reaches the replica that holds it
    stop_leaving_nothing(cluster)
    again = Server(cluster.data_dir, *cluster.args)
    try:
        client = again.client()
        # the paused job is adopted by a replica, still paused, and resumes there
        wait_for(lambda: any(job.id in r["jobs"] for r in replicas(again)), 60, "a replica to adopt the paused job")
        assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
        assert client.fine_tuning.jobs.resume(job.id).status == "running"
        assert finished(again, job.id).status == "succeeded"
        model, text = cluster.finetuned  # fine-tuned before the restart: the same answer
        assert complete(again, model, PROMPTS[0], max_tokens=32)[0] == text
    finally:
        stop_leaving_nothing(again)
