"""The cluster's parts without a cluster: the coordinator's job leases and adoption on a controlled
clock, the router's ranks, and the merge of replicas' Prometheus text (tests/test_cluster.py runs
them together on a local Ray cluster)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from conftest import FakeClock
from loramux.cluster.coordinator import LEASE_SECONDS, Coordinator, JobLeaseLost
from loramux.cluster.metrics_merge import merge_metrics


def job(job_id: str, status: str = "running") -> dict:
    return {"id": job_id, "created_at": int(time.time()), "status": status}


def report(replica: str, jobs: list[str]) -> dict:
    return {"id": replica, "pid": 1, "node": "n", "base": ["m"], "resident": [], "training": [], "running": 0, "waiting": 0,
            "jobs": jobs}


@pytest.fixture
def coordinator(tmp_path):
    c = Coordinator(str(tmp_path), clock=FakeClock(100.0))
    yield c
    c.store.close()


def test_a_job_is_leased_to_its_writer_and_adopted_once_its_replica_is_gone(coordinator):
    c, clock = coordinator, coordinator.clock
    c.heartbeat(report("A", []))
    c.heartbeat(report("B", []))
    c.store_call("A", "put_job", (job("j1"),), {})
    assert c.owner("j1") == "A" and c.placement() == "B"
    with pytest.raises(JobLeaseLost):  # A is live: B cannot write its job
        c.store_call("B", "put_job", (job("j1"),), {})
    assert c.heartbeat(report("B", []))["adopt"] == []
    # A stops reporting; B goes on
    for _ in range(int(LEASE_SECONDS) + 1):
        clock.now += 1
        orders = c.heartbeat(report("B", []))
        if orders["adopt"]:
            break
    assert [r["id"] for r in orders["adopt"]] == ["j1"] and c.owner("j1") == "B"
    assert [r["id"] for r in c.cluster()] == ["B"]
    # A comes back: its write is refused and its heartbeat tells it to drop the job
    with pytest.raises(JobLeaseLost):
        c.store_call("A", "put_job", (job("j1"),), {})
    assert c.heartbeat(report("A", ["j1"]))["drop"] == ["j1"]
    # B finishes it: the lease is released and nobody adopts a finished job
    c.store_call("B", "put_job", (job("j1", "succeeded"),), {})
    assert c.owner("j1") is None and c.heartbeat(report("A", []))["adopt"] == []


def test_orphans_after_a_restart_spread_over_the_replicas(coordinator):
    c = coordinator
    for name in ("j1", "j2", "j3"):
        c.store.put_job(job(name))  # an earlier run's unfinished jobs: no lease
    c.store.put_job(job("done", "succeeded"))
    adopted = {}
    for replica in ("A", "B", "A", "B", "A", "B"):
        held = [j for j, r in adopted.items() if r == replica]
        for record in c.heartbeat(report(replica, held))["adopt"]:
            adopted[record["id"]] = replica
    assert sorted(adopted) == ["j1", "j2", "j3"]
    assert sorted(list(adopted.values()).count(r) for r in ("A", "B")) == [1, 2]


def test_a_replica_that_leaves_hands_its_jobs_on_at_once(coordinator):
    c = coordinator
    c.heartbeat(report("A", []))
    c.heartbeat(report("B", []))
    c.store_call("A", "put_job", (job("j1"),), {})
    c.leave("A")
    assert [r["id"] for r in c.heartbeat(report("B", []))["adopt"]] == ["j1"]


def test_the_heartbeat_answers_with_the_catalog_and_only_store_methods_are_callable(coordinator):
    c = coordinator
    c.store_call("A", "put_adapter", ("alpha", {"path": "/x"}), {})
    assert c.heartbeat(report("A", []))["catalog"] == ["alpha"]
    with pytest.raises(AttributeError, match="close"):
        c.store_call("A", "close", (), {})


def test_metrics_of_replicas_merge_with_a_replica_label():
    a = ('# HELP loramux_requests_total Completed\n# TYPE loramux_requests_total counter\n'
         'loramux_requests_total{model="m",status="ok"} 3.0\n# HELP up Up\n# TYPE up gauge\nup 1.0\n')
    b = ('# HELP loramux_requests_total Completed\n# TYPE loramux_requests_total counter\n'
         'loramux_requests_total{model="m",status="ok"} 5.0\n')
    assert merge_metrics({"r1": a, "r2": b}) == (
        '# HELP loramux_requests_total Completed\n# TYPE loramux_requests_total counter\n'
        'loramux_requests_total{replica="r1",model="m",status="ok"} 3.0\n'
        'loramux_requests_total{replica="r2",model="m",status="ok"} 5.0\n'
        '# HELP up Up\n# TYPE up gauge\nup{replica="r1"} 1.0\n')


def test_the_router_ranks_trainer_then_holders_then_the_rest():
    router = pytest.importorskip("loramux.cluster.router", reason="the router needs Ray Serve: pip install 'loramux[ray]'")

    def replica(name: str, **stats):
        return SimpleNamespace(replica_id=name, routing_stats={"base": ["m"], "resident": [], "training": [], **stats})

    a, b, c = replica("a", resident=["x"]), replica("b", training=["t"]), replica("c")
    ids = lambda ranks: [[r.replica_id for r in rank] for rank in ranks]  # noqa: E731
    assert ids(router.rank_for_model([a, b, c], "t", None)) == [["b"]]  # the live weights are there only
    assert ids(router.rank_for_model([a, b, c], "x", None)) == [["a"], ["b", "c"]]
    assert ids(router.rank_for_model([a, b, c], "x", "c")) == [["a", "c"], ["b"]]  # where it was sent last
    assert ids(router.rank_for_model([a, b, c], "y", None)) == [["a", "b", "c"]]  # nobody has it yet
    assert sorted(ids(router.rank_for_model([a, b, c], "m", "a"))[0]) == ["a", "b", "c"]  # the base spreads
    assert len(router.rank_for_model([a, b, c], None, None)) == 1
