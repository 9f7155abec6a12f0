"""Liveness and Prometheus metrics, outside /v1 and without authentication."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from loramux.server.protocol import Health
from loramux.server.routes.context import Ctx

router = APIRouter()


@router.get("/health", response_model=Health)
async def health():
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(ctx: Ctx):
    await ctx.loop.call(ctx.metrics.observe_engine)  # gauges as of now, not as of the last step
    return PlainTextResponse(ctx.metrics.render(), media_type=ctx.metrics.content_type)
