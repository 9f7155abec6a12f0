"""loramux: fine-tune and serve many LoRA adapters on one shared base LLM, in the same forward passes."""

import os

# CPU tensors of 2 MB and more on transparent huge pages, 2 MB-aligned (torch reads this at its first
# CPU allocation, so it applies where loramux is imported before torch, as in the `loramux`
# command; set it to 0 to opt out). Large activations then come from and go back to the operating
# system whole instead of fragmenting the C heap: a fine-tuning step's peak memory falls by about
# 200 MB of 1.7 GB at the same speed (docs/benchmarks.md, fine-tuning).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from loramux.engine.engine import Engine, EngineConfig, Generation
from loramux.engine.requests import SLO, RequestOutput
from loramux.engine.sampling import SamplingParams
from loramux.engine.scheduler import QueueFullError, SchedulerConfig
from loramux.lora.adapter import AdapterError, LoraConfig, UnknownAdapterError
from loramux.training.config import TrainingConfig
from loramux.training.data import DataError
from loramux.training.job import JobState, TrainingJob

__all__ = [
    "Engine", "EngineConfig", "Generation", "SLO", "RequestOutput", "SamplingParams", "SchedulerConfig",
    "QueueFullError", "LoraConfig", "AdapterError", "UnknownAdapterError", "TrainingConfig", "DataError",
    "JobState", "TrainingJob",
]
__version__ = "0.1.0"
