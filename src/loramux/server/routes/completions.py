"""POST /v1/completions and /v1/chat/completions: each choice is one engine request; outputs come
back on one asyncio queue per HTTP request, as one response or as server-sent events.

A request that fails inside the engine (its last output has finish_reason "error", or "abort" when a
step failed before the engine said why) is answered with a 500 in OpenAI's error shape, or, once a
stream has started, with an error event and [DONE] as vLLM sends them. Clients never see
finish_reason "error" or "abort", which are not OpenAI's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from loramux.engine.requests import RequestOutput
from loramux.engine.scheduler import QueueFullError
from loramux.server.protocol import (
    APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionChunk, CompletionRequest,
    SamplingFields, error_responses, event_stream,
)
from loramux.server.chat_prompt import template_inputs
from loramux.server.logprobs import LegacyLogprobs, joined, prompt_logprobs
from loramux.server.routes.context import Context, Ctx
from loramux.server.tool_calls import ToolCalls, delta_calls, message_calls
from loramux.server.tool_parsers import TOOL_PARSERS
from loramux.structured.spec import StructuredError, StructuredSpec

log = logging.getLogger("loramux.server")
DEFAULT_MAX_TOKENS = 16
FAILED = ("error", "abort")  # finish reasons of a request the engine could not complete

router = APIRouter(responses=error_responses(429))


class Choices:
    """The engine requests behind one completion call (n per prompt, in choice order) and their
    outputs; `structured`: every choice's output constraint (compiled already, see `compiled`)."""

    def __init__(self, ctx: Context, body: SamplingFields, prompts: list[list[int]], structured: StructuredSpec | None = None) -> None:
        self.ctx, self.body, self.prompts, self.structured = ctx, body, prompts, structured
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.ids: list[str] = []
        self.outs: dict[str, list[RequestOutput]] = {}
        self.remaining = 0  # choices not finished yet

    async def start(self, max_tokens: int, logprobs: int | None) -> None:
        """Adds the requests, with the adapter the body's model names held resident meanwhile."""
        slo = self.body.slo_for(self.ctx.engine.config.scheduler.default_slo)
        adapter = await self._reserve(self.body.model)
        try:
            await self._add(max_tokens, logprobs, adapter, slo)
        finally:
            if adapter is not None:
                self.ctx.loop.submit(lambda e: self.ctx.resident.release(adapter))

    async def _reserve(self, model: str) -> str | None:
        """The adapter a request names (None: the base model, by its id or an alias), made resident and
        held until released."""
        if model in self.ctx.model_names:
            return None
        if not self.ctx.resident.known(model):
            raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        await self.ctx.resident.reserve(model, self.ctx.loop)
        return model

    async def _add(self, max_tokens: int, logprobs: int | None, adapter: str | None, slo) -> None:
        loop = self.ctx.loop
        for ids in self.prompts:
            for _ in range(self.body.n):
                rid = f"req-{uuid.uuid4().hex}"
                params = self.body.sampling(len(self.ids), max_tokens, logprobs, self.structured)
                loop.listen(rid, self.queue)
                self.ids.append(rid)
                self.outs[rid] = []
                self.remaining += 1
                try:
                    await loop.call(lambda e, ids=ids, params=params, rid=rid: e.add_request(ids, adapter, params, slo=slo, request_id=rid))
                except BaseException as exc:
                    for r in self.ids[:-1]:
                        loop.submit(lambda e, r=r: e.abort(r))
                    for r in self.ids:
                        loop.forget(r)
                    raise engine_error(exc) from None

    def _take(self, out: RequestOutput) -> str | None:
        """Files an output; returns the engine's message if it ends its request in failure."""
        self.outs[out.request_id].append(out)
        self.remaining -= out.finished
        if out.finished and out.finish_reason in FAILED:
            message = getattr(out, "error", None) or "the engine failed while generating this request"
            log.error("request %s failed in the engine: %s", out.request_id, message)
            return message
        return None

    async def collect(self) -> None:
        """Waits for every choice to finish; a failure in the engine is a 500."""
        try:
            while self.remaining:
                failure = self._take(await self.queue.get())
                if failure is not None:
                    self.record("error")
                    raise APIError(500, failure)
            self.record("ok")
        finally:
            self.finish()

    async def events(self, request: Request, head: dict, chunk: Callable[[int, RequestOutput], dict],
                     opening: list[dict] | None = None) -> AsyncIterator[str]:
        """Server-sent events of the choices' outputs: `chunk(index, output)` gives each one's choice
        objects (an event each, none if it has nothing to send yet); an
        optional opening chunk; a usage chunk if asked for; then [DONE]. A failure in the engine
        ends the stream with an error event and [DONE]. A client that goes away has its requests
        aborted."""
        index = {rid: i for i, rid in enumerate(self.ids)}
        status = "aborted"
        try:
            if opening:
                yield sse({**head, "choices": opening})
            while self.remaining:
                out = await next_output(self.queue, request)
                if out is None:
                    return  # the client went away: `finish` aborts what is left
                failure = self._take(out)
                if failure is not None:
                    status = "error"
                    yield sse(stream_error(failure))
                    yield "data: [DONE]\n\n"
                    return
                if out.new_text or out.finished or out.new_logprobs or out.prompt_logprobs is not None:
                    for choice in chunk(index[out.request_id], out):
                        yield sse({**head, "choices": [choice]})
            status = "ok"
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.finish()
            self.record(status)

    def finish(self) -> None:
        """Forgets the choices' listeners; aborts those that did not finish (a client went away, or
        another choice failed)."""
        for rid, seq in self.outs.items():
            self.ctx.loop.forget(rid)
            if not (seq and seq[-1].finished):
                self.ctx.loop.submit(lambda e, rid=rid: e.abort(rid))

    def record(self, status: str) -> None:
        self.ctx.metrics.record_requests(self.body.model, status, self.prompts, self.outs)
        self.ctx.telemetry.record_requests(status, self.outs, self.body.slo_for(self.ctx.engine.config.scheduler.default_slo))

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = sum(len(o.new_token_ids) for seq in self.outs.values() for o in seq)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def text(self, rid: str) -> str:
        return "".join(o.new_text for o in self.outs[rid])

    def scored_prompt(self, rid: str) -> tuple:
        """The engine's log-probabilities of a choice's prompt tokens (they come on its first output)."""
        return next(o.prompt_logprobs for o in self.outs[rid] if o.prompt_logprobs is not None)

    def prompt_logprobs(self, rid: str) -> list | None:
        """vLLM's `prompt_logprobs` of a choice, if the body asks for them."""
        k = self.body.prompt_logprobs
        return None if k is None else prompt_logprobs(self.ctx.engine.tokenizer, self.scored_prompt(rid), k)


