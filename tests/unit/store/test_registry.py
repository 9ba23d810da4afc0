"""AdapterRegistry on SQLite: versions, aliases, rollback, retention, epoch, rounds, leases."""

from __future__ import annotations

import threading
import time

import pytest

from illume.errors import FailedPrecondition, InvalidRequest, NotFound
from illume.store import AdapterRegistry, FeedbackStore, StoreSettings


@pytest.fixture
def registry(store: FeedbackStore) -> AdapterRegistry:
    return AdapterRegistry(store)


def reg(registry: AdapterRegistry, n: int, namespace: str = "default") -> list[int]:
    return [registry.register(namespace, f"file:///a/{i}", {"i": i}).version for i in range(n)]


def test_versions_start_at_one_per_namespace(registry: AdapterRegistry):
    assert reg(registry, 3) == [1, 2, 3]
    assert reg(registry, 2, "other") == [1, 2]
    rec = registry.get("default", 2)
    assert rec.name == "rationale-v2" and rec.manifest == {"i": 1} and rec.state == "registered"


def test_versions_unique_under_two_threads(tmp_path):
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/r.db")
    registries = [AdapterRegistry.open(settings) for _ in range(2)]  # two engines, like two processes
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        for _ in range(25):
            got[i].append(registries[i].register("ns", "file:///x", {}).version)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for part in got:
        assert part == sorted(part)  # monotonic for each writer
    assert sorted(got[0] + got[1]) == list(range(1, 51))  # no gaps, no reuse
    for r in registries:
        r.close()


def test_get_by_version_name_and_alias(registry: AdapterRegistry):
    reg(registry, 3)
    registry.set_alias("default", "production", 2)
    assert registry.get("default", "2").version == 2
    assert registry.get("default", "rationale-v3").version == 3
    prod = registry.get("default", "production")
    assert prod.version == 2 and prod.aliases == ("production",)
    with pytest.raises(NotFound):
        registry.get("default", "canary")
    with pytest.raises(NotFound):
        registry.get("default", "9")
    with pytest.raises(InvalidRequest):
        registry.get("default", "base")


def test_list_paginates_newest_first(registry: AdapterRegistry):
    reg(registry, 5)
    page, token = registry.list("default", page_size=2)
    versions = [a.version for a in page]
    while token:
        page, token = registry.list("default", page_size=2, page_token=token)
        versions += [a.version for a in page]
    assert versions == [5, 4, 3, 2, 1]
    with pytest.raises(InvalidRequest):
        registry.list("default", page_token="nonsense")


def test_alias_validation(registry: AdapterRegistry):
    reg(registry, 1)
    for bad in ("base", "7", "rationale-v2", "Prod", ""):
        if bad == "":
            continue  # empty means production
        with pytest.raises(InvalidRequest):
            registry.set_alias("default", bad, 1)
    with pytest.raises(InvalidRequest):
        registry.set_alias("default", "canary", 1, share=1.5)
    with pytest.raises(NotFound):
        registry.set_alias("default", "production", 5)
    assert registry.set_alias("default", "", 1).aliases == ("production",)


def test_canary_share_and_aliases(registry: AdapterRegistry):
    reg(registry, 2)
    registry.set_alias("default", "production", 1)
    registry.set_alias("default", "canary", 2, share=0.1)
    al = registry.aliases("default")
    assert al["production"].version == 1 and al["production"].share is None
    assert al["canary"].version == 2 and al["canary"].share == pytest.approx(0.1)


def test_rollback_walks_back_like_a_stack(registry: AdapterRegistry):
    reg(registry, 3)
    with pytest.raises(FailedPrecondition):
        registry.rollback("default")  # no production yet
    registry.set_alias("default", "production", 1)
    with pytest.raises(FailedPrecondition):
        registry.rollback("default")  # nothing earlier
    registry.set_alias("default", "production", 2)
    registry.set_alias("default", "production", 2)  # re-promoting the same version adds no history
    registry.set_alias("default", "production", 3)
    assert registry.rollback("default").version == 2
    assert registry.rollback("default").version == 1
    with pytest.raises(FailedPrecondition):
        registry.rollback("default")
    assert registry.get("default", "production").version == 1


def test_mark_rejected(registry: AdapterRegistry):
    reg(registry, 2)
    registry.set_alias("default", "production", 1)
    with pytest.raises(FailedPrecondition):
        registry.mark_rejected("default", 1, "aliased")
    rec = registry.mark_rejected("default", 2, "gate: ROUGE-L fell 3 points\nmore detail")
    assert rec.state == "rejected" and rec.reason == "gate: ROUGE-L fell 3 points"
    with pytest.raises(FailedPrecondition):
        registry.set_alias("default", "canary", 2)


