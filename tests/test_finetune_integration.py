"""Fine-tuning on the real default model: it learns while serving; a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from loramux import Engine, JobState, LoraConfig, SamplingParams, TrainingConfig
from loramux.datasets import shipped
from loramux.datasets.reverse_words import reverse_words

pytestmark = pytest.mark.integration


def _exact_match(engine: Engine, records: list[dict], adapter: str | None) -> float:
    outs = engine.generate([r["prompt"] for r in records], [adapter] * len(records), max_tokens=8)
    return sum(o.text.strip() == r["completion"].strip() for o, r in zip(outs, records)) / len(records)


def test_learns_while_serving(default_engine):
    """The base model fails the task; a job reaches >= 80% held-out exact match within 5 minutes of
    CPU time while the same engine serves two other adapters, whose outputs are those they give
    without any training; the new adapter serves at once, with no reload."""
    engine = Engine(default_engine.loaded)
    held_out = [json.loads(line) for line in shipped("reverse_words/val.jsonl").read_text().splitlines()]
    try:
        for i, name in enumerate(("poet", "coder")):
            engine.create_adapter(name, LoraConfig(r=8, alpha=16), seed=i, init_b="random")
        assert _exact_match(engine, held_out, None) <= 0.10
        served_prompts = ["Write a line about rain.", "What is a list in Python?", "Say hello.", "Name a color."]
        served_adapters = ["poet", "coder", "poet", "coder"]
        quiet = engine.generate(served_prompts, served_adapters, chat=True, max_tokens=12)

        cpu = time.process_time()
        job = engine.create_job(
            "reverser", shipped("reverse_words/train.jsonl"), lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
            training=TrainingConfig(epochs=1, batch_size=8, learning_rate=1e-3, warmup_steps=2),
        )
        served, mid_job = [], None
        while engine.has_work:
            if not engine.has_unfinished and len(served) < 12:
                i = len(served) % 4
                served.append((i, engine.add_request(served_prompts[i], served_adapters[i], SamplingParams(max_tokens=12), chat=True)))
            if job.step == 8 and mid_job is None:  # the adapter in training answers with its latest weights
                mid_job = engine.add_request("Reverse: lemon piano tiger\nAnswer:", "reverser", SamplingParams(max_tokens=6))
            engine.step()
        cpu = time.process_time() - cpu
        assert job.state is JobState.SUCCEEDED
        assert cpu <= 300, f"took {cpu:.0f} s of CPU time"
        assert len(served) == 12 and all(r.output_ids == quiet[i].token_ids for i, r in served)
        assert mid_job is not None and mid_job.finish_reason in ("stop", "length")
        assert _exact_match(engine, held_out, "reverser") >= 0.80
    finally:
        for name in engine.adapters.names():
            engine.adapters.remove(name)


def _finetune(out_dir, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "loramux.cli", "finetune", "--data", str(shipped("reverse_words/train.jsonl")),
            "--name", "rev", "--output-dir", str(out_dir), "--max-steps", "8", "--batch-size", "4", "--rank", "4",
            "--learning-rate", "1e-3", "--checkpoint-every", "2", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_run_resumes_from_its_checkpoint(tmp_path):
    """`loramux finetune` killed with SIGKILL after a checkpoint, then run again with the same
    command, ends with the adapter of an uninterrupted run."""
    full = _finetune(tmp_path / "full")
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err

    killed = _finetune(tmp_path / "cut")
    deadline = time.monotonic() + 600
    while not (tmp_path / "cut" / "checkpoints" / "step-000004").is_dir():
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()

    resumed = _finetune(tmp_path / "cut")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in err and "step-00000" in err
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)


def test_finetune_cli_refuses_bad_data_naming_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    result = subprocess.run([sys.executable, "-m", "loramux.cli", "finetune", "--data", str(bad), "--name", "x",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "line 2" in result.stderr and "completion" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_reverse_words_data_is_deterministic():
    assert reverse_words(4, seed=0) == reverse_words(4, seed=0)
    assert [json.loads(x) for x in shipped("reverse_words/val.jsonl").read_text().splitlines()] == reverse_words(32, seed=1)
