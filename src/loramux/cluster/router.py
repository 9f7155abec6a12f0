"""Which engine replica takes a request: Ray Serve's request-router hook, run by the ingress's
handle (one router per ingress replica).

The ingress passes two keyword arguments to `EngineReplica.forward` that the router reads:
`target` (a replica id: only that replica, for a job's controls and for per-replica reads) and
`model` (the model a completion asks for). For an adapter, the replicas are tried in ranks:

1. the replica training it, alone: only it has the live weights (the adapter is not in the
   catalog until its job succeeds);
2. the replicas holding it: resident there (each replica's routing stats, `record_routing_stats`),
   or the replica this router last sent it to (stats lag by up to a period, and the first request
   for an adapter is what makes it resident);
3. every other replica.

Ray Serve takes the least-loaded replica of the first rank that has room (fewer than
`max_ongoing_requests` in flight), so an adapter's requests stay where its weights and its prefix
cache are, and spill to the next rank only under load. Base-model requests (and requests without a
model) rank every replica together, shuffled, so they spread.

Why not Ray Serve's model multiplexing: its replicas keep their own LRU of model ids and evict by
it, where loramux's replicas keep their resident limit with pinning and never evict an adapter
that is busy or training (server/resident.py); and a job's adapter must go to one replica only.
"""

from __future__ import annotations

import random
from typing import Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.last_sent: dict[str, ReplicaID] = {}  # model -> the replica it was last routed to

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target, model = kwargs.get("target"), kwargs.get("model")
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        return rank_for_model(candidate_replicas, model, self.last_sent.get(model) if model else None)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        model = pending_request.kwargs.get("model")
        if model and pending_request.kwargs.get("target") is None:
            self.last_sent[model] = replica_id


def rank_for_model(replicas: list[RunningReplica], model: str | None, last_sent: ReplicaID | None) -> list[list[RunningReplica]]:
    """The ranks described above, from the replicas' routing stats: {"base": [...], "resident":
    [...], "training": [...]} (cluster/replica.py)."""
    stats = {r.replica_id: r.routing_stats or {} for r in replicas}
    if model is None or any(model in s.get("base", ()) for s in stats.values()):
        everyone = list(replicas)
        random.shuffle(everyone)
        return [everyone]
    training = [r for r in replicas if model in stats[r.replica_id].get("training", ())]
    if training:
        return [training]
    holders = [r for r in replicas if model in stats[r.replica_id].get("resident", ()) or r.replica_id == last_sent]
    others = [r for r in replicas if r not in holders]
    return [holders, others] if holders else [others]
