"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against a
live server on a tiny model.

Every operation gets schema-valid and schema-invalid requests; every response must be no 5xx,
arrive within the request timeout, have a status and content type the schema declares, and a body
that conforms to it; valid requests must not be refused with 400 nor invalid ones accepted. So
that the fuzzer gets past "no such model / file / job", the server is seeded with a file, a job and
an adapter first, and the fields that name them draw from those real names most of the time
(schemathesis dictionaries), from the generated strings otherwise.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from live_server import KEY, Server, tiny_model_dir
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

EXAMPLES = 6  # per operation and generation mode
TIMEOUT = 120  # seconds a response may take: far more than any takes, even beside the fuzzer's fine-tuning jobs on a busy CPU
SCHEMA_VALID_BUT_400 = ("/v1/completions", "/v1/chat/completions", "/v1/files", "/v1/fine_tuning/jobs",
                        "/v1/fine_tuning/jobs/{job_id}/events", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/load_lora_adapter",
                        "/tokenize", "/detokenize", "/v1/fine_tuning/jobs/{job_id}/pause", "/v1/fine_tuning/jobs/{job_id}/resume")
UNLIKELY_TO_SUCCEED = ("POST /v1/files", "POST /v1/fine_tuning/jobs", "POST /v1/load_lora_adapter",
                       "GET /v1/files", "GET /v1/fine_tuning/jobs",  # lists: a random cursor seldom is one of theirs
                       "GET /v1/fine_tuning/jobs/{job_id}/events", "GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
                       "DELETE /v1/models/{model_id}",  # only the fine-tuned model may go, and only once
                       "POST /v1/fine_tuning/jobs/{job_id}/pause", "POST /v1/fine_tuning/jobs/{job_id}/resume")  # the job has finished
TRAINING = b"".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}).encode() + b"\n" for w in ("yes", "no", "maybe"))


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> dict:
    """The server and the real names to fuzz with."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model_dir(root / "tiny")
    adapters = root / "adapters"
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    save_peft_adapter(LoraAdapter.create("seed", LoraConfig(r=2), config, generator=torch.Generator().manual_seed(0)), adapters / "seed")
    server = Server(root / "data", "--model", str(model), "--api-key", KEY, "--allow-adapter-dir", str(adapters),
                    "--adapter", f"resident={adapters / 'seed'}")
    try:
        client = server.client()
        file = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file.id,
                                             extra_body={"training": {"max_steps": 2, "checkpoint_every": 1}})
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
        assert job.status == "succeeded", job
        cursors = [file.id, job.id, client.fine_tuning.jobs.list_events(job.id).data[-1].id,
                   client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].id]
        names = {"models": ["tiny", "tiny", "resident", job.fine_tuned_model],  # "tiny" twice: jobs need the base model
                 "files": [file.id], "jobs": [job.id], "cursors": cursors,
                 "adapter_dirs": [str(adapters / "seed")], "adapters": ["resident", job.fine_tuned_model]}
        yield {"server": server, "names": names}
    finally:
        server.stop()


def test_api_conforms_to_its_schema(live):
    names = live["names"]
    bindings = {"body.model": "models", "body.training_file": "files", "body.validation_file": "files",
                "path.file_id": "files", "path.job_id": "jobs", "path.model_id": "models", "query.after": "cursors", "body.lora_path": "adapter_dirs",
                "body.lora_name": "adapters"}
    config = schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {KEY}"},
        "request-timeout": TIMEOUT,
        "dictionaries": {name: {"values": values} for name, values in names.items()},
        "parameters": {key: {"dictionary": name, "probability": 0.8} for key, name in bindings.items()},
        # Schema-valid requests that the server must still refuse with a 400, for what a schema
        # cannot say: a prompt that does not fit the model (token ids past its vocabulary, prompt plus
        # max_tokens past its context, or logit_bias ids past it), fields that contradict each other
        # (stream_options without stream), an upload that is not fine-tuning JSONL, a cursor (`after`)
        # that is not in the list, an adapter path that is not an adapter in the allowed directories,
        # ids to detokenize past the vocabulary, messages a chat template refuses, a finished job
        # paused or resumed.
        "operations": [{"include-path": list(SCHEMA_VALID_BUT_400),
                        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409", "429", "5xx"]}}}],
    })
    schema = schemathesis.openapi.from_url(f"{live['server'].url}/openapi.json", config=config)
    cases: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = {}
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):  # the seeded file goes last
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = statuses.setdefault(operation.label, Counter())

            @given(operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                cases[operation.label] += 1
                response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
                seen[response.status_code] += 1

            try:
                fuzz()
            except Unsatisfiable:  # nothing to send that the schema forbids (e.g. only a string in the path)
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as e:  # one failure per operation and mode, all reported below
                failures.append(f"{operation.label} ({mode}): {e}")
    print(f"{sum(cases.values())} cases:", {label: dict(s) for label, s in statuses.items()})
    assert not failures, "\n\n".join(failures)
    assert len(cases) == 25
    # the real names got the fuzzer past "not found" to every operation, and to success where a
    # random request can succeed (a random upload is not fine-tuning JSONL, a random job or adapter
    # load seldom names a valid file or adapter directory, a random cursor seldom is one of the list's)
    assert all(set(s) - {404} for s in statuses.values()), statuses
    assert all(statuses[label][200] for label in statuses if label not in UNLIKELY_TO_SUCCEED), statuses

    # Whatever the fuzzer sent, the server answers, its engine holds no request (none leaked), and
    # no handler raised. (A fuzzed job may fail, e.g. a learning rate that overflows: the job records why.)
    server = live["server"]
    reply = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    metrics = httpx.get(f"{server.url}/metrics").text
    running = [line for line in metrics.splitlines() if line.startswith(("loramux_requests_running", "loramux_kv_blocks_used"))]
    assert [float(line.split()[-1]) for line in running] == [0.0, 0.0], running
    assert "unhandled error" not in Path(server.log).read_text()  # what the app logs with a 500
