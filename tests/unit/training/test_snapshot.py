"""Training snapshots: rows, replay, loss weight, dedup, accumulation, exclusions and the hash."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from illume.training import JudgedItem, ReplayItem, Snapshot, SnapshotConfig, build_snapshot, loss_weight
from illume.training.snapshot import canonical_json


def _item(qid: str, accepted=(), **kw) -> JudgedItem:
    defaults = dict(image=f"/img/{qid}.png", question=f"what colour is thing {qid}?", answer="red")
    defaults.update(kw)
    return JudgedItem(item_id=qid, accepted=tuple(accepted), **defaults)


def _pool(rationales: dict[str, list[str]], plain: int) -> list[JudgedItem]:
    items = [_item(q, r, answer_correct=True, generation_id=f"g-{q}") for q, r in rationales.items()]
    return items + [_item(f"p{i:03d}") for i in range(plain)]


def test_rows_replay_ratio_and_weight_are_as_configured():
    items = _pool({"a": ["the thing is red", "it is red"], "b": ["the square is red"]}, plain=40)
    snap = build_snapshot(items)  # replay_ratio 10 by default
    rationale = [r for r in snap.rows if r.kind == "rationale"]
    answer = [r for r in snap.rows if r.kind == "answer"]
    assert (snap.rationale_rows, snap.answer_rows) == (3, 30)
    assert snap.rationale_loss_weight == 30 / 3
    assert rationale[0].prompt == "Q: what colour is thing a? A: red, seeing that"
    assert [r.target for r in rationale] == [" the thing is red", " it is red", " the square is red"]
    assert [r.source_id for r in rationale] == ["a", "a", "b"]
    assert rationale[0].image == "/img/a.png"
    assert all(
        r.prompt == f"Q: what colour is thing {r.source_id}? A:" and r.target == " red" for r in answer
    )
    assert {r.source_id for r in answer} <= {f"p{i:03d}" for i in range(40)}
    assert len({r.source_id for r in answer}) == 30
    assert snap.manifest.rationale_sources == ("a", "b")
    assert snap.manifest.answer_sources == tuple(sorted(r.source_id for r in answer))
    assert snap.manifest.generation_ids == ("g-a", "g-b")
    assert snap.manifest.replay_candidates == 40

    two = build_snapshot(items, SnapshotConfig(replay_ratio=2))
    assert (two.rationale_rows, two.answer_rows, two.rationale_loss_weight) == (3, 6, 2.0)


def test_replay_is_capped_by_what_exists_and_seeded():
    items = _pool({"a": ["x is red"], "b": ["y is red"], "c": ["z is red"]}, plain=5)
    snap = build_snapshot(items)
    assert (snap.rationale_rows, snap.answer_rows) == (3, 5)
    assert snap.rationale_loss_weight == pytest.approx(5 / 3)
    many = _pool({"a": ["x is red"]}, plain=50)
    draws = {build_snapshot(many, SnapshotConfig(seed=s)).manifest.answer_sources for s in range(4)}
    assert len(draws) > 1  # the seed picks the replay questions
    assert build_snapshot(many, SnapshotConfig(seed=1)) == build_snapshot(many, SnapshotConfig(seed=1))


def _replay_pool(n: int, prefix: str = "r") -> list[ReplayItem]:
    return [
        ReplayItem(f"{prefix}{i:03d}", f"file:/pool/{i}.png", f"how many things {i}?", "2") for i in range(n)
    ]


def test_the_replay_pool_tops_up_answer_rows_to_the_ratio_and_never_repeats_a_judged_question():
    items = _pool({"a": ["x is red"], "b": ["y is red"]}, plain=5)  # 5 judged replay candidates
    pool = [*_replay_pool(40), ReplayItem("p001", "file:/pool/judged.png", "a judged question?", "yes")]
    snap = build_snapshot(items, replay_pool=pool)
    answer = [r for r in snap.rows if r.kind == "answer"]
    assert (snap.rationale_rows, snap.answer_rows) == (2, 20)  # 10x, as the paper's replay
    assert snap.rationale_loss_weight == 10.0
    judged_rows = [r for r in answer if not r.source_id.startswith("pool:")]
    assert len(judged_rows) == 5  # the judged questions come first
    pooled = [r for r in answer if r.source_id.startswith("pool:")]
    assert len(pooled) == 15 and "pool:p001" not in {r.source_id for r in pooled}
    assert all(r.prompt.startswith("Q: how many things") and r.target == " 2" for r in pooled)
    assert all(r.image.startswith("file:/pool/") for r in pooled)
    assert snap.manifest.pool_sources == tuple(r.source_id.removeprefix("pool:") for r in pooled)
    assert build_snapshot(items, replay_pool=pool) == snap  # seeded
    assert build_snapshot(items, replay_pool=pool).sha256 != build_snapshot(items).sha256
    # Enough judged questions: the pool is not touched. No rationale: no replay at all.
    assert build_snapshot(_pool({"a": ["x"]}, plain=30), replay_pool=pool).manifest.pool_sources == ()
    assert build_snapshot(_pool({}, plain=3), replay_pool=pool).answer_rows == 0


def test_a_snapshot_with_pool_rows_round_trips_through_json(tmp_path):
    snap = build_snapshot(_pool({"a": ["x is red"]}, plain=1), replay_pool=_replay_pool(20))
    assert Snapshot.load(snap.save(tmp_path / "s.json")) == snap


def test_weight_without_answer_rows_or_rationales():
    assert loss_weight(0, 5) == 1.0 and loss_weight(5, 0) == 1.0 and loss_weight(20, 4) == 5.0
    only = build_snapshot(_pool({"a": ["x is red"]}, plain=0))
    assert (only.rationale_rows, only.answer_rows, only.rationale_loss_weight) == (1, 0, 1.0)
    empty = build_snapshot(_pool({}, plain=10))
    assert empty.rows == ()  # no rationale rows: no replay either (10 x 0)


def test_dedup_after_normalisation_keeps_the_first_occurrence():
    items = [
        _item("a", ["The square is red ", "the square is red", "  THE SQUARE IS RED"], round=0),
        _item("a", ["the square is red", "there is a red square"], round=1),
        _item("b", ["the square is red"], round=1),  # same text, other question: kept
    ]
    snap = build_snapshot(items)
    texts = [(r.source_id, r.target) for r in snap.rows if r.kind == "rationale"]
    assert texts == [
        ("a", " The square is red"),
        ("a", " there is a red square"),
        ("b", " the square is red"),
    ]
    assert snap.manifest.duplicates_dropped == 3
    capped = build_snapshot(items, SnapshotConfig(max_rationales_per_question=1))
    assert [r.target for r in capped.rows if r.source_id == "a"] == [" The square is red"]


def test_accumulation_across_rounds():
    round0 = [_item("a", ["the square is red"], round=0), _item("b", round=0), _item("c", round=0)]
    round1 = [_item("a", [], round=1), _item("b", ["the circle is blue"], round=1), _item("c", round=1)]
    after0 = build_snapshot(round0)
    after1 = build_snapshot(round0 + round1)
    assert [r.source_id for r in after0.rows if r.kind == "rationale"] == ["a"]
    # a keeps its round-0 rationale although round 1 accepted nothing for it; b joins.
    assert [r.source_id for r in after1.rows if r.kind == "rationale"] == ["a", "b"]
    # Questions with a rationale in any round are never replayed as answer-only rows.
    assert [r.source_id for r in after1.rows if r.kind == "answer"] == ["c"]


def test_held_out_unjudged_and_wrong_answers_never_reach_a_row():
    items = [
        _item("a", ["the square is red"]),
        _item("held", ["the circle is blue"], held_out=True),
        _item("unjudged", judged=False),
        _item("wrong", ["the square is blue"], answer="blue", answer_correct=False),
        *[_item(f"p{i}") for i in range(20)],
    ]
    snap = build_snapshot(items)
    sources = {r.source_id for r in snap.rows}
    assert not sources & {"held", "unjudged", "wrong"}
    assert snap.manifest.held_out_items == 1 and snap.manifest.unjudged_items == 1
    assert snap.manifest.wrong_answer_questions == 1
    assert snap.manifest.replay_candidates == 20
    # A later judgement with the right answer makes the question usable again (its answer is used).
    fixed = build_snapshot(
        [*items, _item("wrong", answer="red", answer_correct=True)], SnapshotConfig(replay_ratio=30)
    )
    assert [r.target for r in fixed.rows if r.source_id == "wrong"] == [" red"]


def test_sha256_is_stable_and_changes_with_any_row(tmp_path):
    items = _pool({"a": ["the square is red"], "b": ["the circle is blue"]}, plain=12)
    snap = build_snapshot(items)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert build_snapshot(shuffled).sha256 == snap.sha256 == build_snapshot(items).sha256
    assert len(snap.sha256) == 64
    changed = [dataclasses.replace(items[0], accepted=("the square is RED!",)), *items[1:]]
    assert build_snapshot(changed).sha256 != snap.sha256
    other_image = [dataclasses.replace(items[1], image="/img/other.png"), items[0], *items[2:]]
    assert build_snapshot(other_image).sha256 != snap.sha256
    assert build_snapshot(items, SnapshotConfig(seed=5)).sha256 != snap.sha256
    # Round trip through JSON verifies the hash; a tampered row is refused.
    path = snap.save(tmp_path / "snapshot.json")
    assert Snapshot.load(path) == snap
    data = json.loads(path.read_text())
    data["rows"][0]["target"] = " something else"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hash mismatch"):
        Snapshot.load(path)


def test_snapshot_is_immutable():
    snap = build_snapshot(_pool({"a": ["x is red"]}, plain=3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.rows = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.rows[0].target = "x"  # type: ignore[misc]
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        snap.config.replay_ratio = 3  # type: ignore[misc]
    assert isinstance(snap.rows, tuple)


def test_replay_passes_give_each_pass_its_own_questions_at_the_ratio():
    items = _pool({"a": ["x is red"], "b": ["y is red"]}, plain=5)
    snap = build_snapshot(items, SnapshotConfig(replay_passes=3), replay_pool=_replay_pool(80))
    assert (snap.rationale_rows, snap.answer_rows) == (2, 60)  # ten per rationale row, per pass
    assert snap.rationale_loss_weight == 10.0
    rationale = tuple(r for r in snap.rows if r.kind == "rationale")
    passes = [snap.pass_rows(p) for p in range(3)]
    answers = [{r.source_id for r in rows if r.kind == "answer"} for rows in passes]
    assert [len(a) for a in answers] == [20, 20, 20]
    assert len(answers[0] | answers[1] | answers[2]) == 60  # no question in two passes
    assert all(rows[:2] == rationale for rows in passes)
    assert snap.pass_rows(4) == passes[1]
    one = build_snapshot(items, replay_pool=_replay_pool(80))
    assert one.pass_rows(0) == one.rows == one.pass_rows(3)


def test_replay_passes_enter_the_hash_only_when_not_one():
    items = _pool({"a": ["x is red"]}, plain=30)
    snap = build_snapshot(items)
    assert b"replay_passes" not in canonical_json(snap.rows, snap.config, snap.rationale_loss_weight)
    three = build_snapshot(items, SnapshotConfig(replay_passes=3))
    assert b'"replay_passes":3' in canonical_json(three.rows, three.config, three.rationale_loss_weight)
    # A snapshot written before replay passes existed still loads, with its hash.
    written_before = snap.to_dict()
    del written_before["config"]["replay_passes"]
    assert Snapshot.from_dict(written_before) == snap


def test_replay_explained_lets_questions_with_rationale_rows_give_answer_rows_too():
    items = _pool({"a": ["x is red"], "b": ["y is red"], "c": ["z is red"]}, plain=2)
    apart = build_snapshot(items)
    assert set(apart.manifest.answer_sources) == {"p000", "p001"}  # the default keeps them apart
    together = build_snapshot(items, SnapshotConfig(replay_explained=True))
    assert set(together.manifest.answer_sources) == {"a", "b", "c", "p000", "p001"}
    assert together.rationale_loss_weight == pytest.approx(5 / 3)
    row = next(r for r in together.rows if r.kind == "answer" and r.source_id == "a")
    assert (row.prompt, row.target) == ("Q: what colour is thing a? A:", " red")
    # A wrong answer gives no answer row, explained or not.
    wrong = [*items, _item("w", ["w is red"], answer_correct=False)]
    assert "w" not in build_snapshot(wrong, SnapshotConfig(replay_explained=True)).manifest.answer_sources
    # It enters the hash only when on, so snapshots written before it keep theirs.
    assert b"replay_explained" not in canonical_json(apart.rows, apart.config, apart.rationale_loss_weight)
    assert Snapshot.from_dict(together.to_dict()) == together
