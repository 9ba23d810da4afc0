"""Core store and registry behaviours, once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest

from illume.errors import AlreadyExists, FailedPrecondition, InvalidRequest, NotFound
from illume.store import (
    AdapterRegistry,
    FeedbackStore,
    FeedbackSubmission,
    NewCandidate,
    NewGeneration,
    StoreSettings,
)
from illume.store.schema import LATEST_VERSION


def record(store: FeedbackStore, texts=("a b", "c d", "e f"), image: bytes = b"img", namespace: str = ""):
    return store.record_generation(
        NewGeneration(
            namespace=namespace,
            image=image,
            question="Why?",
            answer="yes",
            answer_generated=True,
            candidates=[NewCandidate(t, 0.3, 2) for t in texts],
            sampling={"n": len(texts)},
            seed=2**64 - 1,
            adapter_requested="production",
            adapter_version="rationale-v1",
            model_id="tiny",
        )
    )


def test_feedback_contract(any_settings: StoreSettings):
    with FeedbackStore(any_settings) as st:
        assert st.integrity_check()
        gen = record(st)
        c = [x.candidate_id for x in gen.candidates]
        first = st.submit_feedback(
            FeedbackSubmission(
                gen.generation_id, "selected", "ann", "k1", fitting_candidate_ids=(c[0],), ratings={c[2]: 1}
            )
        )
        dup = st.submit_feedback(
            FeedbackSubmission(
                gen.generation_id, "selected", "ann", "k1", fitting_candidate_ids=(c[0],), ratings={c[2]: 1}
            )
        )
        assert dup.duplicate and dup.feedback_id == first.feedback_id
        with pytest.raises(AlreadyExists):
            st.submit_feedback(FeedbackSubmission(gen.generation_id, "none_fit", "ann", "k1"))
        with pytest.raises(NotFound):
            st.submit_feedback(FeedbackSubmission("f" * 32, "none_fit", "ann", "k2"))
        with pytest.raises(InvalidRequest):
            st.submit_feedback(
                FeedbackSubmission(
                    gen.generation_id, "selected", "ann", "k3", fitting_candidate_ids=("nope",)
                )
            )
        second = st.submit_feedback(
            FeedbackSubmission(
                gen.generation_id,
                "selected",
                "ann",
                "k4",
                fitting_candidate_ids=(c[1], c[2]),
                corrected_rationale="zz",
            )
        )
        assert second.revision == 2
        got = st.get_generation(gen.generation_id)
        assert got.seed == 2**64 - 1 and len(got.judgements) == 1 and got.judgements[0].revision == 2
        assert st.get_image(gen.image_sha256) == b"img"
        rows, _ = st.export("sft", include_held_out=True)
        assert [r["completion"] for r in rows] == [" c d", " e f"]
        rows, _ = st.export("kto", include_held_out=True, include_corrected=True)
        assert [(r["completion"], r["label"]) for r in rows] == [
            (" a b", False),
            (" c d", True),
            (" e f", True),
            (" zz", True),
        ]
        stats = st.stats()
        assert (stats.generations, stats.feedback, stats.selected) == (1, 2, 1)
        (a,) = stats.by_adapter
        assert (a.adapter_version, a.judged_candidates, a.accepted_candidates) == ("rationale-v1", 3, 2)
        assert st.delete_annotator("ann") == 2
        assert st.export("sft", include_held_out=True) == ([], None)
        assert st.delete_generation(gen.generation_id)
        with pytest.raises(NotFound):
            st.get_image(gen.image_sha256)


def test_export_pagination(any_settings: StoreSettings):
    with FeedbackStore(any_settings) as st:
        for i in range(15):
            gen = record(st, texts=tuple(f"g{i} c{j}" for j in range(3)), image=f"img{i}".encode())
            st.submit_feedback(
                FeedbackSubmission(
                    gen.generation_id,
                    "selected",
                    "ann",
                    f"k{i}",
                    fitting_candidate_ids=(gen.candidates[i % 3].candidate_id,),
                )
            )
        everything, _ = st.export("dpo", include_held_out=True, limit=1000)
        assert len(everything) == 30
        paged, cursor = [], None
        while True:
            page, cursor = st.export("dpo", include_held_out=True, limit=4, cursor=cursor)
            paged += page
            if cursor is None:
                break
        assert paged == everything


def test_concurrent_open_migrates_once(any_settings: StoreSettings):
    barrier = threading.Barrier(4)
    stores: list[FeedbackStore] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            stores.append(FeedbackStore(any_settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {st.schema_version for st in stores} == {LATEST_VERSION}
    for st in stores:
        st.close()


def test_registry_two_writers_and_aliases(any_settings: StoreSettings):
    regs = [AdapterRegistry.open(any_settings) for _ in range(2)]  # two engines: two "processes"
    got: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            got[i].append(regs[i].register("ns", "s3://bucket/x", {"w": i}).version)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got[0] + got[1]) == list(range(1, 41))
    assert all(part == sorted(part) for part in got)
    r = regs[0]
    epoch = r.registry_epoch("ns")
    r.set_alias("ns", "production", 3)
    r.set_alias("ns", "production", 7)
    assert r.registry_epoch("ns") == epoch + 2
    assert r.rollback("ns").version == 3
    assert r.get("ns", "production").name == "rationale-v3"
    doomed = {a.version for a in r.apply_retention("ns", keep_last=5)}
    # Kept: the five newest and production (3). 7 was rolled back from, so it may go.
    assert doomed == set(range(1, 36)) - {3}
    for reg in regs:
        reg.close()


def test_lease_takeover(any_settings: StoreSettings):
    reg = AdapterRegistry.open(any_settings)
    assert reg.acquire_lease("loop-controller", "pod-a", ttl_s=0.2)
    assert not reg.acquire_lease("loop-controller", "pod-b", ttl_s=5)
    time.sleep(0.3)
    assert reg.acquire_lease("loop-controller", "pod-b", ttl_s=5)
    assert not reg.renew_lease("loop-controller", "pod-a", ttl_s=5)
    assert reg.get_lease("loop-controller").token == 2
    rnd = reg.create_round("ns")
    rnd = reg.update_round(
        rnd.round_id, "promoted", adapter_version=4, scores={"candidate": {"rouge_l": 0.5}}
    )
    assert reg.get_round(rnd.round_id).scores == {"candidate": {"rouge_l": 0.5}}
    with pytest.raises(FailedPrecondition):
        reg.update_round(rnd.round_id, "failed")
    reg.close()


def test_postgres_durability_settings(pg_settings: StoreSettings):
    with FeedbackStore(pg_settings) as st:
        d = st.durability_settings()
        assert d["backend"] == "postgresql" and d["synchronous_commit"] == "on"


def test_postgres_notify(pg_settings: StoreSettings):
    reg = AdapterRegistry.open(pg_settings)
    seen: list[str] = []
    changed = threading.Event()

    def on_change(namespace: str) -> None:
        seen.append(namespace)
        changed.set()

    listener = reg.listen(on_change, poll_s=0.1)
    try:
        assert listener.ready.wait(10)
        ns = f"notify-{pg_settings.db_schema}"
        reg.register(ns, "file:///x", {})
        assert changed.wait(10)
        assert ns in seen
    finally:
        listener.stop()
        reg.close()
