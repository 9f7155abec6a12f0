"""loramux on a Ray Serve cluster (`loramux serve --replicas N`; needs the `loramux[ray]` extra).

Nothing outside this package imports Ray: plain `loramux serve` is one process and never loads it.

    ingress.py      the HTTP entry point: forwards every request to an engine replica
    router.py       which replica: the one training or holding the request's adapter, spilling under load
    replica.py      one Engine with the single-process server's routes, on its own threads
    coordinator.py  the one writer of the data directory's catalog and job records; replicas' leases
    remote_store.py the Store's interface, in a replica, through the coordinator
    metrics_merge.py every replica's Prometheus text as one, labelled by replica
    launch.py       starts (or joins) the cluster, deploys, and stops everything on a signal
"""
