"""`loramux serve` in a subprocess on a free loopback port, and a tiny model to serve fast.

Shared by the tests that drive the HTTP server over real HTTP (test_server.py on the default model;
test_server_api.py and test_fuzz_api.py on the tiny one).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from tiny_model import build_tiny_model  # noqa: E402  (one builder, shared with scripts/soak.py)


KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`loramux serve` in a subprocess on a free loopback port; its output goes to a log file
    beside the data directory."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None) -> None:
        self.data_dir, self.args = data_dir, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loramux.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir), *args],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def tiny_model_dir(target: Path, chat_template: str | None = None) -> Path:
    """scripts/tiny_model.py's tiny random Llama (the default model's vocabulary and tokenizer) in
    `target`, so that `serve --model target` loads in a second and generates fast; `chat_template`
    replaces the default model's template. The served model's name is the directory's name."""
    build_tiny_model(target)
    if chat_template is not None:
        (target / "chat_template.jinja").write_text(chat_template)
    return target
