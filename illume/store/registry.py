"""The adapter registry, tuning rounds and the loop controller's lease (same database as the log).

Contract:

- Writers: the tuning job (adapters, aliases on promotion, its round's progress), the Admin servicer
  (aliases: promote, rollback) and the loop controller (rounds, the lease); the FeedbackLog never
  writes these tables, and the registry never writes the feedback tables (docs/ARCHITECTURE.md,
  "Who writes which table").
- Version numbers come from the store, not the tuner: ``register`` bumps a per-namespace counter row
  in the same transaction that inserts the adapter (an atomic upsert), so two registering writers
  get different numbers and a committed number is never handed out again. Retention marks versions
  ``deleted``; it never deletes the rows or lowers the counter.
- Every version or alias change bumps the namespace's ``epoch`` in the same transaction; replicas
  poll ``registry_epoch()``. On PostgreSQL the transaction also issues
  ``NOTIFY illume_registry, '<namespace>'`` (delivered only if it commits), and ``listen()`` runs a
  thread that calls back on each notification, so replicas learn of a change at once and poll as a
  fallback. SQLite has no push: polling the epoch is the mechanism there.
- Aliases keep a history; ``rollback`` points ``production`` at the version it named before its
  latest promotion (successive rollbacks walk further back, like popping a stack).
  ``remove_alias`` deletes an alias (the loop controller ends a canary with it; no history entry).
- Writers of aliases also include the loop controller: it moves ``production`` to a canary that
  held up and removes the ``canary`` alias (docs/ARCHITECTURE.md, "The canary").
- Namespaces exist once declared (``declare_namespace``; migration 3 declared ``default`` and
  every name already in use); rows are never deleted. ``declared_namespaces()`` is what serving
  watches. Audited changes (``set_alias``, ``rollback``, ``remove_alias``, ``create_round`` given
  an ``actor``, ``declare_namespace``) write their ``audit`` row in the changing transaction; other events use
  ``record_audit``.
- Leases: ``acquire_lease`` is one atomic upsert that succeeds when the lease is free, expired, or
  already held by the caller; the ``token`` grows on every change of holder (fencing). Expiry uses
  the callers' wall clocks, so the TTL must be much longer than the clock skew between nodes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, case, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from illume.adapters import PRODUCTION
from illume.errors import FailedPrecondition, InvalidRequest, NotFound
from illume.store import schema as s
from illume.store.settings import StoreSettings
from illume.store.types import (
    BASE_ADAPTER,
    ROUND_STATES,
    TERMINAL_ROUND_STATES,
    Actor,
    AdapterRecord,
    AliasRecord,
    AuditRecord,
    LeaseRecord,
    NamespaceRecord,
    RoundRecord,
    adapter_name,
    new_id,
    normalize_namespace,
    parse_rfc3339,
    rfc3339,
    utcnow,
)

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "illume_registry"
_VERSION_RE = re.compile(r"^(?:rationale-v)?(\d{1,18})$")
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_ROUND_FIELDS = frozenset(
    {"reason", "snapshot_sha256", "rationale_rows", "answer_rows", "adapter_version", "scores", "job_id"}
)


def _page_size(page_size: int) -> int:
    page_size = page_size or 20
    if not 1 <= page_size <= 100:
        raise InvalidRequest("page_size must be 1-100")
    return page_size


def _encode_token(value: int) -> str:
    return base64.urlsafe_b64encode(f"before:{value}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()).decode()
        prefix, value = raw.split(":", 1)
        if prefix != "before":
            raise ValueError
        return int(value)
    except ValueError:
        raise InvalidRequest("malformed page_token") from None


def parse_version(ref: str | int) -> int | None:
    """The version a reference names ("7", "rationale-v7", 7), or None if it is not a version."""
    if isinstance(ref, int):
        return ref
    match = _VERSION_RE.match(ref.strip())
    return int(match.group(1)) if match else None


class RegistryListener:
    """A background thread that calls ``callback(namespace)`` on every registry notification."""

    def __init__(self, conninfo: str, callback: Callable[[str], None], poll_s: float = 1.0) -> None:
        self._conninfo = conninfo
        self._callback = callback
        self._poll_s = poll_s
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="illume-registry-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg  # imported here: only PostgreSQL deployments need it

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.ready.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=self._poll_s):
                            try:
                                self._callback(note.payload)
                            except Exception:  # a bad callback must not stop the listener
                                log.exception("registry listener callback failed")
            except Exception:
                # Lost connection: reconnect with backoff; replicas keep polling meanwhile.
                log.warning("registry listener lost its connection; reconnecting", exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


class AdapterRegistry:
    """Adapter versions, aliases, tuning rounds and leases of every namespace."""

    def __init__(self, store_or_engine: Any, db_schema: str | None = None) -> None:
        """Use a ``FeedbackStore``'s database (its engine) or an ``Engine`` made by ``schema``."""
        if isinstance(store_or_engine, Engine):
            self.engine = store_or_engine
            s.migrate(self.engine, db_schema)
        else:
            self.engine = store_or_engine.engine  # a FeedbackStore: already migrated
        self.backend = self.engine.dialect.name

    @classmethod
    def open(cls, settings: StoreSettings) -> AdapterRegistry:
        """A registry with its own engine (for processes that do not hold a FeedbackStore)."""
        return cls(s.create_store_engine(settings), db_schema=settings.db_schema)

    def close(self) -> None:
        self.engine.dispose()

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(illume_write=True) as conn, conn.begin():
            yield conn

    def _insert(self, table: Any) -> Any:
        return (pg_insert if self.backend == "postgresql" else sqlite_insert)(table)

    def _bump(self, conn: Connection, namespace: str, new_version: bool) -> tuple[int, int]:
        """Bump the namespace's epoch (and version counter); returns (last_version, epoch)."""
        c = s.adapter_counters
        stmt = self._insert(c).values(namespace=namespace, last_version=int(new_version), epoch=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.c.namespace],
            set_={"last_version": c.c.last_version + int(new_version), "epoch": c.c.epoch + 1},
        ).returning(c.c.last_version, c.c.epoch)
        row = conn.execute(stmt).one()
        if self.backend == "postgresql":
            # Delivered to listeners only when this transaction commits.
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": NOTIFY_CHANNEL, "payload": namespace},
            )
        return int(row[0]), int(row[1])

    def _aliases_of(self, conn: Connection, namespace: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for alias, version in conn.execute(
            select(s.aliases.c.alias, s.aliases.c.version)
            .where(s.aliases.c.namespace == namespace)
            .order_by(s.aliases.c.alias)
        ):
            out.setdefault(int(version), []).append(alias)
        return out

    @staticmethod
    def _record(row: Any, aliases: Sequence[str]) -> AdapterRecord:
        return AdapterRecord(
            namespace=row.namespace,
            version=int(row.version),
            name=adapter_name(int(row.version)),
            aliases=tuple(aliases),
            artifact_uri=row.artifact_uri,
            manifest=json.loads(row.manifest_json),
            round_id=row.round_id,
            parent_version=int(row.parent_version),
            created_at=parse_rfc3339(row.created_at) or utcnow(),
            state=row.state,
            reason=row.reason,
        )

    def _get(self, conn: Connection, namespace: str, ref: str | int) -> AdapterRecord:
        if isinstance(ref, str) and ref.strip() in ("", BASE_ADAPTER):
            raise InvalidRequest("the base model is not a registered adapter")
        version = parse_version(ref)
        if version is None:
            assert isinstance(ref, str)
            version = conn.execute(
                select(s.aliases.c.version).where(
                    s.aliases.c.namespace == namespace, s.aliases.c.alias == ref
                )
            ).scalar()
            if version is None:
                raise NotFound(f"no adapter or alias {ref!r} in namespace {namespace}")
        row = conn.execute(
            select(s.adapters).where(s.adapters.c.namespace == namespace, s.adapters.c.version == version)
        ).first()
        if row is None:
            raise NotFound(f"adapter version {version} not found in namespace {namespace}")
        return self._record(row, self._aliases_of(conn, namespace).get(int(version), []))

    # -- versions ------------------------------------------------------------------------------

    def register(
        self,
        namespace: str,
        artifact_uri: str,
        manifest: Mapping[str, Any],
        round_id: str = "",
        parent_version: int = 0,
    ) -> AdapterRecord:
        """Assign the next version number of ``namespace`` to a stored adapter and record it."""
        namespace = normalize_namespace(namespace)
        if not artifact_uri:
            raise InvalidRequest("artifact_uri is required")
        manifest_json = json.dumps(dict(manifest), sort_keys=True)
        with self._tx() as conn:
            version, _epoch = self._bump(conn, namespace, new_version=True)
            now = utcnow()
            conn.execute(
                insert(s.adapters).values(
                    namespace=namespace,
                    version=version,
                    artifact_uri=artifact_uri,
                    manifest_json=manifest_json,
                    round_id=round_id,
                    parent_version=int(parent_version),
                    created_at=rfc3339(now),
                    state="registered",
                    reason="",
                )
            )
        return AdapterRecord(
            namespace=namespace,
            version=version,
            name=adapter_name(version),
            aliases=(),
            artifact_uri=artifact_uri,
            manifest=json.loads(manifest_json),
            round_id=round_id,
            parent_version=int(parent_version),
            created_at=now,
            state="registered",
        )

    def get(self, namespace: str, version_or_alias: str | int) -> AdapterRecord:
        """An adapter by version ("7", "rationale-v7", 7) or alias; ``NotFound`` if absent."""
        namespace = normalize_namespace(namespace)
        with self.engine.connect() as conn, conn.begin():
            return self._get(conn, namespace, version_or_alias)

    def list(
        self, namespace: str, page_size: int = 20, page_token: str = ""
    ) -> tuple[list[AdapterRecord], str]:
        """Adapters of a namespace, newest first; the token is "" on the last page."""
        namespace = normalize_namespace(namespace)
        page_size = _page_size(page_size)
        before = _decode_token(page_token)
        a = s.adapters
        query = select(a).where(a.c.namespace == namespace).order_by(a.c.version.desc()).limit(page_size + 1)
        if before is not None:
            query = query.where(a.c.version < before)
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(query).all()
            alias_map = self._aliases_of(conn, namespace)
        records = [self._record(r, alias_map.get(int(r.version), [])) for r in rows[:page_size]]
        token = _encode_token(records[-1].version) if len(rows) > page_size else ""
        return records, token

    def mark_rejected(self, namespace: str, version: int | str, reason: str) -> AdapterRecord:
        """Mark a version rejected (by the gate); an aliased version cannot be rejected."""
        namespace = normalize_namespace(namespace)
        with self._tx() as conn:
            record = self._get(conn, namespace, version)
            if record.aliases:
                raise FailedPrecondition(
                    f"version {record.version} is aliased ({', '.join(record.aliases)}); move the alias first"
                )
            conn.execute(
                update(s.adapters)
                .where(s.adapters.c.namespace == namespace, s.adapters.c.version == record.version)
                .values(state="rejected", reason=reason.splitlines()[0] if reason else "")
            )
            self._bump(conn, namespace, new_version=False)
            return self._get(conn, namespace, record.version)

    def apply_retention(self, namespace: str, keep_last: int) -> list[AdapterRecord]:
        """Mark old versions deleted; returns them so the caller deletes their artifacts.

        Kept: the ``keep_last`` newest registered versions, every aliased version and the version
        ``rollback`` would return to. Rejected versions are not kept for their age.
        """
        if keep_last < 0:
            raise InvalidRequest("keep_last must be >= 0")
        namespace = normalize_namespace(namespace)
        a = s.adapters
        with self._tx() as conn:
            rows = conn.execute(
                select(a)
                .where(a.c.namespace == namespace, a.c.state != "deleted")
                .order_by(a.c.version.desc())
            ).all()
            alias_map = self._aliases_of(conn, namespace)
            keep = set(alias_map)
            stack = self._production_stack(conn, namespace)
            if len(stack) >= 2:
                keep.add(stack[-2])
            newest = [int(r.version) for r in rows if r.state == "registered"]
            keep.update(newest[:keep_last])
            doomed = [r for r in rows if int(r.version) not in keep]
            if not doomed:
                return []
            conn.execute(
                update(a)
                .where(a.c.namespace == namespace, a.c.version.in_([int(r.version) for r in doomed]))
                .values(state="deleted")
            )
            self._bump(conn, namespace, new_version=False)
        return [self._record(r, []) for r in doomed]

    # -- aliases -------------------------------------------------------------------------------

    def set_alias(
        self,
        namespace: str,
        alias: str,
        version: int | str,
        share: float | None = None,
        actor: Actor | None = None,
    ) -> AdapterRecord:
        """Point ``alias`` at a registered version (``share``: canary's share of unpinned traffic);
        with an ``actor``, the ``adapter.promote`` audit row is written in the same transaction."""
        namespace = normalize_namespace(namespace)
        alias = alias or PRODUCTION
        if not _ALIAS_RE.match(alias) or alias == BASE_ADAPTER or parse_version(alias) is not None:
            raise InvalidRequest(f"invalid alias name {alias!r}")
        if share is not None and not 0.0 <= share <= 1.0:
            raise InvalidRequest("share must be between 0 and 1")
        with self._tx() as conn:
            record = self._get(conn, namespace, version)
            if record.state != "registered":
                raise FailedPrecondition(f"version {record.version} is {record.state}; it cannot be aliased")
            self._move_alias(conn, namespace, alias, record.version, share, action="set")
            self._audit(
                conn,
                actor,
                "adapter.promote",
                namespace,
                {"alias": alias, "version": record.version, "share": share},
            )
            return self._get(conn, namespace, record.version)

    def remove_alias(self, namespace: str, alias: str, actor: Actor | None = None) -> bool:
        """Remove ``alias`` (a rolled-back canary: its version serves no traffic any more); returns
        whether it existed. Replicas drop it on their next refresh (the epoch is bumped). With an
        ``actor``, the ``adapter.unalias`` audit row is written in the same transaction."""
        namespace = normalize_namespace(namespace)
        al = s.aliases
        with self._tx() as conn:
            gone = conn.execute(delete(al).where(al.c.namespace == namespace, al.c.alias == alias)).rowcount
            if not gone:
                return False
            self._bump(conn, namespace, new_version=False)
            self._audit(conn, actor, "adapter.unalias", namespace, {"alias": alias})
            return True

    def _move_alias(
        self, conn: Connection, namespace: str, alias: str, version: int, share: float | None, action: str
    ) -> None:
        al = s.aliases
        previous = conn.execute(
            select(al.c.version).where(al.c.namespace == namespace, al.c.alias == alias)
        ).scalar()
        now = rfc3339(utcnow())
        stmt = self._insert(al).values(
            namespace=namespace, alias=alias, version=version, share=share, updated_at=now
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[al.c.namespace, al.c.alias],
                set_={"version": version, "share": share, "updated_at": now},
            )
        )
        # Re-pointing an alias at its current target changes only the share: no history entry, so
        # rollback still returns to a different version.
        if previous is None or int(previous) != version:
            conn.execute(
                insert(s.alias_history).values(
                    namespace=namespace,
                    alias=alias,
                    version=version,
                    previous_version=previous,
                    action=action,
                    changed_at=now,
                )
            )
        self._bump(conn, namespace, new_version=False)

    def _production_stack(self, conn: Connection, namespace: str, alias: str = PRODUCTION) -> list[int]:
        h = s.alias_history
        stack: list[int] = []
        for action, version in conn.execute(
            select(h.c.action, h.c.version)
            .where(h.c.namespace == namespace, h.c.alias == alias)
            .order_by(h.c.seq)
        ):
            if action == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(int(version))
        return stack

    def rollback(self, namespace: str, alias: str = PRODUCTION, actor: Actor | None = None) -> AdapterRecord:
        """Point ``alias`` (production) back at the version it named before its latest promotion
        (with an ``actor``, audited as ``adapter.rollback`` in the same transaction)."""
        namespace = normalize_namespace(namespace)
        with self._tx() as conn:
            stack = self._production_stack(conn, namespace, alias)
            if len(stack) < 2:
                raise FailedPrecondition(f"{alias} has no earlier version to roll back to")
            target = self._get(conn, namespace, stack[-2])
            if target.state != "registered":
                raise FailedPrecondition(
                    f"version {target.version} is {target.state}; cannot roll back to it"
                )
            self._move_alias(conn, namespace, alias, target.version, None, action="rollback")
            self._audit(
                conn,
                actor,
                "adapter.rollback",
                namespace,
                {"alias": alias, "version": target.version, "from_version": stack[-1]},
            )
            return self._get(conn, namespace, target.version)

    def aliases(self, namespace: str) -> dict[str, AliasRecord]:
        """The aliases of a namespace and where they point."""
        namespace = normalize_namespace(namespace)
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.aliases).where(s.aliases.c.namespace == namespace)).all()
        return {
            r.alias: AliasRecord(
                namespace=r.namespace,
                alias=r.alias,
                version=int(r.version),
                share=r.share,
                updated_at=parse_rfc3339(r.updated_at) or utcnow(),
            )
            for r in rows
        }

    # -- change notification -------------------------------------------------------------------

    def registry_epoch(self, namespace: str | None = None) -> int:
        """A counter that grows on every version or alias change (of one namespace, or of all)."""
        c = s.adapter_counters
        with self.engine.connect() as conn:
            if namespace is None:
                return int(conn.execute(select(func.coalesce(func.sum(c.c.epoch), 0))).scalar_one())
            value = conn.execute(
                select(c.c.epoch).where(c.c.namespace == normalize_namespace(namespace))
            ).scalar()
            return int(value or 0)

    @property
    def supports_notify(self) -> bool:
        return self.backend == "postgresql"

    def listen(self, callback: Callable[[str], None], poll_s: float = 1.0) -> RegistryListener:
        """PostgreSQL: call ``callback(namespace)`` on each registry change (stop() the listener)."""
        if not self.supports_notify:
            raise FailedPrecondition("change notification needs PostgreSQL; poll registry_epoch()")
        conninfo = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return RegistryListener(conninfo, callback, poll_s)

    # -- rounds --------------------------------------------------------------------------------

    @staticmethod
    def _round(row: Any) -> RoundRecord:
        return RoundRecord(
            round_id=row.round_id,
            namespace=row.namespace,
            state=row.state,
            reason=row.reason,
            snapshot_sha256=row.snapshot_sha256,
            rationale_rows=int(row.rationale_rows),
            answer_rows=int(row.answer_rows),
            adapter_version=int(row.adapter_version),
            scores=json.loads(row.scores_json),
            job_id=row.job_id,
            started_at=parse_rfc3339(row.started_at) or utcnow(),
            finished_at=parse_rfc3339(row.finished_at),
        )

    def create_round(
        self,
        namespace: str,
        state: str = "pending",
        job_id: str = "",
        actor: Actor | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> RoundRecord:
        """Record a new tuning round (id issued here); with an ``actor``, the ``round.start`` audit
        row (the round id plus ``arguments``) is written in the same transaction."""
        if state not in ROUND_STATES or state in TERMINAL_ROUND_STATES:
            raise InvalidRequest(f"a round cannot start in state {state!r}")
        namespace = normalize_namespace(namespace)
        round_id = new_id()
        with self._tx() as conn:
            conn.execute(
                insert(s.rounds).values(
                    round_id=round_id,
                    namespace=namespace,
                    state=state,
                    reason="",
                    snapshot_sha256="",
                    rationale_rows=0,
                    answer_rows=0,
                    adapter_version=0,
                    scores_json="{}",
                    job_id=job_id,
                    started_at=rfc3339(utcnow()),
                    finished_at=None,
                )
            )
            self._audit(conn, actor, "round.start", namespace, {"round_id": round_id, **(arguments or {})})
            return self._round(conn.execute(select(s.rounds).where(s.rounds.c.round_id == round_id)).one())

    def update_round(self, round_id: str, state: str | None = None, **fields: Any) -> RoundRecord:
        """Move a round to ``state`` and/or set fields (reason, snapshot_sha256, rationale_rows,
        answer_rows, adapter_version, scores, job_id). A finished round cannot change."""
        unknown = set(fields) - _ROUND_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown round fields: {', '.join(sorted(unknown))}")
        if state is not None and state not in ROUND_STATES:
            raise InvalidRequest(f"unknown round state {state!r}")
        values: dict[str, Any] = {k: v for k, v in fields.items() if k != "scores"}
        if "reason" in values:
            values["reason"] = str(values["reason"]).splitlines()[0] if values["reason"] else ""
        if "scores" in fields:
            values["scores_json"] = json.dumps(fields["scores"], sort_keys=True)
        if state is not None:
            values["state"] = state
            if state in TERMINAL_ROUND_STATES:
                values["finished_at"] = rfc3339(utcnow())
        r = s.rounds
        with self._tx() as conn:
            row = conn.execute(select(r).where(r.c.round_id == round_id)).first()
            if row is None:
                raise NotFound(f"round {round_id} not found")
            if row.state in TERMINAL_ROUND_STATES:
                raise FailedPrecondition(f"round {round_id} already ended ({row.state})")
            if values:
                conn.execute(update(r).where(r.c.round_id == round_id).values(**values))
            return self._round(conn.execute(select(r).where(r.c.round_id == round_id)).one())

    def get_round(self, round_id: str) -> RoundRecord:
        """One round; ``NotFound`` if absent."""
        with self.engine.connect() as conn:
            row = conn.execute(select(s.rounds).where(s.rounds.c.round_id == round_id)).first()
        if row is None:
            raise NotFound(f"round {round_id} not found")
        return self._round(row)

    def list_rounds(
        self,
        namespace: str,
        page_size: int = 20,
        page_token: str = "",
        states: Sequence[str] | None = None,
    ) -> tuple[list[RoundRecord], str]:
        """Rounds of a namespace, newest first (optionally only some states); "" on the last page."""
        namespace = normalize_namespace(namespace)
        page_size = _page_size(page_size)
        before = _decode_token(page_token)
        r = s.rounds
        query = select(r).where(r.c.namespace == namespace).order_by(r.c.seq.desc()).limit(page_size + 1)
        if before is not None:
            query = query.where(r.c.seq < before)
        if states:
            query = query.where(r.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        token = _encode_token(int(rows[page_size - 1].seq)) if len(rows) > page_size else ""
        return [self._round(row) for row in rows[:page_size]], token

    # -- namespaces and audit --------------------------------------------------------------------

    def _audit(
        self,
        conn: Connection,
        actor: Actor | None,
        action: str,
        namespace: str,
        arguments: Mapping[str, Any],
    ) -> None:
        if actor is None:
            return
        conn.execute(
            insert(s.audit).values(
                at=rfc3339(utcnow()),
                principal=actor.principal[:256],
                key_id=actor.key_id[:16],
                action=action,
                namespace=namespace,
                arguments_json=json.dumps(dict(arguments), sort_keys=True, default=str),
            )
        )

    def record_audit(
        self, actor: Actor, action: str, namespace: str = "", arguments: Mapping[str, Any] | None = None
    ) -> None:
        """Write one audit row in a transaction of its own (namespace "" for system events)."""
        with self._tx() as conn:
            self._audit(conn, actor, action, namespace, arguments or {})

    def declare_namespace(self, name: str, actor: Actor) -> tuple[NamespaceRecord, bool]:
        """Declare a namespace (idempotent); returns it and whether this call declared it. A new
        declaration is audited (``namespace.declare``) in the same transaction."""
        if not name or len(name) > 128:
            raise InvalidRequest("a namespace name is 1-128 characters")
        n = s.namespaces
        now = rfc3339(utcnow())
        stmt = (
            self._insert(n)
            .values(name=name, declared_at=now, declared_by=actor.principal[:256])
            .on_conflict_do_nothing(index_elements=[n.c.name])
            .returning(n.c.name)
        )
        with self._tx() as conn:
            created = conn.execute(stmt).first() is not None
            if created:
                self._audit(conn, actor, "namespace.declare", name, {"namespace": name})
            row = conn.execute(select(n).where(n.c.name == name)).one()
        return self._namespace(row), created

    @staticmethod
    def _namespace(row: Any) -> NamespaceRecord:
        return NamespaceRecord(
            name=row.name, declared_at=parse_rfc3339(row.declared_at) or utcnow(), declared_by=row.declared_by
        )

    def list_namespaces(self) -> list[NamespaceRecord]:
        """Every declared namespace, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.namespaces).order_by(s.namespaces.c.name)).all()
        return [self._namespace(r) for r in rows]

    def declared_namespaces(self) -> frozenset[str]:
        """The names of the declared namespaces: the only ones serving (and replicas) should watch."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(select(s.namespaces.c.name)).scalars())

    def is_declared(self, name: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(select(s.namespaces.c.name).where(s.namespaces.c.name == name)).first()
        return row is not None

    def list_audit(
        self,
        namespaces: Sequence[str] | None = None,
        include_system: bool = True,
        page_size: int = 20,
        page_token: str = "",
    ) -> tuple[list[AuditRecord], str]:
        """Audit events, newest first: of ``namespaces`` (None: all), plus system events (namespace
        "") when ``include_system``; "" token on the last page."""
        page_size = _page_size(page_size)
        before = _decode_token(page_token)
        a = s.audit
        query = select(a).order_by(a.c.seq.desc()).limit(page_size + 1)
        if namespaces is not None:
            allowed = list(namespaces) + ([""] if include_system else [])
            query = query.where(a.c.namespace.in_(allowed))
        elif not include_system:
            query = query.where(a.c.namespace != "")
        if before is not None:
            query = query.where(a.c.seq < before)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        records = [
            AuditRecord(
                seq=int(r.seq),
                at=parse_rfc3339(r.at) or utcnow(),
                principal=r.principal,
                key_id=r.key_id,
                action=r.action,
                namespace=r.namespace,
                arguments=json.loads(r.arguments_json),
            )
            for r in rows[:page_size]
        ]
        token = _encode_token(records[-1].seq) if len(rows) > page_size else ""
        return records, token

    # -- lease ---------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or extend) the lease if it is free, expired or already ours."""
        if ttl_s <= 0:
            raise InvalidRequest("ttl_s must be positive")
        now = time.time()
        ls = s.leases
        stmt = self._insert(ls).values(name=name, holder=holder, expires_at=now + ttl_s, token=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ls.c.name],
            set_={
                "holder": stmt.excluded.holder,
                "expires_at": stmt.excluded.expires_at,
                "token": case((ls.c.holder == stmt.excluded.holder, ls.c.token), else_=ls.c.token + 1),
            },
            where=or_(ls.c.expires_at < now, ls.c.holder == holder),
        ).returning(ls.c.holder)
        with self._tx() as conn:
            return conn.execute(stmt).first() is not None

    def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend our lease; False if someone else holds it now (we lost it)."""
        ls = s.leases
        with self._tx() as conn:
            result = conn.execute(
                update(ls)
                .where(ls.c.name == name, ls.c.holder == holder)
                .values(expires_at=time.time() + ttl_s)
            )
            return result.rowcount == 1

    def release_lease(self, name: str, holder: str) -> bool:
        """Give the lease up (only its holder can)."""
        ls = s.leases
        with self._tx() as conn:
            return conn.execute(delete(ls).where(ls.c.name == name, ls.c.holder == holder)).rowcount == 1

    def get_lease(self, name: str) -> LeaseRecord | None:
        """The lease row as stored (it may have expired), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(s.leases).where(s.leases.c.name == name)).first()
        if row is None:
            return None
        return LeaseRecord(
            name=row.name, holder=row.holder, expires_at=float(row.expires_at), token=int(row.token)
        )
