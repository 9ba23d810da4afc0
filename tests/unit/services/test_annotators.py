"""Annotator reliability on the services side, without Ray: the protobuf conversion of agreement
rows and flags, the Admin servicer's ListAnnotators and ClearAnnotatorFlag over a real SQLite store
and registry (guard, audit, errors), and the tuning job storing the flags its snapshot raised. The
real gRPC server's version is tests/integration/services/test_annotators.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from illume.evaluation.gate import GateConfig
from illume.store import AdapterRegistry, FeedbackStore
from illume.store.settings import StoreSettings
from illume.store.types import AnnotatorFlag
from illume.training.reliability import AnnotatorAgreement, ReliabilityConfig
from illume.training.snapshot import SnapshotConfig
from illume.v1 import illume_pb2 as pb
from services import metrics
from services.convert import annotator_to_pb, annotators_to_pb, cleared_flag_to_pb
from tests.unit.crowd import fill_judged_store
from tests.unit.services.test_tenancy import Backend, call, entry, tenant_servicer

HONEST = ("honest-0", "honest-1", "honest-2")
KEYS = {
    "client-a": entry("client-a", "client", "app-a", namespaces=["tenant-a"]),
    "annotator-a": entry("annotator-a", "annotator", "ann-a", namespaces=["tenant-a"]),
    "admin-a": entry("admin-a", "admin", "ops-a", namespaces=["tenant-a"]),
    "admin-b": entry("admin-b", "admin", "ops-b", namespaces=["tenant-b"]),
}
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- conversion ---------------------------------------------------------------------------------


def _agreement(annotator: str, kappa: float | None, flagged: bool = False) -> AnnotatorAgreement:
    return AnnotatorAgreement(
        annotator=annotator,
        overlap_items=12,
        decisions=60 if kappa is not None else 0,
        agreement=0.9 if kappa is not None else None,
        kappa=kappa,
        flagged=flagged,
        reason=f"reason of {annotator}",
    )


def _flag(annotator: str, cleared: bool = False) -> AnnotatorFlag:
    return AnnotatorFlag(
        namespace="tenant-a",
        annotator_id=annotator,
        kappa=0.05,
        overlap_items=30,
        reason="kappa 0.050 < 0.2 on 30 overlap items",
        flagged_at=T0,
        flagged_by="round:r1",
        cleared_at=T0.replace(hour=9) if cleared else None,
        cleared_by="ops" if cleared else "",
    )


def test_annotators_become_one_row_each_with_their_flag_and_the_thresholds():
    reply = annotators_to_pb(
        [_agreement("a", 0.6), _agreement("b", -0.1, flagged=True), _agreement("c", None)],
        {"a": 7, "b": 9, "c": 1},
        [_flag("b"), _flag("c", cleared=True), _flag("gone")],
        ReliabilityConfig(flag_below_kappa=0.25, min_overlap_items=8, min_annotators=4),
    )
    assert [a.annotator_id for a in reply.annotators] == ["a", "b", "c", "gone"]
    assert (reply.flag_below_kappa, reply.min_overlap_items, reply.min_annotators) == (0.25, 8, 4)
    a, b, c, gone = reply.annotators
    assert (a.judgements, a.overlap_items, a.decisions, a.kappa, a.agreement) == (7, 12, 60, 0.6, 0.9)
    assert a.assessment == "reason of a" and not a.below_threshold and not a.flagged and not a.cleared
    assert a.flagged_at == "" and a.flag_reason == ""
    assert b.below_threshold and b.flagged and not b.cleared and b.kappa == pytest.approx(-0.1)
    assert b.flag_reason.startswith("kappa 0.050") and b.flagged_at == "2026-01-02T03:04:05.000000Z"
    assert not c.HasField("kappa") and not c.HasField("agreement")  # undefined, not 0
    assert c.cleared and not c.flagged and c.cleared_by == "ops" and c.cleared_at.startswith("2026-01-02T09")
    # A flag whose annotator has no judgement left still shows, with no numbers.
    assert gone.flagged and gone.judgements == 0 and not gone.HasField("kappa") and gone.assessment == ""


def test_a_kappa_of_zero_is_present_not_absent():
    message = annotator_to_pb("z", _agreement("z", 0.0), 3, None)
    assert message.HasField("kappa") and message.kappa == 0.0


def test_a_cleared_flag_reply():
    reply = cleared_flag_to_pb(_flag("b", cleared=True))
    assert reply.cleared and reply.annotator_id == "b"
    assert (reply.flagged_at, reply.cleared_at[:13]) == ("2026-01-02T03:04:05.000000Z", "2026-01-02T09")


# -- the servicer -------------------------------------------------------------------------------


def _fill(store: FeedbackStore, namespace: str, items: int, seed: int = 3) -> None:
    """``items`` generations of 6 candidates judged by three honest annotators (5 % slips), one
    who marks at random, and a skip."""
    fill_judged_store(store, namespace, items, (*HONEST, "random"), random.Random(seed), skipper=True)


@pytest.fixture
def servicer(tmp_path: Path, monkeypatch) -> Any:
    monkeypatch.setattr(metrics, "record_request", lambda *a: None)
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/f.db", held_out_fraction=0.1)
    with FeedbackStore(settings) as store:
        _fill(store, "tenant-a", 24)
    svc = tenant_servicer(settings, KEYS, Backend())
    reliability = ReliabilityConfig(min_overlap_items=10)
    svc.config = SimpleNamespace(
        feedback_log=SimpleNamespace(store=settings),
        tuning=SimpleNamespace(snapshot=SnapshotConfig(reliability=reliability)),
    )
    yield svc
    if svc.feedback_store is not None:
        svc.feedback_store.close()
    svc.registry.close()


def _audit(svc: Any) -> list:
    return [e for e in svc.registry.list_audit(None, True, 100, "")[0] if e.principal != "test"]


def test_list_annotators_counts_judgements_and_reports_agreement_and_flags(servicer):
    code, reply = call(servicer, "ListAnnotators", pb.ListAnnotatorsRequest(namespace="tenant-a"), "admin-a")
    assert code == grpc.StatusCode.OK
    rows = {a.annotator_id: a for a in reply.annotators}
    assert sorted(rows) == [*HONEST, "random"]  # the skipper decided nothing
    # Judgements count held-out generations too; the agreement reads what a round trains from.
    trained_on = sum(
        not r.held_out for r in servicer._annotator_store().iter_judged("tenant-a", include_held_out=True)
    )
    assert 0 < trained_on < 24
    assert {a.judgements for a in rows.values()} == {24}
    assert {a.overlap_items for a in rows.values()} == {trained_on}
    assert [i for i, a in rows.items() if a.below_threshold] == ["random"]
    assert all(rows[i].kappa > 0.5 for i in HONEST) and rows["random"].kappa < 0.2
    assert not any(a.flagged for a in rows.values())  # the check flags; only a round stores it
    assert (reply.flag_below_kappa, reply.min_overlap_items, reply.min_annotators) == (0.2, 10, 3)

    servicer.feedback_store.flag_annotator("tenant-a", "honest-1", reason="manual", flagged_by="test")
    rows = {
        a.annotator_id: a
        for a in call(servicer, "ListAnnotators", pb.ListAnnotatorsRequest(namespace="tenant-a"), "admin-a")[
            1
        ].annotators
    }
    assert rows["honest-1"].flagged and rows["honest-1"].flag_reason == "manual"
    assert rows["honest-1"].flagged_at and not rows["honest-1"].below_threshold
    # Another namespace's annotators are its own.
    assert call(servicer, "ListAnnotators", pb.ListAnnotatorsRequest(namespace="tenant-b"), "admin-b")[1] == (
        pb.ListAnnotatorsResponse(flag_below_kappa=0.2, min_overlap_items=10, min_annotators=3)
    )


def test_clear_annotator_flag_clears_audits_and_then_finds_nothing(servicer):
    store = servicer._annotator_store()
    store.flag_annotator("tenant-a", "random", reason="kappa 0.01 < 0.2", kappa=0.01, flagged_by="round:r1")
    request = pb.ClearAnnotatorFlagRequest(namespace="tenant-a", annotator_id=" random ")
    code, reply = call(servicer, "ClearAnnotatorFlag", request, "admin-a")
    assert code == grpc.StatusCode.OK
    assert reply.cleared and reply.annotator_id == "random" and reply.flagged_at and reply.cleared_at
    assert store.annotator_flags("tenant-a") == []
    (flag,) = store.annotator_flags("tenant-a", include_cleared=True)
    assert flag.cleared_by == "ops-a"
    (event,) = _audit(servicer)
    assert (event.action, event.principal, event.namespace) == ("annotator.clear_flag", "ops-a", "tenant-a")
    assert dict(event.arguments) == {"annotator_id": "random", "kappa": 0.01, "reason": "kappa 0.01 < 0.2"}
    listed = call(servicer, "ListAnnotators", pb.ListAnnotatorsRequest(namespace="tenant-a"), "admin-a")[1]
    random_row = next(a for a in listed.annotators if a.annotator_id == "random")
    assert random_row.cleared and not random_row.flagged and random_row.cleared_by == "ops-a"

    code, _ = call(servicer, "ClearAnnotatorFlag", request, "admin-a")  # nothing set any more
    assert code == grpc.StatusCode.NOT_FOUND
    never = pb.ClearAnnotatorFlagRequest(namespace="tenant-a", annotator_id="honest-0")
    assert call(servicer, "ClearAnnotatorFlag", never, "admin-a")[0] == grpc.StatusCode.NOT_FOUND
    assert len(_audit(servicer)) == 1  # a refused clear leaves no audit row


def test_clear_annotator_flag_needs_an_id_the_admin_role_and_the_namespace(servicer):
    store = servicer._annotator_store()
    store.flag_annotator("tenant-a", "random", reason="low")
    empty = pb.ClearAnnotatorFlagRequest(namespace="tenant-a", annotator_id="  ")
    assert call(servicer, "ClearAnnotatorFlag", empty, "admin-a")[0] == grpc.StatusCode.INVALID_ARGUMENT
    request = pb.ClearAnnotatorFlagRequest(namespace="tenant-a", annotator_id="random")
    for key in ("client-a", "annotator-a", "admin-b"):
        assert call(servicer, "ClearAnnotatorFlag", request, key)[0] == grpc.StatusCode.PERMISSION_DENIED
        listing = pb.ListAnnotatorsRequest(namespace="tenant-a")
        assert call(servicer, "ListAnnotators", listing, key)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert [f.annotator_id for f in store.annotator_flags("tenant-a")] == ["random"]
    assert _audit(servicer) == []


# -- the tuning job -----------------------------------------------------------------------------


def test_a_round_stores_the_flags_its_snapshot_raised_and_passes_the_stored_ones(tmp_path, monkeypatch):
    import services.tuner as tuner
    from illume.models.loading import ModelSettings
    from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings

    settings = StoreSettings(url=f"sqlite:///{tmp_path}/f.db", held_out_fraction=0.0)
    config = AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=tmp_path / "model")),
        feedback_log=FeedbackLogSettings(store=settings),
        artifact_uri=str(tmp_path / "artifacts"),
        tuning=TuningSettings(
            snapshot=SnapshotConfig(replay_ratio=0, reliability=ReliabilityConfig(min_overlap_items=10)),
            # No held-out split here (held_out_fraction 0): this test is about flags, not evidence.
            gate=GateConfig(allow_empty=True),
        ),
    )
    with FeedbackStore(settings) as store:
        _fill(store, "default", 24)
        store.flag_annotator("default", "honest-2", reason="manual", flagged_by="ops")
        round_id = AdapterRegistry(store).create_round("default").round_id
    built: dict[str, Any] = {}
    real_build = tuner.build_snapshot

    def build(*args: Any, **kwargs: Any) -> Any:
        built["flagged"] = kwargs.get("flagged_annotators")
        built["snapshot"] = real_build(*args, **kwargs)
        return built["snapshot"]

    def no_training(*_: Any) -> Any:
        raise RuntimeError("no training in this test")

    monkeypatch.setattr(tuner, "build_snapshot", build)
    monkeypatch.setattr(tuner, "_connect_ray", lambda: 1)
    monkeypatch.setattr(tuner, "train_with_ray", no_training)
    final = tuner.run_round(config, "default", round_id)
    assert (final.state, final.reason) == ("failed", "RuntimeError: no training in this test")
    assert built["flagged"] == frozenset({"honest-2"})
    assert set(built["snapshot"].manifest.excluded_annotators) == {"honest-2", "random"}
    with FeedbackStore(settings) as store:
        flags = {f.annotator_id: f for f in store.annotator_flags("default")}
    assert sorted(flags) == ["honest-2", "random"]
    assert flags["honest-2"].reason == "manual" and flags["honest-2"].flagged_by == "ops"  # untouched
    assert flags["random"].flagged_by == f"round:{round_id}" and flags["random"].kappa < 0.2
    assert flags["random"].reason.startswith("kappa ") and flags["random"].overlap_items == 24


def test_record_new_flags_skips_the_ones_already_flagged(tmp_path):
    from services.tuner import record_new_flags

    rows = [
        {"annotator": "a", "flagged": True, "reason": "low a", "kappa": 0.1, "overlap_items": 20},
        {"annotator": "b", "flagged": True, "reason": "low b", "kappa": None, "overlap_items": 21},
        {"annotator": "c", "flagged": False, "reason": "fine", "kappa": 0.7, "overlap_items": 22},
    ]
    snapshot = SimpleNamespace(manifest=SimpleNamespace(annotator_agreement=tuple(rows)))
    with FeedbackStore(StoreSettings(url=f"sqlite:///{tmp_path}/f.db")) as store:
        store.flag_annotator("ns", "a", reason="earlier", kappa=0.0)
        assert record_new_flags(store, "ns", snapshot, frozenset({"a"}), "round:r9") == ["b"]
        flags = {f.annotator_id: f for f in store.annotator_flags("ns")}
    assert sorted(flags) == ["a", "b"] and flags["a"].reason == "earlier"
    assert (flags["b"].reason, flags["b"].kappa, flags["b"].overlap_items) == ("low b", None, 21)
