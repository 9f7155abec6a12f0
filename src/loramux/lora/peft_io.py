"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys look like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A: [r, in],
B: [out, r]). Loading validates everything before returning, so a refused adapter is never half
loaded. Saving is atomic (loramux.atomic): a temporary sibling, fsynced, renamed into place.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loramux.atomic import replace_dir_atomic, write_file_atomic
from loramux.config import ATTENTION_LINEARS, LORA_TARGETS, ModelConfig
from loramux.lora.adapter import AdapterError, LoraAdapter, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# Options whose non-default value changes the computation in ways loramux does not implement.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, [], ()),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),  # aLoRA acts only after the invocation tokens
}
# These initialisations change the base weights too; their saved A/B are wrong on the untouched base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def load_peft_adapter(
    path: str | os.PathLike,
    model: ModelConfig,
    name: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoraAdapter:
    """Reads a PEFT LoRA directory; raises AdapterError naming any mismatch with `model`."""
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{directory} is not a PEFT adapter: {CONFIG_FILE} not found")
    if not weights_path.is_file():
        hint = " (adapter_model.bin is not read: re-save with safe_serialization=True)" if (directory / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{directory}: {WEIGHTS_FILE} not found{hint}")
    config = read_peft_config(directory)
    weights = _weights_from_keys(load_file(weights_path), directory)
    modules = {m for _, m in weights}
    if not modules <= set(config.target_modules):
        raise AdapterError(f"{directory}: weights for {sorted(modules - set(config.target_modules))} not in target_modules {list(config.target_modules)}")
    for (layer, module), (A, _) in weights.items():
        if A.shape[0] != config.r:
            raise AdapterError(f"{directory}: layer {layer} {module} has rank {A.shape[0]}, adapter_config.json says r={config.r}")
    layers = sorted({layer for layer, _ in weights})
    config = LoraConfig(**{**config.__dict__, "target_modules": tuple(m for m in LORA_TARGETS if m in modules),
                           "layers": None if layers == list(range(model.num_layers)) else tuple(layers)})
    adapter = LoraAdapter(
        name or directory.name,
        config,
        {k: (A.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device)) for k, (A, B) in weights.items()},
    )
    adapter.check_fits(model)
    return adapter


def read_peft_config(path: str | os.PathLike) -> LoraConfig:
    """The LoRA config of a PEFT directory's adapter_config.json (target_modules as it says, before
    the weights narrow them); OSError if unreadable, AdapterError if invalid or unsupported."""
    config_path = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path}: invalid JSON ({e})") from None
    return _config_from_peft(raw, Path(path))


def _config_from_peft(raw: dict, directory: Path) -> LoraConfig:
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory}: peft_type {raw.get('peft_type')!r} is not supported; only LORA")
    for option, defaults in _UNSUPPORTED.items():
        if option in raw and raw[option] not in defaults:
            raise AdapterError(f"{directory}: {option}={raw[option]!r} is not supported by loramux")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"{directory}: init_lora_weights={init!r} changes the base model; convert it to a plain LoRA "
            f"first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        # "all-linear", or a regex over full module names: the weights' keys say which linears it hit.
        targets = LORA_TARGETS
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=targets or (),
        use_rslora=bool(raw.get("use_rslora", False)),
    )


def _weights_from_keys(state: dict[str, torch.Tensor], directory: Path) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{directory}: unsupported tensor {key!r} (loramux reads LoRA A/B of {', '.join(LORA_TARGETS)})")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in LORA_TARGETS:
            raise AdapterError(f"{directory}: unknown module {module!r} in {key!r}; supported: {', '.join(LORA_TARGETS)}")
        halves.setdefault((layer, module), {})[which] = tensor
    if not halves:
        raise AdapterError(f"{directory}: {WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{directory}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
    return {k: (v["A"], v["B"]) for k, v in sorted(halves.items())}


@dataclass(frozen=True)
class PeftFiles:
    """An adapter's two PEFT files in memory: the config and CPU copies of the weights under PEFT's
    key names. Made on the thread that owns the adapter (`peft_files`); writing it (`write`) then
    needs no access to the live tensors, so it can run on a writer thread while training goes on."""

    config: dict
    tensors: dict[str, torch.Tensor]

    def write(self, directory: Path) -> None:
        """Writes the two files into `directory` (no fsync: the atomic helpers that call it do)."""
        self.write_weights(directory / WEIGHTS_FILE)
        self.write_config(directory / CONFIG_FILE)

    def write_weights(self, path: Path) -> None:
        save_file(self.tensors, path, metadata={"format": "pt"})

    def write_config(self, path: Path) -> None:
        path.write_text(json.dumps(self.config, indent=2))


def peft_files(adapter: LoraAdapter, base_model: str = "") -> PeftFiles:
    """A snapshot of `adapter` as PEFT files: its weights cloned to the CPU (contiguous)."""
    c = adapter.config
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": list(c.target_modules),
        "use_rslora": c.use_rslora,
        "layers_to_transform": list(c.layers) if c.layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for (layer, module), (A, B) in adapter.weights.items():
        group = "self_attn" if module in ATTENTION_LINEARS else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().to("cpu", copy=True).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().to("cpu", copy=True).contiguous()
    return PeftFiles(config, tensors)


def save_peft_adapter(adapter: LoraAdapter, path: str | os.PathLike, base_model: str = "") -> Path:
    """Writes `adapter` in PEFT's format to `path` (see `write_peft_dir`)."""
    return write_peft_dir(peft_files(adapter, base_model), path)


def write_peft_dir(files: PeftFiles, path: str | os.PathLike) -> Path:
    """Writes PEFT files to `path`. A new directory appears whole (`replace_dir_atomic`); in an
    existing one each file is replaced atomically, weights first, and anything else there
    (checkpoints, say) is left alone."""
    target = Path(path)
    if not target.is_dir():
        return replace_dir_atomic(target, files.write)
    write_file_atomic(target / WEIGHTS_FILE, files.write_weights)
    write_file_atomic(target / CONFIG_FILE, files.write_config)
    return target
