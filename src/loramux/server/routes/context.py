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
from loramux.server.tool_parsers import DEFAULT_TOOL_PARSER
from loramux.server.telemetry import Telemetry


class Settings:
    def __init__(self, *, api_key: str | None = None, allowed_adapter_dirs: tuple[str, ...] = (),
                 max_body_bytes: int = 16 * 2**20, max_upload_bytes: int = 64 * 2**20, max_resident_adapters: int = 0,
                 served_model_names: tuple[str, ...] = (), tool_call_parser: str = DEFAULT_TOOL_PARSER) -> None:
        self.api_key = api_key
        self.tool_call_parser = tool_call_parser  # --tool-call-parser: a name in TOOL_PARSERS
        self.served_model_names = served_model_names  # --served-model-name: the base model's id, then aliases
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
    telemetry: Telemetry

    @property
    def model_names(self) -> tuple[str, ...]:
        return model_names(self.settings, self.engine)

    @property
    def base_id(self) -> str:
        """The base model's id everywhere: /v1/models, fine-tuning jobs, adapter cards' parent."""
        return self.model_names[0]


def model_names(settings: Settings, engine: Engine) -> tuple[str, ...]:
    """The names requests may give the base model: its id first (the first --served-model-name,
    else the loaded model's name), then aliases."""
    return settings.served_model_names or (engine.model_name,)


def get_context(request: Request) -> Context:
    return request.app.state.context


Ctx = Annotated[Context, Depends(get_context)]