def test_retention_keeps_newest_aliased_and_rollback_target(registry: AdapterRegistry):
    reg(registry, 8)
    registry.set_alias("default", "production", 1)
    registry.set_alias("default", "production", 2)  # rollback target: 1
    registry.set_alias("default", "canary", 4)
    registry.mark_rejected("default", 8, "gate")
    doomed = registry.apply_retention("default", keep_last=2)
    assert sorted(a.version for a in doomed) == [3, 5, 8]
    assert all(a.artifact_uri.startswith("file:///a/") for a in doomed)
    states = {a.version: a.state for a in registry.list("default", page_size=100)[0]}
    assert states == {
        1: "registered",
        2: "registered",
        3: "deleted",
        4: "registered",
        5: "deleted",
        6: "registered",
        7: "registered",
        8: "deleted",
    }
    assert registry.apply_retention("default", keep_last=2) == []  # idempotent
    assert reg(registry, 1) == [9]  # numbers are never reused


def test_epoch_bumps_on_every_change(registry: AdapterRegistry):
    assert registry.registry_epoch("default") == 0
    seen = [registry.registry_epoch("default")]
    reg(registry, 2)
    seen.append(registry.registry_epoch("default"))
    registry.set_alias("default", "production", 1)
    seen.append(registry.registry_epoch("default"))
    registry.set_alias("default", "production", 2)
    seen.append(registry.registry_epoch("default"))
    registry.rollback("default")
    seen.append(registry.registry_epoch("default"))
    assert seen == sorted(set(seen))  # strictly increasing
    reg(registry, 1, "other")
    assert registry.registry_epoch() == registry.registry_epoch("default") + registry.registry_epoch("other")
    with pytest.raises(FailedPrecondition):
        registry.listen(lambda ns: None)  # SQLite: poll the epoch instead


# --- rounds --------------------------------------------------------------------------------------


def test_round_lifecycle(registry: AdapterRegistry):
    r = registry.create_round("default")
    assert r.state == "pending" and r.finished_at is None
    r = registry.update_round(
        r.round_id,
        "training",
        job_id="raysubmit_1",
        snapshot_sha256="ab" * 32,
        rationale_rows=10,
        answer_rows=100,
    )
    assert (r.state, r.job_id, r.rationale_rows, r.answer_rows) == ("training", "raysubmit_1", 10, 100)
    r = registry.update_round(r.round_id, "rejected", reason="worse than production", scores={"rouge_l": 0.4})
    assert r.finished_at is not None and r.scores == {"rouge_l": 0.4}
    with pytest.raises(FailedPrecondition):
        registry.update_round(r.round_id, "training")
    with pytest.raises(NotFound):
        registry.get_round("nope")
    with pytest.raises(InvalidRequest):
        registry.update_round(registry.create_round("default").round_id, "dancing")
    with pytest.raises(InvalidRequest):
        registry.update_round(r.round_id, colour="blue")
    assert registry.get_round(r.round_id).reason == "worse than production"


def test_list_rounds(registry: AdapterRegistry):
    ids = [registry.create_round("default").round_id for _ in range(5)]
    registry.update_round(ids[1], "failed", reason="lost")
    got, token = registry.list_rounds("default", page_size=3)
    assert [r.round_id for r in got] == ids[::-1][:3]
    more, token2 = registry.list_rounds("default", page_size=3, page_token=token)
    assert [r.round_id for r in more] == ids[::-1][3:] and token2 == ""
    running, _ = registry.list_rounds("default", states=["pending"])
    assert ids[1] not in {r.round_id for r in running} and len(running) == 4


# --- leases --------------------------------------------------------------------------------------


def test_lease_exclusive_renew_release(registry: AdapterRegistry):
    assert registry.acquire_lease("loop", "a", ttl_s=30)
    assert registry.acquire_lease("loop", "a", ttl_s=30)  # re-entrant for the holder
    assert not registry.acquire_lease("loop", "b", ttl_s=30)
    assert registry.renew_lease("loop", "a", ttl_s=30)
    assert not registry.renew_lease("loop", "b", ttl_s=30)
    assert not registry.release_lease("loop", "b")
    assert registry.release_lease("loop", "a")
    assert registry.acquire_lease("loop", "b", ttl_s=30)
    assert registry.get_lease("loop").holder == "b"


def test_expired_lease_can_be_taken_over(registry: AdapterRegistry):
    assert registry.acquire_lease("loop", "a", ttl_s=0.05)
    token = registry.get_lease("loop").token
    time.sleep(0.1)
    assert registry.acquire_lease("loop", "b", ttl_s=30)
    lease = registry.get_lease("loop")
    assert lease.holder == "b" and lease.token == token + 1  # fencing token moved on
    assert not registry.renew_lease("loop", "a", ttl_s=30)  # the old holder learns it lost the lease
