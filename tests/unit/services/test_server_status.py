"""GetServerStatus's view of one replica: its own report, aged by the reader, cut to the caller."""

from __future__ import annotations

from illume.store.replicas import ReplicaHeartbeat
from services.auth import Caller
from services.convert import replica_status_to_pb

BEAT = ReplicaHeartbeat(
    replica_id="r1",
    node_id="node-a",
    model_id="tiny",
    queue_depth=2,
    loaded_adapters=(("tenant-a", 1), ("tenant-b", 1), ("tenant-b", 2)),
    aliases=(("tenant-a", "production", 1), ("tenant-b", "production", 2)),
    last_reload_at=0.25,
    started_at=0.0,
    heartbeat_at=100.0,
)


def test_a_caller_sees_only_its_own_namespaces():
    caller = Caller("p", "client", namespaces=frozenset({"tenant-b"}))
    status = replica_status_to_pb(BEAT, now=101.0, stale_after_s=10.0, may_use=caller.may_use)
    assert list(status.loaded_adapters) == ["tenant-b/rationale-v1", "tenant-b/rationale-v2"]
    assert list(status.aliases) == ["tenant-b/production=rationale-v2"]
    assert (status.replica_id, status.node_id, status.model_id, status.queue_depth) == (
        "r1",
        "node-a",
        "tiny",
        2,
    )
    assert status.healthy and status.health_reason == "" and status.heartbeat_age_s == 1.0
    assert status.last_reload_at == "1970-01-01T00:00:00.250000Z"
    assert status.heartbeat_at == "1970-01-01T00:01:40.000000Z"
    everyone = Caller("admin", "admin")
    assert len(replica_status_to_pb(BEAT, 101.0, 10.0, everyone.may_use).loaded_adapters) == 3


def test_a_silent_replica_is_unhealthy_and_a_reported_problem_is_kept():
    stale = replica_status_to_pb(BEAT, now=130.0, stale_after_s=10.0, may_use=lambda ns: True)
    assert not stale.healthy and stale.health_reason == "no heartbeat for 30 s"
    sick = ReplicaHeartbeat(
        replica_id="r2", healthy=False, health_reason="model not loaded", heartbeat_at=100.0
    )
    status = replica_status_to_pb(sick, now=100.0, stale_after_s=10.0, may_use=lambda ns: True)
    assert not status.healthy and status.health_reason == "model not loaded" and status.last_reload_at == ""
