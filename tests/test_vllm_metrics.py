"""vLLM's metric names on /metrics, beside loramux's own, against a live server on a tiny model:
each has vLLM's type and labels, the counters and histograms agree with what the responses
reported, and vllm:lora_requests_info names the adapter of a request while it runs."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from live_server import KEY, Server, tiny_model_dir
from loramux.config import ModelConfig
from loramux.lora.adapter import LoraAdapter, LoraConfig
from loramux.lora.peft_io import save_peft_adapter

SERVED = "served-tiny"
MAX_ADAPTERS = 3
TYPES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:lora_requests_info": "gauge",
}
HISTOGRAMS = [name for name, kind in TYPES.items() if kind == "histogram"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-metrics")
    model = tiny_model_dir(root / "tiny")
    config = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    adapter = LoraAdapter.create("poet", LoraConfig(r=2), config, generator=torch.Generator().manual_seed(0))
    save_peft_adapter(adapter, root / "poet")
    srv = Server(root / "data", "--model", str(model), "--api-key", KEY, "--served-model-name", SERVED,
                 "--adapter", f"poet={root / 'poet'}", "--max-adapters", str(MAX_ADAPTERS))
    yield srv
    srv.stop()


def scrape(server) -> dict:
    """The families of /metrics by name."""
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}


def value(families: dict, sample: str) -> float:
    """The value of a vLLM sample of one series (model_name = the served id, engine "0")."""
    family = families[sample.removesuffix("_total").removesuffix("_count")]
    [found] = [s for s in family.samples if s.name == sample]
    assert found.labels == {"model_name": SERVED, "engine": "0"}, found
    return found.value


def test_every_vllm_name_is_there_with_vllms_type(server):
    families = scrape(server)
    assert {name: families[name].type for name in TYPES} == TYPES
    assert "vllm:prompt_tokens_total" in [s.name for s in families["vllm:prompt_tokens"].samples]
    assert "vllm:generation_tokens_total" in [s.name for s in families["vllm:generation_tokens"].samples]
    assert 0 <= value(families, "vllm:kv_cache_usage_perc") <= 1
    [info] = families["vllm:lora_requests_info"].samples
    assert info.labels == {"max_lora": str(MAX_ADAPTERS), "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert "loramux_requests_running" in families and "loramux_prompt_tokens" in families  # loramux's own stay


def test_counters_and_histograms_agree_with_the_responses(server):
    client = server.client()
    before = scrape(server)
    usages = []
    for i, model in enumerate((SERVED, "poet", SERVED, "poet", SERVED)):
        extra = {"ignore_eos": True}  # at least two tokens each: every request has a time per output token
        if i % 2:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                   max_tokens=3 + i, extra_body=extra)
        else:
            reply = client.completions.create(model=model, prompt="Once upon a time " * (i + 1), max_tokens=3 + i, extra_body=extra)
        usages.append(reply.usage)
    after = scrape(server)

    def grew(sample: str) -> float:
        return value(after, sample) - value(before, sample)

    assert grew("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert grew("vllm:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    for name in HISTOGRAMS:
        assert grew(f"{name}_count") == len(usages), name
    assert value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0


def test_lora_requests_info_names_the_adapter_of_a_running_request(server):
    body = {"model": "poet", "prompt": "Tell a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body,
                      timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the request runs
        families = scrape(server)
        [info] = families["vllm:lora_requests_info"].samples
        assert info.labels == {"max_lora": str(MAX_ADAPTERS), "running_lora_adapters": "poet", "waiting_lora_adapters": ""}
        assert info.value > 0  # a timestamp, as vLLM sets it
        assert value(families, "vllm:num_requests_running") == 1
        assert 0 < value(families, "vllm:kv_cache_usage_perc") <= 1
    deadline = time.monotonic() + 60  # the server aborts the request once it sees the client gone
    while scrape(server)["vllm:lora_requests_info"].samples[0].labels["running_lora_adapters"]:
        assert time.monotonic() < deadline, "the aborted request is still running"
        time.sleep(0.1)
