"""Durability by default: jobs checkpoint every few steps and every minute of training, a job
killed with SIGKILL at any moment resumes to the weights of an uninterrupted run, and finished jobs
leave nothing behind in the trainer or the job service."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FakeClock

from loramux import JobState, LoraConfig, TrainingConfig
from loramux.datasets.reverse_words import reverse_words
from loramux.engine.engine import Engine, EngineConfig

LORA = LoraConfig(r=8, alpha=16, target_modules="all-linear")


def _engine(tiny_engine, clock) -> Engine:
    return Engine(tiny_engine().loaded, EngineConfig(kv_cache_memory=16 * 2**20), clock=clock)


def _run(engine: Engine, after_each_step=lambda: None) -> None:
    for _ in range(5_000):
        if not engine.has_work:
            return
        engine.step()
        engine.trainer.writer.wait_all()  # each step's checkpoint is on disk before the next step
        after_each_step()
    raise AssertionError("the engine did not finish its work")


def test_jobs_checkpoint_every_ten_steps_by_default(tiny_engine, tmp_path):
    assert (TrainingConfig().checkpoint_every, TrainingConfig().checkpoint_interval) == (10, 60.0)
    engine = _engine(tiny_engine, FakeClock())  # time stands still: only the step count triggers
    job = engine.create_job("d", reverse_words(8, seed=0), lora=LORA, checkpoint_dir=tmp_path,
                            training=TrainingConfig(max_steps=25, batch_size=4))
    _run(engine)
    assert job.state is JobState.SUCCEEDED
    assert [p.name for p in job.checkpoints] == ["step-000010", "step-000020", "step-000025"]
    assert sorted(os.listdir(tmp_path)) == ["step-000010", "step-000020", "step-000025"]
    assert [e.data["step"] for e in job.events if "checkpoint" in e.data] == [10, 20, 25]


def test_a_checkpoint_after_every_minute_of_training(tiny_engine, tmp_path):
    """With 25 s per optimizer step and a 60 s interval, the clock reads 0, 25, 50, 75 at the ends
    of steps 1-4: step 4 is the first 60 s after the start, then every third step (75 s) after it."""
    clock = FakeClock()
    engine = _engine(tiny_engine, clock)
    job = engine.create_job("t", reverse_words(8, seed=0), lora=LORA, checkpoint_dir=tmp_path,
                            training=TrainingConfig(max_steps=12, batch_size=4, checkpoint_every=0, checkpoint_interval=60))
    steps = [0]

    def tick() -> None:
        if job.step != steps[-1]:
            steps.append(job.step)
            clock.now += 25

    _run(engine, tick)
    assert steps == list(range(13))
    assert [p.name for p in job.checkpoints] == ["step-000004", "step-000007", "step-000010", "step-000012"]
    assert job.running_seconds == 12 * 25


def test_checkpoints_can_be_turned_off(tiny_engine, tmp_path):
    engine = _engine(tiny_engine, FakeClock())
    job = engine.create_job("o", reverse_words(8, seed=0), lora=LORA, checkpoint_dir=tmp_path / "ck",
                            training=TrainingConfig(max_steps=12, batch_size=4, checkpoint_every=0, checkpoint_interval=0))
    _run(engine)
    assert job.state is JobState.SUCCEEDED and job.checkpoints == [] and not (tmp_path / "ck").exists()


def test_the_server_uses_the_engines_checkpoint_defaults_unless_the_request_sets_them():
    from loramux.server.protocol import FineTuningJobRequest

    unset = FineTuningJobRequest(model="m", training_file="f").training
    assert (unset.checkpoint_every, unset.checkpoint_interval) == (10, 60.0)
    explicit = FineTuningJobRequest(model="m", training_file="f", training={"checkpoint_every": 0}).training
    assert (explicit.checkpoint_every, explicit.checkpoint_interval) == (0, 60.0)
    assert set(unset.model_dump()) <= set(TrainingConfig.__dataclass_fields__)  # every option reaches the job


# --- kill -9 and resume --------------------------------------------------------------------------

CHILD_TRAINING = {"epochs": 2, "batch_size": 3, "gradient_accumulation": 2, "learning_rate": 3e-3, "lr_schedule": "cosine",
                  "warmup_steps": 2, "weight_decay": 0.01, "seed": 7, "checkpoint_every": 3, "checkpoint_interval": 0}


def _child(out: Path) -> None:
    """The job the kill test runs in a subprocess: dropout, accumulation, warm-up, cosine decay and
    weight decay, so that resuming must restore data order, RNG, optimizer state and schedule.
    Prints one line per optimizer step: its step, train loss and learning rate."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny_hf, ours_from_hf

    from loramux.model.loader import LoadedModel, load_tokenizer, resolve_model_dir

    path = resolve_model_dir(None)[1]
    model = ours_from_hf(make_tiny_hf(seed=0, vocab_size=49152, tie_word_embeddings=True))
    engine = Engine(LoadedModel(name="tiny", path=path, model=model, tokenizer=load_tokenizer(path)),
                    EngineConfig(kv_cache_memory=16 * 2**20))
    job = engine.create_job("k", reverse_words(20, seed=3), lora=LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear"),
                            training=TrainingConfig(**CHILD_TRAINING), checkpoint_dir=out / "checkpoints", output_dir=out / "adapter")
    print(json.dumps({"resumed_at": job.step}), flush=True)
    seen = 0
    while engine.has_work:
        engine.step()
        for event in job.events[seen:]:
            if "train_loss" in event.data:
                print(json.dumps({k: event.data[k] for k in ("step", "train_loss", "learning_rate")}), flush=True)
        seen = len(job.events)
    assert job.state is JobState.SUCCEEDED, job.error


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_a_job_killed_at_any_step_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    full = _finish(_start(tmp_path / "full"))
    curve = {r["step"]: r for r in full[1:]}
    total = len(curve)
    assert total == 8 and full[0] == {"resumed_at": 0}  # 2 epochs of ceil(20 / 6) optimizer steps
    reference = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")

    for kill_at in sorted({2, 5, random.Random().randint(1, total - 1)}):
        out = tmp_path / f"killed-at-{kill_at}"
        proc = _start(out)
        for line in proc.stdout:
            if json.loads(line).get("step") == kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"
        assert not (out / "adapter").exists()

        resumed = _finish(_start(out))
        start = resumed[0]["resumed_at"]
        assert start <= kill_at and start % 3 == 0  # from its latest checkpoint
        assert [r["step"] for r in resumed[1:]] == list(range(start + 1, total + 1))
        for r in resumed[1:]:  # the same data, dropout masks, optimizer state and learning rates
            assert r["learning_rate"] == curve[r["step"]]["learning_rate"]
            assert r["train_loss"] == pytest.approx(curve[r["step"]]["train_loss"], rel=1e-5, abs=1e-6)
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert weights.keys() == reference.keys()
        for key in reference:
            assert torch.allclose(weights[key], reference[key], atol=1e-6, rtol=1e-5), (kill_at, key)
    assert any((reference[k] != 0).any() for k in reference if "lora_B" in k)


