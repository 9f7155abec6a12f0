"""The web console: static files from the package (`server/console/`) at `/` and `/console/...`,
served without authentication (they hold no data; the page asks for the API key and sends it on
its own calls to /v1), and `/console/config.json`, which tells the page whether to ask for a key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from loramux.server.routes.context import Ctx

FILES = Path(__file__).resolve().parent.parent / "console"

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
async def index():
    return FileResponse(FILES / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/console/config.json")
async def config(ctx: Ctx):
    return {"api_key_required": ctx.settings.api_key is not None}


def mount(app: FastAPI) -> None:
    """The page's routes, then its assets under /console (a missing one is a 404 in OpenAI's shape)."""
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=FILES), name="console")
