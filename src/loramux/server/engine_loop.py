"""The engine's own thread: it runs steps while there is work and, between steps, the calls that
HTTP handlers hand it. The engine is never touched from two threads at once.

Handlers `await loop.call(fn)` to run `fn(engine)` between steps, and receive a request's outputs
on an asyncio queue fed from the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from loramux.engine.engine import Engine
from loramux.engine.requests import RequestOutput

log = logging.getLogger("loramux.server")


class EngineLoop:
    def __init__(self, engine: Engine, on_step: Callable[[Engine], None] = lambda engine: None) -> None:
        self.engine = engine
        self.on_step = on_step  # runs in the engine thread after every step (events, metrics)
        self._calls: queue.Queue[tuple[Callable[[Engine], Any], Future]] = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._calls.put((lambda engine: None, Future()))
        self._thread.join(timeout=30)

    def submit(self, fn: Callable[[Engine], Any]) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Runs fn(engine) in the engine thread between two steps and returns its result."""
        return await asyncio.wrap_future(self.submit(fn))

    def listen(self, request_id: str, q: asyncio.Queue) -> None:
        """Sends the request's RequestOutputs to `q` (register before adding the request; several
        requests may share one queue)."""
        self._listeners[request_id] = (asyncio.get_running_loop(), q)

    def forget(self, request_id: str) -> None:
        self._listeners.pop(request_id, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work:  # idle: sleep until a call arrives
                try:
                    self._execute(*self._calls.get(timeout=0.5))
                except queue.Empty:
                    continue
            while True:  # every pending call, then one step
                try:
                    fn, future = self._calls.get_nowait()
                except queue.Empty:
                    break
                self._execute(fn, future)
            if self.engine.has_work:
                try:
                    outputs = self.engine.step()
                except Exception:  # a bug must not kill the server: fail the step's requests
                    log.exception("engine step failed")
                    outputs = self._abort_all()
                for out in outputs:
                    self._deliver(out)
                self.on_step(self.engine)

    def _execute(self, fn: Callable[[Engine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as e:  # handed back to the caller
            future.set_exception(e)

    def _abort_all(self) -> list[RequestOutput]:
        return [out for rid in list(self.engine.requests) if (out := self.engine.abort(rid)) is not None]

    def _deliver(self, out: RequestOutput) -> None:
        target = self._listeners.get(out.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)
