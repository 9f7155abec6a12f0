"""Faults stay where they belong: a job's fault fails that job, a request's fault that request, and
only a failure of the shared forward pass is the whole step's. In every case the requests in flight
give the tokens they give without the fault, and the engine goes on (another job runs after)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from loramux import JobState, LoraConfig, SamplingParams, TrainingConfig
from loramux.datasets.reverse_words import reverse_words
from loramux.engine.engine import Engine, EngineConfig
from loramux.training.checkpoint import (
    AdapterSnapshot,
    latest_checkpoint,
)
from loramux.training.writer import Snapshot, Writer

LORA = LoraConfig(r=8, alpha=16, target_modules="all-linear")
PROMPTS = ["Reverse: apple river stone\nAnswer:", "Hello there", "Count: 1 2 3"]
SERVED = ["z", None, "z"]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
NO_SPACE = os.strerror(errno.ENOSPC)


def _engine(tiny_engine, writer: Writer | None = None) -> Engine:
    """A tiny engine with adapter "z" (random B, so it changes outputs) and, if given, `writer`."""
    engine = Engine(tiny_engine().loaded, EngineConfig(kv_cache_memory=16 * 2**20), writer=writer)
    engine.create_adapter("z", LORA, seed=5, init_b="random")
    return engine


def _served(engine: Engine) -> list[list[int]]:
    """The served requests' greedy tokens with nothing else running: the reference."""
    return [g.token_ids for g in engine.generate(PROMPTS, SERVED, params=GREEDY)]


def _run(engine: Engine, limit: int = 5_000) -> None:
    for _ in range(limit):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("the engine did not finish its work")


def _assert_released(engine: Engine, job) -> None:
    """A finished job holds no optimizer, gradients or data, and has left the trainer's step loop."""
    assert job.optimizer is None and not job.train and not job.writes_pending
    assert all(t.grad is None and not t.requires_grad for t in job.adapter.parameters())
    assert job.id not in engine.trainer.jobs and engine.job(job.id).state is job.state


def _assert_healthy(engine: Engine, reference: list[list[int]], tmp_path: Path) -> None:
    """The engine serves the same tokens, and trains another job to the end (checkpoints included)."""
    assert _served(engine) == reference
    job = engine.create_job("after", reverse_words(8, seed=9), lora=LORA, checkpoint_dir=tmp_path / "after",
                            training=TrainingConfig(max_steps=3, batch_size=4, checkpoint_every=2, checkpoint_interval=0))
    _run(engine)
    assert job.state is JobState.SUCCEEDED and [p.name for p in job.checkpoints] == ["step-000002", "step-000003"]
    assert engine.kv.allocator.num_used == 0


def _full_disk_under(directory: Path):
    """A write function that fails as a full disk does for snapshots under `directory`, and writes
    the others as usual."""

    def write(snapshot: Snapshot) -> Path:
        if Path(snapshot.directory).is_relative_to(directory):
            raise OSError(errno.ENOSPC, NO_SPACE, str(snapshot.directory))
        return snapshot.write()

    return write


def _train_beside_requests(engine: Engine, **job_args):
    """Starts serving PROMPTS, then a job beside them; runs everything to the end."""
    requests = [engine.add_request(p, a, GREEDY) for p, a in zip(PROMPTS, SERVED)]
    job = engine.create_job("t", reverse_words(24, seed=1), lora=LORA, **job_args)
    _run(engine)
    return job, requests


