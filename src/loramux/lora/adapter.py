"""A LoRA adapter: its configuration and its A/B matrices for each targeted (layer, linear)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramux.config import LORA_TARGETS, ModelConfig
from loramux.lora.ops import LoraWeights

MAX_RANK = 256


class AdapterError(ValueError):
    """An adapter that cannot be used with this base model; the message names the mismatch."""


class UnknownAdapterError(LookupError):
    """No adapter of that name is loaded; the message lists the loaded ones."""


@dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoRA options that loramux supports. scale = alpha / r, or alpha / sqrt(r) with rsLoRA.

    layers: the decoder layers the adapter covers (None: all of them).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = LORA_TARGETS if targets == "all-linear" else (targets,)
        unknown = [m for m in targets if m not in LORA_TARGETS]
        if unknown or not targets:
            raise AdapterError(f"unknown target modules {unknown}; supported: {', '.join(LORA_TARGETS)}")
        object.__setattr__(self, "target_modules", tuple(m for m in LORA_TARGETS if m in targets))
        if not 1 <= self.r <= MAX_RANK:
            raise AdapterError(f"rank r={self.r} is out of range; loramux supports 1 to {MAX_RANK}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora dropout {self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdapter:
    """weights: (layer, module name) -> (A [r, in], B [out, r]). The tensors are the adapter's own:
    the registry installs them into the model's linears by reference, and training updates them in place."""

    def __init__(self, name: str, config: LoraConfig, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
            raise AdapterError(f"invalid adapter name {name!r}")
        self.name, self.config, self.weights = name, config, weights
        self.dropout_generator = torch.Generator(device=next(iter(weights.values()))[0].device) if weights else torch.Generator()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, r={self.config.r}, targets={list(self.config.target_modules)}, linears={len(self.weights)})"

    def layer_weights(self, key: tuple[int, str]) -> LoraWeights:
        A, B = self.weights[key]
        return LoraWeights(A=A, B=B, scale=self.config.scale, dropout=self.config.dropout, dropout_generator=self.dropout_generator)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]

    def requires_grad_(self, flag: bool = True) -> LoraAdapter:
        for t in self.parameters():
            t.requires_grad_(flag)
        return self

    def check_fits(self, model: ModelConfig) -> None:
        """Raises AdapterError naming the first (layer, module) whose shapes do not fit `model`."""
        shapes = model.linear_shapes()
        for (layer, module), (A, B) in self.weights.items():
            if not 0 <= layer < model.num_layers:
                raise AdapterError(f"adapter {self.name!r}: layer {layer} does not exist (base has {model.num_layers})")
            if module not in shapes:
                raise AdapterError(f"adapter {self.name!r}: unknown module {module!r}; supported: {', '.join(LORA_TARGETS)}")
            fan_in, fan_out = shapes[module]
            if A.shape[1] != fan_in or B.shape[0] != fan_out or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"adapter {self.name!r}: layer {layer} {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                    f"the base model needs lora_A [r, {fan_in}] and lora_B [{fan_out}, r]"
                )

    @classmethod
    def create(
        cls,
        name: str,
        config: LoraConfig,
        model: ModelConfig,
        *,
        generator: torch.Generator | None = None,
        init_b: str = "zeros",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LoraAdapter:
        """A new adapter initialised as PEFT does: A ~ kaiming-uniform(a=sqrt(5)), B = 0.
        init_b="random" gives B a small random value instead (for tests and benchmarks)."""
        shapes = model.linear_shapes()
        layers = config.layers if config.layers is not None else range(model.num_layers)
        weights = {}
        for layer in layers:
            for module in config.target_modules:
                fan_in, fan_out = shapes[module]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5)
                A = (torch.rand(config.r, fan_in, generator=generator) * 2 - 1) * bound
                if init_b == "zeros":
                    B = torch.zeros(fan_out, config.r)
                else:
                    B = (torch.rand(fan_out, config.r, generator=generator) * 2 - 1) * 0.1 / math.sqrt(config.r)
                weights[(layer, module)] = (A.to(dtype=dtype, device=device), B.to(dtype=dtype, device=device))
        return cls(name, config, weights)
