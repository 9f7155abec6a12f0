"""A small HTTP client of a running `loramux serve`, for the CLI's --server commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import httpx


FINAL_STATUSES = ("succeeded", "failed", "cancelled")  # of a fine-tuning job

class ServerError(ValueError):
    """The server answered with an error; the message is the server's."""


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, f"{self.base}{path}", **kwargs)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.base}: {e}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ServerError(f"server said {response.status_code}: {message}")
        return response.json()

    def models(self) -> list[dict]:
        return self._call("GET", "/models")["data"]

    def load_adapter(self, name: str, path: str) -> dict:
        return self._call("POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": str(Path(path).resolve())})

    def unload_adapter(self, name: str) -> dict:
        return self._call("POST", "/unload_lora_adapter", json={"lora_name": name})

    def upload(self, path: str) -> dict:
        """Uploads a local fine-tuning file; a file that cannot be read is refused before any request."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        with f:
            return self._call("POST", "/files", files={"file": (Path(path).name, f)}, data={"purpose": "fine-tune"})

    def create_job(self, body: dict) -> dict:
        return self._call("POST", "/fine_tuning/jobs", json=body)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/fine_tuning/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/fine_tuning/jobs/{job_id}/cancel")

    def follow(self, job_id: str, poll: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> Iterator[tuple[dict, list[dict]]]:
        """Yields (job, new events oldest first) until the job is finished."""
        seen: set[str] = set()
        while True:
            job = self.job(job_id)
            events = self._call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})["data"]
            new = [e for e in reversed(events) if e["id"] not in seen]
            seen.update(e["id"] for e in new)
            yield job, new
            if job["status"] in FINAL_STATUSES:
                return
            sleep(poll)
