"""Declared namespaces and the audit table (migration 3) on SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select

from illume.errors import FailedPrecondition
from illume.store import AdapterRegistry, FeedbackStore, StoreSettings
from illume.store import schema as s
from illume.store.types import Actor

ADMIN = Actor("ops-alice", "a1b2c3d4")


@pytest.fixture
def registry(store: FeedbackStore) -> AdapterRegistry:
    return AdapterRegistry(store)


def test_default_is_declared_out_of_the_box(registry: AdapterRegistry):
    assert registry.declared_namespaces() == {"default"}
    assert registry.is_declared("default") and not registry.is_declared("other")


def test_upgrade_from_version_2_declares_the_namespaces_in_use(settings: StoreSettings):
    engine = s.create_store_engine(settings)
    with engine.connect().execution_options(illume_write=True) as conn, conn.begin():
        s.schema_version.create(conn)
        for step in s.MIGRATIONS[:2]:  # a store as version 2 left it
            step.apply(conn)
            conn.execute(
                insert(s.schema_version).values(version=step.version, name=step.name, applied_at="x")
            )
        conn.execute(insert(s.adapter_counters).values(namespace="tenant-a", last_version=1, epoch=1))
        conn.execute(
            insert(s.aliases).values(namespace="tenant-b", alias="production", version=1, updated_at="x")
        )
    assert s.migrate(engine) == s.LATEST_VERSION
    registry = AdapterRegistry(engine)
    assert registry.declared_namespaces() == {"default", "tenant-a", "tenant-b"}
    events, _ = registry.list_audit()
    assert [(e.action, e.principal, dict(e.arguments)) for e in events] == [
        (
            "namespace.declare_on_upgrade",
            "system:migration",
            {"namespaces": ["default", "tenant-a", "tenant-b"]},
        )
    ]
    assert s.migrate(engine) == s.LATEST_VERSION  # idempotent: nothing declared twice
    assert len(registry.list_audit()[0]) == 1


def test_declare_is_idempotent_and_audited_once(registry: AdapterRegistry):
    record, created = registry.declare_namespace("tenant-a", ADMIN)
    assert created and record.name == "tenant-a" and record.declared_by == "ops-alice"
    again, created = registry.declare_namespace("tenant-a", Actor("someone-else"))
    assert not created and again.declared_by == "ops-alice"
    assert [n.name for n in registry.list_namespaces()] == ["default", "tenant-a"]
    events, _ = registry.list_audit()
    assert [(e.action, e.principal, e.key_id, e.namespace) for e in events] == [
        ("namespace.declare", "ops-alice", "a1b2c3d4", "tenant-a")
    ]


def test_promote_rollback_and_round_start_are_audited_in_their_transaction(registry: AdapterRegistry):
    for _ in range(2):
        registry.register("default", "file:///a", {})
    registry.set_alias("default", "production", 1, actor=ADMIN)
    registry.set_alias("default", "production", 2, actor=ADMIN)
    registry.rollback("default", actor=ADMIN)
    round_ = registry.create_round("default", actor=ADMIN, arguments={"force": True})
    events, _ = registry.list_audit()
    assert [(e.action, dict(e.arguments)) for e in reversed(events)] == [
        ("adapter.promote", {"alias": "production", "version": 1, "share": None}),
        ("adapter.promote", {"alias": "production", "version": 2, "share": None}),
        ("adapter.rollback", {"alias": "production", "version": 1, "from_version": 2}),
        ("round.start", {"round_id": round_.round_id, "force": True}),
    ]
    # A change that fails writes no audit row (same transaction).
    with pytest.raises(FailedPrecondition):
        registry.rollback("default", actor=ADMIN)
    assert len(registry.list_audit()[0]) == 4
    # Without an actor (the tuning job's promotion) nothing is audited.
    registry.register("default", "file:///a", {})
    registry.set_alias("default", "production", 3)
    assert len(registry.list_audit()[0]) == 4


def test_audit_listing_filters_namespaces_and_system_events_and_pages(registry: AdapterRegistry):
    registry.declare_namespace("tenant-a", ADMIN)
    registry.declare_namespace("tenant-b", ADMIN)
    registry.record_audit(Actor("system:ingress"), "keys.reload", "", {"added": ["0badc0de"]})
    a_only, _ = registry.list_audit(["tenant-a"], include_system=False)
    assert [e.namespace for e in a_only] == ["tenant-a"]
    with_system, _ = registry.list_audit(["tenant-a"], include_system=True)
    assert [e.namespace for e in with_system] == ["", "tenant-a"]
    everything, _ = registry.list_audit(None, include_system=False)
    assert [e.namespace for e in everything] == ["tenant-b", "tenant-a"]
    first, token = registry.list_audit(page_size=2)
    rest, last = registry.list_audit(page_token=token, page_size=2)
    assert len(first) == 2 and len(rest) == 1 and last == ""
    assert [e.seq for e in first + rest] == sorted((e.seq for e in first + rest), reverse=True)


def test_namespace_rows_are_in_the_schema(store: FeedbackStore):
    with store.engine.connect() as conn:
        assert conn.execute(select(s.namespaces.c.name)).scalars().all() == ["default"]
