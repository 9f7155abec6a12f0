"""`loramux serve --replicas N`: starts a local Ray cluster (or joins one, --ray-address), creates
the coordinator, deploys the ingress and N engine replicas on Ray Serve, and serves until SIGINT or
SIGTERM; then it deletes what it deployed and, if it started the cluster, stops every Ray process.

The data directory is shared storage: every node must see it at the same path (a local disk on one
machine; NFS or the like across machines). Only the coordinator opens its SQLite catalog."""

from __future__ import annotations

import logging
import os
import signal
import threading
from argparse import Namespace
from pathlib import Path

APP_NAME = "loramux"
DEFAULT_MAX_ONGOING_REQUESTS = 32


def cluster_shape(args: Namespace, cpus_here: int) -> tuple[float, int, int]:
    """(CPUs per replica, torch threads per replica, max ongoing requests per replica) from the
    options and this machine's CPUs; a local cluster must fit the replicas on this machine."""
    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    cpus = args.replica_cpus if args.replica_cpus is not None else float(max(1, cpus_here // args.replicas))
    if cpus <= 0:
        raise ValueError("--replica-cpus must be positive")
    if args.ray_address is None and args.replicas * cpus > cpus_here:
        raise ValueError(f"{args.replicas} replicas x {cpus:g} CPUs do not fit this machine's {cpus_here} CPUs: "
                         "lower --replica-cpus, or join a larger cluster with --ray-address")
    threads = args.threads if args.threads is not None else max(1, int(cpus))
    ongoing = args.max_ongoing_requests if args.max_ongoing_requests is not None else DEFAULT_MAX_ONGOING_REQUESTS
    if threads < 1 or ongoing < 1:
        raise ValueError("--threads and --max-ongoing-requests must be at least 1")
    return cpus, threads, ongoing


def serve_cluster(args: Namespace) -> int:
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'loramux[ray]'") from None
    from loramux.cluster.coordinator import HEARTBEAT_SECONDS, Coordinator
    from loramux.cluster.ingress import Ingress
    from loramux.cluster.replica import COORDINATOR, NAMESPACE, EngineReplica
    from loramux.cluster.router import AdapterAffinityRouter
    from loramux.model.loader import resolve_model_dir
    from loramux.server.serve_options import given_adapter_record, serving_settings

    cpus_here = os.cpu_count() or 1
    replica_cpus, threads, ongoing = cluster_shape(args, cpus_here)
    settings = serving_settings(args)
    replica_args = _replica_args(args, threads, settings.api_key)
    resolve_model_dir(replica_args.model, replica_args.cache_dir)  # a GGUF is converted once, here, not by every replica

    own_cluster = args.ray_address is None
    quiet = {"logging_level": logging.WARNING, "namespace": NAMESPACE}
    if own_cluster:
        ray.init(num_cpus=cpus_here, include_dashboard=False, **quiet)
    else:
        ray.init(address=args.ray_address, **quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        coordinator = ray.remote(Coordinator).options(name=COORDINATOR, namespace=NAMESPACE, num_cpus=0, max_restarts=-1).remote(
            replica_args.data_dir)
        try:
            root = ray.get(coordinator.ready.remote())
        except ray.exceptions.RayActorError as e:  # e.g. another server holds the data directory
            raise ValueError(f"the coordinator could not open {replica_args.data_dir}: {e}") from None
        for name, path in args.adapter:
            ray.get(coordinator.store_call.remote("launcher", "put_adapter", (name, given_adapter_record(path)), {}))
        serve.start(http_options={"host": args.host, "port": args.port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        replicas = serve.deployment(
            EngineReplica, name="EngineReplica", num_replicas=args.replicas, max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": replica_cpus}, health_check_period_s=2, graceful_shutdown_timeout_s=5,
            request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                                      request_routing_stats_period_s=HEARTBEAT_SECONDS),
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        # the ingress only forwards: it must take every request the replicas can (Ray Serve's own
        # default, 5 in flight, would cap the whole cluster at 5 concurrent requests)
        ingress = Ingress.options(max_ongoing_requests=args.replicas * ongoing,
                                  logging_config={"log_level": "WARNING", "enable_access_log": False}).bind(
            replicas.bind(replica_args), settings.api_key, max(settings.max_body_bytes, settings.max_upload_bytes))
        serve.run(ingress, name=APP_NAME, route_prefix="/", blocking=False)
        where = "a local Ray cluster" if own_cluster else f"the Ray cluster at {args.ray_address}"
        print(f"loramux serving on http://{args.host}:{args.port}/v1 from {args.replicas} replicas on {where} "
              f"({replica_cpus:g} CPUs and {threads} threads each; data in {root})", flush=True)
        stop.wait()
        return 0
    finally:
        print("loramux: stopping the cluster", flush=True)
        try:
            serve.shutdown() if own_cluster else serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def _replica_args(args: Namespace, threads: int, api_key: str | None) -> Namespace:
    """The options every replica builds its engine and app from: paths made absolute (replicas run
    elsewhere, in other working directories), the API key resolved (from the environment too)."""
    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    values = {k: v for k, v in vars(args).items() if k != "run"}
    model = args.model if args.model is None or not Path(args.model).expanduser().exists() else absolute(args.model)
    return Namespace(**{
        **values, "threads": threads, "api_key": api_key, "model": model, "data_dir": absolute(args.data_dir),
        "cache_dir": absolute(args.cache_dir), "allow_adapter_dir": [absolute(d) for d in args.allow_adapter_dir],
        "adapter": [(name, absolute(path)) for name, path in args.adapter],
    })
