"""Soak a live `loramux serve`: every request must get exactly one final answer, under churn.

For `--duration` seconds, `--clients` concurrent clients send chat and text completions (streamed
or not, n = 1..2, one or two prompts) to the base model and several adapters; some streaming
clients hang up mid-stream on purpose. Meanwhile one task loads and unloads adapters in a loop
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), two fine-tuning jobs train, and the server's
resident memory (VmRSS of /proc/PID/status) is sampled every second. Then new requests stop, the
ones in flight are waited for, the long job is cancelled and the short one waited for, and the
server must be healthy and idle (no running or waiting request, no KV block in use).

Every request ends as exactly one of:
  completed     a 200 answer with every choice finished (a stream: each choice's finish_reason, then [DONE])
  error         an error answer: an HTTP error, or an error event in a stream followed by [DONE];
                expected ones (404 for a churned adapter that is unloaded, 429) are told apart
  disconnected  the soak hung up on purpose
  lost          accepted but never answered: a stream cut before [DONE], [DONE] before every choice
                finished, a missing choice, or no answer within --request-timeout
  refused       the connection itself failed (the server is not listening)
and `duplicated` counts anything delivered twice: a choice finished twice or continued after its
finish_reason, data after [DONE], a second usage chunk, a choice index twice, a response id seen before.

Writes OUT/report.json, OUT/rss.png (and OUT/server.log when it starts the server); exits 1 if
anything was lost or duplicated, an unexpected error (any 5xx among them) occurred, a connection was
refused, the server died, was not healthy and idle at the end, did not stop cleanly on SIGTERM or
logged an ERROR line or a traceback; 2 if the soak could not start. docs/reliability.md, "Soak",
tells how to read the report.

    python scripts/soak.py --duration 60 --clients 8 --out soak-out                 # tiny random model
    python scripts/soak.py --model default --out soak-out                             # SmolLM2-135M-Instruct
    python scripts/soak.py --server http://127.0.0.1:8000 --api-key K --server-pid PID \\
        --adapter-dir DIR_THE_SERVER_ALLOWS --out soak-out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
PROMPTS = ("Tell me about rivers.", "Write a haiku about rain.", "What is two plus two?", "List three colours.",
           "Explain LoRA in one sentence.", "Reverse: apple river stone", "Say hello.", "Count to five.")
MAX_SAMPLES = 20  # problems kept with their details in the report, per category


# --- outcomes -------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What happened to the requests; `samples` keeps the details of the first problems of each kind."""

    sent: int = 0
    completed: int = 0
    disconnected: int = 0
    refused: int = 0
    in_flight: int = 0
    choices: int = 0
    expected: Counter = field(default_factory=Counter)  # error kind -> count
    unexpected: Counter = field(default_factory=Counter)  # error kind -> count
    lost: Counter = field(default_factory=Counter)  # reason -> count
    duplicated: Counter = field(default_factory=Counter)  # reason -> count
    by_route: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=lambda: {"lost": [], "duplicated": [], "unexpected": []})
    response_ids: set = field(default_factory=set)

    def sample(self, category: str, request: dict, detail: str) -> None:
        if len(self.samples[category]) < MAX_SAMPLES:
            self.samples[category].append({**request, "detail": detail})

    def error(self, kind: str, expected: bool, request: dict, detail: str) -> None:
        if expected:
            self.expected[kind] += 1
        else:
            self.unexpected[kind] += 1
            self.sample("unexpected", request, f"{kind}: {detail}")

    def seen_id(self, response_id: str | None, request: dict) -> None:
        """A response id must be new (none is shared by two responses)."""
        if response_id is None:
            return
        if response_id in self.response_ids:
            self.duplicated["response id seen before"] += 1
            self.sample("duplicated", request, f"response id {response_id} seen before")
        self.response_ids.add(response_id)


def error_kind(status: int | str, error: dict | None) -> str:
    """'404 not_found_error/model_not_found'; `status` is 'stream' for an error event in a stream."""
    error = error or {}
    return f"{status} {error.get('type') or '-'}/{error.get('code') or '-'}"


