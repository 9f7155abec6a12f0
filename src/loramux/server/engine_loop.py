"""The engine's loop: it runs steps while there is work and, between steps, the calls that HTTP
handlers hand it. The engine is never touched from two threads at once.

`run()` takes over the calling thread, which should be the one that loaded the model (the main
thread; the HTTP server runs on another). libgomp keeps a team of worker threads for every thread
that has run parallel code, and once its threads outnumber the cores, every team spins only
briefly at its barriers before sleeping: the engine on a thread of its own, beside the main
thread's idle team, made 30% fewer tokens/s on 2 cores (docs/benchmarks.md, "The engine's thread"). For the
same reason torch runs on the engine's thread only: one parallel op on a worker thread that lives
on (asyncio.to_thread's) leaves a team behind and slows every later step as much.

Handlers `await loop.call(fn)` to run `fn(engine)` between steps, and receive a request's outputs
on an asyncio queue fed from the engine's thread.

`Engine.step` keeps its faults to what they belong to (a request, a job, the step's forward pass)
and reports them as outputs with finish_reason "error". An exception that still escapes a step is
an engine bug: it is logged, every request in flight finishes with finish_reason "error" and the
exception's message (their state cannot be trusted any more), and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

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
        self._stopped = threading.Event()

    def stop(self, wait: bool = True) -> None:
        """Ends `run` after the current step; with `wait`, returns once it has ended (at most 30 s)."""
        self._stop.set()
        self._calls.put((lambda engine: None, Future()))
        if wait:
            self._stopped.wait(timeout=30)

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

    def run(self) -> None:
        """Steps and calls on the calling thread until `stop()`."""
        try:
            self._loop()
        finally:
            self._stopped.set()

    def _loop(self) -> None:
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
                except Exception as e:  # an engine bug must not kill the server
                    log.exception("engine step failed")
                    outputs = self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                self._deliver(outputs)
                try:
                    self.on_step(self.engine)
                except Exception:  # bookkeeping (the store, metrics) failing must not stop serving
                    log.exception("after-step bookkeeping failed")

    def _execute(self, fn: Callable[[Engine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as e:  # handed back to the caller
            future.set_exception(e)

    def _fail_all(self, error: str) -> list[RequestOutput]:
        return [out for rid in list(self.engine.requests) if (out := self.engine.fail_request(rid, error)) is not None]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Puts a step's outputs on their listeners' queues: one wake-up per event loop per step,
        not one per output (each wake-up is a write to the loop's self-pipe and a pass of it)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._listeners.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
