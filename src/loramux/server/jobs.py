"""OpenAI fine-tuning jobs on top of the engine's training jobs, persisted in the store.

A job record (OpenAI's `fine_tuning.job` object) is written when the job is created and updated
from the engine thread after every step (`sync`): status, events, checkpoints, and on success the
fine-tuned model, which is then in the adapter catalog. After a restart, `recover` reloads the
catalog's adapters and restarts unfinished jobs, which resume from their latest checkpoint.

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

    async def create(self, body: FineTuningJobRequest, loop: EngineLoop) -> dict:
        job_id = new_id("ftjob")
        h = body.hyperparameters
        record = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
            "model": body.model, "fine_tuned_model": None, "organization_id": "loramux", "result_files": [],
            "status": "validating_files", "training_file": body.training_file, "validation_file": body.validation_file,
            "hyperparameters": {
                "n_epochs": DEFAULTS["n_epochs"] if h.n_epochs == "auto" else h.n_epochs,
                "batch_size": DEFAULTS["batch_size"] if h.batch_size == "auto" else h.batch_size,
                "learning_rate_multiplier": 1.0 if h.learning_rate_multiplier == "auto" else h.learning_rate_multiplier,
            },
            "trained_tokens": None, "error": None, "seed": body.seed if body.seed is not None else 0,
            "user_provided_suffix": body.suffix, "estimated_finish": None, "integrations": [],
            "lora": body.lora.model_dump(), "training": body.training.model_dump(),
            "adapter_name": f"ft:{body.model}:{body.suffix or 'loramux'}:{job_id[-8:]}",
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
        hp, extra, lora = record["hyperparameters"], record["training"], record["lora"]
        # `training` holds TrainingConfig's own names (records written before an option existed get its default)
        training = TrainingConfig(
            epochs=hp["n_epochs"], batch_size=hp["batch_size"], learning_rate=DEFAULTS["learning_rate"] * hp["learning_rate_multiplier"],
            seed=record["seed"], **extra,
        )
        targets = lora["target_modules"]
        config = LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                            target_modules=targets if isinstance(targets, str) else tuple(targets), use_rslora=lora["use_rslora"])
        val = self.store.file_path(record["validation_file"]) if record["validation_file"] else None
        job = self.engine.create_job(
            record["adapter_name"], self.store.file_path(record["training_file"]), val=val, lora=config, training=training,
            checkpoint_dir=self.store.job_dir(record["id"]) / "checkpoints", output_dir=self._adapter_dir(record),
            job_id=record["id"],
        )
        record["status"] = "running"
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

    def recover(self) -> None:
        """After a restart: reload the adapter catalog, restart unfinished jobs from their checkpoints."""
        for name, info in self.store.adapters().items():
            try:
                self.engine.load_adapter(name, info["path"])
            except Exception as e:  # a missing or broken adapter must not keep the server down
                log.error("adapter %s from the catalog could not be loaded: %s", name, e)
        for record in self.store.jobs_with_status(*UNFINISHED):
            try:
                self._start(record)
            except Exception as e:
                log.error("job %s could not be restarted: %s", record["id"], e)
                self._fail(record, f"could not resume after restart: {e}")

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
            self.store.add_checkpoint(job.id, {
                "id": f"ftckpt-{job.id[-12:]}-{step}", "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": str(path), "step_number": step, "fine_tuning_job_id": job.id,
                "metrics": {"step": step, "train_loss": job.last_train_loss, "valid_loss": job.last_eval_loss},
            })
        live.checkpoints_synced = len(job.checkpoints)
        return len(job.checkpoints) > start
