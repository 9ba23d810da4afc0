"""Fixtures of the store's integration tests: PostgreSQL (a fresh schema per test) and SQLite.

PostgreSQL is expected at ``postgresql+psycopg://postgres@127.0.0.1:5432/test`` (override with
``ILLUME_TEST_PG_URL``); when it cannot be reached the PostgreSQL tests are skipped with the
reason. Every PostgreSQL test gets its own schema (``illume_test_<random>``), dropped afterwards,
so concurrent runs never see each other's tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from illume.store import StoreSettings

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("ILLUME_TEST_PG_URL", DEFAULT_PG_URL)


def _conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_available() -> str:
    """The PostgreSQL URL, or a skip with the reason it cannot be used."""
    try:
        import psycopg

        with psycopg.connect(_conninfo(pg_url()), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        pytest.skip(
            f"PostgreSQL not reachable at {pg_url()}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        )
    return pg_url()


def _drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_settings(pg_available: str, tmp_path: Path) -> Iterator[StoreSettings]:
    schema = f"illume_test_{uuid.uuid4().hex[:12]}"
    yield StoreSettings(url=pg_available, db_schema=schema, image_dir=tmp_path / "images", pool_size=20)
    _drop_schema(pg_available, schema)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> StoreSettings:
    return StoreSettings(url=f"sqlite:///{tmp_path}/feedback.db", image_dir=tmp_path / "images")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_settings(request: pytest.FixtureRequest) -> StoreSettings:
    """Runs a test once per backend."""
    name = "sqlite_settings" if request.param == "sqlite" else "pg_settings"
    return request.getfixturevalue(name)
