"""loramux: fine-tune and serve many LoRA adapters on one shared base LLM, in the same forward passes.

The public names below are imported on first use (PEP 562), so that `import loramux` loads neither
torch nor transformers and the `loramux` command starts fast for commands that need neither
(`--help`, the client commands of a running server). `from loramux import Engine` works as usual.
Importing loramux changes nothing process-wide in its host (no environment variables, no global
settings); the `loramux` command alone sets what it needs (see `loramux.cli.main`).
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "loramux.engine.engine",
    "EngineConfig": "loramux.engine.engine",
    "Generation": "loramux.engine.engine",
    "SLO": "loramux.engine.requests",
    "RequestOutput": "loramux.engine.requests",
    "SamplingParams": "loramux.engine.sampling",
    "SchedulerConfig": "loramux.engine.scheduler",
    "QueueFullError": "loramux.engine.scheduler",
    "LoraConfig": "loramux.lora.adapter",
    "AdapterError": "loramux.lora.adapter",
    "UnknownAdapterError": "loramux.lora.adapter",
    "TrainingConfig": "loramux.training.config",
    "DataError": "loramux.training.data",
    "JobState": "loramux.training.job",
    "TrainingJob": "loramux.training.job",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    """Imports a public name's module on first access and keeps the name in this module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loramux' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
