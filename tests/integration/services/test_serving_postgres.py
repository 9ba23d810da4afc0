"""The same application with its feedback log on PostgreSQL (127.0.0.1:5432, database test)."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy

from illume.store.settings import StoreSettings

from .conftest import app_config, client_for, deploy
from .test_serving import png

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_reachable() -> bool:
    try:
        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def postgres_app(sqlite_app, served_model_dir, grpc_port):
    if not _postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schema = f"it_{uuid.uuid4().hex[:10]}"
    config = app_config(served_model_dir, StoreSettings(url=PG_URL, db_schema=schema))
    deploy(config)
    yield config
    deploy(sqlite_app)  # later tests expect the SQLite application
    with sqlalchemy.create_engine(PG_URL).begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_round_trip_on_postgresql(postgres_app, grpc_port):
    with (
        client_for(grpc_port, "client") as c,
        client_for(grpc_port, "annotator") as a,
        client_for(grpc_port, "admin") as admin,
    ):
        assert admin.server_status(timeout=60).store_backend == "postgresql"
        reply = c.generate(png("purple"), "what colour?", "purple", n=3, max_new_tokens=4, timeout=120)
        fit = reply.candidates[0].candidate_id
        first = a.submit_feedback(reply.generation_id, fitting=[fit], idempotency_key="pg-1")
        again = a.submit_feedback(reply.generation_id, fitting=[fit], idempotency_key="pg-1")
        assert not first.duplicate and again.duplicate and again.feedback_id == first.feedback_id
        stats = a.stats()
        assert stats.generations == 1 and stats.selected == 1
        [judgement] = a.get_generation(reply.generation_id).judgements
        assert list(judgement.fitting_candidate_ids) == [fit]
