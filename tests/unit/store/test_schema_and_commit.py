"""Migrations, durability settings and the group-commit writer (SQLite)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Connection, event, func, select, text

from illume.errors import FailedPrecondition, InvalidRequest
from illume.store import FeedbackStore, FeedbackSubmission, NewGeneration, StoreSettings
from illume.store import schema as s
from illume.store.groupcommit import GroupCommitWriter


def test_migrations_idempotent_on_reopen(settings: StoreSettings):
    with FeedbackStore(settings) as st:
        assert st.schema_version == s.LATEST_VERSION
    with FeedbackStore(settings) as st:
        assert st.schema_version == s.LATEST_VERSION
        with st.engine.connect() as conn:
            versions = conn.execute(select(s.schema_version.c.version).order_by(s.schema_version.c.version))
            assert list(versions.scalars()) == [m.version for m in s.MIGRATIONS]
    assert s.current_version(s.create_store_engine(settings)) == s.LATEST_VERSION


def test_concurrent_open_migrates_once(tmp_path):
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/race.db")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    stores: list[FeedbackStore] = []

    def open_it() -> None:
        barrier.wait()
        try:
            stores.append(FeedbackStore(settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with stores[0].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(s.schema_version)).scalar_one() == len(
            s.MIGRATIONS
        )
    for st in stores:
        st.close()


def test_durability_settings_and_integrity(store: FeedbackStore):
    d = store.durability_settings()
    assert d["backend"] == "sqlite" and d["journal_mode"] == "wal" and d["synchronous"] == "FULL"
    assert int(d["busy_timeout_ms"]) > 0
    assert store.integrity_check()


def test_settings_validation(tmp_path):
    with pytest.raises(ValueError):
        StoreSettings(url="sqlite:///x.db", db_schema="Robert'); DROP TABLE")
    with pytest.raises(ValueError):
        StoreSettings(url="mysql://x").backend  # noqa: B018
    with pytest.raises(ValueError):
        FeedbackStore(StoreSettings(url="sqlite:///:memory:"))


# --- group commit --------------------------------------------------------------------------------


@pytest.fixture
def scratch(settings: StoreSettings):
    engine = s.create_store_engine(settings)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    yield engine
    engine.dispose()


def insert_op(key: str):
    def op(conn: Connection) -> str:
        conn.execute(text("INSERT INTO t (k) VALUES (:k)"), {"k": key})
        return key

    return op


def keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT k FROM t")).scalars())


def test_group_commit_batches_concurrent_writes(scratch):
    writer = GroupCommitWriter(scratch, enabled=True, max_batch=64, max_wait_ms=20)
    futures = [writer.submit(insert_op(f"k{i}")) for i in range(100)]
    assert [f.result() for f in futures] == [f"k{i}" for i in range(100)]
    assert keys(scratch) == {f"k{i}" for i in range(100)}
    assert writer.writes == 100 and writer.commits < 100
    writer.close()
    with pytest.raises(FailedPrecondition):
        writer.submit(insert_op("late"))


def test_failed_write_does_not_fail_its_batch(scratch):
    writer = GroupCommitWriter(scratch, enabled=True, max_batch=64, max_wait_ms=50)

    def bad(conn: Connection) -> None:
        conn.execute(text("INSERT INTO t (k) VALUES ('poison')"))
        raise InvalidRequest("no")

    futures = [
        writer.submit(insert_op("a")),
        writer.submit(bad),
        writer.submit(insert_op("b")),
        writer.submit(insert_op("a")),
    ]  # duplicate key: IntegrityError for that op only
    assert futures[0].result() == "a" and futures[2].result() == "b"
    with pytest.raises(InvalidRequest):
        futures[1].result()
    with pytest.raises(Exception, match="UNIQUE"):
        futures[3].result()
    assert keys(scratch) == {"a", "b"}  # the failed op's partial write was rolled back
    assert writer.commits == 1
    writer.close()


def test_commit_failure_falls_back_to_single_writes(scratch):
    writer = GroupCommitWriter(scratch, enabled=True, max_batch=64, max_wait_ms=50)
    state = {"broken": True}

    def breaks_the_transaction(conn: Connection) -> str:
        if state["broken"]:
            state["broken"] = False
            # Fails the batch as a whole (as a failed COMMIT would), not just this op's savepoint.
            conn.exec_driver_sql("ROLLBACK")
        conn.execute(text("INSERT INTO t (k) VALUES ('c')"))
        return "c"

    futures = [
        writer.submit(insert_op("a")),
        writer.submit(breaks_the_transaction),
        writer.submit(insert_op("b")),
    ]
    results = []
    for f in futures:
        try:
            results.append(f.result())
        except Exception as exc:  # the poisoned op may fail; its neighbours may not
            results.append(type(exc).__name__)
    assert results[0] == "a" and results[2] == "b"
    assert {"a", "b"} <= keys(scratch)
    writer.close()


def test_disabled_group_commit_commits_every_write(settings: StoreSettings, tmp_path):
    with FeedbackStore(settings.model_copy(update={"group_commit": False})) as st:
        gen = st.record_generation(
            NewGeneration(
                namespace="",
                image=b"i",
                question="q",
                answer="a",
                answer_generated=False,
                candidates=[],
                sampling={},
                seed=0,
                adapter_requested="",
                adapter_version="base",
                model_id="m",
            )
        )
        for i in range(5):
            with pytest.raises(InvalidRequest):  # no candidates: selected cannot name one
                st.submit_feedback(
                    FeedbackSubmission(
                        gen.generation_id, "selected", "a", f"k{i}", fitting_candidate_ids=("x",)
                    )
                )
            st.submit_feedback(FeedbackSubmission(gen.generation_id, "none_fit", f"a{i}", f"n{i}"))
        assert st.commit_count == 6  # the generation and five judgements, one commit each


def test_store_counts_fewer_commits_than_writes_under_contention(store: FeedbackStore, make_generation):
    gen = make_generation()
    barrier = threading.Barrier(8)

    def work(w: int) -> None:
        barrier.wait()
        for i in range(20):
            store.submit_feedback(FeedbackSubmission(gen.generation_id, "none_fit", f"w{w}-{i}", f"w{w}-{i}"))

    before_commits, before_writes = store.commit_count, store.write_count
    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.write_count - before_writes == 160
    assert store.commit_count - before_commits < 160
    assert store.stats().feedback == 160


def test_failed_commit_retries_each_write_alone(scratch):
    fail = {"left": 1}

    @event.listens_for(scratch, "commit")
    def disk_full(_conn) -> None:  # fires before the DBAPI commit
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("disk full")

    writer = GroupCommitWriter(scratch, enabled=True, max_batch=64, max_wait_ms=50)
    futures = [writer.submit(insert_op(k)) for k in "xyz"]
    assert [f.result() for f in futures] == ["x", "y", "z"]
    assert keys(scratch) == {"x", "y", "z"}
    assert writer.commits == 3  # the failed batch is not counted; each retry is
    writer.close()


def test_group_commit_defaults_by_backend():
    from illume.store.settings import StoreSettings

    assert StoreSettings(url="sqlite:///x.db").group_commit_enabled
    assert not StoreSettings(url="postgresql+psycopg://u@h/db").group_commit_enabled
    assert StoreSettings(url="postgresql+psycopg://u@h/db", group_commit=True).group_commit_enabled
