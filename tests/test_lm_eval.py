"""lm-evaluation-harness against the live server: its `local-completions` model (loglikelihoods
from /v1/completions with echo and logprobs) on a small multiple-choice task written here gives the
same accuracy and per-choice loglikelihoods as its `hf` model on the same weights in transformers.
Nothing is downloaded: the task's data is a local JSONL file."""

from __future__ import annotations

import json

import pytest

from live_server import KEY, Server, tiny_model_dir

QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " Berlin"], 0),
    ("Two plus two equals", [" four", " five", " seven"], 0),
    ("The sky on a clear day is", [" green", " blue", " loud"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " miles"], 0),
    ("A cat says", [" woof", " moo", " meow"], 2),
    ("The opposite of hot is", [" cold", " tall", " late"], 0),
    ("Bees make", [" steel", " honey", " glass"], 1),
    ("The first month of the year is", [" March", " January", " October"], 1),
    ("Fish live in", [" water", " clouds", " sand"], 0),
    ("The sun rises in the", [" west", " north", " east"], 2),
    ("Ice is a form of", [" water", " fire", " wood"], 0),
    ("A week has seven", [" days", " hours", " years"], 0),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    srv = Server(root / "data", "--model", str(tiny_model_dir(root / "tiny")), "--api-key", KEY)
    srv.model_dir = root / "tiny"
    yield srv
    srv.stop()


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task over a local JSONL file, for lm-eval's TaskManager(include_path=...)."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path


def evaluate(model: str, model_args: str, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(task_dir)),
                           log_samples=True, batch_size=1)


def per_choice(results: dict) -> dict[tuple[int, int], float]:
    """(document, choice) -> the loglikelihood lm-eval got for that choice."""
    return {(s["doc_id"], i): float(r[0]) for s in results["samples"]["tiny_mc"] for i, r in enumerate(s["filtered_resps"])}


def test_local_completions_against_the_server_agrees_with_hf(server, task_dir, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the bearer token
    served = evaluate("local-completions", f"model=tiny,base_url={server.url}/v1/completions,tokenizer={server.model_dir},"
                      "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1", task_dir)
    local = evaluate("hf", f"pretrained={server.model_dir},dtype=float32,device=cpu", task_dir)
    assert served["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]
    mine, theirs = per_choice(served), per_choice(local)
    assert len(mine) == sum(len(c) for _, c, _ in QUESTIONS) and mine.keys() == theirs.keys()
    assert max(abs(mine[k] - theirs[k]) for k in mine) < 1e-3
