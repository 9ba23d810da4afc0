"""Exports in the TRL formats, held-out exclusion, cursor pagination, iter_judged, deletion."""

from __future__ import annotations

import pytest

from illume.errors import InvalidRequest
from illume.store import FeedbackStore, FeedbackSubmission

from .conftest import MakeGeneration

PROMPT = "Q: What animal is this? A: a dog, seeing that"


def judge(store, gen, verdict="selected", fitting=(0,), key=None, annotator="ann", corrected=""):
    return store.submit_feedback(
        FeedbackSubmission(
            generation_id=gen.generation_id,
            verdict=verdict,
            annotator_id=annotator,
            idempotency_key=key or f"{gen.generation_id}-{annotator}-{verdict}-{fitting}",
            fitting_candidate_ids=tuple(gen.candidates[i].candidate_id for i in fitting),
            corrected_rationale=corrected,
        )
    )


def all_rows(store: FeedbackStore, fmt: str, limit: int, **kw) -> list[dict]:
    rows, cursor, pages = [], None, 0
    while True:
        page, cursor = store.export(fmt, cursor=cursor, limit=limit, **kw)
        assert len(page) <= limit
        rows += page
        pages += 1
        assert pages < 1000
        if cursor is None:
            return rows


@pytest.fixture
def judged(store: FeedbackStore, make_generation: MakeGeneration):
    """Three judged generations: a selection of two of three, a none-fit with a correction, a skip."""
    g1 = make_generation(("the dog barks", "the dog is furry", "it is a cat"))
    g2 = make_generation(("it meows", "it has wings"), question="Why?", answer="no")
    g3 = make_generation(("x y z",))
    judge(store, g1, fitting=(0, 1), corrected="its tail wags")
    judge(store, g2, verdict="none_fit", fitting=(), corrected="it is a fish")
    judge(store, g3, verdict="skipped", fitting=())
    return g1, g2, g3


def test_sft_rows(store: FeedbackStore, judged):
    g1, g2, _ = judged
    rows, cursor = store.export("sft")
    assert cursor is None
    assert rows == [
        {"prompt": PROMPT, "completion": " the dog barks", "images": [g1.image_sha256]},
        {"prompt": PROMPT, "completion": " the dog is furry", "images": [g1.image_sha256]},
    ]
    rows, _ = store.export("sft", include_corrected=True)
    assert rows == [
        {"prompt": PROMPT, "completion": " the dog barks", "images": [g1.image_sha256]},
        {"prompt": PROMPT, "completion": " the dog is furry", "images": [g1.image_sha256]},
        {"prompt": PROMPT, "completion": " its tail wags", "images": [g1.image_sha256]},
        {"prompt": "Q: Why? A: no, seeing that", "completion": " it is a fish", "images": [g2.image_sha256]},
    ]


def test_dpo_rows(store: FeedbackStore, judged):
    g1, g2, _ = judged
    rows, _ = store.export("dpo")
    img = [g1.image_sha256]
    assert rows == [
        {"prompt": PROMPT, "chosen": " the dog barks", "rejected": " it is a cat", "images": img},
        {"prompt": PROMPT, "chosen": " the dog is furry", "rejected": " it is a cat", "images": img},
    ]
    rows, _ = store.export("dpo", include_corrected=True)
    p2, img2 = "Q: Why? A: no, seeing that", [g2.image_sha256]
    assert rows[2:] == [
        {"prompt": PROMPT, "chosen": " its tail wags", "rejected": " it is a cat", "images": img},
        {"prompt": p2, "chosen": " it is a fish", "rejected": " it meows", "images": img2},
        {"prompt": p2, "chosen": " it is a fish", "rejected": " it has wings", "images": img2},
    ]


def test_kto_rows(store: FeedbackStore, judged):
    g1, g2, _ = judged
    rows, _ = store.export("kto")
    img, img2, p2 = [g1.image_sha256], [g2.image_sha256], "Q: Why? A: no, seeing that"
    assert rows == [
        {"prompt": PROMPT, "completion": " the dog barks", "label": True, "images": img},
        {"prompt": PROMPT, "completion": " the dog is furry", "label": True, "images": img},
        {"prompt": PROMPT, "completion": " it is a cat", "label": False, "images": img},
        {"prompt": p2, "completion": " it meows", "label": False, "images": img2},
        {"prompt": p2, "completion": " it has wings", "label": False, "images": img2},
    ]


def test_held_out_excluded_unless_asked(store: FeedbackStore, make_generation: MakeGeneration):
    train = make_generation(("a", "b"))
    held = make_generation(("c", "d"), held_out=True)
    judge(store, train, fitting=(0,))
    judge(store, held, fitting=(1,))
    assert [r["completion"] for r in store.export("sft")[0]] == [" a"]
    assert [r["completion"] for r in store.export("sft", include_held_out=True)[0]] == [" a", " d"]
    assert [g.generation_id for g in store.iter_judged()] == [train.generation_id]
    assert len(list(store.iter_judged(include_held_out=True))) == 2


