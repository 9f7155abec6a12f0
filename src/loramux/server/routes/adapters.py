"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names): adapters from the
allowed directories join or leave the catalog and the engine."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from loramux.lora.adapter import AdapterError
from loramux.server.protocol import AdapterStatus, APIError, LoadAdapterRequest, UnloadAdapterRequest, error_responses
from loramux.server.routes.context import Ctx

router = APIRouter()


@router.post("/load_lora_adapter", responses={200: {"model": AdapterStatus}, **error_responses(429)})
async def load_adapter(body: LoadAdapterRequest, ctx: Ctx):
    path = Path(body.lora_path).expanduser()
    real = path.resolve()  # symlinks and '..' resolved before the check
    allowed = (ctx.store.root, *ctx.settings.allowed_adapter_dirs)
    if not any(real.is_relative_to(root) for root in allowed):
        raise APIError(400, f"adapter path {body.lora_path!r} is outside the allowed directories", param="lora_path")
    if ctx.resident.known(body.lora_name) or body.lora_name in ctx.model_names:
        raise APIError(400, f"a model named {body.lora_name!r} is already loaded", param="lora_name")
    try:  # read and registered between two steps, on the engine's thread (torch runs nowhere else)
        await ctx.loop.call(lambda e: ctx.resident.add(body.lora_name, real))
    except AdapterError as e:
        raise APIError(400, str(e), param="lora_path") from None
    ctx.store.put_adapter(body.lora_name, {"path": str(real), "source": "loaded", "pinned": body.pinned})
    return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": True}


@router.post("/unload_lora_adapter", responses={200: {"model": AdapterStatus}, **error_responses(409)})
async def unload_adapter(body: UnloadAdapterRequest, ctx: Ctx):
    if not ctx.resident.known(body.lora_name):
        raise APIError(404, f"no adapter named {body.lora_name!r}", param="lora_name")
    try:
        await ctx.loop.call(lambda e: e.unload_adapter(body.lora_name) if body.lora_name in e.adapters else None)
    except ValueError as e:
        raise APIError(409, str(e), param="lora_name") from None
    ctx.store.remove_adapter(body.lora_name)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "loaded": False}
