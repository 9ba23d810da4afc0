"""Training items and gate items read from a real (SQLite) feedback store."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from PIL import Image

from illume.evaluation.gate import GateItem
from illume.store import (
    FeedbackStore,
    FeedbackSubmission,
    NewCandidate,
    NewGeneration,
    StoreSettings,
    held_out_for,
)
from illume.training import build_snapshot
from illume.training.from_store import gate_items, judged_items, question_key, store_image_loader

FRACTION = 0.5
_shade = itertools.count(1)


def _png(held_out: bool) -> bytes:
    """A fresh small PNG that falls on the asked side of the held-out split."""
    import hashlib

    while True:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (next(_shade) % 256, 10, 20)).save(buffer, format="PNG")
        data = buffer.getvalue()
        if held_out_for(hashlib.sha256(data).hexdigest(), FRACTION) == held_out:
            return data


@pytest.fixture
def store(tmp_path: Path):
    settings = StoreSettings(
        url=f"sqlite:///{tmp_path}/f.db", image_dir=tmp_path / "img", held_out_fraction=FRACTION
    )
    with FeedbackStore(settings) as st:
        yield st


def _generation(
    store,
    texts,
    *,
    held_out=False,
    image=None,
    question="what colour is the square?",
    answer="red",
    version="base",
    answer_generated=False,
):
    return store.record_generation(
        NewGeneration(
            namespace="default",
            image=image if image is not None else _png(held_out),
            question=question,
            answer=answer,
            answer_generated=answer_generated,
            candidates=[NewCandidate(t, 0.3, len(t.split())) for t in texts],
            sampling={"n": len(texts)},
            seed=1,
            adapter_requested="",
            adapter_version=version,
            model_id="tiny",
        )
    )


_keys = itertools.count()


def _judge(store, gen, verdict, fitting=(), annotator="ann-1", answer_correct=None, corrected=""):
    return store.submit_feedback(
        FeedbackSubmission(
            generation_id=gen.generation_id,
            verdict=verdict,
            annotator_id=annotator,
            idempotency_key=f"key-{next(_keys)}",
            fitting_candidate_ids=tuple(gen.candidates[i].candidate_id for i in fitting),
            answer_correct=answer_correct,
            corrected_rationale=corrected,
        )
    )


def test_judged_items_merge_annotators_and_skip_held_out(store):
    a = _generation(store, ["the square is red", "it is red", "The square is red "], version="rationale-v3")
    first = _judge(store, a, "selected", fitting=(1, 2), annotator="ann-1", answer_correct=True)
    second = _judge(store, a, "selected", fitting=(0,), annotator="ann-2", corrected="red square seen")
    _judge(store, a, "skipped", annotator="ann-3")
    b = _generation(store, ["no idea"], question="is there a blue circle?", answer="yes")
    _judge(store, b, "none_fit", answer_correct=True)
    _judge(store, b, "none_fit", annotator="ann-2", answer_correct=False)
    c = _generation(store, ["x"])  # never judged
    held = _generation(store, ["the square is red"], held_out=True)
    _judge(store, held, "selected", fitting=(0,))
    assert held.held_out and not a.held_out and c.generation_id

    items = judged_items(store, "default")
    assert [i.generation_id for i in items] == [a.generation_id, b.generation_id]
    item_a, item_b = items
    # Fitting texts of all annotators, in candidate order, stripped and deduplicated.
    assert item_a.accepted == ("the square is red", "it is red")
    assert item_a.answer_correct is True and item_b.answer_correct is False
    assert set(item_a.feedback_ids) == {first.feedback_id, second.feedback_id}
    assert item_a.image == a.image_sha256 and item_a.round == 3 and item_b.round == 0
    assert item_a.item_id == question_key(a.image_sha256, "What colour is  the square? ")
    assert item_a.candidates_judged == 3 and not item_a.held_out
    assert item_b.accepted == ()
    with_corrected = judged_items(store, "default", include_corrected=True)[0]
    assert with_corrected.accepted == ("the square is red", "it is red", "red square seen")

    snapshot = build_snapshot(items)
    assert {r.target.strip() for r in snapshot.rows if r.kind == "rationale"} == set(item_a.accepted)
    image = store_image_loader(store)(item_a.image)
    assert image.size == (8, 8) and image.mode == "RGB"


def test_gate_items_are_held_out_generations_with_accepted_rationales(store):
    train = _generation(store, ["the square is red"])
    _judge(store, train, "selected", fitting=(0,))
    gens = []
    for k in range(4):
        gen = _generation(store, [f"reason {k}", f"other {k}"], held_out=True)
        _judge(store, gen, "selected", fitting=(0, 1) if k % 2 else (0,))
        gens.append(gen)
    none_fit = _generation(store, ["nothing"], held_out=True)
    _judge(store, none_fit, "none_fit")
    wrong = _generation(store, ["because"], held_out=True)
    _judge(store, wrong, "selected", fitting=(0,), answer_correct=False)

    items = gate_items(store, "default", limit=10)
    assert [i.generation_id for i in items] == [g.generation_id for g in gens]
    assert all(isinstance(i, GateItem) for i in items)
    assert items[0].references == ("reason 0",) and items[1].references == ("reason 1", "other 1")
    assert items[0].question == "what colour is the square?" and items[0].answer == "red"
    assert items[0].load_image().size == (8, 8)
    assert [i.generation_id for i in gate_items(store, "default", limit=2)] == [
        g.generation_id for g in gens[-2:]
    ]  # the newest
    assert gate_items(store, "other-namespace", limit=5) == []


def test_a_gate_item_knows_its_answer_when_the_client_sent_it_or_an_annotator_judged_it_right(store):
    sent = _generation(store, ["reason a"], held_out=True)
    _judge(store, sent, "selected", fitting=(0,))
    own = _generation(store, ["reason b"], held_out=True, answer_generated=True)
    _judge(store, own, "selected", fitting=(0,))
    own_judged = _generation(store, ["reason c"], held_out=True, answer_generated=True)
    _judge(store, own_judged, "selected", fitting=(0,), answer_correct=True)
    known = {i.generation_id: i.answer_known for i in gate_items(store, "default", limit=10)}
    assert known == {sent.generation_id: True, own.generation_id: False, own_judged.generation_id: True}


def test_a_gate_item_carries_the_candidates_no_annotator_marked_fitting(store):
    gen = _generation(
        store,
        ["the square is red", "it is blue", "The square is red ", "a circle", "it is blue", "its corners"],
        held_out=True,
    )
    _judge(store, gen, "selected", fitting=(0,), annotator="ann-1")
    _judge(store, gen, "selected", fitting=(5,), annotator="ann-2")
    (item,) = gate_items(store, "default", limit=10)
    assert item.references == ("the square is red", "its corners")
    # Unmarked, in candidate order, deduplicated; a copy of an accepted text is no rejection.
    assert item.rejected == ("it is blue", "a circle")
