"""Write benchmark of the feedback store: acknowledged durable writes per second.

Not a test. ``bench_writes`` opens a store on ``url`` (a fresh SQLite file or a fresh PostgreSQL
schema, removed afterwards), records one generation, then ``writers`` threads each submit
``writes_per_writer`` judgements (distinct keys and annotators) and wait for every acknowledgement.
A write counts once ``submit_feedback`` returned, i.e. once its transaction committed durably.

    python -m illume.store.bench --url sqlite:////tmp/bench/feedback.db --writers 16 --writes 50
    python -m illume.store.bench --url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from illume.store.feedback import FeedbackStore
from illume.store.settings import StoreSettings
from illume.store.types import FeedbackSubmission, NewCandidate, NewGeneration


def bench_writes(url: str, writers: int, writes_per_writer: int, group_commit: bool) -> dict[str, Any]:
    """Run the benchmark once; returns counts, seconds, writes/s and commits."""
    schema = None
    if url.startswith("sqlite"):
        # A fresh file per run, beside the one named, so runs do not inherit each other's WAL.
        db = Path(make_url(url).database or "bench.db")
        db = db.with_name(f"{db.stem}-{uuid.uuid4().hex[:8]}{db.suffix or '.db'}")
        run_url = f"sqlite:///{db}"
    else:
        schema = f"illume_bench_{uuid.uuid4().hex[:10]}"
        run_url = url
    settings = StoreSettings(url=run_url, db_schema=schema, group_commit=group_commit, pool_size=writers + 2)
    store = FeedbackStore(settings)
    try:
        gen = store.record_generation(
            NewGeneration(
                namespace="bench",
                image=b"bench-image",
                question="q",
                answer="a",
                answer_generated=False,
                candidates=[NewCandidate("x", 0.3, 1), NewCandidate("y", 0.9, 1)],
                sampling={},
                seed=0,
                adapter_requested="",
                adapter_version="base",
                model_id="bench",
            )
        )
        fitting = (gen.candidates[0].candidate_id,)
        barrier = threading.Barrier(writers + 1)
        commits0, errors = store.commit_count, []

        def writer(w: int) -> None:
            barrier.wait()
            try:
                for i in range(writes_per_writer):
                    key = f"w{w}-{i}"
                    store.submit_feedback(
                        FeedbackSubmission(gen.generation_id, "selected", key, key, "bench", fitting)
                    )
            except Exception as exc:  # reported, not raised: the figures say how many failed
                errors.append(repr(exc))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        total = writers * writes_per_writer
        return {
            "backend": settings.backend,
            "group_commit": group_commit,
            "writers": writers,
            "writes": total,
            "errors": len(errors),
            "seconds": round(seconds, 3),
            "writes_per_s": round(total / seconds, 1),
            "commits": store.commit_count - commits0,
            "durability": store.durability_settings(),
        }
    finally:
        store.close()
        if schema is not None:
            from sqlalchemy import create_engine

            engine = create_engine(url)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--writes", type=int, default=50, help="writes per writer")
    args = parser.parse_args()
    for group_commit in (False, True):
        print(json.dumps(bench_writes(args.url, args.writers, args.writes, group_commit)))


if __name__ == "__main__":
    main()