def test_a_checkpoint_write_that_finds_the_disk_full_fails_that_job_alone(tiny_engine, tmp_path):
    full = tmp_path / "full"
    engine = _engine(tiny_engine, Writer(write=_full_disk_under(full)))
    reference = _served(engine)
    job, requests = _train_beside_requests(
        engine, checkpoint_dir=full, training=TrainingConfig(epochs=2, batch_size=4, checkpoint_every=2, checkpoint_interval=0))
    assert [r.output_ids for r in requests] == reference and {r.finish_reason for r in requests} == {"length"}
    assert job.state is JobState.FAILED
    assert job.error == f"writing checkpoint at step 2 failed: [Errno {errno.ENOSPC}] {NO_SPACE}: '{full}'"
    assert job.events[-1].message == f"job failed: {job.error}" and job.events[-1].data["state"] == "failed"
    assert 2 <= job.step < job.total_steps and job.checkpoints == []
    assert all(torch.isfinite(t).all() for t in job.adapter.parameters())
    _assert_released(engine, job)
    _assert_healthy(engine, reference, tmp_path)


def test_a_final_adapter_write_that_fails_fails_the_job_instead_of_succeeding(tiny_engine, tmp_path):
    full = tmp_path / "full"
    engine = _engine(tiny_engine, Writer(write=_full_disk_under(full)))
    reference = _served(engine)
    job, requests = _train_beside_requests(engine, output_dir=full / "adapter", training=TrainingConfig(max_steps=3, batch_size=4))
    assert [r.output_ids for r in requests] == reference
    assert job.state is JobState.FAILED and job.step == job.total_steps
    assert job.error.startswith(f"writing the adapter to {full / 'adapter'} failed: [Errno {errno.ENOSPC}]")
    assert not any(e.data.get("state") == "succeeded" for e in job.events)
    _assert_released(engine, job)
    _assert_healthy(engine, reference, tmp_path)


def test_a_slow_disk_stalls_neither_serving_nor_training_and_success_waits_for_the_write(tiny_engine, tmp_path):
    """While the writer is stuck on the final adapter, requests keep completing; the job stays
    running (not succeeded) until the write lands, then succeeds."""
    released = threading.Event()

    def stuck_until_released(snapshot: Snapshot) -> Path:
        if isinstance(snapshot, AdapterSnapshot):
            assert released.wait(timeout=300)
        return snapshot.write()

    engine = _engine(tiny_engine, Writer(write=stuck_until_released))
    reference = _served(engine)
    job = engine.create_job("t", reverse_words(8, seed=1), lora=LORA, output_dir=tmp_path / "out",
                            training=TrainingConfig(max_steps=2, batch_size=4))
    while job.step < job.total_steps:
        engine.step()
    requests = [engine.add_request(p, a, GREEDY) for p, a in zip(PROMPTS, SERVED)]
    while engine.has_unfinished:
        engine.step()
    assert [r.output_ids for r in requests] == reference
    assert job.state is JobState.RUNNING and job.writes_pending and not (tmp_path / "out").exists()
    released.set()
    _run(engine)
    assert job.state is JobState.SUCCEEDED and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert [e.message for e in job.events[-2:]] == [f"adapter written to {tmp_path / 'out'}", "job succeeded"]


def _mount_tmpfs(directory: Path, size: str) -> None:
    directory.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")


