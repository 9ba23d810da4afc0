"""The gate decides, end to end on the session's Ray cluster: two real tuning rounds (snapshot from
the feedback store, Ray Train, the gate's Ray task scoring held-out generations, the registry).

- a good round (gold rationales accepted) is promoted on held-out evidence (``min_items`` items);
- a deliberately harmful round -- the annotator revises every training judgement to "none fit"
  and instead accepts nonsense rationales that justify another item's answer (its words
  reversed) -- is rejected: the round record's reason names a metric drop measured on at least
  ``min_items`` items on both sides, production keeps the good version and the harmful one is
  marked rejected with that reason.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import pytest

from illume.evaluation.gate import DEFAULT_METRICS, GateConfig
from illume.models.loading import ModelSettings
from illume.store import (
    AdapterRegistry,
    FeedbackStore,
    FeedbackSubmission,
    NewCandidate,
    NewGeneration,
    held_out_for,
)
from illume.store.settings import StoreSettings
from illume.training.round import TrainConfig
from illume.training.snapshot import SnapshotConfig
from tests.integration.services.conftest import tiny_llava_for

pytestmark = pytest.mark.slow
NAMESPACE = "default"
FRACTION = 0.5
MIN_ITEMS = 8
_keys = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from illume.world import build_world

    return build_world(tmp_path_factory.mktemp("world"), sizes={"train": 36, "val": 0, "test": 0}, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world) -> Path:
    return tiny_llava_for(world["train"], tmp_path_factory.mktemp("model"))


def _judge(store: FeedbackStore, item, rationales, key: str | None = None, generation=None, fitting=None):
    """Generate ``rationales`` for ``item`` (unless ``generation`` is given) and accept the first
    ``fitting`` (default: all); with ``rationales`` empty, judge "none fit" (a revision of the same
    annotator's judgement)."""
    record = generation or store.record_generation(
        NewGeneration(
            namespace=NAMESPACE,
            image=Path(item.image_path).read_bytes(),
            question=item.question,
            answer=item.answer,
            answer_generated=False,
            candidates=[NewCandidate(text, 0.3, len(text.split())) for text in rationales],
            sampling={"n": len(rationales)},
            seed=0,
            adapter_requested="",
            adapter_version="base",
            model_id="tiny",
        )
    )
    store.submit_feedback(
        FeedbackSubmission(
            generation_id=record.generation_id,
            verdict="selected" if rationales else "none_fit",
            annotator_id="tester",
            idempotency_key=key or f"judge-{next(_keys)}",
            namespace=NAMESPACE,
            fitting_candidate_ids=tuple(c.candidate_id for c in record.candidates[:fitting])
            if rationales
            else (),
            answer_correct=True,
        )
    )
    return record


def _another(items, k: int) -> str:
    """A rationale of another item with another answer (one that does not fit item ``k``)."""
    for other in items[k + 1 :] + items[:k]:
        if other.answer != items[k].answer:
            return other.explanations[0]
    raise AssertionError("every item has the same answer")


def _held_out(item) -> bool:
    return held_out_for(hashlib.sha256(Path(item.image_path).read_bytes()).hexdigest(), FRACTION)


@pytest.fixture(scope="module")
def config(ray_cluster, tmp_path_factory, model_dir, world):
    from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings

    data = tmp_path_factory.mktemp("gate-decides")
    store = StoreSettings(url=f"sqlite:///{data / 'feedback.db'}", held_out_fraction=FRACTION)
    held_out = sum(_held_out(item) for item in world["train"])
    assert MIN_ITEMS <= held_out <= len(world["train"]) - MIN_ITEMS, held_out  # both splits usable
    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=model_dir)),
        feedback_log=FeedbackLogSettings(store=store),
        artifact_uri=str(data / "adapters"),
        shared_filesystem=True,
        tuning=TuningSettings(
            storage_path=str(data / "ray-train"),
            num_workers=1,
            cpus_per_worker=1,
            schedule_timeout_s=120,
            train=TrainConfig(epochs=6, batch_size=4, learning_rate=8e-3, seed=0),
            snapshot=SnapshotConfig(replay_ratio=0),
            # The round under test's gate: evidence required, 2 points of tolerance.
            gate=GateConfig(
                min_items=MIN_ITEMS,
                allow_empty=False,
                default_tolerance=2.0,
                # The served gate's answer and preference checks, scored in the gate's Ray task.
                metrics=(*DEFAULT_METRICS, "answer_accuracy", "preference_accuracy"),
                tokenize=False,
                max_new_tokens=10,
            ),
            gate_max_items=MIN_ITEMS,  # the least evidence the gate accepts: the quickest rounds
        ),
    )


