"""Group commit under contention, and acknowledged writes surviving SIGKILL of the writer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from illume.store import FeedbackStore, FeedbackSubmission, NewCandidate, NewGeneration, StoreSettings
from illume.store import schema as s

CHILD = Path(__file__).with_name("durability_child.py")
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_group_commit_16_threads(any_settings: StoreSettings):
    # Explicitly on: the default leaves it off on PostgreSQL.
    with FeedbackStore(any_settings.model_copy(update={"group_commit": True})) as st:
        gen = st.record_generation(
            NewGeneration(
                namespace="",
                image=b"img",
                question="q",
                answer="a",
                answer_generated=False,
                candidates=[NewCandidate("x", 0.3, 1)],
                sampling={},
                seed=1,
                adapter_requested="",
                adapter_version="base",
                model_id="m",
            )
        )
        acked: list[list[str]] = [[] for _ in range(16)]
        barrier = threading.Barrier(16)
        commits_before = st.commit_count

        def writer(w: int) -> None:
            barrier.wait()
            for i in range(50):
                key = f"w{w}-{i}"
                st.submit_feedback(
                    FeedbackSubmission(
                        gen.generation_id,
                        "selected",
                        key,
                        key,
                        fitting_candidate_ids=(gen.candidates[0].candidate_id,),
                    )
                )
                acked[w].append(key)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        all_keys = {k for part in acked for k in part}
        assert len(all_keys) == 800
        with st.engine.connect() as conn:
            stored = set(conn.execute(select(s.feedback.c.idempotency_key)).scalars())
        assert stored == all_keys
        commits = st.commit_count - commits_before
        assert commits < 800, commits
        assert st.stats().selected == 800


def _run_child_and_kill(
    settings: StoreSettings, run: int, rng: random.Random, acked: dict[str, set[str]]
) -> int:
    args = [
        sys.executable,
        str(CHILD),
        settings.url,
        str(settings.image_dir),
        settings.db_schema or "",
        str(run),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    got = {"n": 0}
    first = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.endswith("\n"):
                break  # cut off by the kill: not an acknowledgement
            kind, ident = line.split()
            acked[kind].add(ident)
            got["n"] += 1
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    if not first.wait(30):
        proc.kill()
        raise AssertionError(f"child wrote nothing: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(rng.uniform(0.05, 0.5))  # kill at a random moment while writes are in flight
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL
    return got["n"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_acknowledged_writes_survive_sigkill(backend: str, request: pytest.FixtureRequest):
    settings: StoreSettings = request.getfixturevalue(f"{'sqlite' if backend == 'sqlite' else 'pg'}_settings")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acked: dict[str, set[str]] = {"G": set(), "F": set()}
    for run in range(5):
        assert _run_child_and_kill(settings, run, rng, acked) > 0, f"seed {seed}"
    assert acked["F"] and acked["G"]
    with FeedbackStore(settings) as st:
        assert st.integrity_check()
        if backend == "sqlite":
            d = st.durability_settings()
            assert (d["journal_mode"], d["synchronous"]) == ("wal", "FULL")
        else:
            assert st.durability_settings()["synchronous_commit"] == "on"
        with st.engine.connect() as conn:
            keys = set(conn.execute(select(s.feedback.c.idempotency_key)).scalars())
            gens = set(conn.execute(select(s.generations.c.generation_id)).scalars())
        missing_f, missing_g = acked["F"] - keys, acked["G"] - gens
        assert not missing_f and not missing_g, (
            f"seed {seed}: lost {len(missing_f)} feedback, {len(missing_g)} gens"
        )
        for gid in list(acked["G"])[:20]:
            g = st.get_generation(gid)
            assert st.get_image(g.image_sha256)  # the image of an acknowledged generation is there too