def test_only_latest_revision_is_exported(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation(("a", "b"))
    judge(store, gen, fitting=(0,), key="r1")
    judge(store, gen, fitting=(1,), key="r2")
    assert [r["completion"] for r in store.export("sft")[0]] == [" b"]


@pytest.mark.parametrize("fmt", ["sft", "dpo", "kto"])
@pytest.mark.parametrize("limit", [1, 2, 3, 7, 1000])
def test_pagination_is_complete_without_repeats(
    store: FeedbackStore, make_generation: MakeGeneration, fmt, limit
):
    for i in range(12):
        n = i % 4 + 1
        gen = make_generation(tuple(f"g{i} cand {j}" for j in range(n)))
        if i % 4:
            judge(store, gen, fitting=tuple(range(min(n, i % 3 + 1))))
        else:
            judge(store, gen, verdict="none_fit", fitting=())
    everything, cursor = store.export(fmt, limit=1000)
    assert cursor is None and everything
    assert all_rows(store, fmt, limit) == everything


def test_cursor_stable_under_concurrent_inserts(store: FeedbackStore, make_generation: MakeGeneration):
    before = [make_generation((f"old {i}",)) for i in range(5)]
    for g in before:
        judge(store, g)
    page1, cursor = store.export("sft", limit=2)
    # New judgements arrive between pages; one old judgement is revised (drops out, comes back later).
    late = make_generation(("late",))
    judge(store, late)
    judge(store, before[0], fitting=(0,), key="revision-2")
    rest = []
    while cursor is not None:
        page, cursor = store.export("sft", limit=2, cursor=cursor)
        rest += page
    seen = [r["completion"] for r in page1 + rest]
    assert seen == [" old 0", " old 1", " old 2", " old 3", " old 4", " late", " old 0"]


def test_cursor_misuse_is_invalid(store: FeedbackStore, judged):
    _, cursor = store.export("sft", limit=1)
    assert cursor is not None
    with pytest.raises(InvalidRequest):
        store.export("dpo", cursor=cursor, limit=1)  # another export's cursor
    with pytest.raises(InvalidRequest):
        store.export("sft", cursor="garbage!", limit=1)
    with pytest.raises(InvalidRequest):
        store.export("csv")
    with pytest.raises(InvalidRequest):
        store.export("sft", limit=1001)


def test_iter_judged_yields_judged_generations_with_judgements(store: FeedbackStore, judged):
    g1, g2, _ = judged
    got = list(store.iter_judged())
    assert [g.generation_id for g in got] == [g1.generation_id, g2.generation_id]  # skip-only left out
    assert got[0].judgements[0].fitting_candidate_ids == (
        g1.candidates[0].candidate_id,
        g1.candidates[1].candidate_id,
    )
    assert got[1].judgements[0].verdict == "none_fit"
    first_time = got[1].judgements[0].created_at
    assert [g.generation_id for g in store.iter_judged(since=first_time)] == [g2.generation_id]


def test_iter_judged_pages_through_many(store: FeedbackStore, make_generation: MakeGeneration, monkeypatch):
    monkeypatch.setattr("illume.store.feedback._READ_BATCH", 3)
    gens = [make_generation(("a",)) for _ in range(10)]
    for g in gens:
        judge(store, g)
    assert [g.generation_id for g in store.iter_judged()] == [g.generation_id for g in gens]


# --- deletion ------------------------------------------------------------------------------------


def test_delete_generation_removes_everything(
    store: FeedbackStore, make_generation: MakeGeneration, settings
):
    gen = make_generation(("a", "b"), image=b"only-image")
    keep = make_generation(("c",))
    judge(store, gen, corrected="fixed")
    judge(store, keep)
    assert store.delete_generation(gen.generation_id)
    assert not store.delete_generation(gen.generation_id)  # idempotent
    assert [r["completion"] for r in store.export("sft", include_corrected=True)[0]] == [" c"]
    assert [g.generation_id for g in store.iter_judged()] == [keep.generation_id]
    assert store.stats().generations == 1
    assert not (settings.image_dir / gen.image_sha256[:2] / gen.image_sha256).exists()
    with pytest.raises(Exception, match="not found"):
        store.get_generation(gen.generation_id)


def test_delete_generation_keeps_shared_image(store: FeedbackStore, make_generation: MakeGeneration):
    a = make_generation(image=b"shared")
    make_generation(image=b"shared")
    store.delete_generation(a.generation_id)
    assert store.get_image(a.image_sha256) == b"shared"


def test_delete_generation_respects_namespace(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation(namespace="t1")
    assert not store.delete_generation(gen.generation_id, namespace="t2")
    assert store.delete_generation(gen.generation_id, namespace="t1")


def test_delete_annotator(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation(("a", "b"))
    judge(store, gen, fitting=(0,), annotator="alice", key="a1")
    judge(store, gen, fitting=(0, 1), annotator="alice", key="a2")
    judge(store, gen, fitting=(1,), annotator="bob", key="b1")
    assert store.delete_annotator("alice") == 2
    (j,) = store.get_generation(gen.generation_id).judgements
    assert j.annotator_id == "bob"
    assert [r["completion"] for r in store.export("sft")[0]] == [" b"]
    assert store.stats().feedback == 1
    assert store.delete_annotator("alice") == 0
