"""The cluster's HTTP entry point: a Ray Serve ingress that forwards every request whole to an
engine replica, whose app (the single-process server's routes, create_app) answers it; so the API
is the same, route for route, with or without a cluster.

Where a request goes (the router, router.py, picks among the candidates):
- completions, chat completions, /tokenize and /detokenize: by the body's `model`;
- a new fine-tuning job: the live replica that runs the fewest (the coordinator's `placement`);
- a job's cancel, pause and resume: the replica that holds it (the coordinator's `owner`), else any;
- the console's serving series (/v1/loramux/stats): the oldest live replica's, so that its charts
  follow one engine;
- anything else (files, jobs' records, models, the console's pages, /health): any replica, all of
  them reading the same catalog through the coordinator.
Two routes are the ingress's own: `GET /cluster` (behind the API key) lists the live replicas, and
`/metrics` joins every replica's, each sample labelled with its replica.

A replica that dies before it answers (killed, say) is dropped by Ray Serve's router and the
request is sent to another, once; one that dies mid-stream ends the stream with an error event in
OpenAI's shape, a response not yet begun is a 503.
"""

# no `from __future__ import annotations`: Ray Serve's ingress has FastAPI read the handlers' annotations as objects
import asyncio
import json
import re
from collections.abc import AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from loramux.cluster.metrics_merge import merge_metrics
from loramux.cluster.replica import COORDINATOR, NAMESPACE, REPLICA_HEADER
from loramux.server.app import check_api_key
from loramux.server.protocol import APIError

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # the replicas' app has the schema and docs

BY_MODEL = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
JOB_CONTROL = re.compile(r"^/v1/fine_tuning/jobs/([^/]+)/(cancel|pause|resume)$")
RETRYABLE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)
DIRECTED_TIMEOUT = 30.0  # seconds a request for one replica waits for it (it may have just died)


def _answer(error: APIError) -> JSONResponse:
    """An error the ingress answers itself, in OpenAI's shape."""
    return JSONResponse(error.body(), status_code=error.status, headers={REPLICA_HEADER: "ingress"})


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return _answer(APIError(status, message, code=code))


def _request_of(request: Request, body: bytes) -> dict:
    """What EngineReplica.forward takes: the request's ASGI fields and its body."""
    scope = request.scope
    return {"method": scope["method"], "path": scope["path"], "query_string": scope["query_string"],
            "headers": list(scope["headers"]), "body": body, "client": scope.get("client")}


async def _body(stream, event_stream: bool) -> AsyncIterator[bytes]:
    """The replica's body chunks; if the replica dies mid-stream, an event stream ends with an error
    event in OpenAI's shape (any other body is cut short, which its client reports)."""
    try:
        async for chunk in stream:
            yield chunk
    except RETRYABLE:
        if event_stream:
            error = APIError(503, "the replica serving this stream stopped; the response is incomplete", code="replica_unavailable")
            yield f"data: {json.dumps(error.body())}\n\n".encode()
    finally:  # also when the client goes away: the replica's request is aborted
        stream.cancel()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, replicas, api_key: str | None, max_body_bytes: int) -> None:
        self.replicas = replicas
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)

    @app.get("/cluster")
    async def cluster(self, request: Request) -> Response:
        """The live replicas: id, pid, node, base model names, resident adapters, adapters in
        training, requests running and waiting, fine-tuning jobs held, seconds since last report."""
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": await self.coordinator.cluster.remote()}, headers={REPLICA_HEADER: "ingress"})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every live replica's /metrics as one text, each sample labelled replica="<id>"."""
        texts = {}
        for replica in await self.coordinator.cluster.remote():
            try:
                status, _, body = await self._collect(_request_of(request, b""), target=replica["id"])
            except (asyncio.TimeoutError, *RETRYABLE):
                continue  # died since its last report
            if status == 200:
                texts[replica["id"]] = body.decode()
        return PlainTextResponse(merge_metrics(texts), headers={REPLICA_HEADER: "ingress"})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def proxy(self, path: str, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        model, target = await self._destination(request, body)
        forwarded = _request_of(request, body)
        for attempt in range(2):
            stream = self.replicas.options(stream=True).forward.remote(forwarded, model=model, target=target)
            try:
                head = await asyncio.wait_for(stream.__anext__(), DIRECTED_TIMEOUT if target else None)
            except asyncio.CancelledError:  # the client went away before the answer began
                stream.cancel()
                raise
            except RETRYABLE:
                if attempt == 0 and target is None:
                    continue  # the router has dropped the dead replica: another one takes it
                return _error(503, "the replica serving this request stopped; retry", code="replica_unavailable")
            except asyncio.TimeoutError:
                stream.cancel()
                return _error(503, "the replica for this request did not answer; retry", code="replica_unavailable")
            except StopAsyncIteration:
                return _error(502, "the replica ended the request without an answer", code="replica_error")
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head["headers"]]
            event_stream = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)
            response = StreamingResponse(_body(stream, event_stream), status_code=head["status"])
            response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            return response

    async def _destination(self, request: Request, body: bytes) -> tuple[str | None, str | None]:
        """(model, target replica) for the router."""
        path = request.url.path
        if request.method == "POST" and path in BY_MODEL:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None  # the replica answers the malformed body with its own 400
            return (model if isinstance(model, str) else None), None
        if request.method == "POST" and path.rstrip("/") == "/v1/fine_tuning/jobs":
            return None, await self.coordinator.placement.remote()
        if request.method == "POST" and (match := JOB_CONTROL.match(path)):
            return None, await self.coordinator.owner.remote(match.group(1))
        if path == "/v1/loramux/stats":  # one replica's series, the same one from poll to poll
            live = await self.coordinator.cluster.remote()
            return None, live[0]["id"] if live else None
        return None, None

    async def _collect(self, request: dict, target: str) -> tuple[int, list, bytes]:
        stream = self.replicas.options(stream=True).forward.remote(request, target=target)
        head = await asyncio.wait_for(stream.__anext__(), DIRECTED_TIMEOUT)
        return head["status"], head["headers"], b"".join([chunk async for chunk in stream])

    def _denied(self, request: Request) -> Response | None:
        try:
            check_api_key(request, self.api_key)
        except APIError as e:
            return _answer(e)
        return None

