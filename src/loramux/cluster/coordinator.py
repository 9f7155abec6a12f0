"""The cluster's coordinator: one Ray actor, the only writer of the data directory's SQLite catalog
and job records (the Store), and the keeper of which replica runs which fine-tuning job.

Replicas reach the Store through it (remote_store.py) and report to it every HEARTBEAT_SECONDS
(`heartbeat`): what they hold (resident adapters, adapters in training, requests running and
waiting, live jobs). A replica that has not reported for LEASE_SECONDS is dead to the cluster.

Jobs are held by leases. A replica takes one when it writes the record of a job that is not
finished (it created or restarted the job) and renews it with every heartbeat that lists the job.
A write to a job leased to another live replica is refused (`JobLeaseLost`): a replica that was
taken for dead cannot overwrite the job's new owner. An unfinished job without a live lease (its
replica was killed, or the whole service restarted) is an orphan; the next heartbeat of a live
replica that runs the fewest jobs adopts one orphan (its reply carries the record to restart, which
resumes from the job's last checkpoint), so orphans spread over the replicas one by one.
"""

from __future__ import annotations

import time
from typing import Any

from loramux.server.jobs import UNFINISHED
from loramux.server.store import Store

HEARTBEAT_SECONDS = 1.0
LEASE_SECONDS = 6.0

# The Store's methods replicas may call (its path helpers run locally, remote_store.py).
STORE_METHODS = frozenset({
    "add_file", "get_file", "list_files", "delete_file",
    "put_job", "get_job", "list_jobs", "jobs_with_status", "add_event", "list_events", "add_checkpoint", "list_checkpoints",
    "put_adapter", "remove_adapter", "adapters", "delete_adapter_dir",
})


class JobLeaseLost(RuntimeError):
    """A replica wrote to a job that another live replica holds."""


class Coordinator:
    """Run as a Ray actor (launch.py); every method runs on the actor's one thread, in order."""

    def __init__(self, data_dir: str, clock=time.monotonic) -> None:
        self.store = Store(data_dir)
        self.clock = clock
        self.replicas: dict[str, dict] = {}  # replica id -> its last heartbeat, with "seen" (clock)
        self.leases: dict[str, tuple[str, float]] = {}  # job id -> (replica id, expiry on clock)

    def ready(self) -> str:
        return str(self.store.root)

    # --- the Store ----------------------------------------------------------------------------------
    def store_call(self, replica: str, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in STORE_METHODS:
            raise AttributeError(f"the Store has no remote method {method!r}")
        if method == "put_job":
            self._check_lease(replica, args[0])
        return getattr(self.store, method)(*args, **kwargs)

    def _check_lease(self, replica: str, record: dict) -> None:
        """Refuses a write to a job leased to another live replica; leases an unfinished job to the
        writer, and drops the lease of a finished one."""
        job_id, now = record["id"], self.clock()
        holder = self.leases.get(job_id)
        if holder is not None and holder[0] != replica and holder[1] > now and self._live(holder[0], now):
            raise JobLeaseLost(f"fine-tuning job {job_id} is held by replica {holder[0]}, not {replica}")
        if record["status"] in UNFINISHED:
            self.leases[job_id] = (replica, now + LEASE_SECONDS)
        else:
            self.leases.pop(job_id, None)

    # --- replicas -----------------------------------------------------------------------------------
    def heartbeat(self, status: dict) -> dict:
        """A replica's report: {"id", "pid", "node", "resident", "training", "base", "running",
        "waiting", "jobs"}. Returns its orders: {"catalog": adapter names the cluster still serves
        (a resident adapter not among them was unloaded or deleted elsewhere), "adopt": job records
        to restart, "drop": job ids it runs but no longer holds}."""
        now, replica = self.clock(), status["id"]
        self.replicas[replica] = {**status, "seen": now}
        drop = []
        for job_id in status["jobs"]:
            holder = self.leases.get(job_id)
            if holder is None or holder[0] == replica or holder[1] <= now or not self._live(holder[0], now):
                self.leases[job_id] = (replica, now + LEASE_SECONDS)
            else:
                drop.append(job_id)
        adopt = []
        orphans = [r for r in self.store.jobs_with_status(*UNFINISHED) if not self._held(r["id"], now)]
        if orphans and len(status["jobs"]) - len(drop) <= min(self._job_counts(now).values()):
            adopt.append(orphans[0])
            self.leases[orphans[0]["id"]] = (replica, now + LEASE_SECONDS)
        return {"catalog": sorted(self.store.adapters()), "adopt": adopt, "drop": drop}

    def leave(self, replica: str) -> None:
        """A replica that stops on purpose: its jobs are orphans at once."""
        self.replicas.pop(replica, None)
        self.leases = {job: lease for job, lease in self.leases.items() if lease[0] != replica}

    def _live(self, replica: str, now: float) -> bool:
        seen = self.replicas.get(replica, {}).get("seen")
        return seen is not None and now - seen < LEASE_SECONDS

    def _held(self, job_id: str, now: float) -> bool:
        holder = self.leases.get(job_id)
        return holder is not None and holder[1] > now and self._live(holder[0], now)

    def _job_counts(self, now: float) -> dict[str, int]:
        counts = {r: 0 for r in self.replicas if self._live(r, now)}
        for replica, expiry in self.leases.values():
            if replica in counts and expiry > now:
                counts[replica] += 1
        return counts

    # --- for the ingress ----------------------------------------------------------------------------
    def cluster(self) -> list[dict]:
        """The live replicas' last reports, oldest replica first, with the seconds since each."""
        now = self.clock()
        return [{**{k: v for k, v in s.items() if k != "seen"}, "last_seen_seconds": round(now - s["seen"], 3)}
                for r, s in self.replicas.items() if self._live(r, now)]

    def owner(self, job_id: str) -> str | None:
        """The live replica that holds the job, if any."""
        now = self.clock()
        return self.leases[job_id][0] if self._held(job_id, now) else None

    def placement(self) -> str | None:
        """The live replica a new job should go to: the one that runs the fewest."""
        counts = self._job_counts(self.clock())
        return min(counts, key=counts.get) if counts else None
