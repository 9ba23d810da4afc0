"""FeedbackStore: generations, idempotent feedback, revisions, errors, stats (SQLite, no Ray)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from illume.errors import AlreadyExists, InvalidRequest, NotFound
from illume.store import (
    FeedbackStore,
    FeedbackSubmission,
    NewCandidate,
    NewGeneration,
    StoreSettings,
    held_out_for,
)
from illume.store import schema as s

from .conftest import MakeGeneration, image_bytes


def sub(gen, verdict="selected", fitting=(0,), key="k1", annotator="ann-1", **kw) -> FeedbackSubmission:
    """A submission naming candidates by index."""
    return FeedbackSubmission(
        generation_id=gen.generation_id,
        verdict=verdict,
        annotator_id=annotator,
        idempotency_key=key,
        fitting_candidate_ids=tuple(gen.candidates[i].candidate_id for i in fitting),
        **kw,
    )


def count(store: FeedbackStore, table) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


# --- generations ---------------------------------------------------------------------------------


def test_record_generation_issues_ids_and_round_trips(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    assert len(gen.generation_id) == 32
    assert [c.candidate_id for c in gen.candidates] == [f"{gen.generation_id}-c{i}" for i in range(3)]
    got = store.get_generation(gen.generation_id)
    assert got.candidates == gen.candidates
    assert got.question == gen.question and got.answer == "a dog" and got.seed == 1234
    assert got.sampling == {"n": 3, "temperatures": [0.3, 0.9]}
    assert got.judgements == ()
    assert store.get_image(gen.image_sha256) == store.get_image(got.image_sha256)


def test_image_stored_by_content_hash(store: FeedbackStore, make_generation: MakeGeneration, settings):
    data = b"\x89PNG fake image"
    gen = make_generation(image=data)
    sha = hashlib.sha256(data).hexdigest()
    assert gen.image_sha256 == sha
    assert (settings.image_dir / sha[:2] / sha).read_bytes() == data
    assert store.get_image(sha) == data
    assert not list((settings.image_dir / sha[:2]).glob(".*.tmp"))  # no temp file left behind


def test_images_in_database_when_no_image_dir(tmp_path):
    with FeedbackStore(StoreSettings(url=f"sqlite:///{tmp_path}/f.db")) as st:
        gen = st.record_generation(
            NewGeneration(
                namespace="",
                image=b"abc",
                question="q",
                answer="a",
                answer_generated=True,
                candidates=[NewCandidate("x", 0.3, 1)],
                sampling={},
                seed=0,
                adapter_requested="",
                adapter_version="base",
                model_id="m",
            )
        )
        assert st.get_image(gen.image_sha256) == b"abc"
        assert count(st, s.images) == 1


def test_seed_uint64_round_trips(store: FeedbackStore):
    gen = store.record_generation(
        NewGeneration(
            namespace="",
            image=b"i",
            question="q",
            answer="a",
            answer_generated=False,
            candidates=[],
            sampling={},
            seed=2**64 - 1,
            adapter_requested="",
            adapter_version="base",
            model_id="m",
        )
    )
    assert store.get_generation(gen.generation_id).seed == 2**64 - 1


@pytest.mark.parametrize(
    "change",
    [{"image": b""}, {"seed": -1}, {"seed": 2**64}, {"client_request_id": "x" * 129}],
)
def test_record_generation_rejects_bad_input(store: FeedbackStore, change):
    kwargs = dict(
        namespace="",
        image=b"i",
        question="q",
        answer="a",
        answer_generated=False,
        candidates=[],
        sampling={},
        seed=1,
        adapter_requested="",
        adapter_version="base",
        model_id="m",
    )
    with pytest.raises(InvalidRequest):
        store.record_generation(NewGeneration(**{**kwargs, **change}))


def test_get_generation_unknown_or_other_namespace(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation(namespace="tenant-a")
    with pytest.raises(NotFound):
        store.get_generation("nope", "tenant-a")
    with pytest.raises(NotFound):
        store.get_generation(gen.generation_id)  # "default"
    assert store.get_generation(gen.generation_id, "tenant-a").namespace == "tenant-a"


# --- held-out split ------------------------------------------------------------------------------


def test_held_out_is_deterministic_and_near_fraction():
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    first = [held_out_for(h, 0.1) for h in shas]
    assert first == [held_out_for(h, 0.1) for h in shas]
    assert 0.08 < sum(first) / len(first) < 0.12
    assert not any(held_out_for(h, 0.0) for h in shas)
    assert all(held_out_for(h, 1.0) for h in shas)


def test_held_out_assigned_at_write_from_image(store: FeedbackStore, make_generation: MakeGeneration):
    data = image_bytes(held_out=True)
    a = make_generation(image=data)
    b = make_generation(image=data, question="another question")
    c = make_generation(held_out=False)
    assert a.held_out and b.held_out and not c.held_out
    assert store.get_generation(a.generation_id).held_out


# --- feedback: idempotency, revisions ------------------------------------------------------------


def test_same_key_same_body_is_duplicate(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    first = store.submit_feedback(sub(gen, fitting=(0, 2)))
    # Order of the fitting ids carries no meaning: still the same body.
    again = store.submit_feedback(replace(sub(gen, fitting=(2, 0))))
    assert not first.duplicate and first.revision == 1
    assert again.duplicate and again.feedback_id == first.feedback_id and again.revision == 1
    assert count(store, s.feedback) == 1


def test_same_key_other_body_is_already_exists(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    store.submit_feedback(sub(gen, fitting=(0,)))
    with pytest.raises(AlreadyExists):
        store.submit_feedback(sub(gen, fitting=(1,)))
    with pytest.raises(AlreadyExists):
        store.submit_feedback(sub(gen, fitting=(0,), corrected_rationale="something else"))
    assert count(store, s.feedback) == 1


def test_new_key_same_annotator_is_next_revision(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    r1 = store.submit_feedback(sub(gen, fitting=(0,), key="a"))
    r2 = store.submit_feedback(sub(gen, verdict="none_fit", fitting=(), key="b"))
    r3 = store.submit_feedback(sub(gen, fitting=(1,), key="c"))
    other = store.submit_feedback(sub(gen, fitting=(2,), key="d", annotator="ann-2"))
    assert (r1.revision, r2.revision, r3.revision, other.revision) == (1, 2, 3, 1)
    judgements = {j.annotator_id: j for j in store.get_generation(gen.generation_id).judgements}
    assert judgements["ann-1"].revision == 3 and judgements["ann-1"].feedback_id == r3.feedback_id
    assert judgements["ann-1"].fitting_candidate_ids == (gen.candidates[1].candidate_id,)
    assert judgements["ann-2"].revision == 1
    stats = store.stats()
    assert stats.feedback == 4  # every revision is stored
    assert (stats.selected, stats.none_fit, stats.skipped) == (2, 0, 0)  # only current ones count
    # a retry of an old revision's key is still acknowledged as that revision
    again = store.submit_feedback(sub(gen, fitting=(0,), key="a"))
    assert again.duplicate and again.revision == 1


def test_judgement_fields_round_trip(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    c = [x.candidate_id for x in gen.candidates]
    store.submit_feedback(
        sub(
            gen, fitting=(0,), ratings={c[0]: 4, c[1]: 1}, answer_correct=False, corrected_rationale="it wags"
        )
    )
    (j,) = store.get_generation(gen.generation_id).judgements
    assert j.verdict == "selected" and j.ratings == {c[0]: 4, c[1]: 1}
    assert j.answer_correct is False and j.corrected_rationale == "it wags"
    # the corrected rationale is stored apart from the judgement
    assert count(store, s.corrections) == 1


# --- feedback: errors ----------------------------------------------------------------------------


def test_unknown_generation_is_not_found(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    with pytest.raises(NotFound):
        store.submit_feedback(replace(sub(gen), generation_id="0" * 32))
    with pytest.raises(NotFound):
        store.submit_feedback(replace(sub(gen), namespace="elsewhere"))


@pytest.mark.parametrize(
    "change",
    [
        {"verdict": "selected", "fitting_candidate_ids": ()},  # selected needs an id
        {"verdict": "none_fit"},  # none_fit takes none (sub() has one)
        {"verdict": "skipped"},
        {"verdict": "maybe"},
        {"idempotency_key": ""},
        {"idempotency_key": "k" * 129},
        {"annotator_id": ""},
        {"generation_id": ""},
        {"corrected_rationale": "x" * 4001},
    ],
)
def test_inconsistent_submission_is_invalid(store: FeedbackStore, make_generation: MakeGeneration, change):
    gen = make_generation()
    with pytest.raises(InvalidRequest):
        store.submit_feedback(replace(sub(gen), **change))
    assert count(store, s.feedback) == 0


def test_foreign_candidate_ids_are_invalid(store: FeedbackStore, make_generation: MakeGeneration):
    gen, other = make_generation(), make_generation()
    foreign = other.candidates[0].candidate_id
    with pytest.raises(InvalidRequest):
        store.submit_feedback(replace(sub(gen), fitting_candidate_ids=(foreign,)))
    with pytest.raises(InvalidRequest):
        store.submit_feedback(replace(sub(gen), ratings={foreign: 3}))
    with pytest.raises(InvalidRequest):
        store.submit_feedback(replace(sub(gen), fitting_candidate_ids=(gen.candidates[0].candidate_id,) * 2))
    assert count(store, s.feedback) == 0


@pytest.mark.parametrize("rating", [0, 5, -1, True, 2.5])
def test_rating_out_of_range_is_invalid(store: FeedbackStore, make_generation: MakeGeneration, rating):
    gen = make_generation()
    with pytest.raises(InvalidRequest):
        store.submit_feedback(sub(gen, ratings={gen.candidates[1].candidate_id: rating}))


def test_failed_write_does_not_consume_the_key(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    with pytest.raises(InvalidRequest):
        store.submit_feedback(replace(sub(gen), ratings={"bogus": 2}))
    assert not store.submit_feedback(sub(gen)).duplicate


# --- stats ---------------------------------------------------------------------------------------


def test_stats_per_adapter(store: FeedbackStore, make_generation: MakeGeneration):
    base1 = make_generation(adapter_version="base")
    base2 = make_generation(adapter_version="base")
    v1a = make_generation(adapter_version="rationale-v1")
    v1b = make_generation(adapter_version="rationale-v1", held_out=True)
    make_generation(adapter_version="rationale-v1")  # never judged
    store.submit_feedback(sub(base1, fitting=(0, 1), key="1"))
    store.submit_feedback(sub(base1, fitting=(1,), key="2", annotator="ann-2"))  # overlaps: c1 counted once
    store.submit_feedback(sub(base2, verdict="none_fit", fitting=(), key="3"))
    store.submit_feedback(sub(v1a, verdict="skipped", fitting=(), key="4"))
    store.submit_feedback(sub(v1b, fitting=(2,), key="5"))
    stats = store.stats()
    assert (stats.generations, stats.feedback, stats.held_out_generations) == (5, 5, 1)
    assert (stats.selected, stats.none_fit, stats.skipped) == (3, 1, 1)
    by = {a.adapter_version: a for a in stats.by_adapter}
    assert (by["base"].generations, by["base"].judged_generations, by["base"].accepted_generations) == (
        2,
        2,
        1,
    )
    assert (by["base"].judged_candidates, by["base"].accepted_candidates) == (6, 2)
    v1 = by["rationale-v1"]
    assert (v1.generations, v1.judged_generations, v1.accepted_generations) == (3, 1, 1)
    assert (v1.judged_candidates, v1.accepted_candidates) == (3, 1)
    assert store.stats("empty-namespace").generations == 0


def test_stats_follow_latest_revision(store: FeedbackStore, make_generation: MakeGeneration):
    gen = make_generation()
    store.submit_feedback(sub(gen, fitting=(0,), key="a"))
    store.submit_feedback(sub(gen, verdict="none_fit", fitting=(), key="b"))
    (a,) = store.stats().by_adapter
    assert (a.judged_generations, a.accepted_generations, a.accepted_candidates) == (1, 0, 0)


# --- async callers -------------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False])
def test_async_wrappers(tmp_path, group_commit):
    settings = StoreSettings(
        url=f"sqlite:///{tmp_path}/f.db", image_dir=tmp_path / "img", group_commit=group_commit
    )

    async def main(st: FeedbackStore) -> list:
        gen = await st.arecord_generation(
            NewGeneration(
                namespace="",
                image=b"img",
                question="q",
                answer="a",
                answer_generated=False,
                candidates=[NewCandidate("x", 0.3, 1)],
                sampling={},
                seed=0,
                adapter_requested="",
                adapter_version="base",
                model_id="m",
            )
        )
        subs = [sub(gen, key=f"k{i}", annotator=f"a{i}") for i in range(20)]
        return await asyncio.gather(*(st.asubmit_feedback(x) for x in subs))

    with FeedbackStore(settings) as st:
        receipts = asyncio.run(main(st))
        assert len({r.feedback_id for r in receipts}) == 20
        assert st.stats().feedback == 20
