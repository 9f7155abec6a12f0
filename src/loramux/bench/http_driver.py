"""Drive an OpenAI-compatible server (loramux's or vLLM's) with an open-loop arrival schedule.

Each request is a streaming `/v1/completions` call with token-id prompts, greedy, `ignore_eos`, sent
at its arrival time from one asyncio loop; the client stamps the first streamed chunk and the end.
The output token count comes from the stream's final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from loramux.bench.machine import stop_session
from loramux.bench.records import RequestRecord
from loramux.bench.workload import BenchRequest


async def _one(client: httpx.AsyncClient, r: BenchRequest, model: str, start: float, record: RequestRecord) -> None:
    await asyncio.sleep(max(r.arrival - (time.perf_counter() - start), 0.0))
    body = {"model": model, "prompt": r.prompt_ids, "max_tokens": r.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and record.first_token is None:
                    record.first_token = time.perf_counter() - start
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
        record.finished = time.perf_counter() - start
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"


async def _run(base_url: str, requests: list[BenchRequest], models: dict[str | None, str]) -> list[RequestRecord]:
    records = [RequestRecord.of(r) for r in requests]
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, r, models[r.adapter], start, rec) for r, rec in zip(requests, records)))
    return records


def run_http(base_url: str, requests: list[BenchRequest], models: dict[str | None, str]) -> list[RequestRecord]:
    """models maps each request's adapter (None: the base model) to the server's model name."""
    return asyncio.run(_run(base_url, requests, models))


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


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
