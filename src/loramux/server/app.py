"""The OpenAI-compatible HTTP server: the app, its error handling and authentication; the routes
are in `routes/`, one module per resource.

One process: FastAPI handlers on an event loop in one thread, the engine's loop (`EngineLoop`) in
another, `serve` puts them on their threads. Handlers never touch the engine directly; they hand it
calls that run between two steps.

Every error, whoever raises it (a handler, request validation, Starlette's router for an unknown
route or a wrong method, the body limit, an unexpected exception), is answered in OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from loramux.engine.engine import Engine
from loramux.server.engine_loop import EngineLoop
from loramux.server.jobs import JobService
from loramux.server.metrics import Metrics
from loramux.server.middleware import LimitsAndLogs
from loramux.server.protocol import STREAM_CHUNKS, APIError, error_responses
from loramux.server.resident import ResidentAdapters
from loramux.server.routes import adapters, completions, console, files, fine_tuning, health, models, stats, tokenize
from loramux.server.routes.context import Context, Settings, model_names
from loramux.server.store import Store
from loramux.server.telemetry import Telemetry

log = logging.getLogger("loramux.server")


def create_app(engine: Engine, store: Store, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics(model_names(settings, engine)[0], settings.max_resident_adapters)
    jobs = JobService(engine, store, metrics)
    resident = ResidentAdapters(engine, store, metrics, settings.max_resident_adapters)
    telemetry = Telemetry(engine.config.scheduler.default_slo)
    loop = EngineLoop(engine, on_step=lambda e: (jobs.sync(), metrics.observe_engine(e), telemetry.observe_step(e)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # recovery is the engine loop's first call (it runs on the main thread, see process.serve)
        await loop.call(lambda engine: (jobs.recover(), resident.preload(), resident.make_room(0)))
        yield
        loop.stop()
        store.close()

    app = FastAPI(title="loramux", lifespan=lifespan)
    app.state.loop = loop
    app.state.context = Context(engine, store, settings, metrics, jobs, resident, loop, telemetry)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(LimitsAndLogs, max_body_bytes=settings.max_body_bytes)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=error_responses(400, 401, 404, 413, 500))
    for module in (models, completions, files, fine_tuning, adapters, stats):
        v1.include_router(module.router)
    app.include_router(health.router)
    app.include_router(v1)
    app.include_router(tokenize.router, dependencies=v1.dependencies, responses=v1.responses)  # vLLM's, beside /v1
    console.mount(app)
    app.openapi = lambda: openapi_schema(app)
    return app


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's OpenAPI schema, less the 422 responses it declares for every route with
    parameters (invalid requests get 400 here, `validation_error`), plus the streams' event models
    (protocol.event_stream refers to them)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, chunks = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS], ref_template="#/components/schemas/{model}")
        components.update(chunks["$defs"])
    return app.openapi_schema


def authorize(request: Request) -> None:
    check_api_key(request, request.app.state.context.settings.api_key)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (anything passes without a key)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "missing or invalid API key (expected Authorization: Bearer KEY)", code="invalid_api_key")


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the first invalid parameter (dotted, e.g. "hyperparameters.n_epochs"), with
    every complaint pydantic has about it (one per member of a union, e.g. a number or "auto")."""
    errors = exc.errors()
    if not errors:
        return JSONResponse(APIError(400, "invalid request").body(), status_code=400)
    if errors[0]["type"] == "json_invalid":
        where = errors[0]["loc"][-1]
        message = f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])} (character {where})"
        return JSONResponse(APIError(400, message).body(), status_code=400)
    params = [_param(error, exc.body) for error in errors]
    first = params[0] or ""
    messages = dict.fromkeys(e["msg"] for e, p in zip(errors, params) if (p or "") == first or (p or "").startswith(f"{first}."))
    message = f"{params[0] or 'body'}: {'; '.join(messages)}"
    return JSONResponse(APIError(400, message, params[0]).body(), status_code=400)


def _param(error: dict, body: Any) -> str | None:
    """The dotted path of an invalid parameter: the error's location less its source ("body",
    "query", "path") and less pydantic's names of union members ("int", "list[str]", ...), which
    are told apart from fields by walking the body along the location."""
    source, *loc = error["loc"]
    if source != "body":
        return ".".join(map(str, loc)) or None
    path, value = [], body
    for i, part in enumerate(loc):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, Sequence) and not isinstance(value, str) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (error["type"] == "missing" and i == len(loc) - 1):
            continue  # a union member's name: the value stays where it is
        path.append(str(part))
    return ".".join(path) or None


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors: an unknown route (404), a wrong method (405), a malformed form (400)."""
    route = f"({request.method} {request.url.path})"
    message = {404: f"Invalid URL {route}", 405: f"Invalid method for URL {route}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(APIError(500, "internal server error").body(), status_code=500)
