"""Settings of the feedback store (one object, built once by the caller and passed down).

Nothing here reads the environment at import time; a deployment builds ``StoreSettings`` from its
own configuration (Serve config, CLI flags) and hands it to ``FeedbackStore``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StoreSettings(BaseModel):
    """Where and how the feedback log, the adapter registry and the rounds are stored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        description=(
            "SQLAlchemy database URL: `sqlite:///path/feedback.db` (embedded default, one node) or "
            "`postgresql+psycopg://postgres@127.0.0.1:5432/test` (cluster)."
        )
    )
    image_dir: Path | None = Field(
        default=None,
        description=(
            "Directory for content-addressed image files (`<sha256[:2]>/<sha256>`, written "
            "atomically and fsynced). None stores image bytes in the database's `images` table, "
            "which is what a multi-node cluster without a shared volume wants."
        ),
    )
    db_schema: str | None = Field(
        default=None,
        description=(
            "PostgreSQL only: schema (search_path) holding the tables; created if absent. "
            "None uses the server's default (public). Lets several deployments share a database."
        ),
    )
    held_out_fraction: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Share of images (by a hash of their sha256) put in the never-trained held-out split.",
    )
    group_commit: bool | None = Field(
        default=None,
        description=(
            "Batch concurrent writes into one transaction on a single writer thread (one durable "
            "commit for many acknowledgements). False commits every write on its own. None (default) "
            "picks what measured faster here: on for SQLite, off for PostgreSQL, which already "
            "merges the flushes of concurrent commits (docs/STORE.md)."
        ),
    )
    group_commit_max_batch: int = Field(
        default=256, ge=1, le=10_000, description="Most writes one group-commit transaction holds."
    )
    group_commit_max_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description=(
            "How long the writer waits for more writes once one is queued. 0 takes whatever queued "
            "up while the previous commit was being flushed, which is enough batching under load "
            "and adds no latency to a lone write."
        ),
    )
    pool_size: int = Field(default=8, ge=1, le=256, description="Database connection pool size.")
    busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="SQLite: how long a writer waits for another process's lock."
    )

    @field_validator("db_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str | None) -> str | None:
        # The schema name is interpolated into DDL and a connection option, so only plain
        # lower-case identifiers are accepted.
        if value is not None and not _SCHEMA_RE.match(value):
            raise ValueError("db_schema must match [a-z_][a-z0-9_]{0,62}")
        return value

    @property
    def group_commit_enabled(self) -> bool:
        """Whether writes go through the group-commit writer (see ``group_commit``)."""
        return self.group_commit if self.group_commit is not None else self.backend == "sqlite"

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql`` (the wire contract's ``store_backend``)."""
        scheme = self.url.split(":", 1)[0].split("+", 1)[0]
        if scheme in ("postgresql", "postgres"):
            return "postgresql"
        if scheme == "sqlite":
            return "sqlite"
        raise ValueError(f"unsupported store URL scheme {scheme!r}")
