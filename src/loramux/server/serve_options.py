"""What `loramux serve`'s options make: the engine and the server's settings, the same for the
single process (cli.py) and for every replica of a cluster (cluster/replica.py)."""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from loramux.engine.engine import Engine
from loramux.server.routes.context import Settings


def serving_engine(args: Namespace) -> Engine:
    """Loads the model (on the calling thread, which should be the one that runs the engine's steps)."""
    from loramux import EngineConfig, SchedulerConfig
    from loramux.model.loader import load_model

    scheduler = SchedulerConfig(max_waiting=args.max_waiting, enable_prefix_caching=args.enable_prefix_caching)
    return Engine(load_model(args.model, cache=args.cache_dir, dtype=args.dtype),
                  EngineConfig(kv_cache_memory=args.kv_cache_mb * 2**20, scheduler=scheduler))


def serving_settings(args: Namespace) -> Settings:
    for name, _ in args.adapter:
        if name in args.served_model_name:
            raise ValueError(f"--adapter {name}: the name is one of --served-model-name's")
    return Settings(api_key=args.api_key or os.environ.get("LORAMUX_API_KEY"), allowed_adapter_dirs=tuple(args.allow_adapter_dir),
                    max_body_bytes=int(args.max_body_mb * 2**20), max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_resident_adapters=args.max_adapters, served_model_names=tuple(args.served_model_name),
                    tool_call_parser=args.tool_call_parser)


def given_adapter_record(path: str) -> dict:
    """The catalog's record of an --adapter: evictable, reloaded on demand, kept across restarts."""
    return {"path": str(Path(path).resolve()), "source": "--adapter", "pinned": False}
