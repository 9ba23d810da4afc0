"""Replica heartbeats (migration 4): each Generator replica upserts its row; readers judge age."""

from __future__ import annotations

from illume.store import schema as s
from illume.store.registry import AdapterRegistry
from illume.store.replicas import ReplicaHeartbeat, ReplicaTable


def test_heartbeats_upsert_list_remove_and_prune(settings):
    registry = AdapterRegistry.open(settings)
    assert s.current_version(registry.engine) >= 4
    table = ReplicaTable(registry)
    assert table.list() == []
    first = ReplicaHeartbeat(
        replica_id="r1",
        node_id="node-a",
        model_id="tiny",
        queue_depth=3,
        loaded_adapters=(("tenant-a", 1), ("tenant-b", 1)),
        aliases=(("tenant-a", "production", 1),),
        last_reload_at=1000.5,
        started_at=900.0,
        heartbeat_at=1001.0,
    )
    table.heartbeat(first)
    assert table.list() == [first]
    again = ReplicaHeartbeat(
        replica_id="r1",
        healthy=False,
        health_reason="model not loaded",
        started_at=900.0,
        heartbeat_at=1005.0,
    )
    table.heartbeat(again)  # the same replica: its row is replaced, not added
    other = ReplicaHeartbeat(replica_id="r0", started_at=1990.0, heartbeat_at=2000.0)
    table.heartbeat(other)
    assert table.list() == [other, again]  # by replica id
    assert again.age_s(now=1015.0) == 10.0
    assert again.fresh(10.0, now=1015.0) and not again.fresh(9.0, now=1015.0)
    assert table.prune(older_than_s=100.0, now=2050.0) == 1  # r1, silent since 1005
    assert [b.replica_id for b in table.list()] == ["r0"]
    assert table.remove("r0") is True and table.remove("r0") is False
    assert table.list() == []
