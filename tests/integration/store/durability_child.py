"""Child process of the SIGKILL durability test: writes forever, acknowledging on stdout.

Usage: durability_child.py URL IMAGE_DIR DB_SCHEMA RUN. Eight threads record generations and
submit feedback through one group-commit store; a line ``G <generation_id>`` or ``F <key>`` is
printed only after the call returned, i.e. after its transaction committed. The parent kills this
process with SIGKILL at a random moment and then checks that every printed id is stored.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from illume.store import FeedbackStore, FeedbackSubmission, NewCandidate, NewGeneration, StoreSettings


def main() -> None:
    url, image_dir, schema, run = sys.argv[1:5]
    store = FeedbackStore(StoreSettings(url=url, image_dir=image_dir, db_schema=schema or None))
    lock = threading.Lock()

    def ack(kind: str, ident: str) -> None:
        with lock:
            sys.stdout.write(f"{kind} {ident}\n")
            sys.stdout.flush()

    def new_generation() -> str:
        gen = store.record_generation(
            NewGeneration(
                namespace="",
                image=os.urandom(256),
                question="q",
                answer="a",
                answer_generated=False,
                candidates=[NewCandidate("x", 0.3, 1), NewCandidate("y", 0.9, 1)],
                sampling={},
                seed=0,
                adapter_requested="",
                adapter_version="base",
                model_id="m",
            )
        )
        ack("G", gen.generation_id)
        return gen.generation_id

    def worker(w: int) -> None:
        gid = new_generation()
        i = 0
        while True:
            if i % 10 == 9:
                gid = new_generation()
            key = f"r{run}-w{w}-{i}"
            store.submit_feedback(FeedbackSubmission(gid, "none_fit", key, key))
            ack("F", key)
            i += 1

    for w in range(8):
        threading.Thread(target=worker, args=(w,), daemon=True).start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
