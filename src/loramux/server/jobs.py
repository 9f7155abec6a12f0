"""OpenAI fine-tuning jobs on top of the engine's training jobs, persisted in the store.

A job record (OpenAI's `fine_tuning.job` object) is written when the job is created and updated
from the engine thread after every step (`sync`): status, events, checkpoints, and on success the
fine-tuned model, which is then in the adapter catalog. After a restart, `recover` restarts the
unfinished jobs, which resume from their latest checkpoint.

A job's `method` (OpenAI's block, "supervised" or "dpo" with its hyperparameters resolved), its
`metadata` and the adapter it starts from (`init_from`: a fine-tuned model the request named as its
`model`; for DPO the frozen reference) are in its record, so that a restart recreates the same
TrainingConfig. `pause` and `resume` act at once, between two engine steps; a paused job is
recreated paused after a restart. Each checkpoint is a model of its own, "<fine-tuned model>:ckpt-step-N"
(OpenAI's naming), put in the adapter catalog (source "checkpoint") and loaded on demand by the
requests that name it, as evicted adapters are.

Jobs checkpoint by default (TrainingConfig's checkpoint_every and checkpoint_interval, unless the
request sets them), so a crash loses at most a few steps or a minute of training. The service
tracks only live jobs, each with its record held in memory: a step's `sync` costs one pass over
the live jobs and writes only what changed, however many jobs ran before; a job's last sync (its
final state) drops it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramux.engine.engine import Engine
from loramux.lora.adapter import LoraConfig
from loramux.server.metrics import Metrics
from loramux.server.protocol import APIError, FineTuningJobRequest
from loramux.server.store import Store, new_id
from loramux.training.config import TrainingConfig
from loramux.training.data import DataError
from loramux.training.job import JobState, TrainingJob

if TYPE_CHECKING:
    from loramux.server.engine_loop import EngineLoop

log = logging.getLogger("loramux.server")
DEFAULTS = {"n_epochs": 3, "batch_size": 8, "learning_rate": 2e-4}
UNFINISHED = ("validating_files", "queued", "running", "paused")


@dataclass
class _Live:
    """A running job, its store record as last written, and how much of it the store has."""

    job: TrainingJob
    record: dict
    events_synced: int = 0
    checkpoints_synced: int = 0


class JobService:
    def __init__(self, engine: Engine, store: Store, metrics: Metrics) -> None:
        self.engine, self.store, self.metrics = engine, store, metrics
        self._live: dict[str, _Live] = {}

    async def create(self, body: FineTuningJobRequest, loop: EngineLoop, base: str | None = None,
                     init_from: str | None = None) -> dict:
        """base: the base model's id (default: body.model); init_from: the adapter the job starts from
        (a fine-tuned model the request named as its `model`), made resident by the caller."""
        job_id = new_id("ftjob")
        base = base or body.model
        method = body.resolved_method()
        hp = method[method["type"]]["hyperparameters"]
        record = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
            "model": body.model, "fine_tuned_model": None, "organization_id": "loramux", "result_files": [],
            "status": "validating_files", "training_file": body.training_file, "validation_file": body.validation_file,
            "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            "method": method, "metadata": body.metadata,
            "trained_tokens": None, "error": None, "seed": body.seed if body.seed is not None else 0,
            "user_provided_suffix": body.suffix, "estimated_finish": None, "integrations": [],
            "lora": None if init_from else body.lora.model_dump(), "training": body.training.model_dump(),
            "init_from": init_from,
            # OpenAI's form; an adapter's name has no '/', so a base id such as "org/model" gives "ft:org--model:..."
            "adapter_name": f"ft:{base.replace('/', '--')}:{body.suffix or 'loramux'}:{job_id[-8:]}",
        }
        self.store.put_job(record)
        try:
            await loop.call(lambda engine: self._start(record))
        except DataError as e:
            self._fail(record, str(e))
            raise APIError(400, f"fine-tuning job failed validation: {e}", param="training_file", code="invalid_file") from None
        except ValueError as e:  # settings the schema cannot judge alone (e.g. a LoRA config against this model)
            self._fail(record, str(e), param=None, code="invalid_request")
            raise APIError(400, f"fine-tuning job refused: {e}", code="invalid_request") from None
        return self.store.get_job(job_id)

    def _start(self, record: dict) -> TrainingJob:
        """Creates the engine job (in the engine thread, or before it runs)."""
        extra, lora = record["training"], record["lora"]
        # records written before `method` existed are supervised, with their hyperparameters
        method = record.get("method") or {"type": "supervised", "supervised": {"hyperparameters": record["hyperparameters"]}}
        hp = method[method["type"]]["hyperparameters"]
        # `training` holds TrainingConfig's own names (records written before an option existed get its default)
        training = TrainingConfig(
            epochs=hp["n_epochs"], batch_size=hp["batch_size"], learning_rate=DEFAULTS["learning_rate"] * hp["learning_rate_multiplier"],
            seed=record["seed"], method=method["type"], **({"beta": hp["beta"]} if "beta" in hp else {}), **extra,
        )
        config = None
        if lora is not None:
            targets = lora["target_modules"]
            config = LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                target_modules=targets if isinstance(targets, str) else tuple(targets), use_rslora=lora["use_rslora"])
        init_from = record.get("init_from")
        if init_from is not None and init_from not in self.engine.adapters:  # after a restart: e.g. a checkpoint model
            info = self.store.adapters().get(init_from)
            if info is None:
                raise ValueError(f"the model {init_from!r} it starts from is no longer in the catalog")
            self.engine.load_adapter(init_from, info["path"])
        val = self.store.file_path(record["validation_file"]) if record["validation_file"] else None
        job = self.engine.create_job(
            record["adapter_name"], self.store.file_path(record["training_file"]), val=val, lora=config, training=training,
            init_from=init_from, checkpoint_dir=self.store.job_dir(record["id"]) / "checkpoints",
            output_dir=self._adapter_dir(record), job_id=record["id"],
        )
        if record["status"] == "paused":  # paused before a restart: stays paused
            job.pause()
        record["status"] = job.state.value
        self.store.put_job(record)
        self._live[job.id] = _Live(job, record)
        return job

    def _adapter_dir(self, record: dict):
        return self.store.root / "adapters" / record["id"]

    def _fail(self, record: dict, message: str, param: str | None = "training_file", code: str = "invalid_training_file") -> None:
        record.update(status="failed", finished_at=int(time.time()), error={"code": code, "message": message, "param": param})
        self.store.put_job(record)

    async def cancel(self, job_id: str, loop: EngineLoop) -> dict:
        def cancel(engine: Engine) -> None:
            if job_id in self._live:
                self._live[job_id].job.cancel()
                self.sync()

        await loop.call(cancel)
        record = self.store.get_job(job_id)
        if record["status"] in UNFINISHED:  # not in the engine (never started): cancel the record
            record.update(status="cancelled", finished_at=int(time.time()))
            self.store.put_job(record)
        return record

    async def pause(self, job_id: str, loop: EngineLoop) -> dict:
        """OpenAI's pause: a running job stops taking work at once (between two engine steps) and
        stays paused, across restarts too, until resumed; 400 in any other state."""
        return await self._pause_or_resume(job_id, loop, pause=True)

    async def resume(self, job_id: str, loop: EngineLoop) -> dict:
        """Resumes a paused job (400 unless paused)."""
        return await self._pause_or_resume(job_id, loop, pause=False)

    async def _pause_or_resume(self, job_id: str, loop: EngineLoop, pause: bool) -> dict:
        def change(engine: Engine) -> None:
            live = self._live.get(job_id)
            state = live.job.state if live is not None else None
            wanted = (JobState.RUNNING, JobState.QUEUED) if pause else (JobState.PAUSED,)
            if state not in wanted:
                status = (self.store.get_job(job_id) or {}).get("status") if state is None else state.value
                verb = "paused" if pause else "resumed"
                why = "only a running or queued job can be" if pause else "only a paused job can be"
                raise APIError(400, f"the fine-tuning job {job_id} is {status}: {why} {verb}", param="fine_tuning_job_id",
                               code="invalid_job_state")
            live.job.pause() if pause else live.job.resume()
            self.sync()

        await loop.call(change)
        return self.store.get_job(job_id)

    def recover(self) -> None:
        """After a restart: restarts the unfinished jobs from their checkpoints (the catalog's other
        adapters are ResidentAdapters' to load)."""
        for record in self.store.jobs_with_status(*UNFINISHED):
            self.restart(record)

    def restart(self, record: dict) -> None:
        """Engine thread: recreates an unfinished job from its record; it resumes from its latest
        checkpoint (after a restart, or in a cluster on a replica that adopts it); a job that cannot
        be recreated fails with the reason."""
        try:
            self._start(record)
        except Exception as e:
            log.error("job %s could not be restarted: %s", record["id"], e)
            self._fail(record, f"could not resume after restart: {e}")
        self.sync()  # its events so far (a paused job takes no step that would sync them)

    def training(self) -> dict[str, str]:
        """Engine thread: the live jobs' ids, each with the adapter it trains."""
        return {job_id: live.record["adapter_name"] for job_id, live in self._live.items()}

    def forget(self, job_id: str) -> None:
        """Engine thread, in a cluster: stops a job this replica no longer holds (another replica
        adopted it while this one was taken for dead), writing nothing to its record, and drops
        its adapter."""
        live = self._live.pop(job_id, None)
        if live is None:
            return
        live.job.cancel()
        try:
            self.engine.unload_adapter(live.record["adapter_name"])
        except (LookupError, ValueError) as e:
            log.warning("adapter %s of job %s stays loaded: %s", live.record["adapter_name"], job_id, e)

    def sync(self) -> None:
        """Mirrors the live jobs into the store (engine thread, after every step); a job that
        reached a final state is synced one last time and dropped."""
        for live in list(self._live.values()):
            job, record = live.job, live.record
            changed = self._sync_events(live) | self._sync_checkpoints(live)
            status = "running" if job.state is JobState.QUEUED else job.state.value
            if status != record["status"] or changed:
                record["status"] = status
                record["trained_tokens"] = job.train_tokens
                if job.state.is_final:
                    record["finished_at"] = int(time.time())
                    self._finish(job, record)
                self.store.put_job(record)
            if job.state.is_final:
                del self._live[job.id]

    def _finish(self, job: TrainingJob, record: dict) -> None:
        name = record["adapter_name"]
        if job.state is JobState.SUCCEEDED:
            record["fine_tuned_model"] = name
            self.store.put_adapter(name, {"path": str(self._adapter_dir(record)), "source": "fine-tune", "job": job.id})
            return
        if job.state is JobState.FAILED:
            record["error"] = {"code": "training_failed", "message": job.error or "training failed", "param": None}
        try:  # a cancelled or failed job leaves no model behind
            self.engine.unload_adapter(name)
        except (LookupError, ValueError) as e:
            log.warning("adapter %s of job %s stays loaded: %s", name, job.id, e)

    def _sync_events(self, live: _Live) -> bool:
        job, start = live.job, live.events_synced
        for event in job.events[start:]:
            self.store.add_event(job.id, {
                "id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(event.created_at),
                "level": "error" if "failed" in event.message else "info", "message": event.message,
                "data": event.data, "type": "metrics" if "train_loss" in event.data or "eval_loss" in event.data else "message",
            })
        live.events_synced = len(job.events)
        return len(job.events) > start

    def _sync_checkpoints(self, live: _Live) -> bool:
        job, start = live.job, live.checkpoints_synced
        for path in job.checkpoints[start:]:
            step = int(path.name.split("-")[1])
            # a servable model, named as OpenAI names checkpoints: in the catalog, loaded on demand
            model = f"{live.record['adapter_name']}:ckpt-step-{step}"
            self.store.put_adapter(model, {"path": str(path), "source": "checkpoint", "job": job.id})
            self.store.add_checkpoint(job.id, {
                "id": f"ftckpt-{job.id[-12:]}-{step}", "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": model, "step_number": step, "fine_tuning_job_id": job.id,
                "metrics": {"step": step, "train_loss": job.last_train_loss, "valid_loss": job.last_eval_loss},
            })
        live.checkpoints_synced = len(job.checkpoints)
        return len(job.checkpoints) > start
