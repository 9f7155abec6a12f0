"""An engine replica: one Engine behind the single-process server's own FastAPI app (create_app),
its store the coordinator's (remote_store.py). A Ray Serve deployment; the ingress hands it HTTP
requests whole (`forward`) and streams back what the app answers.

Threads, as in the single-process server (server/process.py):
- "loramux-engine" loads the model, then runs the engine's loop (steps, and calls between them);
- "loramux-http" runs the app's event loop: its handlers block on the store as they do on SQLite
  in one process, so they stay off Ray Serve's own event loop (which answers the router's probes);
- "loramux-heartbeat" reports to the coordinator every HEARTBEAT_SECONDS and carries out its
  orders: adopt an orphaned job, forget one it lost, drop adapters the catalog no longer has.

Every response carries `x-loramux-replica: <replica id>`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from argparse import Namespace
from collections.abc import AsyncIterator, Callable

import ray
from ray import serve

from loramux.cluster.coordinator import HEARTBEAT_SECONDS, LEASE_SECONDS
from loramux.cluster.remote_store import RemoteStore

log = logging.getLogger("loramux.cluster")
COORDINATOR = "loramux-coordinator"
NAMESPACE = "loramux"
REPLICA_HEADER = "x-loramux-replica"


class EngineReplica:
    def __init__(self, args: Namespace) -> None:
        self.id = serve.get_replica_context().replica_id.unique_id
        coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
        store = RemoteStore(coordinator, ray.get(coordinator.ready.remote()), self.id)
        self.coordinator, self.node = coordinator, ray.get_runtime_context().get_node_id()
        self.app = None
        self.http = asyncio.new_event_loop()
        threading.Thread(target=self.http.run_forever, name="loramux-http", daemon=True).start()
        started = threading.Event()
        failure: list[BaseException] = []

        def engine_thread() -> None:
            try:
                self.app = _build_app(args, store)
            except BaseException as e:  # reported by the constructor: Ray Serve retries the replica
                failure.append(e)
                return
            finally:
                started.set()
            self.app.state.loop.run()

        threading.Thread(target=engine_thread, name="loramux-engine", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]
        self.ctx = self.app.state.context
        self.loop = self.app.state.loop
        self.stats = self.loop.submit(self._report).result()
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeats, name="loramux-heartbeat", daemon=True).start()

    # --- HTTP ---------------------------------------------------------------------------------------
    async def forward(self, request: dict, model: str | None = None, target: str | None = None) -> AsyncIterator:
        """Runs one HTTP request through the app: yields {"status", "headers"} first, then the body's
        chunks (bytes). request: {"method", "path", "query_string", "headers", "body", "client"}, the
        ASGI scope's fields (headers as (bytes, bytes) pairs). `model` and `target` are for the
        router (router.py). Cancelled (the client went away), the app sees the client disconnect."""
        here = asyncio.get_running_loop()
        messages: asyncio.Queue = asyncio.Queue()
        disconnected = threading.Event()
        asyncio.run_coroutine_threadsafe(
            _call_app(self.app, request, lambda m: here.call_soon_threadsafe(messages.put_nowait, m), disconnected), self.http)
        done = False
        try:
            while not done:
                # what the app sent since the last yield goes as one chunk: each chunk is a Ray
                # object and two hops (here to the ingress, the ingress to Ray's proxy), so when a
                # stream's events come faster than they travel, they travel together
                batch = [await messages.get()]
                while not messages.empty():
                    batch.append(messages.get_nowait())
                body = b""
                for message in batch:
                    if message is None:
                        done = True
                        break
                    if message["type"] == "http.response.start":
                        yield {"status": message["status"],
                               "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.id.encode())]}
                    elif message["type"] == "http.response.body":
                        body += message.get("body", b"")
                        if not message.get("more_body"):
                            done = True
                            break
                if body:
                    yield body
        finally:
            disconnected.set()

    # --- the cluster's view of this replica ---------------------------------------------------------
    def record_routing_stats(self) -> dict:
        """Ray Serve's hook: what the router reads (router.py), as of the last heartbeat."""
        return {k: self.stats[k] for k in ("base", "resident", "training", "running", "waiting")}

    def _report(self, engine) -> dict:
        """Engine thread: this replica's state for the coordinator and the router."""
        training = self.ctx.jobs.training()
        return {
            "id": self.id, "pid": os.getpid(), "node": self.node, "base": list(self.ctx.model_names),
            "resident": sorted(engine.adapters.names()), "training": sorted(training.values()),
            "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting), "jobs": sorted(training),
        }

    def _heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.stats = self.loop.submit(self._report).result(timeout=LEASE_SECONDS)
                orders = ray.get(self.coordinator.heartbeat.remote(self.stats), timeout=LEASE_SECONDS)
            except Exception as e:  # a slow step or a coordinator restarting: report again next time
                log.warning("replica %s: heartbeat failed: %s", self.id, e)
                continue
            jobs, resident = self.ctx.jobs, self.ctx.resident
            for record in orders["adopt"]:
                log.info("replica %s adopts fine-tuning job %s", self.id, record["id"])
                self.loop.submit(lambda e, record=record: jobs.restart(record))
            for job_id in orders["drop"]:
                log.warning("replica %s lost fine-tuning job %s to another replica", self.id, job_id)
                self.loop.submit(lambda e, job_id=job_id: jobs.forget(job_id))
            catalog = set(orders["catalog"])
            self.loop.submit(lambda e: resident.retain_cataloged(catalog, grace_seconds=LEASE_SECONDS))

    def __del__(self) -> None:
        """Ray Serve's graceful stop: the coordinator hands this replica's jobs on at once."""
        if getattr(self, "_stop", None) is None:
            return
        self._stop.set()
        self.loop.stop(wait=True)
        try:
            ray.get(self.coordinator.leave.remote(self.id), timeout=5)
        except Exception:
            pass  # the coordinator is stopping too; leases expire on their own


def _build_app(args: Namespace, store: RemoteStore):
    """Engine thread: the model (with args.threads torch threads) and the server's app; the
    --adapter directories are read once, so a bad one fails the replica with its reason."""
    import torch

    from loramux.server.app import create_app
    from loramux.server.serve_options import serving_engine, serving_settings

    torch.set_num_threads(args.threads)
    engine = serving_engine(args)
    for name, path in args.adapter:
        engine.read_adapter(name, path)
    return create_app(engine, store, serving_settings(args))


async def _call_app(app, request: dict, deliver: Callable[[dict | None], None], disconnected: threading.Event) -> None:
    """On the app's event loop: one ASGI call; each message the app sends goes to `deliver`, then
    None. Once `disconnected` is set, the app's receive() reports the client gone."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"], "scheme": "http",
        "path": request["path"], "raw_path": request["path"].encode(), "query_string": request["query_string"],
        "root_path": "", "headers": request["headers"], "client": request["client"], "server": ("loramux-replica", 0),
    }
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        while not disconnected.is_set():
            await asyncio.sleep(0.1)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        deliver(message)

    try:
        await app(scope, receive, send)
    except Exception:  # the app has answered 500 already if it could
        log.exception("request %s %s failed", request["method"], request["path"])
    finally:
        deliver(None)
