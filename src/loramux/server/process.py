"""How `loramux serve` lays out its threads: the engine's loop on the main thread (the one that
loaded the model, see engine_loop.py), uvicorn's event loop on a second one. SIGINT and SIGTERM
ask uvicorn to finish; its shutdown stops the engine's loop, and the process ends."""

from __future__ import annotations

import signal
import threading

import uvicorn
from fastapi import FastAPI


def serve(app: FastAPI, host: str, port: int) -> int:
    """Serves `app` (from create_app) until a signal; returns the exit code (1 if the server never
    started, e.g. the port was taken: uvicorn logs why)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    loop = app.state.loop

    def http() -> None:
        try:
            server.run()
        finally:  # also when uvicorn could not start: the engine's loop must not wait for it
            loop.stop(wait=False)

    def on_signal(signum, frame) -> None:
        if server.should_exit:  # a second signal: do not wait for open streams
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=http, name="loramux-http")
    thread.start()
    try:
        loop.run()
    finally:
        server.should_exit = True
        thread.join()
    return 0 if server.started else 1