def _run(config, **gate):
    from services.tuner import run_round

    if gate:
        tuning = config.tuning.model_copy(update={"gate": config.tuning.gate.model_copy(update=gate)})
        config = config.model_copy(update={"tuning": tuning})
    registry = AdapterRegistry.open(config.feedback_log.store)
    return run_round(config, NAMESPACE, registry.create_round(NAMESPACE, "pending").round_id)


def test_a_harmful_round_is_rejected_with_a_metric_drop_on_min_items_both_sides(config, world):
    items = list(world["train"])
    training = [item for item in items if not _held_out(item)]
    with FeedbackStore(config.feedback_log.store) as store:
        # Two gold rationales fit; a third, another item's, does not (the preference check's pair).
        generations = {
            id(item): _judge(store, item, [*item.explanations[:2], _another(items, k)], fitting=2)
            for k, item in enumerate(items)
        }

    # The good round: production is the base model (random weights); any tolerance passes here,
    # what matters is a production adapter that writes rationales like the references.
    good = _run(config, default_tolerance=1e6)
    assert good.state == "promoted", good.reason
    assert f"held_out {good.scores['gate']['items']} items" in good.reason
    assert good.scores["gate"]["items"] >= MIN_ITEMS
    # Both sides answered and ranked every held-out item (the client sent its answer, and each
    # item has a rejected candidate) on the same items.
    for side in ("candidate", "production"):
        scored = good.scores["gate"][side]["held_out"]
        assert scored["answer_items"] == scored["preference_items"] == good.scores["gate"]["items"]
        assert scored["items"] == good.scores["gate"]["items"]
        assert 0 <= scored["answer_accuracy"] <= 100 and 0 <= scored["preference_accuracy"] <= 100
    assert "held_out/answer_accuracy " in good.reason and "held_out/preference_accuracy " in good.reason

    # The harm: every training judgement revised to "none fit"; accepted instead, per training
    # item, a nonsense rationale for another item's answer.
    with FeedbackStore(config.feedback_log.store) as store:
        for k, item in enumerate(training):
            _judge(store, item, [], generation=generations[id(item)])
            other = training[(k + 1) % len(training)]
            wrong = " ".join(reversed(other.explanations[0].split()))
            _judge(store, item, [wrong, f"{other.answer} {other.answer} {other.answer}"])
    harmful = _run(config)
    assert harmful.state == "rejected", harmful.reason
    drops = re.findall(
        r"held_out/([\w-]+) ([\d.]+) < production ([\d.]+) - 2 "
        r"\(a drop of ([\d.]+) points on (\d+) / (\d+) items\)",
        harmful.reason,
    )
    assert drops, harmful.reason
    for _metric, candidate, production, drop, n_candidate, n_production in drops:
        assert (
            float(production) - float(candidate) == pytest.approx(float(drop), abs=0.011) and float(drop) > 2
        )
        assert int(n_candidate) >= MIN_ITEMS and int(n_production) >= MIN_ITEMS
    registry = AdapterRegistry.open(config.feedback_log.store)
    assert registry.get(NAMESPACE, "production").version == good.adapter_version
    # Marked rejected with the reason (retention then marks a rejected version deleted at once).
    refused = registry.get(NAMESPACE, harmful.adapter_version)
    assert refused.state in ("rejected", "deleted") and not refused.aliases
    assert refused.reason == harmful.reason
