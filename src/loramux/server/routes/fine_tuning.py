"""/v1/fine_tuning/jobs: jobs (JobService), their events and checkpoints, newest first."""

from __future__ import annotations

from fastapi import APIRouter

from loramux.server.protocol import (
    APIError, FineTuningJob, FineTuningJobList, FineTuningJobRequest, JobCheckpointList, JobEventList,
)
from loramux.server.routes import paging
from loramux.server.routes.context import Context, Ctx
from loramux.server.routes.files import file_or_404

MAX_PAGE = 100

router = APIRouter(prefix="/fine_tuning/jobs")


def job_or_404(ctx: Context, job_id: str) -> dict:
    job = ctx.store.get_job(job_id)
    if job is None:
        raise APIError(404, f"no such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
    return job


@router.post("", responses={200: {"model": FineTuningJob}})
async def create_job(body: FineTuningJobRequest, ctx: Ctx):
    """`model`: the base model (by its id or an alias; the job records its id), or a fine-tuned
    model of the catalog, which the job starts from (its copy is trained; for DPO it is the frozen
    reference), held resident while the job is created."""
    body.resolved_method()  # a conflict between hyperparameters and method is a 400 before anything else
    start = None
    if body.model in ctx.model_names:
        body.model = ctx.base_id
    elif ctx.resident.known(body.model):
        if "lora" in body.model_fields_set:
            raise APIError(400, f"lora: a job that starts from the fine-tuned model {body.model!r} takes its LoRA config; "
                                "give no lora", param="lora")
        start = body.model
    else:
        raise APIError(404, f"the model {body.model!r} does not exist; fine-tune the base model {ctx.base_id!r} "
                            "or a fine-tuned model", param="model", code="model_not_found")
    file_or_404(ctx, body.training_file)
    if body.validation_file is not None:
        file_or_404(ctx, body.validation_file)
    if start is None:
        return await ctx.jobs.create(body, ctx.loop, base=ctx.base_id)
    await ctx.resident.reserve(start, ctx.loop)
    try:
        return await ctx.jobs.create(body, ctx.loop, base=ctx.base_id, init_from=start)
    finally:
        ctx.loop.submit(lambda e: ctx.resident.release(start))


@router.get("", responses={200: {"model": FineTuningJobList}})
async def list_jobs(ctx: Ctx, after: paging.After = None, limit: paging.Limit = 20):
    return paging.page(ctx.store.list_jobs, after, limit, MAX_PAGE)


@router.get("/{job_id}", responses={200: {"model": FineTuningJob}})
async def get_job(job_id: str, ctx: Ctx):
    return job_or_404(ctx, job_id)


@router.post("/{job_id}/cancel", responses={200: {"model": FineTuningJob}})
async def cancel_job(job_id: str, ctx: Ctx):
    job_or_404(ctx, job_id)
    return await ctx.jobs.cancel(job_id, ctx.loop)


@router.post("/{job_id}/pause", responses={200: {"model": FineTuningJob}})
async def pause_job(job_id: str, ctx: Ctx):
    job_or_404(ctx, job_id)
    return await ctx.jobs.pause(job_id, ctx.loop)


@router.post("/{job_id}/resume", responses={200: {"model": FineTuningJob}})
async def resume_job(job_id: str, ctx: Ctx):
    job_or_404(ctx, job_id)
    return await ctx.jobs.resume(job_id, ctx.loop)


@router.get("/{job_id}/events", responses={200: {"model": JobEventList}})
async def job_events(job_id: str, ctx: Ctx, after: paging.After = None, limit: paging.Limit = 20):
    job_or_404(ctx, job_id)
    return paging.page(lambda after, limit: ctx.store.list_events(job_id, after, limit), after, limit, MAX_PAGE)


@router.get("/{job_id}/checkpoints", responses={200: {"model": JobCheckpointList}})
async def job_checkpoints(job_id: str, ctx: Ctx, after: paging.After = None, limit: paging.Limit = 10):
    job_or_404(ctx, job_id)
    return paging.page(lambda after, limit: ctx.store.list_checkpoints(job_id, after, limit), after, limit, MAX_PAGE,
                       with_ids=True)
