"""Acknowledged feedback survives SIGKILL of the FeedbackLog replica, several times, under load."""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time

import grpc
import psutil
import pytest
from PIL import Image

from illume.store import FeedbackStore

from .conftest import client_for

pytestmark = pytest.mark.slow
REPLICA_TITLE = "ServeReplica:illume:FeedbackLog"


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 7 % 256, 10, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _feedback_log_pids() -> list[int]:
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if REPLICA_TITLE in cmdline:
            pids.append(process.info["pid"])
    return pids


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _wait_for_new_replica(old: set[int], timeout: float = 60.0) -> None:
    assert _wait_until(lambda: set(_feedback_log_pids()) - old, timeout), (
        "the FeedbackLog replica did not come back"
    )


# Acknowledgements awaited before each kill and after the last restart: every kill lands while
# feedback is flowing, however fast the machine is, and the service takes feedback again after it.
ACKS_BETWEEN_KILLS = 15


def test_acknowledged_feedback_survives_sigkill(sqlite_app, grpc_port):
    with client_for(grpc_port, "client") as c:
        generations = [
            c.generate(_png(i), f"question {i}?", "a", n=2, max_new_tokens=3, timeout=120) for i in range(8)
        ]
    acknowledged: list[tuple[str, str]] = []  # (generation id, feedback id)
    lock = threading.Lock()
    stop = threading.Event()

    def submitter(worker: int) -> None:
        rng = random.Random(worker)
        with client_for(grpc_port, "annotator") as a:
            a.retries, a.backoff_s = 6, 0.25
            n = 0
            while not stop.is_set() and n < 400:
                n += 1
                generation = rng.choice(generations)
                try:
                    receipt = a.submit_feedback(
                        generation.generation_id,
                        fitting=[generation.candidates[0].candidate_id],
                        annotator_id=f"w{worker}-{n}",
                        idempotency_key=f"w{worker}-{n}",
                        timeout=20,
                    )
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    continue
                with lock:
                    acknowledged.append((generation.generation_id, receipt.feedback_id))

    workers = [threading.Thread(target=submitter, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()

    def await_more_acknowledged() -> None:
        target = len(acknowledged) + ACKS_BETWEEN_KILLS
        assert _wait_until(lambda: len(acknowledged) >= target, 90.0), (
            f"{len(acknowledged)} of {target} acknowledged"
        )

    rng = random.Random(0)
    try:
        for _ in range(3):
            await_more_acknowledged()
            time.sleep(rng.uniform(0.0, 1.0))
            pids = set(_feedback_log_pids())
            assert pids, "no FeedbackLog replica process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            _wait_for_new_replica(pids)
        await_more_acknowledged()  # taken again after the last restart
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    store = FeedbackStore(sqlite_app.feedback_log.store)
    try:
        by_generation: dict[str, set[str]] = {}
        for generation_id, _ in acknowledged:
            if generation_id not in by_generation:
                by_generation[generation_id] = {
                    j.feedback_id for j in store.get_generation(generation_id).judgements
                }
        missing = [f for g, f in acknowledged if f not in by_generation[g]]
        assert not missing, f"{len(missing)} acknowledged submissions were lost"
        assert store.integrity_check()
        settings = store.durability_settings()
        assert settings["journal_mode"].lower() == "wal" and settings["synchronous"].upper() in ("FULL", "2")
    finally:
        store.close()
