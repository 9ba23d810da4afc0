"""Annotator flags (migration 5) on SQLite: set, re-set, clear, list, delete, upgrade."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, inspect

from illume.errors import InvalidRequest
from illume.store import FeedbackStore, FeedbackSubmission, StoreSettings
from illume.store import schema as s


def test_a_flag_holds_until_cleared_and_keeps_when_it_was_first_raised(store: FeedbackStore):
    first = store.flag_annotator("default", "ann-r", reason="kappa 0.01 < 0.2", kappa=0.01, overlap_items=40)
    assert first.active and first.kappa == 0.01 and first.overlap_items == 40 and first.flagged_by == ""
    again = store.flag_annotator("", "ann-r", reason="kappa 0.05 < 0.2", kappa=0.05, overlap_items=60)
    assert again.flagged_at == first.flagged_at and (again.kappa, again.overlap_items) == (0.05, 60)
    assert [f.annotator_id for f in store.annotator_flags("default")] == ["ann-r"]
    assert store.annotator_flags("other") == []  # per namespace

    assert store.clear_annotator_flag("default", "ann-r", cleared_by="ops-alice")
    assert not store.clear_annotator_flag("default", "ann-r")  # nothing left to clear
    assert store.annotator_flags("default") == []
    (cleared,) = store.annotator_flags("default", include_cleared=True)
    assert not cleared.active and cleared.cleared_by == "ops-alice" and cleared.cleared_at is not None

    renewed = store.flag_annotator("default", "ann-r", reason="manual", flagged_by="ops-bob")
    assert renewed.active and renewed.flagged_by == "ops-bob" and renewed.kappa is None
    assert renewed.flagged_at >= cleared.cleared_at and renewed.cleared_by == ""
    with pytest.raises(InvalidRequest):
        store.flag_annotator("default", "", reason="x")


def test_deleting_an_annotator_deletes_its_flags(store: FeedbackStore, make_generation):
    gen = make_generation()
    store.submit_feedback(
        FeedbackSubmission(
            generation_id=gen.generation_id, verdict="none_fit", annotator_id="ann-r", idempotency_key="k1"
        )
    )
    store.flag_annotator("default", "ann-r", reason="low")
    store.flag_annotator("tenant", "ann-r", reason="low")
    store.flag_annotator("default", "ann-ok", reason="low")
    assert store.delete_annotator("ann-r") == 1
    assert [f.annotator_id for f in store.annotator_flags("default", include_cleared=True)] == ["ann-ok"]
    assert store.annotator_flags("tenant", include_cleared=True) == []


def test_upgrade_from_version_4_adds_the_flag_table(settings: StoreSettings):
    engine = s.create_store_engine(settings)
    with engine.connect().execution_options(illume_write=True) as conn, conn.begin():
        s.schema_version.create(conn)
        for step in s.MIGRATIONS[:4]:  # a store as version 4 left it
            step.apply(conn)
            conn.execute(
                insert(s.schema_version).values(version=step.version, name=step.name, applied_at="x")
            )
    assert "annotator_flags" not in inspect(engine).get_table_names()
    assert s.migrate(engine) == s.LATEST_VERSION
    assert "annotator_flags" in inspect(engine).get_table_names()
    engine.dispose()
    with FeedbackStore(settings) as store:
        store.flag_annotator("default", "ann", reason="x")
        assert len(store.annotator_flags()) == 1
