"""What the route modules share: the server's settings and parts, one `Context` per app, handed to
handlers as a FastAPI dependency (`ctx: Ctx`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from loramux.engine.engine import Engine
from loramux.server.engine_loop import EngineLoop
from loramux.server.jobs import JobService
from loramux.server.metrics import Metrics
from loramux.server.resident import ResidentAdapters
from loramux.server.store import Store


class Settings:
    def __init__(self, *, api_key: str | None = None, allowed_adapter_dirs: tuple[str, ...] = (),
                 max_body_bytes: int = 16 * 2**20, max_upload_bytes: int = 64 * 2**20, max_resident_adapters: int = 0) -> None:
        self.api_key = api_key
        self.max_resident_adapters = max_resident_adapters  # 0: no limit
        self.allowed_adapter_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_adapter_dirs)
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes


@dataclass(frozen=True)
class Context:
    """The engine is only read here (its name, tokenizer, config); anything else goes through `loop`."""

    engine: Engine
    store: Store
    settings: Settings
    metrics: Metrics
    jobs: JobService
    resident: ResidentAdapters
    loop: EngineLoop


def get_context(request: Request) -> Context:
    return request.app.state.context


Ctx = Annotated[Context, Depends(get_context)]
