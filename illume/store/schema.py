"""Tables, engine set-up and versioned migrations of the store (SQLite or PostgreSQL).

Writers, one per table group (nobody else writes these tables):

- ``generations``, ``candidates``, ``images``, ``feedback``, ``feedback_items``, ``corrections``:
  the FeedbackLog deployment, through ``FeedbackStore`` (its group-commit writer thread).
- ``adapters``, ``adapter_counters``, ``aliases``, ``alias_history``: the adapter registry
  (``AdapterRegistry``), called by the tuning job (register, promote, reject, retention) and the
  Admin servicer (promote, rollback).
- ``rounds``: the loop controller (creates and fails rounds) and the tuning job (its progress),
  through ``AdapterRegistry``; ``leases``: the loop controller.
- ``namespaces``, ``audit``: ``AdapterRegistry`` (the Ingress declares namespaces and records
  admin actions; the registry records promote/rollback/round starts in the changing transaction).
- ``replicas``: each Generator replica its own row (``illume.store.replicas``), read by the Ingress.
- ``annotator_flags``: ``FeedbackStore`` (``flag_annotator`` when an annotator's agreement is too
  low, ``clear_annotator_flag`` by an admin); read when snapshots are built.
- ``schema_version``: whoever opens the store first after an upgrade (``migrate``).

Durability is set on every connection, never per call: SQLite runs in WAL mode with
``synchronous=FULL`` (a commit returns only after the WAL is fsynced) and a busy timeout;
PostgreSQL connections run with ``synchronous_commit=on``. Transactions that write on SQLite start
with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing on a lock upgrade.

Migrations are an ordered list of steps; ``migrate`` applies the missing ones inside one
transaction that holds the database's write lock (SQLite ``BEGIN IMMEDIATE``) or a transaction-level
advisory lock (PostgreSQL), so two processes opening the store at once never both migrate. A step,
once released, is never edited: a schema change is a new step appended to ``MIGRATIONS`` (and the
table definitions below updated to match).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import make_url

from illume.store.settings import StoreSettings
from illume.store.types import rfc3339, utcnow

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
SeqType = BigInteger().with_variant(Integer(), "sqlite")
# Timestamps are stored as RFC 3339 UTC text: identical on both backends and sortable as text.
Timestamp = String(32)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), nullable=False),
    Column("applied_at", Timestamp, nullable=False),
)

# --- feedback log (migration 1) ---------------------------------------------------------------

images = Table(
    "images",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

generations = Table(
    "generations",
    metadata,
    # seq orders generations for keyset pagination (ids are random in their low bits).
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("generation_id", String(64), nullable=False, unique=True),
    Column("namespace", String(128), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("question", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("answer_generated", Boolean, nullable=False),
    Column("sampling_json", Text, nullable=False),
    # uint64 on the wire does not fit a signed BIGINT, so the seed is kept as decimal text.
    Column("seed", String(20), nullable=False),
    Column("adapter_requested", String(128), nullable=False),
    Column("adapter_version", String(128), nullable=False),
    Column("model_id", String(256), nullable=False),
    Column("held_out", Boolean, nullable=False),
    Column("client_request_id", String(128), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_generations_ns_seq", "namespace", "seq"),
    Index("ix_generations_image", "image_sha256"),
)

candidates = Table(
    "candidates",
    metadata,
    Column("candidate_id", String(80), primary_key=True),
    Column(
        "generation_id",
        String(64),
        ForeignKey("generations.generation_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("idx", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("temperature", Float, nullable=False),
    Column("token_count", Integer, nullable=False),
    Column("finish_reason", String(8), nullable=False),
    Column("mean_logprob", Float, nullable=False),
    Index("ix_candidates_generation", "generation_id", "idx"),
)

feedback = Table(
    "feedback",
    metadata,
    # seq is the export cursor's order: new judgements always land after existing ones.
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("feedback_id", String(64), nullable=False, unique=True),
    Column(
        "generation_id",
        String(64),
        ForeignKey("generations.generation_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("namespace", String(128), nullable=False),
    Column("annotator_id", String(128), nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("body_sha256", String(64), nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("answer_correct", Boolean, nullable=True),
    Column("revision", Integer, nullable=False),
    # Only the latest revision of an annotator's judgement counts; flipped in the same
    # transaction that inserts the next revision.
    Column("is_current", Boolean, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("namespace", "idempotency_key", name="uq_feedback_key"),
    UniqueConstraint("generation_id", "annotator_id", "revision", name="uq_feedback_revision"),
    Index("ix_feedback_current", "namespace", "is_current", "seq"),
    Index("ix_feedback_generation", "generation_id"),
    Index("ix_feedback_annotator", "annotator_id"),
)

feedback_items = Table(
    "feedback_items",
    metadata,
    Column(
        "feedback_id",
        String(64),
        ForeignKey("feedback.feedback_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("candidate_id", String(80), nullable=False),
    Column("fitting", Boolean, nullable=False),
    Column("rating", Integer, nullable=True),
    PrimaryKeyConstraint("feedback_id", "candidate_id"),
)

# Corrected rationales are client-written text: kept apart so no query that builds training rows
# reads them unless the operator asks for them.
corrections = Table(
    "corrections",
    metadata,
    Column(
        "feedback_id",
        String(64),
        ForeignKey("feedback.feedback_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("text", Text, nullable=False),
)

FEEDBACK_TABLES = (images, generations, candidates, feedback, feedback_items, corrections)

# --- registry, rounds, leases (migration 2) ----------------------------------------------------

adapter_counters = Table(
    "adapter_counters",
    metadata,
    Column("namespace", String(128), primary_key=True),
    # Versions come from this row, bumped in the registering transaction: never reused.
    Column("last_version", BigInteger, nullable=False),
    # Bumped on every version or alias change; replicas poll it.
    Column("epoch", BigInteger, nullable=False),
)

adapters = Table(
    "adapters",
    metadata,
    Column("namespace", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("artifact_uri", Text, nullable=False),
    Column("manifest_json", Text, nullable=False),
    Column("round_id", String(64), nullable=False),
    Column("parent_version", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    PrimaryKeyConstraint("namespace", "version"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("namespace", String(128), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("share", Float, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("namespace", "alias"),
)

alias_history = Table(
    "alias_history",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("namespace", String(128), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("previous_version", BigInteger, nullable=True),
    Column("action", String(16), nullable=False),  # "set" or "rollback"
    Column("changed_at", Timestamp, nullable=False),
    Index("ix_alias_history_ns_alias", "namespace", "alias", "seq"),
)

rounds = Table(
    "rounds",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("round_id", String(64), nullable=False, unique=True),
    Column("namespace", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("snapshot_sha256", String(64), nullable=False),
    Column("rationale_rows", BigInteger, nullable=False),
    Column("answer_rows", BigInteger, nullable=False),
    Column("adapter_version", BigInteger, nullable=False),
    Column("scores_json", Text, nullable=False),
    Column("job_id", String(256), nullable=False),
    Column("started_at", Timestamp, nullable=False),
    Column("finished_at", Timestamp, nullable=True),
    Index("ix_rounds_ns_seq", "namespace", "seq"),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("token", BigInteger, nullable=False),
)

REGISTRY_TABLES = (adapter_counters, adapters, aliases, alias_history, rounds, leases)

# --- declared namespaces, audit (migration 3) ---------------------------------------------------

# A namespace exists only once declared (config at start, the Admin DeclareNamespace RPC, or the
# upgrade to version 3 for names already in use); the Ingress answers NOT_FOUND for others and
# replicas watch only these. Rows are never deleted.
namespaces = Table(
    "namespaces",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("declared_at", Timestamp, nullable=False),
    Column("declared_by", String(256), nullable=False),
)

# Admin actions and system events (promote, rollback, round start, namespace declarations, key
# reloads, on-behalf feedback): who (principal and short key id, never the key), when, what.
audit = Table(
    "audit",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("at", Timestamp, nullable=False),
    Column("principal", String(256), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("action", String(64), nullable=False),
    # "" for events of no one namespace (key reloads).
    Column("namespace", String(128), nullable=False),
    Column("arguments_json", Text, nullable=False),
    Index("ix_audit_ns_seq", "namespace", "seq"),
)

TENANCY_TABLES = (namespaces, audit)

# --- generator replicas' heartbeats (migration 4) -----------------------------------------------

# One row per Generator replica, upserted by the replica itself every few seconds (health, queue,
# last adapter reload, loaded adapters as (namespace, version) pairs); the Ingress reads them for
# GetServerStatus and treats a row whose heartbeat is older than its staleness limit as unhealthy.
# A replica deletes its row when it stops; rows of replicas that died are pruned by age.
replicas = Table(
    "replicas",
    metadata,
    Column("replica_id", String(256), primary_key=True),
    Column("node_id", String(128), nullable=False),
    Column("model_id", String(256), nullable=False),
    Column("healthy", Boolean, nullable=False),
    Column("health_reason", Text, nullable=False),
    Column("queue_depth", Integer, nullable=False),
    # JSON lists: [[namespace, version], ...] and [[namespace, alias, version], ...].
    Column("loaded_adapters_json", Text, nullable=False),
    Column("aliases_json", Text, nullable=False),
    Column("last_reload_at", Float, nullable=True),  # epoch seconds; None: nothing loaded yet
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),  # epoch seconds of the writer's clock
)

REPLICA_TABLES = (replicas,)

# --- annotator flags (migration 5) ---------------------------------------------------------------

# An annotator whose agreement with the others was too low (illume.training.reliability) stays
# flagged -- their judgements left out of snapshots -- until an admin clears the flag, even if a
# later check would pass: a person decides. One row per (namespace, annotator); flagging again after
# a clear starts a new flag on the same row. ``cleared_at`` None: the flag holds.
annotator_flags = Table(
    "annotator_flags",
    metadata,
    Column("namespace", String(128), nullable=False),
    Column("annotator_id", String(128), nullable=False),
    Column("kappa", Float, nullable=True),
    Column("overlap_items", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("flagged_at", Timestamp, nullable=False),
    Column("flagged_by", String(256), nullable=False),
    Column("cleared_at", Timestamp, nullable=True),
    Column("cleared_by", String(256), nullable=False),
    PrimaryKeyConstraint("namespace", "annotator_id"),
)

FLAG_TABLES = (annotator_flags,)

# --- the judging queue (migration 6) ------------------------------------------------------------

# One row per (generation, annotator) ever handed out by NextItem: an annotator is never handed the
# same generation twice, and while ``expires_at`` (epoch seconds) is ahead the item is reserved for
# them (others get it only as an overlap item). Deleted with the generation.
item_leases = Table(
    "item_leases",
    metadata,
    Column(
        "generation_id",
        String(64),
        ForeignKey("generations.generation_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("annotator_id", String(128), nullable=False),
    Column("namespace", String(128), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("score", Float, nullable=False),
    Column("handed_at", Timestamp, nullable=False),
    Column("expires_at", Float, nullable=False),
    PrimaryKeyConstraint("generation_id", "annotator_id"),
    Index("ix_item_leases_ns_annotator", "namespace", "annotator_id"),
)

# Items an admin uploaded to be judged: generated on demand (``generation_id`` set once they are;
# ``claimed_until`` reserves a pending item while one NextItem call generates it). The image is
# kept like a generation's (``images`` table or the image directory) under its sha256.
pool_items = Table(
    "pool_items",
    metadata,
    Column("item_id", String(64), primary_key=True),
    Column("namespace", String(128), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("question", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("added_at", Timestamp, nullable=False),
    Column("added_by", String(256), nullable=False),
    Column("claimed_until", Float, nullable=True),
    Column("generation_id", String(64), nullable=True),
    UniqueConstraint("namespace", "image_sha256", "question", name="uq_pool_item"),
    Index("ix_pool_items_pending", "namespace", "generation_id"),
)

QUEUE_TABLES = (item_leases, pool_items)
DEFAULT_NAMESPACE = "default"


# --- migrations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Connection], None]


def _create(tables: tuple[Table, ...]) -> Callable[[Connection], None]:
    def step(conn: Connection) -> None:
        metadata.create_all(conn, tables=list(tables), checkfirst=True)

    return step


def _declare_namespaces_in_use(conn: Connection) -> None:
    """Version 3: the tenancy tables, with ``default`` and every namespace already in the store
    declared (so an upgrade changes nothing a deployment serves)."""
    metadata.create_all(conn, tables=list(TENANCY_TABLES), checkfirst=True)
    in_use: set[str] = set()
    for table in (generations, feedback, adapter_counters, adapters, aliases, rounds):
        in_use.update(conn.execute(select(table.c.namespace).distinct()).scalars())
    declared = set(conn.execute(select(namespaces.c.name)).scalars())
    now = rfc3339(utcnow())
    added = sorted((in_use | {DEFAULT_NAMESPACE}) - declared)
    for name in added:
        conn.execute(insert(namespaces).values(name=name, declared_at=now, declared_by="migration"))
    if in_use:  # an upgrade of a store in use (a new store has nothing to report)
        conn.execute(
            insert(audit).values(
                at=now,
                principal="system:migration",
                key_id="",
                action="namespace.declare_on_upgrade",
                namespace="",
                arguments_json=json.dumps({"namespaces": added}),
            )
        )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "feedback log", _create(FEEDBACK_TABLES)),
    Migration(2, "adapter registry, rounds, leases", _create(REGISTRY_TABLES)),
    Migration(3, "declared namespaces, audit", _declare_namespaces_in_use),
    Migration(4, "generator replica heartbeats", _create(REPLICA_TABLES)),
    Migration(5, "annotator flags", _create(FLAG_TABLES)),
    Migration(6, "judging queue: item leases, pool items", _create(QUEUE_TABLES)),
)
LATEST_VERSION = MIGRATIONS[-1].version


def _lock_key(db_schema: str | None) -> int:
    digest = hashlib.sha256(f"illume.store.migrate:{db_schema or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migrate(engine: Engine, db_schema: str | None = None) -> int:
    """Apply the missing migration steps; returns the schema version now in place (idempotent).

    ``db_schema`` (PostgreSQL) is created first when absent; the engine's connections must have it
    on their search_path (``create_store_engine`` does that).
    """
    with engine.connect().execution_options(illume_write=True) as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            # Serialises concurrent openers for the whole transaction; released at commit.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(db_schema)})
            if db_schema:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db_schema}"'))
        schema_version.create(conn, checkfirst=True)
        applied = set(conn.execute(select(schema_version.c.version)).scalars())
        for step in MIGRATIONS:
            if step.version in applied:
                continue
            step.apply(conn)
            conn.execute(
                insert(schema_version).values(
                    version=step.version, name=step.name, applied_at=rfc3339(utcnow())
                )
            )
        return max(applied | {m.version for m in MIGRATIONS})


def current_version(engine: Engine) -> int:
    """The highest applied migration step (0 on an empty database)."""
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, "schema_version"):
            return 0
        query = select(schema_version.c.version).order_by(schema_version.c.version.desc())
        return conn.execute(query).scalars().first() or 0


# --- engine -------------------------------------------------------------------------------------


def create_store_engine(settings: StoreSettings) -> Engine:
    """An engine whose every connection is set up for durable commits (see the module docstring)."""
    if settings.backend == "sqlite":
        return _sqlite_engine(settings)
    return _postgres_engine(settings)


def _switch_to_wal(cursor: Any, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

    Why: on a new database file the switch needs an exclusive lock and SQLite answers "database is
    locked" at once instead of calling the busy handler, so connections opened together (several
    openers of one store) would fail. The mode is stored in the file, so later connections only read it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _sqlite_engine(settings: StoreSettings) -> Engine:
    url = make_url(settings.url)
    if not url.database or url.database == ":memory:":
        # An in-memory database is private to one connection and not durable: refuse it.
        raise ValueError("the SQLite store needs a file path (sqlite:///path/feedback.db)")
    Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        connect_args={"check_same_thread": False, "timeout": settings.busy_timeout_ms / 1000},
    )
    busy = int(settings.busy_timeout_ms)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would otherwise BEGIN lazily
        # and break SAVEPOINT); SQLAlchemy's "begin" hook below emits BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy}")
        _switch_to_wal(cur, busy / 1000)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that later writes can fail
        # with SQLITE_BUSY at the upgrade, which the busy timeout does not cover.
        immediate = conn.get_execution_options().get("illume_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(settings: StoreSettings) -> Engine:
    options = "-c synchronous_commit=on"
    if settings.db_schema:
        options += f" -c search_path={settings.db_schema}"
    return create_engine(
        settings.url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_pre_ping=True,
        connect_args={"options": options},
    )


def durability_settings(engine: Engine) -> dict[str, str]:
    """What a connection of this engine actually runs with (read back from the database)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = int(conn.exec_driver_sql("PRAGMA synchronous").scalar() or 0)
            names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
            return {
                "backend": "sqlite",
                "journal_mode": str(journal).lower(),
                "synchronous": names.get(sync, str(sync)),
                "busy_timeout_ms": str(conn.exec_driver_sql("PRAGMA busy_timeout").scalar()),
            }
        return {
            "backend": "postgresql",
            "synchronous_commit": str(conn.exec_driver_sql("SHOW synchronous_commit").scalar()),
            "fsync": str(conn.exec_driver_sql("SHOW fsync").scalar()),
            "wal_sync_method": str(conn.exec_driver_sql("SHOW wal_sync_method").scalar()),
        }


def integrity_check(engine: Engine) -> bool:
    """SQLite ``PRAGMA integrity_check`` is "ok"; on PostgreSQL a trivial query answers."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check").fetchall()]
            return rows == ["ok"]
        return conn.exec_driver_sql("SELECT 1").scalar() == 1
