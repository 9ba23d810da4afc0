"""The judging queue (illume/store/queue.py): leases, never twice, overlap, scoring, pools."""

from __future__ import annotations

import random
import threading

import pytest

from illume.errors import InvalidRequest
from illume.selection import SelectionConfig
from illume.store import FeedbackStore, FeedbackSubmission
from illume.store.queue import HandedItem, JudgingQueue, NewPoolItem, PoolClaim

from .conftest import MakeGeneration, image_bytes

NOW = 1_000_000.0
ONLY_SCORE = SelectionConfig(random_share=0.0, overlap_share=0.0)


def queue(store: FeedbackStore, **config) -> JudgingQueue:
    return JudgingQueue(store, ONLY_SCORE.model_copy(update=config), random.Random(0))


def judge(store: FeedbackStore, item: HandedItem, annotator: str, verdict: str = "none_fit") -> None:
    store.submit_feedback(
        FeedbackSubmission(
            generation_id=item.generation.generation_id,
            verdict=verdict,
            annotator_id=annotator,
            idempotency_key=f"{annotator}-{item.generation.generation_id}",
        )
    )


def test_a_leased_item_goes_to_no_one_else_until_its_lease_ends(store, make_generation: MakeGeneration):
    first, second = make_generation(), make_generation()
    q = queue(store, lease_s=60)
    a = q.next_item("default", "ann-a", now=NOW)
    b = q.next_item("default", "ann-b", now=NOW)
    assert {a.generation.generation_id, b.generation.generation_id} == {
        first.generation_id,
        second.generation_id,
    }
    assert q.next_item("default", "ann-c", now=NOW + 59) is None
    late = q.next_item("default", "ann-c", now=NOW + 61)  # both leases ran out unjudged
    assert late is not None and late.reason == "active"
    assert a.lease_expires_at.timestamp() == pytest.approx(NOW + 60)
    assert a.generation.judgements == ()


def test_an_annotator_is_never_handed_the_same_item_twice(store, make_generation: MakeGeneration):
    for _ in range(3):
        make_generation()
    q = queue(store, lease_s=1)
    seen = []
    for k in range(5):
        item = q.next_item("default", "ann-a", now=NOW + 10 * k)  # leases long expired each time
        if item is None:
            break
        seen.append(item.generation.generation_id)
    assert len(seen) == 3 == len(set(seen))


def test_an_overlap_item_reaches_a_second_annotator_and_no_third(store, make_generation: MakeGeneration):
    make_generation()
    q = queue(store, overlap_share=1.0, max_judgements=2)
    a = q.next_item("default", "ann-a", now=NOW)
    judge(store, a, "ann-a")
    b = q.next_item("default", "ann-b", now=NOW)
    assert b.generation.generation_id == a.generation.generation_id and b.reason == "overlap"
    assert q.next_item("default", "ann-c", now=NOW) is None  # one judged, one holds it: 2 of 2
    judge(store, b, "ann-b")
    assert q.next_item("default", "ann-c", now=NOW + 10_000) is None


def test_a_skip_frees_the_item_for_the_others(store, make_generation: MakeGeneration):
    make_generation()
    q = queue(store, lease_s=600)
    a = q.next_item("default", "ann-a", now=NOW)
    judge(store, a, "ann-a", verdict="skipped")
    b = q.next_item("default", "ann-b", now=NOW + 1)
    assert b.generation.generation_id == a.generation.generation_id and b.reason == "active"


def test_active_picks_the_candidates_that_disagree_and_random_picks_any(
    store, make_generation: MakeGeneration
):
    same = make_generation(("a red ball", "a red ball", "a red ball"))
    differ = make_generation(("a red ball", "two green dogs", "sky over water"))
    assert (
        queue(store).next_item("default", "ann-a", now=NOW).generation.generation_id == differ.generation_id
    )
    picks = set()
    for seed in range(12):  # each pick's lease has run out before the next
        q = JudgingQueue(store, ONLY_SCORE.model_copy(update={"mode": "random"}), random.Random(seed))
        item = q.next_item("default", f"ann-r{seed}", now=NOW + 1000 * (seed + 1))
        assert item.reason == "random" and item.score == 0.0
        picks.add(item.generation.generation_id)
    assert picks == {same.generation_id, differ.generation_id}