@router.post("/completions", responses={200: {"model": Completion, "content": event_stream(CompletionChunk)}})
async def completions(body: CompletionRequest, request: Request, ctx: Ctx):
    """Each choice's text is its prompt's (with echo: as given, or decoded from its token ids) and
    then what was generated; with logprobs, echoed prompt tokens come first in `logprobs` (the
    first with null values). max_tokens 0 (echo only) scores the prompt and generates nothing."""
    engine = ctx.engine
    tokenizer = engine.tokenizer
    given = body.prompts()
    prompts = [engine.encode(p) if isinstance(p, str) else p for p in given]
    echoes = [(p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=body.skip_special_tokens)) if body.echo else ""
              for p in given]
    choices = Choices(ctx, body, prompts, await compiled(ctx, body.output_spec()))
    await choices.start(DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens, body.logprobs)
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    trackers = {rid: LegacyLogprobs(tokenizer, body.logprobs, body.skip_special_tokens) for rid in choices.ids}
    echoed: set[str] = set()  # the choices whose prompt (text and log-probabilities) has been sent

    def piece(index: int, outs: list[RequestOutput]) -> tuple[str, dict | None]:
        """The text and logprobs object of a choice's next outputs, after its echo if not yet sent."""
        rid, prompt = choices.ids[index], index // body.n
        text, tracker, logprobs = "".join(o.new_text for o in outs), trackers[rid], None
        if body.echo and rid not in echoed:
            echoed.add(rid)
            text = echoes[prompt] + text
            if body.logprobs is not None:
                logprobs = tracker.add(zip(prompts[prompt], choices.scored_prompt(rid)))
                tracker.restart(len(echoes[prompt]))
        if body.logprobs is not None:
            generated = tracker.add((lp.token_id, lp) for o in outs for lp in o.new_logprobs)
            logprobs = generated if logprobs is None else joined(logprobs, generated)
        return text, logprobs

    if not body.stream:
        await choices.collect()
        listed = []
        for i, rid in enumerate(choices.ids):
            text, logprobs = piece(i, choices.outs[rid])
            listed.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": choices.outs[rid][-1].finish_reason,
                           "prompt_logprobs": choices.prompt_logprobs(rid)})
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": listed,
                "usage": choices.usage()}

    head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}

    def chunk(index: int, out: RequestOutput) -> list[dict]:
        text, logprobs = piece(index, [out])
        return [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}]

    return StreamingResponse(choices.events(request, head, chunk), media_type="text/event-stream")


