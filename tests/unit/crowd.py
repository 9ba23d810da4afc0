"""A feedback store filled with a simulated crowd: honest annotators who slip on a few decisions and
one who marks at random (tests/unit/training/test_reliability.py, tests/unit/services/test_annotators.py)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from illume.store import FeedbackStore, FeedbackSubmission, NewCandidate, NewGeneration


def fill_judged_store(
    store: FeedbackStore,
    namespace: str,
    items: int,
    annotators: Sequence[str],
    rng: random.Random,
    *,
    slip: float = 0.05,
    skipper: bool = False,
) -> None:
    """``items`` generations of 6 candidates (candidate 0 and about 15 % of the others truly fit),
    each judged by every one of ``annotators``: "random" marks each candidate with probability 0.5,
    the others flip a ``slip`` share of the true decisions. With ``skipper``, "skipper" skips the
    first generation (a skip decides nothing)."""
    keys = itertools.count()
    for k in range(items):
        gen = store.record_generation(
            NewGeneration(
                namespace=namespace,
                image=f"image {namespace} {k}".encode(),
                question=f"what is shown in {k}?",
                answer="a dog",
                answer_generated=False,
                candidates=[NewCandidate(f"because {k} {i}", 0.3, 3) for i in range(6)],
                sampling={"n": 6},
                seed=1,
                adapter_requested="",
                adapter_version="base",
                model_id="tiny",
            )
        )
        truth = [i == 0 or rng.random() < 0.15 for i in range(6)]
        for annotator in annotators:
            if annotator == "random":
                marks = [rng.random() < 0.5 for _ in truth]
            else:
                marks = [t != (rng.random() < slip) for t in truth]
            fitting = tuple(c.candidate_id for c, m in zip(gen.candidates, marks, strict=True) if m)
            store.submit_feedback(
                FeedbackSubmission(
                    generation_id=gen.generation_id,
                    verdict="selected" if fitting else "none_fit",
                    annotator_id=annotator,
                    idempotency_key=f"k{next(keys)}",
                    namespace=namespace,
                    fitting_candidate_ids=fitting,
                )
            )
        if skipper and k == 0:
            store.submit_feedback(
                FeedbackSubmission(
                    generation_id=gen.generation_id,
                    verdict="skipped",
                    annotator_id="skipper",
                    idempotency_key=f"k{next(keys)}",
                    namespace=namespace,
                )
            )
