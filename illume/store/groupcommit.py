"""Group commit: many callers' writes, one durable transaction.

A write is a function ``op(conn) -> result`` that reads and writes through the given connection
and must not commit. Callers hand ops to :class:`GroupCommitWriter`; one writer thread takes
whatever queued up (at most ``max_batch``, waiting at most ``max_wait_ms`` for more), runs each op
inside its own SAVEPOINT of a single transaction, commits once, and only then resolves the callers'
futures. So an acknowledged write is a committed, fsynced one, and N concurrent writes cost about
one fsync instead of N.

Failure isolation: an op that raises rolls back to its savepoint and only its caller sees the
error; the others still commit. If the commit itself fails (or the connection breaks), every op
of the batch is retried alone in its own transaction, so one poisoned write cannot fail its
neighbours. Ops are re-run from scratch on retry, so they must derive everything from the database
(they do: they re-check idempotency keys and revisions).

With ``enabled=False`` each op runs in the caller's thread in its own transaction: one commit per
write, the benchmark's baseline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from illume.errors import FailedPrecondition

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[Connection], Any]

_STOP = object()
# A unique-constraint race with another process (two FeedbackLog replicas on PostgreSQL) is
# resolved by re-running the op, which then sees the other writer's row.
_INTEGRITY_RETRIES = 3


def run_in_savepoint(conn: Connection, op: Op) -> Any:
    """Run ``op`` inside a SAVEPOINT, retrying a unique-constraint race a few times."""
    for attempt in range(_INTEGRITY_RETRIES):
        savepoint = conn.begin_nested()
        try:
            result = op(conn)
        except IntegrityError:
            savepoint.rollback()
            if attempt == _INTEGRITY_RETRIES - 1:
                raise
            continue
        except BaseException:
            savepoint.rollback()
            raise
        savepoint.commit()
        return result
    raise AssertionError("unreachable")


class GroupCommitWriter:
    """Runs write ops durably; batches concurrent ones into one transaction when enabled."""

    def __init__(
        self,
        engine: Engine,
        *,
        enabled: bool = True,
        max_batch: int = 256,
        max_wait_ms: float = 0.0,
        name: str = "illume-store-writer",
    ) -> None:
        self._engine = engine
        self.enabled = enabled
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._commits = 0
        self._writes = 0
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    # -- counters (for tests and the benchmark) --

    @property
    def commits(self) -> int:
        """Transactions committed so far (batches plus per-op fallbacks)."""
        return self._commits

    @property
    def writes(self) -> int:
        """Ops that completed (successfully or with an error of their own)."""
        return self._writes

    # -- API --

    def submit(self, op: Op) -> Future[Any]:
        """Queue ``op``; the future resolves after the transaction holding it has committed."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the feedback store is closed")
            if self.enabled:
                # Queued under the lock so close() cannot slip its stop marker in ahead of it.
                self._queue.put((op, future))
                return future
        # Disabled: callers commit in parallel in their own threads (outside the lock).
        self._run_alone(op, future)
        return future

    def run(self, op: Op) -> Any:
        """Queue ``op`` and wait for its durable result (or its error)."""
        return self.submit(op).result()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes, then stop the writer thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- internals --

    def _run_alone(self, op: Op, future: Future[Any]) -> None:
        try:
            with self._engine.connect().execution_options(illume_write=True) as conn:
                result = _commit_after(conn, lambda: run_in_savepoint(conn, op))
        except BaseException as exc:  # the caller gets its own error
            self._count(commits=0)
            _resolve(future, False, exc)
            return
        self._count(commits=1)
        _resolve(future, True, result)

    def _count(self, commits: int, writes: int = 1) -> None:
        with self._lock:
            self._commits += commits
            self._writes += writes

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self._max_wait_s
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Op, Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []

        def body(conn: Connection) -> None:
            for op, _future in batch:
                try:
                    outcomes.append((True, run_in_savepoint(conn, op)))
                except DBAPIError as exc:
                    if exc.connection_invalidated:
                        raise
                    outcomes.append((False, exc))
                except Exception as exc:
                    outcomes.append((False, exc))
                # Stop at once if the database dropped the transaction (SQLite rolls back by
                # itself on some errors): later ops would otherwise run in autocommit mode.
                if not _in_transaction(conn):
                    raise TransactionLost("the database rolled the group-commit transaction back")

        try:
            with self._engine.connect().execution_options(illume_write=True) as conn:
                _commit_after(conn, lambda: body(conn))
        except Exception:
            # The transaction as a whole failed (commit error, lost connection, a transaction
            # broken under the savepoints): nothing of it is durable, so every op is retried alone
            # and reports its own outcome.
            log.warning(
                "group commit of %d writes failed; retrying them one by one", len(batch), exc_info=True
            )
            for op, future in batch:
                self._run_alone(op, future)
            return
        self._count(commits=1, writes=len(batch))
        for (ok, value), (_op, future) in zip(outcomes, batch, strict=True):
            _resolve(future, ok, value)


class TransactionLost(RuntimeError):
    """The transaction ended under the writer's feet; none of its writes committed."""


def _in_transaction(conn: Connection) -> bool:
    """Whether the database itself still has our transaction open (not just SQLAlchemy's view).

    pysqlite's ``commit()`` is a silent no-op outside a transaction, so a transaction that SQLite
    rolled back on its own would otherwise look committed.
    """
    dbapi = conn.connection.dbapi_connection
    if conn.dialect.name == "sqlite":
        return bool(getattr(dbapi, "in_transaction", True))
    info = getattr(dbapi, "info", None)
    status = getattr(info, "transaction_status", None)
    # psycopg: 2 = INTRANS (open, healthy); 3 = INERROR (must roll back); 0 = IDLE (gone).
    return status is None or int(status) == 2


def _commit_after(conn: Connection, body: Callable[[], T]) -> T:
    """Run ``body`` in a transaction and commit it, or raise.

    Explicit on purpose: SQLAlchemy's ``with conn.begin():`` silently closes (without committing
    and without raising) a transaction that an inner failure deactivated, which would acknowledge
    writes that never committed.
    """
    trans = conn.begin()
    try:
        result = body()
        if not trans.is_active or not _in_transaction(conn):
            raise TransactionLost("the transaction was rolled back before its commit")
        trans.commit()
    except BaseException:
        if trans.is_active:
            trans.rollback()
        else:
            trans.close()
        raise
    return result


def _resolve(future: Future[Any], ok: bool, value: Any) -> None:
    # An asyncio caller that was cancelled cancels the future; its write is committed anyway, and
    # setting a result on a cancelled future must not kill the writer thread.
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:
        pass