def test_a_checkpoint_on_a_really_full_filesystem_fails_the_job_and_leaves_no_partial_checkpoint(tiny_engine, tmp_path):
    """The same fault from a real filesystem: a 64 KiB tmpfs cannot hold a checkpoint (adapter and
    optimizer state of this job: about 400 KiB)."""
    full = tmp_path / "tmpfs"
    _mount_tmpfs(full, "64k")
    try:
        engine = _engine(tiny_engine)
        reference = _served(engine)
        job, requests = _train_beside_requests(
            engine, checkpoint_dir=full / "checkpoints",
            training=TrainingConfig(epochs=2, batch_size=4, checkpoint_every=2, checkpoint_interval=0))
        assert [r.output_ids for r in requests] == reference
        assert job.state is JobState.FAILED and job.error.startswith("writing checkpoint at step 2 failed: [Errno 28]")
        assert latest_checkpoint(full / "checkpoints") is None and os.listdir(full / "checkpoints") == []
        _assert_released(engine, job)
        _assert_healthy(engine, reference, tmp_path)
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_non_finite_loss_fails_the_job_before_it_reaches_the_weights(tiny_engine, tmp_path):
    """A learning rate of 1e30 makes step 1 set B to about +-1e30 (finite); in the next forward pass
    the LoRA deltas of q and k make attention scores overflow, and the loss is not finite. The job
    fails then, before its optimizer step, and its weights stay those of step 1."""
    engine = _engine(tiny_engine)
    reference = _served(engine)
    requests = [engine.add_request(p, a, GREEDY) for p, a in zip(PROMPTS, SERVED)]
    job = engine.create_job("t", reverse_words(24, seed=1), lora=LORA,
                            training=TrainingConfig(epochs=2, batch_size=4, learning_rate=1e30, max_grad_norm=None))
    after_step_1 = None
    while engine.has_work:
        engine.step()
        if job.step == 1 and after_step_1 is None:
            after_step_1 = [t.detach().clone() for t in job.adapter.parameters()]
    assert [r.output_ids for r in requests] == reference
    assert job.state is JobState.FAILED and job.step == 1
    assert re.match(r"the training loss is not finite \((nan|inf)\) in optimizer step 2", job.error), job.error
    assert job.error.endswith("the adapter keeps its weights of step 1")
    weights = list(job.adapter.parameters())
    assert all(torch.isfinite(t).all() for t in weights) and max(t.abs().max().item() for t in weights) > 1e29
    assert all(torch.equal(a, b) for a, b in zip(weights, after_step_1))
    _assert_released(engine, job)
    engine.unload_adapter("t")
    _assert_healthy(engine, reference, tmp_path)


def test_a_request_that_fails_at_sample_time_finishes_alone_with_an_error(tiny_engine, tmp_path):
    """An end token id outside the vocabulary, blocked by min_tokens, makes sampling raise for that
    request only; the others, and a job training beside them, are unaffected."""
    engine = _engine(tiny_engine)
    reference = _served(engine)
    solo = tiny_engine()
    trained_alone = solo.create_job("t", reverse_words(8, seed=1), lora=LORA, training=TrainingConfig(max_steps=2, batch_size=4))
    _run(solo)

    requests = [engine.add_request(p, a, GREEDY) for p, a in zip(PROMPTS, SERVED)]
    bad = engine.add_request("Hello", "z", SamplingParams(max_tokens=8, stop_token_ids=(10**9,), min_tokens=2))
    job = engine.create_job("t", reverse_words(8, seed=1), lora=LORA, training=TrainingConfig(max_steps=2, batch_size=4))
    outputs = []
    while engine.has_work:
        outputs += [o for o in engine.step() if o.request_id == bad.id]
    assert [r.output_ids for r in requests] == reference
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].finish_reason == "error"
    assert outputs[0].error == ("sampling or decoding the next token failed: IndexError: "
                                "index 1000000000 is out of bounds for dimension 0 with size 49152")
    assert bad.finish_reason == "error" and bad.error == outputs[0].error and bad.id not in engine.requests
    assert job.state is JobState.SUCCEEDED
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(job.adapter.parameters(), trained_alone.adapter.parameters()))
    generation = engine.generate(["Hello"], ["z"], params=SamplingParams(max_tokens=4, stop_token_ids=(10**9,), min_tokens=1))[0]
    assert generation.finish_reason == "error" and generation.error == outputs[0].error and generation.token_ids == []
    _assert_healthy(engine, reference, tmp_path)


