"""Drive an OpenAI-compatible server (loramux's or vLLM's) with an open-loop arrival schedule, and
start and watch `loramux serve` and its fine-tuning jobs.

Each request is a streaming call, greedy, `ignore_eos`, sent at its arrival time from one asyncio
loop: `/v1/completions` with token-id prompts, or `/v1/chat/completions` with the prompt as one
user message (as chat users send it; the server adds its chat template). The client stamps the
first streamed chunk that carries generated text, and the end. The prompt and output token counts
come from the stream's final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx

from loramux.bench.machine import stop_session
from loramux.bench.options import BenchOptions, loramux_command
from loramux.bench.records import RequestRecord
from loramux.bench.workload import BenchRequest
from loramux.client import FINAL_STATUSES, Client



def free_port() -> int:
    """A TCP port free on localhost now, for a server this run starts (two runs at once never clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(r: BenchRequest, model: str, chat: Callable[[list[int]], str] | None) -> tuple[str, dict]:
    """The route and body of a request: token ids to /v1/completions, or with `chat` (token ids ->
    text) one user message to /v1/chat/completions."""
    body = {"model": model, "max_tokens": r.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat is None:
        return "/v1/completions", body | {"prompt": r.prompt_ids}
    return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": chat(r.prompt_ids)}]}


def _has_text(choice: dict) -> bool:
    """Whether a streamed choice carries generated text (a chat stream opens with an empty delta)."""
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def _one(client: httpx.AsyncClient, r: BenchRequest, call: tuple[str, dict], start: float,
               record: RequestRecord) -> None:
    await asyncio.sleep(max(r.arrival - (time.perf_counter() - start), 0.0))
    route, body = call
    try:
        async with client.stream("POST", route, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if record.first_token is None and any(_has_text(c) for c in chunk.get("choices") or ()):
                    record.first_token = time.perf_counter() - start
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.output_tokens = chunk["usage"]["completion_tokens"]
        record.finished = time.perf_counter() - start
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"


async def _run(base_url: str, requests: list[BenchRequest], calls: list[tuple[str, dict]]) -> list[RequestRecord]:
    records = [RequestRecord.of(r) for r in requests]
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, r, call, start, rec) for r, call, rec in zip(requests, calls, records)))
    return records


def run_http(base_url: str, requests: list[BenchRequest], models: dict[str | None, str],
             chat: Callable[[list[int]], str] | None = None) -> list[RequestRecord]:
    """models maps each request's adapter (None: the base model) to the server's model name. With
    `chat` (token ids -> text, e.g. the tokenizer's decode), requests are chat completions whose
    user message is the prompt's text. Bodies are made before the first arrival."""
    calls = [_call(r, models[r.adapter], chat) for r in requests]
    return asyncio.run(_run(base_url, requests, calls))


@contextmanager
def server_process(command: list[str], base_url: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 600.0) -> Iterator[subprocess.Popen]:
    """Starts a server, waits until GET /v1/models answers, and stops it (SIGTERM, then SIGKILL)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(f"{base_url}/v1/models", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer within {timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield proc
        finally:
            stop_session(proc, lambda: _stop(proc))


@contextmanager
def loramux_server(o: BenchOptions, adapter_dirs: dict[str, Path], data_dir: Path, log_path: Path,
                   allow_adapter_dir: Path | None = None) -> Iterator[str]:
    """Runs `loramux serve` with the run's model, dtype and resident limit (`max_adapters`), its
    default settings otherwise, the given adapters (`--adapter`) and, with `allow_adapter_dir`,
    adapters of that directory loadable over the API, on a free port; yields its URL and stops it
    at the end."""
    port = free_port()
    cmd = loramux_command() + ["serve", "--port", str(port), "--dtype", o.dtype, "--data-dir", str(data_dir),
                               "--max-adapters", str(o.max_adapters)]
    if o.model:
        cmd += ["--model", o.model]
    for name, path in adapter_dirs.items():
        cmd += ["--adapter", f"{name}={path}"]
    if allow_adapter_dir is not None:
        cmd += ["--allow-adapter-dir", str(allow_adapter_dir)]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, url, log_path):
        yield url


def served_models(url: str, adapters) -> dict[str | None, str]:
    """run_http's `models` for a loramux server: None -> its base model's id (the first entry of
    /v1/models that is not an adapter), each adapter name -> itself."""
    data = httpx.get(f"{url}/v1/models").json()["data"]
    return {None: next((m["id"] for m in data if not m.get("parent")), data[0]["id"])} | {n: n for n in adapters}


class JobProgress:
    """Watches a server's fine-tuning job from a thread while a `with` block runs. `progress` holds
    (seconds since the block started, trained tokens) each time the job's `trained_tokens` changed:
    the server updates it once per optimizer step, so these are the steps' ends, seen within
    `interval` seconds. A job that ends meanwhile (it should train throughout) fails the block."""

    def __init__(self, client: Client, job_id: str, interval: float = 0.2) -> None:
        self.client, self.job_id, self.interval = client, job_id, interval
        self.progress: list[tuple[float, int]] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-job-progress", daemon=True)

    def __enter__(self) -> "JobProgress":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def wait(self, seconds: float, steps: int = 2) -> None:
        """Blocks until `seconds` have passed since the first step end seen and at least `steps`
        step ends were seen (so a rate can be taken), or the watch failed."""
        while True:
            if self.error is not None:
                raise self.error
            p = self.progress
            if len(p) >= steps and p[-1][0] - p[0][0] >= seconds:
                return
            time.sleep(self.interval)

    def _watch(self) -> None:
        last = None
        try:
            while not self._stop.wait(self.interval):
                job = self.client.job(self.job_id)
                if job["status"] in FINAL_STATUSES:
                    raise RuntimeError(f"the fine-tuning job {self.job_id} ended ({job['status']}: {job.get('error')}) "
                                       "while it was being measured")
                tokens = job["trained_tokens"] or 0
                if last is not None and tokens != last:
                    self.progress.append((time.perf_counter() - self._start, tokens))
                last = tokens
        except Exception as e:  # handed to the measuring thread by wait() and __exit__
            self.error = e
            self._stop.set()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
