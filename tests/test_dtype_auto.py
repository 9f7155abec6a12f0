"""--dtype auto: the model's own dtype where this CPU computes it fast (AVX512-BF16 or AMX), float32
otherwise; the default of `loramux serve`, `generate` and `demo`. The CPU probe's answer is passed
in or patched, so both branches run on any machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_hf
from loramux.config import UnsupportedModelError
from loramux.model import dtype as dtypes
from loramux.model.dtype import auto_dtype, fast_bf16, resolve_dtype
from loramux.model.loader import SOURCE_FILE, load_model, own_dtype, resolve_model_dir

FAST, AVX2_ONLY = "AVX512-BF16", None  # what fast_bf16() answers on a Zen 4 / Sapphire Rapids, and on an AVX2 CPU


@pytest.mark.parametrize("own, label, cpu, expected, reason", [
    (torch.bfloat16, "bfloat16", FAST, torch.bfloat16, "model bfloat16, CPU has AVX512-BF16"),
    (torch.bfloat16, "bfloat16", "AMX", torch.bfloat16, "model bfloat16, CPU has AMX"),
    (torch.bfloat16, "bfloat16", AVX2_ONLY, torch.float32, "model bfloat16, CPU has neither AVX512-BF16 nor AMX"),
    (torch.float16, "float16", FAST, torch.bfloat16, "model float16, CPU has AVX512-BF16"),
    (torch.bfloat16, "GGUF Q4_1", FAST, torch.bfloat16, "model GGUF Q4_1, CPU has AVX512-BF16"),
    (torch.float32, "float32", FAST, torch.float32, "model float32"),
    (torch.float32, "float32", AVX2_ONLY, torch.float32, "model float32"),
])
def test_auto_rules(own, label, cpu, expected, reason):
    assert auto_dtype(own, label, cpu) == (expected, reason)


@pytest.mark.parametrize("cpu, expected", [(FAST, torch.bfloat16), (AVX2_ONLY, torch.float32)])
def test_auto_asks_the_probe_and_logs_the_choice(monkeypatch, caplog, cpu, expected):
    monkeypatch.setattr(dtypes, "fast_bf16", lambda: cpu)
    with caplog.at_level(logging.INFO, logger="loramux.model.dtype"):
        assert resolve_dtype("auto", lambda: (torch.bfloat16, "bfloat16")) == expected
    assert caplog.messages == [f"dtype auto -> {str(expected).removeprefix('torch.')} (model bfloat16, CPU has "
                               + (f"{cpu})" if cpu else "neither AVX512-BF16 nor AMX)")]


def test_a_named_dtype_is_taken_as_it_is_and_an_unknown_one_refused(monkeypatch):
    def own():
        raise AssertionError("the model's own dtype is read for auto only")

    monkeypatch.setattr(dtypes, "fast_bf16", lambda: FAST)
    assert resolve_dtype("float32", own) == torch.float32
    assert resolve_dtype("bf16", own) == torch.bfloat16
    assert resolve_dtype(torch.float32, own) == torch.float32
    with pytest.raises(ValueError, match="dtype 'float16' is not supported; choose one of auto, float32"):
        resolve_dtype("float16", own)


def test_the_probe_agrees_with_the_flags_linux_reports():
    """fast_bf16() (torch's probe) against the flags Linux reports for this CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    expected = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert fast_bf16() == expected


def _model_dir(tmp_path: Path, **config) -> Path:
    """A tiny float32 model directory whose config.json says `config` about its dtype."""
    path = tmp_path / "tiny"
    make_tiny_hf(seed=1).save_pretrained(path)
    written = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in ("dtype", "torch_dtype")}
    (path / "config.json").write_text(json.dumps(written | config))
    return path


