"""Generator replicas' heartbeats: what each replica reports of itself, for ``GetServerStatus``.

Contract (docs/ARCHITECTURE.md, "Server status"):

- a Serve handle reaches one replica per call, so replicas report themselves instead: every
  Generator replica upserts its own row of ``replicas`` (``heartbeat``) every few seconds and
  after each adapter reload, and deletes it when it stops (``remove``); nobody else writes a row;
- a row holds the replica's id and node, the base model, its health (and why not), its queue
  depth, when it last installed an adapter, the adapters it has loaded as (namespace, version)
  pairs and its alias table as (namespace, alias, version), and the writer's clock at the
  heartbeat;
- readers (``list``) judge freshness themselves: ``ReplicaHeartbeat.fresh(max_age_s)``; a stale
  row is reported unhealthy ("no heartbeat for N s"), and rows older than ``prune`` 's limit are
  deleted (replicas that died without removing their row);
- the age uses the writers' and the reader's wall clocks, so the staleness limit must be much
  longer than the clock skew between nodes (as for the loop controller's lease).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, select

from illume.store import schema as s


@dataclass(frozen=True)
class ReplicaHeartbeat:
    """One replica's report of itself (a row of ``replicas``)."""

    replica_id: str
    node_id: str = ""
    model_id: str = ""
    healthy: bool = True
    health_reason: str = ""
    queue_depth: int = 0
    loaded_adapters: tuple[tuple[str, int], ...] = ()  # (namespace, version)
    aliases: tuple[tuple[str, str, int], ...] = ()  # (namespace, alias, version)
    last_reload_at: float | None = None  # epoch seconds
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat_at)

    def fresh(self, max_age_s: float, now: float | None = None) -> bool:
        return self.age_s(now) <= max_age_s


class ReplicaTable:
    """Reads and writes ``replicas`` on a store engine (an ``AdapterRegistry`` 's or its own)."""

    def __init__(self, engine_or_registry: Any) -> None:
        self.engine: Engine = getattr(engine_or_registry, "engine", engine_or_registry)
        self.backend = self.engine.dialect.name

    def _insert(self) -> Any:
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(s.replicas)

    def heartbeat(self, beat: ReplicaHeartbeat) -> None:
        """Upsert the replica's row."""
        values = {
            "node_id": beat.node_id,
            "model_id": beat.model_id,
            "healthy": bool(beat.healthy),
            "health_reason": beat.health_reason,
            "queue_depth": int(beat.queue_depth),
            "loaded_adapters_json": json.dumps([[ns, int(v)] for ns, v in beat.loaded_adapters]),
            "aliases_json": json.dumps([[ns, a, int(v)] for ns, a, v in beat.aliases]),
            "last_reload_at": beat.last_reload_at,
            "started_at": beat.started_at,
            "heartbeat_at": beat.heartbeat_at,
        }
        stmt = self._insert().values(replica_id=beat.replica_id, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[s.replicas.c.replica_id], set_=values)
        with self.engine.connect().execution_options(illume_write=True) as conn, conn.begin():
            conn.execute(stmt)

    def list(self) -> list[ReplicaHeartbeat]:
        """Every row, by replica id (fresh or not)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.replicas).order_by(s.replicas.c.replica_id)).all()
        return [
            ReplicaHeartbeat(
                replica_id=row.replica_id,
                node_id=row.node_id,
                model_id=row.model_id,
                healthy=bool(row.healthy),
                health_reason=row.health_reason,
                queue_depth=int(row.queue_depth),
                loaded_adapters=tuple((str(ns), int(v)) for ns, v in json.loads(row.loaded_adapters_json)),
                aliases=tuple((str(ns), str(a), int(v)) for ns, a, v in json.loads(row.aliases_json)),
                last_reload_at=None if row.last_reload_at is None else float(row.last_reload_at),
                started_at=float(row.started_at),
                heartbeat_at=float(row.heartbeat_at),
            )
            for row in rows
        ]

    def remove(self, replica_id: str) -> bool:
        with self.engine.connect().execution_options(illume_write=True) as conn, conn.begin():
            return conn.execute(delete(s.replicas).where(s.replicas.c.replica_id == replica_id)).rowcount == 1

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Delete rows whose last heartbeat is older than ``older_than_s``; returns how many."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self.engine.connect().execution_options(illume_write=True) as conn, conn.begin():
            return conn.execute(delete(s.replicas).where(s.replicas.c.heartbeat_at < cutoff)).rowcount
