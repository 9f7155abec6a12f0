"""loramux: fine-tune and serve many LoRA adapters on one shared base LLM, in the same forward passes."""

from loramux.engine.engine import Engine, Generation
from loramux.engine.sampling import SamplingParams
from loramux.lora.adapter import AdapterError, LoraConfig, UnknownAdapterError

__all__ = ["Engine", "Generation", "SamplingParams", "LoraConfig", "AdapterError", "UnknownAdapterError"]
__version__ = "0.1.0"
