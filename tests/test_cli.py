"""The `loramux generate` command, run as a user would, against transformers + PEFT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROMPTS = ["What is the capital of France?", "Write one sentence about dogs.", "List two fruits."]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux.cli", *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def peft_adapter_dir(tmp_path_factory, default_engine):
    """A PEFT adapter (rank 8 on q, v; non-zero B) made by the peft package on the default model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_engine.loaded.path, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("adapters") / "peft-qv"
    peft_model.save_pretrained(path)
    return path


def _peft_greedy(default_engine, adapter_dir, prompt: str, max_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_engine.loaded.path, dtype=torch.float32)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.tensor([default_engine.encode(prompt, chat=True)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=default_engine.tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.integration
def test_chat_answers_paris():
    result = _cli("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.integration
def test_json_greedy_matches_transformers_peft_in_a_mixed_batch(default_engine, peft_adapter_dir):
    """Prompts for the adapter and for the base model share one batch; each prompt's token ids equal
    transformers + PEFT greedy generation for that prompt alone."""
    uses = ["peft", "base", "peft"]
    args = ["generate", "--dtype", "float32", "--json", "--chat", "--max-tokens", "20", "--adapter", f"peft={peft_adapter_dir}"]
    for prompt, use in zip(PROMPTS, uses):
        args += ["--prompt", prompt, "--use", use]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row, use in zip(rows, uses):
        expected = _peft_greedy(default_engine, peft_adapter_dir if use == "peft" else None, row["prompt"], 20)
        # transformers stops at EOS too; ours stops there and reports finish_reason "stop"
        assert row["token_ids"] == expected, (row["prompt"], use)
        assert row["text"] == default_engine.tokenizer.decode(expected, skip_special_tokens=True)
    # the adapter really changed something
    assert any(row["token_ids"] != _peft_greedy(default_engine, None, row["prompt"], 20)
               for row, use in zip(rows, uses) if use == "peft")


def test_bad_input_gets_a_clear_error_not_a_traceback(tmp_path):
    missing = _cli("generate", "--prompt", "hi", "--model", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    not_a_model = _cli("generate", "--prompt", "hi", "--model", str(tmp_path))
    assert not_a_model.returncode == 2 and "Llama family" in not_a_model.stderr
    bad_spec = _cli("generate", "--prompt", "hi", "--adapter", "no-equals-sign")
    assert bad_spec.returncode == 2 and "NAME=PATH" in bad_spec.stderr


@pytest.mark.integration
def test_unknown_adapter_and_bad_params_are_refused():
    unknown = _cli("generate", "--prompt", "hi", "--use", "nope")
    assert unknown.returncode == 2 and "unknown adapter 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr
    bad_top_p = _cli("generate", "--prompt", "hi", "--top-p", "0")
    assert bad_top_p.returncode == 2 and "top_p" in bad_top_p.stderr


def test_client_commands_refuse_on_one_line(tmp_path):
    """Against a server: an unreadable training file is refused before any request, and an
    unreachable server is named (nothing listens on port 9)."""
    absent = _cli("finetune", "--data", str(tmp_path / "absent.jsonl"), "--name", "x", "--server", "http://127.0.0.1:9")
    assert absent.returncode == 2 and "cannot read" in absent.stderr and "Traceback" not in absent.stderr
    unreachable = _cli("adapters", "list", "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def test_finetune_on_a_server_refuses_the_options_of_local_runs():
    """`--server` jobs run on the server's model and data directory: local-only options are refused
    by name before anything is sent (no server needs to run: the check comes first)."""
    result = _cli("finetune", "--server", "http://127.0.0.1:9", "--data", "x.jsonl", "--name", "n",
                  "--output-dir", "out", "--dtype", "bfloat16")
    assert result.returncode == 2
    assert "--output-dir, --dtype apply to local runs only" in result.stderr and "Traceback" not in result.stderr
