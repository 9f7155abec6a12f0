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
    base = ctx.engine.model_name
    if body.model != base:
        raise APIError(404, f"the model {body.model!r} does not exist; fine-tune the base model {base!r}",
                       param="model", code="model_not_found")
    file_or_404(ctx, body.training_file)
    if body.validation_file is not None:
        file_or_404(ctx, body.validation_file)
    return await ctx.jobs.create(body, ctx.loop)


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


@router.get("/{job_id}/events", responses={200: {"model": JobEventList}})
async def job_events(job_id: str, ctx: Ctx, after: paging.After = None, limit: paging.Limit = 20):
    job_or_404(ctx, job_id)
    return paging.page(lambda after, limit: ctx.store.list_events(job_id, after, limit), after, limit, MAX_PAGE)


@router.get("/{job_id}/checkpoints", responses={200: {"model": JobCheckpointList}})
async def job_checkpoints(job_id: str, ctx: Ctx, after: paging.After = None, limit: paging.Limit = 10):
    job_or_404(ctx, job_id)
    return paging.page(lambda after, limit: ctx.store.list_checkpoints(job_id, after, limit), after, limit, MAX_PAGE,
                       with_ids=True)
