"""Annotator reliability: kappa, the simulated honest-and-random crowd, exclusion from snapshots,
the per-annotator share cap, the only annotator, and the check over a real SQLite store."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from illume.store import FeedbackStore, StoreSettings
from illume.store.types import CandidateRecord, Judgement
from illume.training import JudgedItem, SnapshotConfig, build_snapshot
from illume.training.from_store import agreement, cleared_annotators, flagged_annotators, judged_items
from illume.training.reliability import (
    ReliabilityConfig,
    annotator_agreement,
    apply_share_cap,
    cohen_kappa,
    with_admin_clears,
)
from tests.unit.crowd import fill_judged_store

HONEST = tuple(f"honest-{k}" for k in range(5))
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _judgement(n: int, annotator: str, candidates, marks) -> Judgement:
    fitting = tuple(c.candidate_id for c, m in zip(candidates, marks, strict=True) if m)
    return Judgement(
        feedback_id=f"f{n:06d}",
        annotator_id=annotator,
        verdict="selected" if fitting else "none_fit",
        fitting_candidate_ids=fitting,
        ratings={},
        answer_correct=True,
        corrected_rationale="",
        revision=1,
        created_at=_T0 + timedelta(seconds=n),
    )


def crowd(
    seed: int,
    *,
    items: int = 200,
    per_item: int | None = None,
    random_rate: float = 0.5,
    annotators: tuple[str, ...] = (*HONEST, "random"),
) -> list[JudgedItem]:
    """Generations of 10 candidates (10-20 % truly fitting) judged by honest annotators, who flip
    10 % of their decisions, and by "random", who marks each candidate with ``random_rate``."""
    rng = random.Random(seed)
    counter = itertools.count()
    out = []
    for k in range(items):
        gid = f"g{k:04d}"
        candidates = tuple(
            CandidateRecord(f"{gid}-c{i}", i, f"rationale {k} number {i}", 0.3, 4, "eos", 0.0)
            for i in range(10)
        )
        rate = rng.uniform(0.1, 0.2)
        truth = [rng.random() < rate for _ in candidates]
        who = annotators if per_item is None else rng.sample(annotators, per_item)
        judgements = []
        for annotator in who:
            if annotator == "random":
                marks = [rng.random() < random_rate for _ in candidates]
            else:
                marks = [t != (rng.random() < 0.1) for t in truth]
            judgements.append(_judgement(next(counter), annotator, candidates, marks))
        out.append(
            JudgedItem(
                item_id=f"q{k:04d}",
                image=f"/img/{k}.png",
                question=f"what is in picture {k}?",
                answer="a thing",
                answer_correct=True,
                generation_id=gid,
                candidates=candidates,
                judgements=tuple(judgements),
            )
        )
    return out


def test_cohen_kappa_and_its_degenerate_cases():
    assert cohen_kappa([(True, True), (False, False)] * 5) == pytest.approx(1.0)
    assert cohen_kappa([(True, False), (False, True)] * 5) == pytest.approx(-1.0)
    # Raw agreement 0.8, but the "fits" rates alone give 0.8 * 1 by chance: kappa 0.
    assert cohen_kappa([(False, False)] * 8 + [(False, True)] * 2) == pytest.approx(0.0)
    assert cohen_kappa([(False, False)] * 10) is None  # all negative: undefined
    assert cohen_kappa([]) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_item, random_rate", [(None, 0.5), (None, 0.15), (4, 0.5), (3, 0.15)])
def test_the_random_annotator_is_flagged_and_no_honest_one(seed, per_item, random_rate):
    agreements = {
        a.annotator: a
        for a in annotator_agreement(
            crowd(seed, per_item=per_item, random_rate=random_rate), ReliabilityConfig()
        )
    }
    assert set(agreements) == {*HONEST, "random"}
    assert agreements["random"].flagged and abs(agreements["random"].kappa) < 0.15
    for name in HONEST:
        assert not agreements[name].flagged and agreements[name].kappa > 0.4, agreements[name]
        assert agreements[name].overlap_items >= 80
    # Raw agreement is no use here: the random annotator at the base rate still agrees on most decisions.
    if random_rate < 0.2:
        assert agreements["random"].agreement > 0.7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_flagged_annotators_judgements_leave_the_snapshot(seed):
    items = crowd(seed, per_item=4)
    snap = build_snapshot(items, SnapshotConfig(replay_ratio=0))
    assert snap.manifest.excluded_annotators == ("random",)
    assert snap.rationale_rows > 100
    random_ids = {j.feedback_id for i in items for j in i.judgements if j.annotator_id == "random"}
    assert not random_ids & set(snap.manifest.feedback_ids)
    assert all("random" not in p["annotators"] for p in snap.manifest.rationale_provenance)
    # Without the exclusion its marks would have added rows of their own.
    kept = build_snapshot(
        items, SnapshotConfig(replay_ratio=0, reliability=ReliabilityConfig(exclude_flagged=False))
    )
    assert kept.manifest.excluded_annotators == () and kept.rationale_rows > snap.rationale_rows
    assert any("random" in p["annotators"] for p in kept.manifest.rationale_provenance)
    assert kept.sha256 != snap.sha256


def test_too_little_overlap_or_too_few_annotators_raise_no_flag():
    few = annotator_agreement(crowd(0, items=10), ReliabilityConfig(min_overlap_items=20))
    assert not any(a.flagged for a in few) and next(a for a in few if a.annotator == "random").kappa < 0.3
    two = annotator_agreement(crowd(0, annotators=("honest-0", "random")), ReliabilityConfig())
    assert not any(a.flagged for a in two) and all("only 2 annotators" in a.reason for a in two)


def test_an_only_annotator_is_never_flagged_nor_excluded():
    items = crowd(0, annotators=("random",), random_rate=0.3)
    (solo,) = annotator_agreement(items, ReliabilityConfig())
    assert not solo.flagged and solo.kappa is None and solo.overlap_items == 0
    # Even a flag stored for them excludes nothing: the namespace has nobody else.
    snap = build_snapshot(items, SnapshotConfig(replay_ratio=0), flagged_annotators=["random"])
    assert snap.manifest.excluded_annotators == () and snap.manifest.capped_rows == 0
    assert snap.rationale_rows == sum(len(j.fitting_candidate_ids) for i in items for j in i.judgements)


def test_a_stored_flag_excludes_but_never_every_annotator():
    items = crowd(1, annotators=("honest-0", "honest-1"))
    assert build_snapshot(items, flagged_annotators=["honest-1"]).manifest.excluded_annotators == (
        "honest-1",
    )
    both = build_snapshot(items, flagged_annotators=["honest-0", "honest-1"])
    assert both.manifest.excluded_annotators == () and both.rationale_rows > 0


def _heavy_crowd(seed: int) -> list[JudgedItem]:
    """One annotator judges half of all items alone; four others share the other half."""
    rng = random.Random(seed)
    counter = itertools.count()
    others = [f"light-{k}" for k in range(4)]
    out = []
    for k in range(120):
        annotator = "heavy" if k % 2 == 0 else others[(k // 2) % 4]
        gid = f"g{k:04d}"
        candidates = tuple(
            CandidateRecord(f"{gid}-c{i}", i, f"reason {k} {i}", 0.3, 2, "eos", 0.0) for i in range(10)
        )
        marks = [rng.random() < 0.15 for _ in candidates]
        marks[0] = True  # every item contributes at least one row
        judgement = _judgement(next(counter), annotator, candidates, marks)
        out.append(
            JudgedItem(
                item_id=f"q{k:04d}",
                image="i",
                question=f"q {k}?",
                answer="a",
                answer_correct=True,
                generation_id=gid,
                candidates=candidates,
                judgements=(judgement,),
            )
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_share_cap_holds_when_one_annotator_submits_half_of_all_judgements(seed):
    items = _heavy_crowd(seed)
    config = SnapshotConfig(replay_ratio=0, reliability=ReliabilityConfig(max_share_of_rationale_rows=0.3))
    uncapped = build_snapshot(
        items, SnapshotConfig(replay_ratio=0, reliability=ReliabilityConfig(max_share_of_rationale_rows=None))
    )
    snap = build_snapshot(items, config)
    owners = [p["annotators"] for p in snap.manifest.rationale_provenance]
    heavy = sum(o == ["heavy"] for o in owners)
    assert 0 < heavy <= 0.3 * len(owners)
    assert heavy + 1 > 0.3 * len(owners) - 1  # cut to the cap, not far below it
    assert snap.manifest.capped_rows == uncapped.rationale_rows - snap.rationale_rows > 0
    # Only the heavy annotator lost rows, and it kept its oldest judgements.
    before = [p for p in uncapped.manifest.rationale_provenance]
    assert sum(p["annotators"] != ["heavy"] for p in before) == len(owners) - heavy
    heavy_fids = sorted({f for p in before if p["annotators"] == ["heavy"] for f in p["feedback_ids"]})
    kept_fids = {
        f
        for p in snap.manifest.rationale_provenance
        if p["annotators"] == ["heavy"]
        for f in p["feedback_ids"]
    }
    assert kept_fids == set(heavy_fids[: len(kept_fids)])
    assert build_snapshot(items, config) == snap  # deterministic


def test_apply_share_cap_keeps_an_equal_split_and_rows_vouched_for_by_two():
    a, b, ab = frozenset({"a"}), frozenset({"b"}), frozenset({"a", "b"})
    assert apply_share_cap([a] * 5 + [b] * 5, 0.1) == (True,) * 10  # 1/k: an equal split always fits
    keep = apply_share_cap([a] * 8 + [b] * 2 + [ab] * 2, 0.5)
    assert keep == (True,) * 4 + (False,) * 4 + (True,) * 4  # a: 4 of 8 rows left = 0.5 of 8
    assert apply_share_cap([a] * 8, 0.1) == (True,) * 8  # one annotator: nothing capped
    assert apply_share_cap([a] * 8 + [b], None) == (True,) * 9


# --- over a real SQLite store -------------------------------------------------------------------


def test_agreement_and_exclusion_over_a_sqlite_store(tmp_path: Path):
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/f.db", held_out_fraction=0.0)
    annotators = ("honest-0", "honest-1", "honest-2", "random")
    with FeedbackStore(settings) as store:
        fill_judged_store(store, "default", 30, annotators, random.Random(7))
        config = ReliabilityConfig(min_overlap_items=10)
        found = {a.annotator: a for a in agreement(store, "default", config)}
        assert [a for a, v in found.items() if v.flagged] == ["random"]
        assert found["random"].overlap_items == 30

        items = judged_items(store, "default")
        snap = build_snapshot(items, SnapshotConfig(replay_ratio=0, reliability=config))
        assert snap.manifest.excluded_annotators == ("random",)
        # The flag, stored until an admin clears it, excludes even when the check itself would not flag.
        store.flag_annotator("default", "honest-2", reason="manual", kappa=None)
        assert flagged_annotators(store, "default") == frozenset({"honest-2"})
        lenient = SnapshotConfig(replay_ratio=0, reliability=ReliabilityConfig(min_overlap_items=1000))
        flagged = build_snapshot(items, lenient, flagged_annotators=flagged_annotators(store, "default"))
        assert flagged.manifest.excluded_annotators == ("honest-2",)
        store.clear_annotator_flag("default", "honest-2", cleared_by="admin")
        assert flagged_annotators(store, "default") == frozenset()


def test_an_admins_clear_holds_until_new_evidence():
    items = crowd(2, per_item=4)
    config = ReliabilityConfig()
    random_now = next(a for a in annotator_agreement(items, config) if a.annotator == "random")
    assert random_now.flagged
    # Cleared at today's overlap: not flagged nor excluded until min_overlap_items more are judged.
    cleared = {"random": random_now.overlap_items}
    held = {a.annotator: a for a in with_admin_clears(annotator_agreement(items, config), cleared, config)}
    assert not held["random"].flagged and "cleared by an admin" in held["random"].reason
    snap = build_snapshot(items, SnapshotConfig(replay_ratio=0), cleared_annotators=cleared)
    assert snap.manifest.excluded_annotators == ()
    assert any("random" in p["annotators"] for p in snap.manifest.rationale_provenance)
    # Cleared when it had far less overlap: the evidence since then decides again.
    early = {"random": random_now.overlap_items - config.min_overlap_items}
    again = build_snapshot(items, SnapshotConfig(replay_ratio=0), cleared_annotators=early)
    assert again.manifest.excluded_annotators == ("random",)


def test_list_and_round_see_a_cleared_flag_the_same_way(tmp_path: Path):
    settings = StoreSettings(url=f"sqlite:///{tmp_path}/f.db", held_out_fraction=0.0)
    with FeedbackStore(settings) as store:
        store.flag_annotator("default", "random", reason="low kappa", kappa=0.01, overlap_items=5)
        store.clear_annotator_flag("default", "random", cleared_by="admin")
        assert cleared_annotators(store, "default") == {"random": 5}
        assert flagged_annotators(store, "default") == frozenset()
        store.flag_annotator("default", "random", reason="again", kappa=0.0, overlap_items=40)
        assert cleared_annotators(store, "default") == {}
        assert flagged_annotators(store, "default") == frozenset({"random"})