def is_expected(status: int | str, error: dict | None, model: str, churned: set[str]) -> bool:
    """Errors that a correct server gives under churn: the model named is a churned adapter that is
    unloaded right now (404, or an error event saying so), or load shedding (429)."""
    error = error or {}
    if status == 429 or error.get("type") == "rate_limit_error":
        return True
    not_found = status == 404 or error.get("type") == "not_found_error"
    return not_found and error.get("code") == "model_not_found" and model in churned


class StreamCheck:
    """Checks a server-sent event stream of `choices` choices as its events arrive."""

    def __init__(self, choices: int, tally: Tally, request: dict) -> None:
        self.choices, self.tally, self.request = choices, tally, request
        self.finished: dict[int, str] = {}
        self.done = False
        self.error: dict | None = None
        self.usage_chunks = 0
        self.response_id: str | None = None
        self.events = 0

    def duplicate(self, reason: str, detail: str = "") -> None:
        self.tally.duplicated[reason] += 1
        self.tally.sample("duplicated", self.request, f"{reason} {detail}".strip())

    def feed(self, data: str) -> None:
        self.events += 1
        if self.done:
            self.duplicate("data after [DONE]", data[:200])
            return
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            self.error = event["error"]
            return
        if self.response_id is None:
            self.response_id = event.get("id")
            self.tally.seen_id(self.response_id, self.request)
        elif event.get("id") != self.response_id:
            self.duplicate("chunk of another response in the stream", f"{event.get('id')} != {self.response_id}")
        if event.get("usage") is not None:
            self.usage_chunks += 1
            if self.usage_chunks > 1:
                self.duplicate("second usage chunk")
        for choice in event.get("choices", []):
            index = choice.get("index")
            if index in self.finished:
                self.duplicate("choice continued after its finish_reason", f"index {index}")
            elif choice.get("finish_reason") is not None:
                self.finished[index] = choice["finish_reason"]

    def missing(self) -> list[int]:
        return [i for i in range(self.choices) if i not in self.finished]


# --- the soak -------------------------------------------------------------------------------------
@dataclass
class Soak:
    """Shared state of one soak run."""

    url: str
    headers: dict
    base_model: str
    stable: list[str]  # adapters loaded for the whole soak
    churned: set[str]  # adapters loaded and unloaded in a loop
    deadline: float
    request_timeout: float
    seed: int
    tally: Tally = field(default_factory=Tally)
    fine_tuned: list[str] = field(default_factory=list)  # models of jobs that succeeded: served too
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # the server died: stop early
    churn: Counter = field(default_factory=Counter)
    rss: list = field(default_factory=list)  # (seconds since start, RSS MiB, requests in flight, completed)
    started: float = field(default_factory=time.monotonic)

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.stop.is_set()

    def models(self) -> list[str]:
        return [self.base_model, *self.stable, *sorted(self.churned), *self.fine_tuned]


def make_request(rng: random.Random, soak: Soak) -> tuple[str, dict, int, int | None]:
    """(route, body, number of choices, events to read before hanging up or None) of a random request."""
    model = rng.choice(soak.models())
    n = rng.choice((1, 1, 2))
    stream = rng.random() < 0.6
    body: dict = {"model": model, "n": n, "stream": stream, "max_tokens": rng.randint(4, 24),
                  "temperature": rng.choice((0.0, 0.8)), "seed": rng.randint(0, 2**31), "ignore_eos": rng.random() < 0.5}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        route, prompts = "/v1/completions", rng.choice((1, 1, 1, 2))
        body["prompt"] = rng.choice(PROMPTS) if prompts == 1 else rng.sample(PROMPTS, 2)
    else:
        route, prompts = "/v1/chat/completions", 1
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    hang_up = rng.randint(0, 3) if stream and rng.random() < 0.15 else None
    return route, body, n * prompts, hang_up


