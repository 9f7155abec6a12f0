"""loramux: fine-tune and serve many LoRA adapters on one shared base LLM, in the same forward passes."""

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
