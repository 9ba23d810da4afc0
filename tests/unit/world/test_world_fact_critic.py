"""The fact critic: a hand-written case set, gold and distractor rationales of generated items."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from illume.critics.base import CriticInput
from illume.critics.fact import FactCritic
from illume.world import tagged_distractors

CASES = json.loads((Path(__file__).parent / "data" / "critic_cases.json").read_text())


def _input(case: dict) -> CriticInput:
    return CriticInput(case["q"], case["a"], (), CASES["scenes"][case["scene"]])


def test_case_set_is_broad() -> None:
    kinds = {c["kind"] for c in CASES["cases"]}
    assert kinds >= {"paraphrase", "irrelevant", "false_clause", "missing_fact", "ungrammatical"}
    assert len(CASES["cases"]) >= 40
    questions = {c["q"].split()[0] + " " + c["q"].split()[1] for c in CASES["cases"]}
    assert len(questions) >= 5


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: f"{c['kind']}:{c['c'][:50]}")
def test_hand_written_case(case: dict) -> None:
    verdict = FactCritic().judge(case["c"], _input(case))
    assert verdict.accepted == case["accept"], verdict.reason
    assert 0.0 <= verdict.score <= 1.0
    if case["accept"]:
        assert verdict.score == 1.0
    elif case["kind"] in {"false_clause", "ungrammatical", "degenerate"}:
        assert verdict.score == 0.0, verdict.reason


def test_partial_coverage_scores_in_between() -> None:
    case = next(c for c in CASES["cases"] if c["c"] == "the triangle is large" and c["a"] == "yes")
    verdict = FactCritic().judge(case["c"], _input(case))
    assert not verdict.accepted and verdict.score == 0.5 and "misses" in verdict.reason


def test_without_a_scene_nothing_is_accepted() -> None:
    verdict = FactCritic().judge("the square is red", CriticInput("what colour is the square?", "red"))
    assert not verdict.accepted and verdict.score == 0.0


def test_scene_may_come_in_extra() -> None:
    scene = CASES["scenes"]["A"]
    inp = CriticInput("what colour is the triangle?", "green", extra={"scene": scene})
    assert FactCritic().judge("the triangle is green", inp).accepted


def test_a_wrong_answer_cannot_be_justified() -> None:
    inp = CriticInput("what colour is the triangle?", "blue", scene=CASES["scenes"]["A"])
    assert not FactCritic().judge("the triangle is green", inp).accepted
    assert not FactCritic().judge("the triangle is blue", inp).accepted


def test_foreign_question_is_rejected_with_reason() -> None:
    inp = CriticInput("why is the sky blue?", "because", scene=CASES["scenes"]["A"])
    verdict = FactCritic().judge("the square is red", inp)
    assert not verdict.accepted and "answer depends on" in verdict.reason


def _world_input(item, stored: bool = True) -> CriticInput:
    extra = {"scene": item.scene, "family": item.family}
    if stored:
        extra["facts"] = item.facts
    return CriticInput(item.question, item.answer, item.rationales, item.scene, extra)


@pytest.mark.parametrize("stored", [True, False], ids=["stored-facts", "derived-facts"])
def test_every_gold_rationale_is_accepted(items, stored: bool) -> None:
    critic = FactCritic()
    for item in items[::2]:
        for rationale in item.rationales:
            verdict = critic.judge(rationale, _world_input(item, stored))
            assert verdict.accepted, (item.question, item.answer, rationale, verdict.reason)


def test_distractors_are_rejected(items) -> None:
    critic = FactCritic()
    kinds = set()
    for item in items[::3]:
        golds = set(item.rationales)
        for text, kind in tagged_distractors(item, random.Random(item.question_id), 6):
            kinds.add(kind)
            assert text not in golds
            verdict = critic.judge(text, _world_input(item))
            assert not verdict.accepted, (item.question, text, kind)
            if kind in {"wrong_answer", "partly_false"}:
                assert verdict.reason.startswith("false"), (item.question, text, verdict.reason)
            else:
                assert verdict.reason.startswith("true but misses"), (item.question, text, verdict.reason)
    assert kinds == {"irrelevant", "wrong_answer", "partly_false"}