async def one_request(client: httpx.AsyncClient, soak: Soak, route: str, body: dict, choices: int, hang_up: int | None) -> None:
    """Sends one request and files its outcome in the tally."""
    tally = soak.tally
    request = {"route": route, "model": body["model"], "stream": body["stream"], "n": body["n"], "choices": choices,
               "t": round(time.monotonic() - soak.started, 2)}
    tally.sent += 1
    tally.in_flight += 1
    tally.by_route[f"{route} stream={body['stream']}"] += 1
    try:
        if body["stream"]:
            await stream_request(client, soak, route, body, choices, hang_up, request)
        else:
            await plain_request(client, soak, route, body, choices, request)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # never accepted: not lost, but the server is not listening
        tally.refused += 1
        tally.sample("unexpected", request, f"connection refused: {e!r}")
    except httpx.TimeoutException:
        tally.lost[f"no answer within {soak.request_timeout:g} s"] += 1
        tally.sample("lost", request, "timeout")
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        tally.lost["connection dropped before the answer ended"] += 1
        tally.sample("lost", request, repr(e))
    except ValueError as e:  # not JSON where JSON was due
        tally.error("malformed answer", False, request, repr(e))
    finally:
        tally.in_flight -= 1


def answer_error(response: httpx.Response) -> dict | None:
    try:
        return response.json().get("error")
    except (json.JSONDecodeError, AttributeError):
        return None


async def plain_request(client: httpx.AsyncClient, soak: Soak, route: str, body: dict, choices: int, request: dict) -> None:
    tally = soak.tally
    response = await client.post(route, json=body)
    if response.status_code != 200:
        error = answer_error(response)
        tally.error(error_kind(response.status_code, error), is_expected(response.status_code, error, body["model"], soak.churned),
                    request, response.text[:300])
        return
    answer = response.json()
    tally.seen_id(answer.get("id"), request)
    indices = Counter(c.get("index") for c in answer.get("choices", []))
    for index, count in indices.items():
        if count > 1:
            tally.duplicated["choice index twice in an answer"] += count - 1
            tally.sample("duplicated", request, f"index {index} x{count}")
    missing = [i for i in range(choices) if i not in indices]
    if missing:
        tally.lost["choice missing from the answer"] += 1
        tally.sample("lost", request, f"missing choices {missing}")
        return
    finish(soak, request, [c.get("finish_reason") for c in answer["choices"]])


async def stream_request(client: httpx.AsyncClient, soak: Soak, route: str, body: dict, choices: int,
                         hang_up: int | None, request: dict) -> None:
    tally = soak.tally
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            error = answer_error(response)
            tally.error(error_kind(response.status_code, error), is_expected(response.status_code, error, body["model"], soak.churned),
                        request, response.text[:300])
            return
        check = StreamCheck(choices, tally, request)
        async for line in response.aiter_lines():
            if hang_up is not None and check.events >= hang_up:
                tally.disconnected += 1  # leaving the block closes the connection mid-stream
                return
            if line.startswith("data: "):
                check.feed(line[6:])
    if not check.done:
        tally.lost["stream ended without [DONE]"] += 1
        tally.sample("lost", request, f"{check.events} events, finished {check.finished}")
    elif check.error is not None:
        tally.error(error_kind("stream", check.error), is_expected("stream", check.error, body["model"], soak.churned),
                    request, json.dumps(check.error)[:300])
    elif check.missing():
        tally.lost["[DONE] before every choice finished"] += 1
        tally.sample("lost", request, f"choices {check.missing()} never finished")
    elif body.get("stream_options") and check.usage_chunks == 0:
        tally.error("stream usage chunk missing", False, request, "include_usage was asked for")
    else:
        finish(soak, request, list(check.finished.values()))


def finish(soak: Soak, request: dict, reasons: list) -> None:
    """A complete answer; a finish_reason other than stop/length (an engine abort) is an unexpected error."""
    odd = [r for r in reasons if r not in ("stop", "length")]
    if odd:
        soak.tally.error(f"finish_reason {odd[0]}", False, request, f"finish reasons {reasons}")
        return
    soak.tally.completed += 1
    soak.tally.choices += len(reasons)


