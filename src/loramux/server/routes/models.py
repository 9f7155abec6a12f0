"""/v1/models: the base model (under each of its served names) and every adapter of the catalog,
resident or not; one model's card; deleting a fine-tuned model.

A fine-tuning job's checkpoints are models too ("ft:base:suffix:job:ckpt-step-N", each checkpoint's
`fine_tuned_model_checkpoint`), served on demand from the checkpoint's files: as OpenAI does, the
list leaves them out (a job's checkpoints endpoint lists them), and GET /v1/models/{id} answers for
them. They go with their job: DELETE refuses them (403).

Model ids may hold '/' (a served name such as "org/model") and fine-tuned ones hold ':'
("ft:base:suffix:job"), hence the `path` parameters. Deleting a fine-tuned model, as OpenAI's
DELETE does, unregisters it, drops it from the catalog (requests naming it get 404 from then on)
and removes its directory under the data dir; its job stays, with its checkpoints. The base model
and adapters the server was given (--adapter, /v1/load_lora_adapter) are not deletable (403).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter

from loramux.lora.adapter import AdapterError
from loramux.lora.peft_io import WEIGHTS_FILE, read_peft_config

from loramux.server.protocol import APIError, ErrorResponse, ModelCard, ModelDeleted, ModelList, error_responses
from loramux.server.routes.context import Context, Ctx

router = APIRouter()


async def cards(ctx: Context, checkpoints: bool = False) -> list[dict]:
    """Every model's card: the base model's served names first, then adapters by name; a job's
    checkpoint models ("ft:...:ckpt-step-N") only with `checkpoints`."""
    resident = await ctx.loop.call(lambda e: {n: lora_facts(e.adapters.get(n).config) for n in e.adapters.names()})
    catalog = {n: info for n, info in ctx.store.adapters().items() if checkpoints or info.get("source") != "checkpoint"}
    loaded = set(resident) - (set(ctx.store.adapters()) - set(catalog))
    base = {"object": "model", "created": 0, "owned_by": "loramux", "root": str(ctx.engine.loaded.path), "parent": None,
            "max_model_len": ctx.engine.model.config.max_position_embeddings, "resident": True}
    result = [{"id": name, **base} for name in ctx.model_names]
    for n in sorted(loaded | set(catalog)):
        info = catalog.get(n, {})
        root = info.get("path")
        on_disk = await asyncio.to_thread(disk_facts, root) if root else {"lora": None, "size_bytes": None}
        result.append({"id": n, "object": "model", "created": 0, "owned_by": "loramux", "root": root, "parent": ctx.base_id,
                      "max_model_len": None, "resident": n in loaded, "pinned": bool(info.get("pinned")),
                      "lora": resident.get(n) or on_disk["lora"], "size_bytes": on_disk["size_bytes"]})
    return result


def lora_facts(config) -> dict:
    """An adapter's LoRA shape as its card shows it: rank, alpha and target modules."""
    return {"r": config.r, "alpha": config.alpha, "target_modules": list(config.target_modules)}


def disk_facts(root: str) -> dict:
    """What an adapter's directory says of it: its LoRA shape (adapter_config.json, read as the
    loader reads it) and the size of its weights file; None where a file is missing or unreadable (a job still
    training it has written neither)."""
    directory = Path(root)
    try:
        lora = lora_facts(read_peft_config(directory))
    except (OSError, AdapterError):
        lora = None
    try:
        size = (directory / WEIGHTS_FILE).stat().st_size
    except OSError:
        size = None
    return {"lora": lora, "size_bytes": size}


@router.get("/models", responses={200: {"model": ModelList}})
async def list_models(ctx: Ctx):
    return {"object": "list", "data": await cards(ctx)}


@router.get("/models/{model_id:path}", responses={200: {"model": ModelCard}})
async def retrieve_model(model_id: str, ctx: Ctx):
    card = next((c for c in await cards(ctx, checkpoints=True) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return card


@router.delete("/models/{model_id:path}", responses={
    200: {"model": ModelDeleted}, 403: {"model": ErrorResponse, "description": "not a fine-tuned model"}, **error_responses(409)})
async def delete_model(model_id: str, ctx: Ctx):
    if model_id in ctx.model_names:
        raise APIError(403, f"{model_id!r} names the base model {ctx.base_id!r}, which cannot be deleted; only fine-tuned "
                            "models can", param="model", code="model_not_deletable")
    directory = await ctx.loop.call(lambda e: ctx.resident.delete(model_id))
    if directory is not None:
        await asyncio.to_thread(ctx.store.delete_adapter_dir, directory)
    return {"id": model_id, "object": "model", "deleted": True}
