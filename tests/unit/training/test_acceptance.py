"""What people said becomes rows: the acceptance rule (marks, ratings, corrections), row weights,
the manifest's per-row provenance, the hash over weights and rules, and the loss weight."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import pytest
import torch
from pydantic import ValidationError

from illume.store.types import CandidateRecord, Judgement
from illume.training import JudgedItem, Snapshot, SnapshotConfig, build_snapshot
from illume.training import round as round_module
from illume.training.snapshot import AcceptanceRule

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_fid = itertools.count()


def _candidates(gid: str, texts: list[str]) -> tuple[CandidateRecord, ...]:
    return tuple(
        CandidateRecord(f"{gid}-c{i}", i, t, 0.3, len(t.split()), "eos", 0.0) for i, t in enumerate(texts)
    )


def _judgement(annotator: str, fitting=(), ratings=None, corrected="", verdict=None) -> Judgement:
    n = next(_fid)
    return Judgement(
        feedback_id=f"f{n:04d}",
        annotator_id=annotator,
        verdict=verdict or ("selected" if fitting else "none_fit"),
        fitting_candidate_ids=tuple(fitting),
        ratings=dict(ratings or {}),
        answer_correct=True,
        corrected_rationale=corrected,
        revision=1,
        created_at=_T0 + timedelta(seconds=n),
    )


def _item(qid: str, texts: list[str], judgements, **kw) -> JudgedItem:
    return JudgedItem(
        item_id=qid,
        image=f"/img/{qid}.png",
        question=f"what is {qid}?",
        answer="red",
        answer_correct=True,
        generation_id=f"g-{qid}",
        candidates=_candidates(f"g-{qid}", texts),
        judgements=tuple(judgements),
        **kw,
    )


TEXTS = ["marked unrated", "marked rated two", "rated four", "rated three", "rated two", "rated one"]


def _rated_item(corrected: str = "my own words") -> JudgedItem:
    c = [f"g-q-c{i}" for i in range(len(TEXTS))]
    ratings = {c[1]: 2, c[2]: 4, c[3]: 3, c[4]: 2, c[5]: 1}
    return _item("q", TEXTS, [_judgement("ann", fitting=(c[0], c[1]), ratings=ratings, corrected=corrected)])


def _rationales(snapshot: Snapshot) -> dict[str, tuple[str, float]]:
    return {r.target.strip(): (r.rule, r.weight) for r in snapshot.rows if r.kind == "rationale"}


def test_marked_or_rated_three_fits_and_the_rating_gives_the_weight():
    snap = build_snapshot([_rated_item()], SnapshotConfig(replay_ratio=0))
    assert _rationales(snap) == {
        "marked unrated": ("selected", 1.0),
        "marked rated two": ("selected", 0.5),  # marked: fits; its rating still sets the weight
        "rated four": ("rating>=3", 1.0),
        "rated three": ("rating>=3", 0.75),
    }  # rated 1-2 and not marked: does not fit; the corrected text: off by default
    # The manifest records, per rationale row in row order, the rule, the weight and who said so.
    rows = [r for r in snap.rows if r.kind == "rationale"]
    provenance = snap.manifest.rationale_provenance
    assert [(p["rule"], p["weight"]) for p in provenance] == [(r.rule, r.weight) for r in rows]
    assert all(p["annotators"] == ["ann"] and p["source_id"] == "q" for p in provenance)


def test_corrected_rationales_train_only_when_the_operator_enables_them():
    default = build_snapshot([_rated_item()], SnapshotConfig(replay_ratio=0))
    assert "my own words" not in _rationales(default)
    enabled = SnapshotConfig(
        replay_ratio=0, acceptance=AcceptanceRule(train_corrected=True, corrected_weight=0.5)
    )
    assert _rationales(build_snapshot([_rated_item()], enabled))["my own words"] == ("corrected", 0.5)


def test_the_rating_threshold_and_weights_are_configurable():
    only_marked = SnapshotConfig(replay_ratio=0, acceptance=AcceptanceRule(min_fitting_rating=None))
    assert set(_rationales(build_snapshot([_rated_item()], only_marked))) == {
        "marked unrated",
        "marked rated two",
    }
    strict = AcceptanceRule(min_fitting_rating=4, rating_weights=(0.1, 0.2, 0.3, 2.0), unrated_weight=0.9)
    found = _rationales(build_snapshot([_rated_item()], SnapshotConfig(replay_ratio=0, acceptance=strict)))
    assert found == {
        "marked unrated": ("selected", 0.9),
        "marked rated two": ("selected", 0.2),
        "rated four": ("rating>=4", 2.0),
    }
    with pytest.raises(ValidationError):
        AcceptanceRule(rating_weights=(0.0, 0.5, 0.75, 1.0))


def test_several_endorsements_of_one_text_give_one_row_with_the_strongest_weight():
    c0 = "g-q-c0"
    item = _item(
        "q",
        ["the square is red", "The square is red "],
        [_judgement("ann-1", ratings={c0: 3}), _judgement("ann-2", fitting=("g-q-c1",))],
    )
    snap = build_snapshot([item], SnapshotConfig(replay_ratio=0))
    assert _rationales(snap) == {"the square is red": ("selected", 1.0)}
    (provenance,) = snap.manifest.rationale_provenance
    assert provenance["annotators"] == ["ann-1", "ann-2"] and len(provenance["feedback_ids"]) == 2


def test_unrated_marks_hash_like_the_snapshots_before_ratings_existed(tmp_path):
    """Stored judgements without ratings give the same rows and sha256 as hand-built accepted texts."""
    texts = ["it is red", "the paint is red", "no"]
    judged = [
        _item(q, texts, [_judgement("ann", fitting=(f"g-{q}-c0", f"g-{q}-c1"))], feedback_ids=("x",))
        for q in ("a", "b")
    ] + [_item(f"p{k}", texts, [_judgement("ann")]) for k in range(6)]
    legacy = [
        dataclasses.replace(
            i, candidates=(), judgements=(), accepted=tuple(texts[:2]) if i.item_id in "ab" else ()
        )
        for i in judged
    ]
    config = SnapshotConfig(replay_ratio=2)
    new, old = build_snapshot(judged, config), build_snapshot(legacy, config)
    assert new.rows == old.rows and new.sha256 == old.sha256
    assert {r.rule for r in new.rows if r.kind == "rationale"} == {"selected"}
    assert Snapshot.load(new.save(tmp_path / "s.json")) == new


def test_the_hash_covers_weights_and_rules(tmp_path):
    base = build_snapshot([_rated_item()], SnapshotConfig(replay_ratio=0))
    reweighted = build_snapshot(
        [_rated_item()],
        SnapshotConfig(replay_ratio=0, acceptance=AcceptanceRule(rating_weights=(0.25, 0.5, 0.8, 1.0))),
    )
    assert [r.target for r in reweighted.rows] == [r.target for r in base.rows]
    assert reweighted.sha256 != base.sha256
    # Any row's weight or rule enters the hash: a tampered file no longer loads.
    data = base.to_dict()
    assert Snapshot.from_dict(data) == base
    for key, value in (("weight", 0.7), ("rule", "corrected")):
        tampered = base.to_dict()
        tampered["rows"][0][key] = value
        with pytest.raises(ValueError, match="hash mismatch"):
            Snapshot.from_dict(tampered)


def test_the_rationale_loss_weight_and_the_training_row_weights_follow_the_row_weights(monkeypatch):
    items = [_rated_item()] + [_item(f"p{k}", ["x"], [_judgement("ann")]) for k in range(40)]
    snap = build_snapshot(items, SnapshotConfig(replay_ratio=2))
    weights = [r.weight for r in snap.rows if r.kind == "rationale"]
    assert weights == [1.0, 0.5, 1.0, 0.75] and snap.answer_rows == 8
    assert snap.rationale_loss_weight == pytest.approx(
        8 / sum(weights)
    )  # rationale rows weigh as much as answers
    assert round_module.mean_row_weight(snap) == pytest.approx((2 * 8) / (4 + 8))

    monkeypatch.setattr(round_module, "encode_row", lambda loaded, row, image: {})
    dataset = round_module.SnapshotDataset(object(), snap.rows, lambda ref: None, snap.rationale_loss_weight)
    row_weights = [float(dataset[k]["row_weight"]) for k in range(len(snap.rows))]
    expected = [snap.rationale_loss_weight * w for w in weights] + [1.0] * 8
    assert row_weights == pytest.approx(expected)
    assert isinstance(dataset[0]["row_weight"], torch.Tensor)