@pytest.mark.parametrize("config, expected", [
    ({"dtype": "bfloat16"}, (torch.bfloat16, "bfloat16")),
    ({"torch_dtype": "float16"}, (torch.float16, "float16")),  # transformers 4's key
    ({"dtype": "float32"}, (torch.float32, "float32")),
    ({}, (torch.float32, "float32")),  # transformers reads no dtype as float32
])
def test_own_dtype_of_a_model_directory(tmp_path, config, expected):
    assert own_dtype(_model_dir(tmp_path, **config)) == expected


def test_own_dtype_of_a_converted_gguf_file(tmp_path):
    path = _model_dir(tmp_path, dtype="float32")  # what a conversion's config.json says, whatever the file held
    (path / SOURCE_FILE).write_text(json.dumps({"gguf": "m.Q4_1.gguf", "tensor_type": "Q4_1"}))
    assert own_dtype(path) == (torch.bfloat16, "GGUF Q4_1")
    (path / SOURCE_FILE).write_text(json.dumps({"gguf": "m.F16.gguf", "tensor_type": "F16"}))
    assert own_dtype(path) == (torch.bfloat16, "GGUF F16")
    (path / SOURCE_FILE).write_text(json.dumps({"gguf": "m.F32.gguf", "tensor_type": "F32"}))
    assert own_dtype(path) == (torch.float32, "GGUF F32")


def test_an_unknown_own_dtype_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError, match="dtype 'float64'"):
        own_dtype(_model_dir(tmp_path, dtype="float64"))


@pytest.mark.parametrize("config, cpu, expected", [
    ({"dtype": "bfloat16"}, FAST, torch.bfloat16),
    ({"dtype": "bfloat16"}, AVX2_ONLY, torch.float32),
    ({"dtype": "float32"}, FAST, torch.float32),
])
def test_load_model_in_auto(tmp_path, monkeypatch, config, cpu, expected):
    monkeypatch.setattr(dtypes, "fast_bf16", lambda: cpu)
    monkeypatch.setattr("loramux.model.loader.load_tokenizer", lambda directory: None)  # the tiny model has none
    assert load_model(_model_dir(tmp_path, **config), dtype="auto").model.dtype == expected


def test_serve_generate_and_demo_default_to_auto_finetune_and_bench_to_float32():
    from loramux.cli import build_parser

    parser = build_parser()
    for argv in (["serve"], ["generate"], ["demo"]):
        assert parser.parse_args(argv).dtype == "auto", argv
    assert parser.parse_args(["finetune", "--data", "d.jsonl", "--name", "n"]).dtype is None  # float32 for local runs
    assert parser.parse_args(["bench", "inference"]).dtype == "float32"
    with pytest.raises(SystemExit):  # a benchmark names the dtype its peers run in
        parser.parse_args(["bench", "inference", "--dtype", "auto"])
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "{auto,float32,bfloat16}" in serve_help and "AVX512-BF16 or AMX" in serve_help and "(default: auto)" in serve_help


def test_serve_loads_its_engine_in_auto(tmp_path, monkeypatch):
    """`loramux serve`'s engine (serving_engine, also every cluster replica's) takes --dtype's default."""
    from loramux.cli import build_parser
    from loramux.server.serve_options import serving_engine

    monkeypatch.setattr(dtypes, "fast_bf16", lambda: FAST)
    monkeypatch.setattr("loramux.model.loader.load_tokenizer", lambda directory: None)
    args = build_parser().parse_args(["serve", "--model", str(_model_dir(tmp_path, dtype="bfloat16")), "--kv-cache-mb", "4"])
    assert serving_engine(args).model.dtype == torch.bfloat16


@pytest.mark.integration
def test_the_default_model_is_a_quantized_gguf_so_auto_may_run_it_in_bf16():
    """SmolLM2-135M-Instruct ships as a Q4_1 GGUF file: 16 bits or fewer, so bf16 where the CPU is fast."""
    assert own_dtype(resolve_model_dir(None)[1]) == (torch.bfloat16, "GGUF Q4_1")