def test_a_failed_forward_pass_fails_that_steps_requests_and_jobs_and_the_engine_goes_on(tiny_engine, default_tokenizer, tmp_path):
    """A model whose vocabulary (97) is smaller than its tokenizer's: a job's tokenized samples hold
    ids the embedding does not have, so the forward pass of a step with them raises. That step's
    requests finish with "error" (never "abort"), the job fails, and later requests run as before."""
    from conftest import make_tiny_hf, ours_from_hf

    from loramux.model.loader import LoadedModel, resolve_model_dir

    model = ours_from_hf(make_tiny_hf(seed=0))
    engine = Engine(LoadedModel(name="tiny97", path=resolve_model_dir(None)[1], model=model, tokenizer=default_tokenizer),
                    EngineConfig(kv_cache_memory=4 * 2**20))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    reference = [g.token_ids for g in engine.generate(prompts, params=GREEDY)]
    in_flight = [engine.add_request(p, None, GREEDY) for p in prompts]
    job = engine.create_job("t", reverse_words(8, seed=1), lora=LORA, training=TrainingConfig(max_steps=2, batch_size=4))
    finals = {}
    while engine.has_work:
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert job.state is JobState.FAILED and job.error.startswith("the step's forward pass failed: IndexError")
    assert [(finals[r.id].finish_reason, finals[r.id].error) for r in in_flight] == [("error", job.error)] * 3
    assert all(len(r.output_ids) < GREEDY.max_tokens for r in in_flight)
    assert not engine.requests and engine.kv.allocator.num_used == 0
    assert [g.token_ids for g in engine.generate(prompts, params=GREEDY)] == reference
    _assert_released(engine, job)


def test_the_server_loop_keeps_serving_when_a_job_finds_the_disk_full(tiny_engine, tmp_path):
    """Through the server's engine loop, job service and store: a job whose checkpoints find the
    disk full fails (status, error, an error event) while every streamed request in flight ends
    normally with the tokens it gives without the fault."""
    from loramux.server.engine_loop import EngineLoop
    from loramux.server.jobs import JobService
    from loramux.server.metrics import Metrics
    from loramux.server.protocol import FineTuningJobRequest
    from loramux.server.store import Store

    store = Store(tmp_path / "data")
    engine = _engine(tiny_engine, Writer(write=_full_disk_under(store.root / "jobs")))
    reference = _served(engine)
    jobs = JobService(engine, store, Metrics())
    loop = EngineLoop(engine, on_step=lambda e: jobs.sync())
    thread = threading.Thread(target=loop.run)
    thread.start()

    async def scenario() -> tuple[dict, list[dict], list[list]]:
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"r{i}" for i in range(len(PROMPTS))]
        for rid in ids:
            loop.listen(rid, queue)
        for rid, prompt, adapter in zip(ids, PROMPTS, SERVED):
            await loop.call(lambda e, p=prompt, a=adapter, rid=rid: e.add_request(p, a, GREEDY, request_id=rid))
        training_file = store.add_file("train.jsonl", "fine-tune", "\n".join(map(json.dumps, reverse_words(24, seed=1))).encode())
        body = FineTuningJobRequest(model="tiny", training_file=training_file["id"],
                                    training={"max_steps": 6, "checkpoint_every": 1}, hyperparameters={"batch_size": 4})
        record = await jobs.create(body, loop)
        outputs: dict[str, list] = {rid: [] for rid in ids}
        while not all(o and o[-1].finished for o in outputs.values()):
            out = await asyncio.wait_for(queue.get(), timeout=300)
            outputs[out.request_id].append(out)
        while (record := store.get_job(record["id"]))["status"] == "running":
            await asyncio.sleep(0.05)
        return record, store.list_events(record["id"], limit=100)[0], [outputs[rid] for rid in ids]

    try:
        record, events, streams = asyncio.run(scenario())
    finally:
        loop.stop()
        thread.join(timeout=60)
        store.close()
    assert [[t for o in s for t in o.new_token_ids] for s in streams] == reference
    assert [s[-1].finish_reason for s in streams] == ["length"] * 3 and all(o.error is None for s in streams for o in s)
    assert record["status"] == "failed" and record["fine_tuned_model"] is None
    assert record["error"]["code"] == "training_failed"
    assert record["error"]["message"].startswith("writing checkpoint at step 1 failed: [Errno 28]")
    assert record["adapter_name"] not in engine.adapters  # the failed job's adapter is unloaded
    assert events[0]["level"] == "error" and events[0]["message"] == f"job failed: {record['error']['message']}"
    assert not jobs._live and not engine.trainer.jobs