def test_newest_adapter_and_unjudged_images_come_first(store, make_generation: MakeGeneration):
    texts = ("a red ball", "a red ball")
    old = make_generation(texts, adapter_version="rationale-v1")
    new = make_generation(texts, adapter_version="rationale-v2")
    q = queue(store)
    assert q.next_item("default", "ann-a", now=NOW).generation.generation_id == new.generation_id
    assert q.next_item("default", "ann-a", now=NOW).generation.generation_id == old.generation_id


def test_concurrent_callers_never_share_a_fresh_item(store, make_generation: MakeGeneration):
    for _ in range(12):
        make_generation()
    q = queue(store, random_share=0.5)
    handed: list[str] = []
    lock = threading.Lock()

    def annotate(name: str) -> None:
        for _ in range(3):
            item = q.next_item("default", name)
            if item is not None:
                with lock:
                    handed.append(item.generation.generation_id)

    threads = [threading.Thread(target=annotate, args=(f"ann-{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handed) == 12 == len(set(handed))


def test_namespaces_are_apart(store, make_generation: MakeGeneration):
    tenant = make_generation(namespace="tenant")
    q = queue(store)
    assert q.next_item("default", "ann-a", now=NOW) is None
    assert q.next_item("tenant", "ann-a", now=NOW).generation.generation_id == tenant.generation_id
    assert q.image_in_namespace("tenant", tenant.image_sha256)
    assert not q.image_in_namespace("default", tenant.image_sha256)


def test_pool_items_are_claimed_once_then_leased_with_their_generation(
    store, make_generation: MakeGeneration
):
    q = queue(store)
    image = image_bytes(False)
    upload = q.add_pool_items(
        "default", [NewPoolItem(image, "what is it?", "a dog"), NewPoolItem(image, "what is it?")], "admin"
    )
    assert (upload.added, upload.already_present, upload.pending) == (1, 1, 1)
    claim = q.next_item("default", "ann-a", now=NOW)
    assert isinstance(claim, PoolClaim) and claim.answer == "a dog"
    assert q.image_in_namespace("default", claim.image_sha256)
    assert q.pool_image(claim.item_id) == image
    assert q.next_item("default", "ann-b", now=NOW + 1) is None  # claimed while it is generated
    q.release_pool_claim(claim.item_id)
    claim = q.next_item("default", "ann-a", now=NOW + 2)
    generation = make_generation(image=image, question=claim.question)
    handed = q.attach_pool_generation(claim, generation.generation_id, "ann-a", now=NOW + 3)
    assert handed.reason == "pool" and handed.generation.generation_id == generation.generation_id
    assert q.pending_pool_items("default") == 0
    assert q.next_item("default", "ann-b", now=NOW + 4) is None  # leased to ann-a
    with pytest.raises(InvalidRequest, match="question is empty"):
        q.add_pool_items("default", [NewPoolItem(image, " ")], "admin")


def test_deleting_a_generation_drops_its_leases_and_pool_item(store, make_generation: MakeGeneration):
    q = queue(store)
    item = make_generation()
    q.next_item("default", "ann-a", now=NOW)
    assert store.delete_generation(item.generation_id)
    assert q.next_item("default", "ann-b", now=NOW) is None


def test_stats_count_answer_judgements(store, make_generation: MakeGeneration):
    for correct in (True, False, True):
        g = make_generation()
        store.submit_feedback(
            FeedbackSubmission(
                generation_id=g.generation_id,
                verdict="none_fit",
                annotator_id="ann",
                idempotency_key=g.generation_id,
                answer_correct=correct,
            )
        )
    (base,) = store.stats().by_adapter
    assert (base.answers_judged, base.answers_correct) == (3, 2)
    assert base.first_generation_at
