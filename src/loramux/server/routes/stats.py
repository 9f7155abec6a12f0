"""GET /v1/loramux/stats: the serving time series (telemetry.py) the web console charts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from loramux.server.routes.context import Ctx

# At most an hour in buckets of at least 5 s: 720 buckets, bounded by the schema itself.
MAX_WINDOW, MIN_INTERVAL = 3_600, 5

router = APIRouter()


@router.get("/loramux/stats")
async def stats(ctx: Ctx,
                window: Annotated[float, Query(gt=0, le=MAX_WINDOW, description="seconds of history")] = 300,
                interval: Annotated[float, Query(ge=MIN_INTERVAL, le=MAX_WINDOW, description="seconds per bucket")] = 5):
    """Requests per second, TTFT and TPOT percentiles (p50, p90, p99) beside the default targets,
    SLO attainment, KV cache use, the waiting queue and the rows of each kind per second, in
    buckets of `interval` seconds over the last `window` seconds, oldest first."""
    return ctx.telemetry.stats(window, interval)