async def client_loop(soak: Soak, number: int) -> None:
    """One client: a request at a time until the deadline."""
    rng = random.Random(soak.seed * 1000 + number)
    timeout = httpx.Timeout(soak.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=soak.url, headers=soak.headers, timeout=timeout) as client:
        while soak.running():
            before = soak.tally.refused
            await one_request(client, soak, *make_request(rng, soak))
            if soak.tally.refused > before:
                await asyncio.sleep(0.5)  # not listening: do not spin


async def churn_loop(soak: Soak, client: httpx.AsyncClient, paths: dict[str, Path]) -> None:
    """Loads and unloads the churned adapters, one call every ~0.3 s, until the deadline."""
    rng = random.Random(soak.seed)
    loaded = {name: False for name in paths}
    while soak.running():
        name = rng.choice(sorted(paths))
        action = "unload" if loaded[name] else "load"
        payload = {"lora_name": name} if loaded[name] else {"lora_name": name, "lora_path": str(paths[name])}
        try:
            response = await client.post(f"/v1/{action}_lora_adapter", json=payload)
        except httpx.HTTPError as e:
            soak.churn[f"{action} failed: {type(e).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        if response.status_code == 200:
            loaded[name] = action == "load"
            soak.churn[f"{action} ok"] += 1
        elif action == "unload" and response.status_code == 409:
            soak.churn["unload refused: in use (409)"] += 1
        else:
            error = answer_error(response)
            soak.churn[f"{action} {response.status_code}"] += 1
            soak.tally.error(f"{action}_lora_adapter {error_kind(response.status_code, error)}", False,
                             {"route": f"/v1/{action}_lora_adapter", "model": name}, response.text[:300])
        await asyncio.sleep(rng.uniform(0.1, 0.5))
    soak.churn["left loaded"] = sum(loaded.values())


async def run_jobs(soak: Soak, client: httpx.AsyncClient, steps: int, wait_after: float) -> list[dict]:
    """Uploads the shipped reverse-words data and runs two jobs: a short one (`steps` steps, with a
    validation file and evaluations) whose fine-tuned model then joins the clients' models, and a
    long one (checkpoints every few steps) that trains through the whole soak and is cancelled at
    its deadline. The short one is cancelled if still unfinished `wait_after` seconds past the
    deadline. Returns their final records with a short history."""
    from loramux.datasets import shipped

    async def upload(name: str) -> str:
        with shipped(f"reverse_words/{name}").open("rb") as f:
            response = await client.post("/v1/files", files={"file": (name, f.read())}, data={"purpose": "fine-tune"})
        response.raise_for_status()
        return response.json()["id"]

    jobs: list[dict] = []
    try:
        await follow_jobs(soak, client, jobs, await upload("train.jsonl"), await upload("val.jsonl"), steps, wait_after)
    except httpx.HTTPError as e:  # the server died, or refused a job: an unexpected error either way
        soak.tally.error(f"fine-tuning {type(e).__name__}", False, {"route": "/v1/fine_tuning/jobs"}, str(e)[:300])
    return jobs


async def follow_jobs(soak: Soak, client: httpx.AsyncClient, jobs: list[dict], train: str, val: str, steps: int,
                      wait_after: float) -> None:
    """Creates the two jobs (appended to `jobs`) and polls them every second until they are final."""
    specs = [  # (request, when the soak cancels it if unfinished)
        ({"suffix": "soak-short", "validation_file": val, "lora": {"r": 8, "alpha": 16},
          "training": {"max_steps": steps, "eval_every": max(steps // 2, 1)}}, soak.deadline + wait_after),
        ({"suffix": "soak-long", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
          "training": {"max_steps": 10**6, "checkpoint_every": max(steps // 3, 1)}}, soak.deadline),
    ]
    for spec, cutoff in specs:
        response = await client.post("/v1/fine_tuning/jobs", json={"model": soak.base_model, "training_file": train,
                                                                    "hyperparameters": {"n_epochs": 1, "batch_size": 4}, **spec})
        response.raise_for_status()
        jobs.append({"id": response.json()["id"], "suffix": spec["suffix"], "history": [], "cutoff": cutoff})
    while not soak.stop.is_set() and not all(j.get("status") in FINAL_JOB_STATES for j in jobs):
        for job in jobs:
            if job.get("status") in FINAL_JOB_STATES:
                continue
            record = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}")).raise_for_status().json()
            if record["status"] not in FINAL_JOB_STATES and time.monotonic() > job["cutoff"]:
                record = (await client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")).raise_for_status().json()
                job["cancelled_by_soak"] = record["status"] == "cancelled"
            if record["status"] != job.get("status"):
                job["history"].append([round(time.monotonic() - soak.started, 1), record["status"]])
            job.update(status=record["status"], fine_tuned_model=record["fine_tuned_model"], error=record["error"],
                       trained_tokens=record["trained_tokens"])
            if record["status"] == "succeeded":
                soak.fine_tuned.append(record["fine_tuned_model"])
        await asyncio.sleep(1)
    for job in jobs:  # the last step reached, from the newest events
        del job["cutoff"]
        events = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 50})).raise_for_status().json()["data"]
        job["last_step"] = max((e["data"].get("step", 0) for e in events if e.get("data")), default=0)


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


async def sample_rss(soak: Soak, pid: int | None, server: subprocess.Popen | None) -> None:
    """Every second: the server's RSS and the requests in flight; stops the soak if the server died."""
    while True:
        mib = rss_mib(pid) if pid else None
        soak.rss.append((round(time.monotonic() - soak.started, 1), mib, soak.tally.in_flight, soak.tally.completed))
        if (server is not None and server.poll() is not None) or (pid and mib is None):
            soak.stop.set()
            return
        await asyncio.sleep(1)


async def settle(client: httpx.AsyncClient, seconds: float = 15) -> dict:
    """Once traffic stops: the server's health and its request and KV gauges, polled until idle."""
    end, health, gauges = time.monotonic() + seconds, None, {}
    while True:
        try:
            health = (await client.get("/health")).status_code
            text = (await client.get("/metrics")).text
        except httpx.HTTPError as e:
            return {"health": repr(e)}
        gauges = {name: float(m.group(1)) for name in ("loramux_requests_running", "loramux_requests_waiting", "loramux_kv_blocks_used",
                                                       "loramux_adapters_resident")
                  if (m := re.search(rf"^{name} (\S+)$", text, re.M))}
        idle = all(gauges.get(k, 1) == 0 for k in ("loramux_requests_running", "loramux_requests_waiting", "loramux_kv_blocks_used"))
        if (health == 200 and idle) or time.monotonic() > end:
            return {"health": health, "idle": idle, **gauges}
        await asyncio.sleep(0.5)


# --- setup: model, adapters, server ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(model: str | None, work: Path) -> Path:
    """The HF directory of `--model`: None builds the tiny random Llama, 'default' is loramux's default model."""
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny-llama")
    from loramux.model.loader import resolve_model_dir

    return resolve_model_dir(None if model == "default" else model)[1]


def make_adapters(directory: Path, names: list[str], model: Path, seed: int) -> dict[str, Path]:
    """Random PEFT LoRA adapters shaped for the model in `model` (B random, so each changes the outputs)."""
    import torch

    from loramux.config import ModelConfig
    from loramux.lora.adapter import LoraAdapter, LoraConfig
    from loramux.lora.peft_io import save_peft_adapter

    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    paths = {}
    for i, name in enumerate(names):
        lora = LoraConfig(r=(4, 8)[i % 2], alpha=16, target_modules="all-linear" if i % 2 else ("q_proj", "v_proj"))
        adapter = LoraAdapter.create(name, lora, config, generator=torch.Generator().manual_seed(seed + i), init_b="random")
        paths[name] = save_peft_adapter(adapter, directory / name)
    return paths


def start_server(model: Path, work: Path, out: Path, key: str, adapters: Path, kv_cache_mb: int,
                 threads: int) -> tuple[subprocess.Popen, str]:
    """`loramux serve` on a free loopback port, logging to OUT/server.log; returns once /health answers.
    `threads` (OMP_NUM_THREADS; 0 keeps the environment's) sizes torch's thread team."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(out / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "loramux.cli", "serve", "--model", str(model), "--port", str(port),
                             "--data-dir", str(work / "data"), "--api-key", key, "--allow-adapter-dir", str(adapters),
                             "--kv-cache-mb", str(kv_cache_mb)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None)
    log.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"the server did not start; see {out / 'server.log'}")


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then SIGKILL after 30 s; returns the exit code (None if it had to be killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# --- the run --------------------------------------------------------------------------------------
async def soak_server(args, url: str, headers: dict, pid: int | None, server: subprocess.Popen | None,
                      adapter_dir: Path | None, model: Path) -> dict:
    """Runs the soak against the server at `url`; returns the report (without the verdict)."""
    control = httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(60, connect=10))
    try:
        models = (await control.get("/v1/models")).raise_for_status().json()["data"]
        base = next(m["id"] for m in models if m.get("parent") is None)
        tag = uuid.uuid4().hex[:6]
        stable = [f"soak-{tag}-stable{i}" for i in range(2)]
        churned = [f"soak-{tag}-churn{i}" for i in range(3)]
        paths = make_adapters(adapter_dir, stable + churned, model, args.seed) if adapter_dir else {}
        for name in stable if paths else ():
            (await control.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(paths[name])})).raise_for_status()
        soak = Soak(url=url, headers=headers, base_model=base, stable=stable if paths else [], churned=set(churned) if paths else set(),
                    deadline=time.monotonic() + args.duration, request_timeout=args.request_timeout, seed=args.seed)
        sampler = asyncio.create_task(sample_rss(soak, pid, server))
        jobs = asyncio.create_task(run_jobs(soak, control, args.job_steps, args.job_wait))
        clients = [asyncio.create_task(client_loop(soak, i)) for i in range(args.clients)]
        if paths:
            await churn_loop(soak, control, {n: paths[n] for n in churned})
        # past the deadline the clients send nothing new; each waits for its last answer (bounded by its timeout)
        _, pending = await asyncio.wait(clients, timeout=max(soak.deadline - time.monotonic(), 0) + args.request_timeout + 15)
        for task in pending:
            task.cancel()
            soak.tally.lost["still in flight after the drain"] += 1
        await asyncio.gather(*pending, return_exceptions=True)
        for task in clients:
            if task.done() and not task.cancelled() and task.exception() is not None:
                soak.tally.error("soak client crashed", False, {"route": "-"}, repr(task.exception()))
        drained_at = round(time.monotonic() - soak.started, 1)
        job_records = await jobs
        end = await settle(control)
        sampler.cancel()
        soak.rss.append((round(time.monotonic() - soak.started, 1), rss_mib(pid) if pid else None, soak.tally.in_flight,
                         soak.tally.completed))  # as of the end of the drain
        for name in [*stable, *churned] if paths else ():  # the soak's own adapters leave the catalog (models of jobs stay)
            try:
                await control.post("/v1/unload_lora_adapter", json={"lora_name": name})
            except httpx.HTTPError:
                break  # the server is gone: the verdict says so
    finally:
        await control.aclose()
    t = soak.tally
    return {
        "server": {"url": url, "pid": pid, "model": base, "health_at_end": end.get("health"), "idle_at_end": end.get("idle"),
                   "gauges_at_end": {k: v for k, v in end.items() if k.startswith("loramux_")}, "died": soak.stop.is_set()},
        "duration_s": args.duration, "drained_at_s": drained_at, "clients": args.clients,
        "requests": {"sent": t.sent, "completed": t.completed, "choices_completed": t.choices, "errors": t.expected.total() + t.unexpected.total(),
                     "errors_expected": t.expected.total(), "errors_unexpected": t.unexpected.total(), "disconnected": t.disconnected, "refused": t.refused,
                     "lost": sum(t.lost.values()), "duplicated": sum(t.duplicated.values())},
        "by_route": dict(t.by_route), "errors": {k: {"expected": t.expected[k], "unexpected": t.unexpected[k]} for k in sorted(t.expected | t.unexpected)},
        "lost": dict(t.lost), "duplicated": dict(t.duplicated), "samples": t.samples,
        "churn": dict(soak.churn), "adapters": {"stable": soak.stable, "churned": sorted(soak.churned), "fine_tuned": soak.fine_tuned},
        "jobs": job_records, "rss": rss_summary(soak.rss), "rss_samples": soak.rss,
    }


def rss_summary(samples: list) -> dict:
    """Start, end and peak RSS, and the growth over the second half (a leak keeps growing there;
    the KV pool's pages and allocator caches settle in the first)."""
    mib = [m for _, m, _, _ in samples if m is not None]
    if not mib:
        return {}
    half = mib[len(mib) // 2:]
    return {"start_mib": round(mib[0], 1), "end_mib": round(mib[-1], 1), "peak_mib": round(max(mib), 1),
            "second_half_growth_mib": round(half[-1] - half[0], 1), "samples": len(mib)}


def verdict(report: dict, log: Path | None) -> list[str]:
    """The reasons the soak failed (empty: it passed)."""
    r, failures = report["requests"], []
    if r["lost"]:
        failures.append(f"{r['lost']} request(s) lost")
    if r["duplicated"]:
        failures.append(f"{r['duplicated']} duplicate(s) delivered")
    if r["errors_unexpected"]:
        failures.append(f"{r['errors_unexpected']} unexpected error(s): " + ", ".join(k for k, e in report["errors"].items() if e["unexpected"]))
    if r["refused"]:
        failures.append(f"{r['refused']} connection(s) refused")
    server = report["server"]
    if server["died"]:
        failures.append("the server died during the soak")
    elif "exit_code" in server and server["exit_code"] != 0:
        failures.append(f"the server did not stop cleanly on SIGTERM (exit code {server['exit_code']}; None: killed after 30 s)")
    elif server["health_at_end"] != 200:
        failures.append(f"/health at the end: {server['health_at_end']}")
    elif not server["idle_at_end"]:
        failures.append(f"not idle after the drain: {server['gauges_at_end']}")
    if log is not None and log.is_file():
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if " ERROR " in line or line.startswith(("ERROR", "Traceback"))]
        server["log_errors"] = errors[:MAX_SAMPLES]
        if errors:
            failures.append(f"{len(errors)} error line(s) in {log}")
    return failures


def plot(report: dict, path: Path) -> None:
    """RSS over time, with requests in flight and completed, the deadline and the jobs' final moments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["rss_samples"]
    t = [s[0] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(2, 1))
    top.plot(t, [s[1] for s in samples], color="tab:blue")
    top.set_ylabel("server RSS (MiB)")
    top.set_title(f"loramux soak: {report['clients']} clients, {report['requests']['completed']} completed, "
                  f"{report['requests']['lost']} lost, {report['requests']['duplicated']} duplicated")
    bottom.plot(t, [s[2] for s in samples], color="tab:orange", label="in flight")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("seconds")
    done = bottom.twinx()
    done.plot(t, [s[3] for s in samples], color="tab:green", label="completed (cumulative)")
    done.set_ylabel("completed")
    for ax in (top, bottom):
        ax.axvline(report["duration_s"], color="grey", linestyle="--", linewidth=1, label="new requests stop")
        for k, job in enumerate(j for j in report["jobs"] if j["history"]):
            ax.axvline(job["history"][-1][0], color="tab:red", linestyle=":", linewidth=1, label=None if k else "a job's last status change")
    top.legend(loc="lower right", fontsize=8)
    bottom.legend(handles=bottom.get_lines()[:1] + done.get_lines(), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(report: dict) -> str:
    r, rss = report["requests"], report["rss"]
    lines = [f"requests: {r['sent']} sent, {r['completed']} completed ({r['choices_completed']} choices), "
             f"{r['errors']} errors ({r['errors_expected']} expected), {r['disconnected']} disconnected on purpose, "
             f"{r['refused']} refused, {r['lost']} lost, {r['duplicated']} duplicated"]
    lines += [f"  error {kind}: {e['expected'] + e['unexpected']}" + (f", {e['unexpected']} UNEXPECTED" if e["unexpected"] else "")
              for kind, e in report["errors"].items()]
    lines += [f"  lost: {reason}: {n}" for reason, n in report["lost"].items()]
    lines += [f"  duplicated: {reason}: {n}" for reason, n in report["duplicated"].items()]
    lines.append("churn: " + ", ".join(f"{k} {v}" for k, v in report["churn"].items()))
    lines += [f"job {j['id']} ({j['suffix']}): {j.get('status')}{' by the soak' if j.get('cancelled_by_soak') else ''} "
              f"(step {j.get('last_step')}, {j.get('trained_tokens')} tokens)" for j in report["jobs"]]
    if rss:
        lines.append(f"server RSS: {rss['start_mib']} -> {rss['end_mib']} MiB, peak {rss['peak_mib']}, "
                     f"second-half growth {rss['second_half_growth_mib']} MiB")
    s = report["server"]
    lines.append(f"server at the end: health {s['health_at_end']}, idle {s['idle_at_end']}, {s['gauges_at_end']}")
    lines.append("PASS" if not report["failures"] else "FAIL: " + "; ".join(report["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60, help="seconds of traffic (then the drain)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--out", required=True, help="directory for report.json, rss.png and server.log")
    p.add_argument("--model", default=None, help="model to serve: an HF directory or .gguf, 'default' for SmolLM2-135M-Instruct "
                   "(default: a tiny random Llama built here); with --server, the server's model, to shape adapters (default: 'default')")
    p.add_argument("--server", default=None, metavar="URL", help="soak this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("LORAMUX_API_KEY"), help="its API key (env LORAMUX_API_KEY)")
    p.add_argument("--server-pid", type=int, default=None, help="its process id, for RSS (with --server)")
    p.add_argument("--adapter-dir", default=None, help="with --server: a directory the server allows adapters from "
                   "(--allow-adapter-dir), where the soak writes its adapters; without it, no adapter churn")
    p.add_argument("--job-steps", type=int, default=30, help="max_steps of the short fine-tuning job (the long one "
                   "trains until the end of the traffic, with a checkpoint every job-steps/3 steps)")
    p.add_argument("--job-wait", type=float, default=120, help="seconds past --duration the short job may take before it is cancelled")
    p.add_argument("--request-timeout", type=float, default=120, help="a request with no answer after this is lost")
    p.add_argument("--kv-cache-mb", type=int, default=64, help="KV cache of the server the soak starts")
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads of the server the soak starts (0: as the environment says). One, because on a "
                   "busy machine a team of OpenMP threads waiting for each other at every op made steps ~10x slower, "
                   "and a soak wants many requests, not the best speed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loramux-soak-") as tmp:
        work, server, log = Path(tmp), None, None
        try:
            if args.server:
                url, pid, key = args.server.rstrip("/"), args.server_pid, args.api_key
                adapter_dir = Path(args.adapter_dir) if args.adapter_dir else None
                model = model_dir(args.model or "default", work) if adapter_dir else None
            else:
                model = model_dir(args.model, work)
                adapter_dir, key, log = work / "adapters", f"soak-{uuid.uuid4().hex}", out / "server.log"
                adapter_dir.mkdir()
                server, url = start_server(model, work, out, key, adapter_dir, args.kv_cache_mb, args.server_threads)
                pid = server.pid
        except (RuntimeError, OSError, ValueError) as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            report = asyncio.run(soak_server(args, url, headers, pid, server, adapter_dir, model))
        except httpx.HTTPError as e:  # only the setup calls raise (listing models, loading the stable adapters)
            print(f"soak: could not set up against {url}: {e}", file=sys.stderr)
            return 2
        finally:
            exit_code = stop_server(server) if server is not None else None
        if server is not None:
            report["server"]["exit_code"] = exit_code
    report["failures"] = verdict(report, log)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "rss.png")
    print(summary(report))
    print(f"report: {out / 'report.json'}  plot: {out / 'rss.png'}" + (f"  server log: {log}" if log else ""))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