@router.post("/chat/completions", responses={200: {"model": ChatCompletion, "content": event_stream(ChatCompletionChunk)}})
async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: Ctx):
    """The messages (and tools, unless tool_choice is "none") through the model's chat template, with
    its options (add_generation_prompt, continue_final_message, chat_template_kwargs). The output
    follows response_format or structured_outputs, or for tool_choice "required" or a named tool,
    the tools' schemas (server/tool_calls.py); its tool calls become `message.tool_calls` with
    finish_reason "tool_calls" (streamed: each call once complete, as OpenAI streams calls)."""
    engine = ctx.engine
    ids, tools = chat_prompt(ctx, body)
    room = engine.model.config.max_position_embeddings - len(ids)  # OpenAI's default: up to the context
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    guided = tools.spec()
    choices = Choices(ctx, body, [ids], await compiled(ctx, body.output_spec() or (guided and (guided, "tools"))))
    await choices.start(max_tokens, logprobs)
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    def token(token_id: int) -> dict:
        text = engine.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode())}

    def logprobs_of(seq: list[RequestOutput]) -> dict | None:
        if logprobs is None:
            return None
        return {"content": [{**token(lp.token_id), "logprob": lp.logprob,
                             "top_logprobs": [{**token(t), "logprob": v} for t, v in lp.top]}
                            for o in seq for lp in o.new_logprobs]}

    if not body.stream:
        await choices.collect()
        listed = []
        for i, rid in enumerate(choices.ids):
            content, calls = tools.extract(choices.text(rid))
            message = {"role": "assistant", "content": content, **({"tool_calls": message_calls(calls)} if calls else {})}
            listed.append({"index": i, "message": message, "logprobs": logprobs_of(choices.outs[rid]),
                           "finish_reason": "tool_calls" if calls else choices.outs[rid][-1].finish_reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model, "choices": listed,
                "usage": choices.usage(), "prompt_logprobs": choices.prompt_logprobs(choices.ids[0])}

    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(len(choices.ids))]
    streams = [tools.stream() for _ in choices.ids]

    def chunk(index: int, out: RequestOutput) -> list[dict]:
        logprobs = logprobs_of([out])
        if not tools.active:
            return [{"index": index, "delta": {"content": out.new_text} if out.new_text else {},
                     "logprobs": logprobs, "finish_reason": out.finish_reason}]
        content, calls = streams[index].push(out.new_text, out.finished)
        deltas = ([{"content": content}] if content else []) + [{"tool_calls": d} for d in delta_calls(calls)]
        if not deltas and not out.finished and logprobs is None:
            return []  # text held back: it may be a call
        deltas = deltas or [{}]
        reason = ("tool_calls" if calls else out.finish_reason) if out.finished else None
        return [{"index": index, "delta": d, "logprobs": logprobs if i == 0 else None,
                 "finish_reason": reason if i == len(deltas) - 1 else None} for i, d in enumerate(deltas)]

    return StreamingResponse(choices.events(request, head, chunk, opening), media_type="text/event-stream")


async def compiled(ctx: Context, found: tuple[StructuredSpec, str] | None) -> StructuredSpec | None:
    """The request's output constraint (and the field that asked for it), compiled now, in a worker
    thread (a large grammar takes a while; the engine's steps go on), so that an invalid one is a
    400 naming its field; the engine then finds it in its grammar cache."""
    if found is None:
        return None
    spec, param = found
    try:
        await asyncio.to_thread(ctx.engine.grammars.compile, spec)
    except StructuredError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None
    return spec


def chat_prompt(ctx: Context, body: ChatCompletionRequest) -> tuple[list[int], ToolCalls]:
    """A chat request's prompt token ids (its messages, and tools unless tool_choice is "none",
    through the model's chat template with the request's options) and its tool calls' handling; a
    conversation the template refuses is a 400. /tokenize renders messages with this too."""
    tools = ToolCalls(body, TOOL_PARSERS[ctx.settings.tool_call_parser]())
    messages, template_tools = template_inputs(body, ctx.engine.tokenizer.chat_template or "", tools.parser, tools.active)
    try:
        ids = ctx.engine.encode_chat(messages, tools=template_tools, add_generation_prompt=body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs)
    except (TemplateError, ValueError) as e:  # e.g. a template that refuses the order of the roles
        raise APIError(400, f"the model's chat template cannot render these messages: {e}", param="messages") from None
    return ids, tools


def engine_error(exc: BaseException) -> APIError:
    """The answer to an exception from adding a request to the engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, LookupError):
        return APIError(404, str(exc.args[0] if exc.args else exc), param="model", code="model_not_found")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=getattr(exc, "param", None), code="invalid_request")  # InvalidParam names it
    log.error("engine call failed: %r", exc)
    return APIError(500, "internal server error")


def stream_error(message: str) -> dict:
    """The event that ends a stream whose request failed in the engine, as vLLM sends it: OpenAI's
    error object with the HTTP status the response would have had as its code."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": 500}}


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
