"""/v1/files: fine-tuning files, checked line by line when uploaded, kept in the store."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from loramux.server.protocol import APIError, FileDeleted, FileList, FileObject
from loramux.server.routes import paging
from loramux.server.routes.context import Context, Ctx
from loramux.training.data import DataError, parse_jsonl

MAX_PAGE = 10_000  # OpenAI's bound, and its default

router = APIRouter()


def file_or_404(ctx: Context, file_id: str) -> dict:
    record = ctx.store.get_file(file_id)
    if record is None:
        raise APIError(404, f"no such file: {file_id}", param="file_id", code="file_not_found")
    return record


@router.post("/files", responses={200: {"model": FileObject}})
async def upload(ctx: Ctx, file: UploadFile = File(...), purpose: Literal["fine-tune"] = Form(...)):
    """A JSONL file of fine-tuning samples (checked line by line: a bad line is a 400 naming it)."""
    limit = ctx.settings.max_upload_bytes
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise APIError(413, f"file exceeds the upload limit of {limit} bytes", param="file")
    try:
        parse_jsonl(content.splitlines())
    except DataError as e:
        raise APIError(400, f"invalid fine-tuning file: {e}", param="file", code="invalid_file") from None
    return await asyncio.to_thread(ctx.store.add_file, file.filename or "upload.jsonl", purpose, content)


@router.get("/files", responses={200: {"model": FileList}})
async def list_files(ctx: Ctx, purpose: str | None = None, after: paging.After = None, limit: paging.Limit = MAX_PAGE,
                     order: Literal["asc", "desc"] = "desc"):
    """By creation time, newest first unless `order` is "asc"."""
    return paging.page(lambda after, limit: ctx.store.list_files(purpose, after, limit, order), after, limit, MAX_PAGE, with_ids=True)


@router.get("/files/{file_id}", responses={200: {"model": FileObject}})
async def get_file(file_id: str, ctx: Ctx):
    return file_or_404(ctx, file_id)


@router.get("/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}})
async def file_content(file_id: str, ctx: Ctx):
    file_or_404(ctx, file_id)
    return Response(ctx.store.file_path(file_id).read_bytes(), media_type="application/jsonl")


@router.delete("/files/{file_id}", responses={200: {"model": FileDeleted}})
async def delete_file(file_id: str, ctx: Ctx):
    file_or_404(ctx, file_id)
    ctx.store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
