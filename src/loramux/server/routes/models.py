"""GET /v1/models: the base model and every adapter of the catalog, resident or not."""

from __future__ import annotations

from fastapi import APIRouter

from loramux.server.protocol import ModelList
from loramux.server.routes.context import Ctx

router = APIRouter()


@router.get("/models", responses={200: {"model": ModelList}})
async def list_models(ctx: Ctx):
    loaded = set(await ctx.loop.call(lambda e: e.adapters.names()))
    base = ctx.engine.model_name
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "loramux", "root": base, "parent": None, "resident": True}]
    data += [{"id": n, "object": "model", "created": 0, "owned_by": "loramux", "root": base, "parent": base,
              "resident": n in loaded} for n in sorted(loaded | set(ctx.store.adapters()))]
    return {"object": "list", "data": data}
