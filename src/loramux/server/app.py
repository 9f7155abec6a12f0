"""The OpenAI-compatible HTTP server: inference, files, fine-tuning jobs, adapters, health, metrics.

One process: FastAPI handlers on an event loop in one thread, the engine's loop (`EngineLoop`) in
another, `serve` puts them on their threads. Handlers never touch the engine directly; they hand it
calls that run between two steps.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loramux.engine.engine import Engine
from loramux.engine.requests import RequestOutput
from loramux.engine.scheduler import QueueFullError
from loramux.lora.adapter import AdapterError
from loramux.server.engine_loop import EngineLoop
from loramux.server.jobs import JobService
from loramux.server.metrics import Metrics
from loramux.server.middleware import LimitsAndLogs
from loramux.server.resident import ResidentAdapters
from loramux.server.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, FineTuningJobRequest, LoadAdapterRequest, SamplingFields,
    UnloadAdapterRequest,
)
from loramux.server.store import Store
from loramux.training.data import DataError, parse_jsonl

log = logging.getLogger("loramux.server")
DEFAULT_MAX_TOKENS = 16


class Settings:
    def __init__(self, *, api_key: str | None = None, allowed_adapter_dirs: tuple[str, ...] = (),
                 max_body_bytes: int = 16 * 2**20, max_upload_bytes: int = 64 * 2**20, max_resident_adapters: int = 0) -> None:
        self.api_key = api_key
        self.max_resident_adapters = max_resident_adapters  # 0: no limit
        self.allowed_adapter_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_adapter_dirs)
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes


def create_app(engine: Engine, store: Store, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    jobs = JobService(engine, store, metrics)
    resident = ResidentAdapters(engine, store, settings.max_resident_adapters)
    loop = EngineLoop(engine, on_step=lambda e: (jobs.sync(), metrics.observe_engine(e)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # recovery is the engine loop's first call (it runs on the main thread, see process.serve)
        await loop.call(lambda engine: (jobs.recover(), resident.make_room(0)))
        yield
        loop.stop()
        store.close()

    app = FastAPI(title="loramux", lifespan=lifespan)
    app.state.loop, app.state.jobs, app.state.metrics = loop, jobs, metrics

    # --- errors, limits, logs -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    app.add_middleware(LimitsAndLogs, max_body_bytes=settings.max_body_bytes)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key (expected Authorization: Bearer KEY)", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    # --- health and metrics ---------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        await loop.call(metrics.observe_engine)  # gauges as of now, not as of the last step
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    # --- models ---------------------------------------------------------------------------------
    @v1.get("/models")
    async def list_models():
        loaded = set(await loop.call(lambda e: e.adapters.names()))
        base = engine.model_name
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "loramux", "root": base, "parent": None, "resident": True}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "loramux", "root": base, "parent": base,
                  "resident": n in loaded} for n in sorted(loaded | set(store.adapters()))]
        return {"object": "list", "data": data}

    async def reserve(model: str) -> str | None:
        """The adapter a request names (None: the base model), made resident and held until released."""
        if model == engine.model_name:
            return None
        if not resident.known(model):
            raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        await resident.reserve(model, loop)
        return model

    # --- inference ------------------------------------------------------------------------------
    async def start(body: SamplingFields, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
                    q: asyncio.Queue) -> list[tuple[str, int]]:
        """Adds n requests per prompt; returns (request id, prompt index) per choice, in choice order."""
        slo = body.slo_for(engine.config.scheduler.default_slo)
        adapter = await reserve(body.model)
        try:
            return await add_choices(body, prompts, max_tokens, logprobs, q, adapter, slo)
        finally:
            if adapter is not None:
                loop.submit(lambda e: resident.release(adapter))

    async def add_choices(body, prompts, max_tokens, logprobs, q, adapter, slo) -> list[tuple[str, int]]:
        choices = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                rid = f"req-{uuid.uuid4().hex}"
                params = body.sampling(len(choices), max_tokens, logprobs)
                loop.listen(rid, q)
                choices.append((rid, p))
                try:
                    await loop.call(lambda e, ids=ids, params=params, rid=rid: e.add_request(ids, adapter, params, slo=slo, request_id=rid))
                except BaseException as exc:
                    for r, _ in choices[:-1]:
                        loop.submit(lambda e, r=r: e.abort(r))
                    for r, _ in choices:
                        loop.forget(r)
                    raise engine_error(exc) from None
        return choices

    async def collect(q: asyncio.Queue, choices: list[tuple[str, int]]) -> dict[str, list[RequestOutput]]:
        outs: dict[str, list[RequestOutput]] = {rid: [] for rid, _ in choices}
        remaining = len(choices)
        try:
            while remaining:
                out = await q.get()
                outs[out.request_id].append(out)
                remaining -= out.finished
        finally:
            finish(choices, outs)
        return outs

    def finish(choices: list[tuple[str, int]], outs: dict[str, list[RequestOutput]]) -> None:
        """Forgets the choices' listeners; aborts those that did not finish (a client went away)."""
        for rid, _ in choices:
            loop.forget(rid)
            if not (outs[rid] and outs[rid][-1].finished):
                loop.submit(lambda e, rid=rid: e.abort(rid))

    def usage(prompts: list[list[int]], outs: dict[str, list[RequestOutput]]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(o.new_token_ids) for seq in outs.values() for o in seq)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id])

    def record(model: str, outs: dict[str, list[RequestOutput]], prompts: list[list[int]], status: str) -> None:
        metrics.record_requests(model, status, prompts, outs)

    async def stream(request: Request, body: SamplingFields, q: asyncio.Queue, choices: list[tuple[str, int]],
                     prompts: list[list[int]], head: dict, chunk, opening: list[dict] | None = None) -> AsyncIterator[str]:
        """Server-sent events of the choices' outputs: `chunk(index, output)` shapes each one; an
        optional opening chunk; a usage chunk if asked for; then [DONE]. A client that goes away has
        its requests aborted."""
        outs: dict[str, list[RequestOutput]] = {rid: [] for rid, _ in choices}
        index = {rid: i for i, (rid, _) in enumerate(choices)}
        remaining = len(choices)
        try:
            if opening:
                yield sse({**head, "choices": opening})
            while remaining:
                out = await next_output(q, request)
                if out is None:
                    return  # the client went away: `finish` aborts what is left
                outs[out.request_id].append(out)
                remaining -= out.finished
                if out.new_text or out.finished:
                    yield sse({**head, "choices": [chunk(index[out.request_id], out)]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompts, outs)})
            yield "data: [DONE]\n\n"
        finally:
            finish(choices, outs)
            record(body.model, outs, prompts, "ok" if not remaining else "aborted")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [engine.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
        q: asyncio.Queue = asyncio.Queue()
        choices = await start(body, prompts, max_tokens, body.logprobs, q)
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def logprobs_of(seq: list[RequestOutput]) -> dict | None:
            if body.logprobs is None:
                return None
            lps = [lp for o in seq for lp in o.new_logprobs]
            return {"tokens": [token_text(lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
                    "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": []}

        if not body.stream:
            outs = await collect(q, choices)
            record(body.model, outs, prompts, "ok")
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "text": "".join(o.new_text for o in outs[rid]), "logprobs": logprobs_of(outs[rid]),
                                 "finish_reason": outs[rid][-1].finish_reason} for i, (rid, _) in enumerate(choices)],
                    "usage": usage(prompts, outs)}

        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
        chunk = lambda index, out: {"index": index, "text": out.new_text, "logprobs": logprobs_of([out]),  # noqa: E731
                                    "finish_reason": out.finish_reason}
        return StreamingResponse(stream(request, body, q, choices, prompts, head, chunk), media_type="text/event-stream")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            ids = engine.encode_chat(body.template_messages())
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompts = [ids]
        room = engine.model.config.max_position_embeddings - len(ids)  # OpenAI's default: up to the context
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        q: asyncio.Queue = asyncio.Queue()
        choices = await start(body, prompts, max_tokens, logprobs, q)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs_of(seq: list[RequestOutput]) -> dict | None:
            if logprobs is None:
                return None
            content = []
            for lp in (lp for o in seq for lp in o.new_logprobs):
                text = token_text(lp.token_id)
                content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                                "top_logprobs": [{"token": token_text(t), "logprob": v, "bytes": list(token_text(t).encode())}
                                                 for t, v in lp.top]})
            return {"content": content}

        if not body.stream:
            outs = await collect(q, choices)
            record(body.model, outs, prompts, "ok")
            return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(o.new_text for o in outs[rid])},
                                 "logprobs": logprobs_of(outs[rid]), "finish_reason": outs[rid][-1].finish_reason}
                                for i, (rid, _) in enumerate(choices)],
                    "usage": usage(prompts, outs)}

        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(len(choices))]
        chunk = lambda index, out: {"index": index, "delta": {"content": out.new_text} if out.new_text else {},  # noqa: E731
                                    "logprobs": logprobs_of([out]), "finish_reason": out.finish_reason}
        return StreamingResponse(stream(request, body, q, choices, prompts, head, chunk, opening), media_type="text/event-stream")

    # --- files ----------------------------------------------------------------------------------
    @v1.post("/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose != "fine-tune":
            raise APIError(400, f"purpose {purpose!r} is not supported; use 'fine-tune'", param="purpose")
        content = await file.read(settings.max_upload_bytes + 1)
        if len(content) > settings.max_upload_bytes:
            raise APIError(413, f"file exceeds the upload limit of {settings.max_upload_bytes} bytes", param="file")
        try:
            parse_jsonl(content.splitlines())
        except DataError as e:
            raise APIError(400, f"invalid fine-tuning file: {e}", param="file", code="invalid_file") from None
        return await asyncio.to_thread(store.add_file, file.filename or "upload.jsonl", purpose, content)

    @v1.get("/files")
    async def list_files(purpose: str | None = None):
        return {"object": "list", "data": store.list_files(purpose), "has_more": False}

    def file_or_404(file_id: str) -> dict:
        record = store.get_file(file_id)
        if record is None:
            raise APIError(404, f"no such file: {file_id}", param="file_id", code="file_not_found")
        return record

    @v1.get("/files/{file_id}")
    async def get_file(file_id: str):
        return file_or_404(file_id)

    @v1.get("/files/{file_id}/content")
    async def file_content(file_id: str):
        file_or_404(file_id)
        return Response(store.file_path(file_id).read_bytes(), media_type="application/jsonl")

    @v1.delete("/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- fine-tuning ----------------------------------------------------------------------------
    @v1.post("/fine_tuning/jobs")
    async def create_job(body: FineTuningJobRequest):
        if body.model != engine.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; fine-tune the base model {engine.model_name!r}",
                           param="model", code="model_not_found")
        file_or_404(body.training_file)
        if body.validation_file is not None:
            file_or_404(body.validation_file)
        return await jobs.create(body, loop)

    @v1.get("/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20):
        data, more = store.list_jobs(after, max(1, min(limit, 100)))
        return {"object": "list", "data": data, "has_more": more}

    def job_or_404(job_id: str) -> dict:
        job = store.get_job(job_id)
        if job is None:
            raise APIError(404, f"no such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
        return job

    @v1.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_or_404(job_id)

    @v1.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        job_or_404(job_id)
        return await jobs.cancel(job_id, loop)

    @v1.get("/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = None, limit: int = 20):
        job_or_404(job_id)
        data, more = store.list_events(job_id, after, max(1, min(limit, 100)))
        return {"object": "list", "data": data, "has_more": more}

    @v1.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        job_or_404(job_id)
        data = store.list_checkpoints(job_id)
        return {"object": "list", "data": data[: max(1, min(limit, 100))], "has_more": len(data) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    # --- adapters -------------------------------------------------------------------------------
    @v1.post("/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        path = Path(body.lora_path).expanduser()
        real = path.resolve()  # symlinks and '..' resolved before the check
        allowed = (store.root, *settings.allowed_adapter_dirs)
        if not any(real.is_relative_to(root) for root in allowed):
            raise APIError(400, f"adapter path {body.lora_path!r} is outside the allowed directories", param="lora_path")
        if resident.known(body.lora_name) or body.lora_name == engine.model_name:
            raise APIError(400, f"a model named {body.lora_name!r} is already loaded", param="lora_name")
        try:  # read and registered between two steps, on the engine's thread (torch runs nowhere else)
            await loop.call(lambda e: resident.add(body.lora_name, real))
        except AdapterError as e:
            raise APIError(400, str(e), param="lora_path") from None
        store.put_adapter(body.lora_name, {"path": str(real), "source": "loaded", "pinned": body.pinned})
        return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": True}

    @v1.post("/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        if not resident.known(body.lora_name):
            raise APIError(404, f"no adapter named {body.lora_name!r}", param="lora_name")
        try:
            await loop.call(lambda e: e.unload_adapter(body.lora_name) if body.lora_name in e.adapters else None)
        except ValueError as e:
            raise APIError(409, str(e), param="lora_name") from None
        store.remove_adapter(body.lora_name)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": False}

    app.include_router(v1)
    return app


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, LookupError):
        return APIError(404, str(exc.args[0] if exc.args else exc), param="model", code="model_not_found")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_request")
    log.error("engine call failed: %r", exc)
    return APIError(500, "internal server error")


async def next_output(q: asyncio.Queue, request: Request, poll: float = 0.5) -> RequestOutput | None:
    """The next output for a stream, or None once the client has disconnected."""
    while True:
        if not q.empty():  # most outputs are already there: no timer, no task
            return q.get_nowait()
        try:
            return await asyncio.wait_for(q.get(), timeout=poll)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"