# --- finished jobs release their memory ----------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_twenty_jobs_in_a_row_leave_the_trainer_and_the_job_service_as_they_found_them(tiny_engine, tmp_path):
    """20 server jobs, one after another, each with checkpoints and an adapter written: afterwards
    the trainer and the job service hold no live job, the engine no more tensors than after the
    second job, a step's sync reads nothing from the store, and the process grew by little."""
    import asyncio
    import threading

    from loramux.server.engine_loop import EngineLoop
    from loramux.server.jobs import JobService
    from loramux.server.metrics import Metrics
    from loramux.server.protocol import FineTuningJobRequest
    from loramux.server.store import Store

    class CountingStore(Store):
        """The real store, counting the job reads of the engine's thread (where `sync` runs)."""

        engine_reads = 0

        def get_job(self, job_id):
            if threading.current_thread() is thread:
                CountingStore.engine_reads += 1
            return super().get_job(job_id)

    thread = threading.Thread(target=lambda: loop.run())

    store = CountingStore(tmp_path / "data")
    engine = Engine(tiny_engine().loaded, EngineConfig(kv_cache_memory=16 * 2**20))
    jobs = JobService(engine, store, Metrics())
    loop = EngineLoop(engine, on_step=lambda e: jobs.sync())
    thread.start()
    training = store.add_file("train.jsonl", "fine-tune", "\n".join(map(json.dumps, reverse_words(8, seed=0))).encode())
    body = FineTuningJobRequest(model="tiny", training_file=training["id"], lora={"r": 8, "alpha": 16},
                                training={"max_steps": 4, "checkpoint_every": 2}, hyperparameters={"batch_size": 4})

    async def one_job() -> dict:
        record = await jobs.create(body, loop)
        while (record := store.get_job(record["id"]))["status"] == "running":
            await asyncio.sleep(0.02)
        # the server keeps succeeded adapters in its catalog; unload it so that what remains is the trainer's
        await loop.call(lambda e: e.unload_adapter(record["fine_tuned_model"]))
        return record

    try:
        records, tensors, rss = [], [], []
        for _ in range(20):
            records.append(asyncio.run(one_job()))
            tensors.append(asyncio.run(loop.call(lambda e: _live_tensors())))
            rss.append(_rss_bytes())
    finally:
        loop.stop()
        thread.join(timeout=60)
        store.close()
    assert [r["status"] for r in records] == ["succeeded"] * 20
    assert CountingStore.engine_reads == 0  # the per-step sync works from the records it holds
    assert engine.trainer.jobs == {} and not jobs._live and len(engine.trainer.finished) == 20
    assert all(n <= tensors[1] for n in tensors[2:]), tensors
    assert rss[-1] - rss[1] < 64 * 2**20, [r // 2**20 for r in rss]


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
