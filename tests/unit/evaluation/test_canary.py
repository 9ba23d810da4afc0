"""The canary's decision on live feedback counts (``illume.evaluation.canary.decide_canary``)."""

from __future__ import annotations

from illume.evaluation.canary import ArmStats, CanaryConfig, decide_canary

CONFIG = CanaryConfig(enabled=True, min_sample=20, max_acceptance_drop=5, max_answer_drop=5)
PRODUCTION = ArmStats(1, generations=40, candidates=400, accepted=200, answers_judged=40, answers_correct=30)


def test_too_small_a_sample_on_either_side_waits():
    small = ArmStats(2, generations=19, candidates=190, accepted=0, answers_judged=19, answers_correct=0)
    decision = decide_canary(small, PRODUCTION, CONFIG)
    assert decision.action == "wait"
    assert decision.reason == (
        "canary v2 vs production v1: waiting for live feedback: 19 / 40 judged generations "
        "(need 20 on each side)"
    )


def test_answers_are_compared_only_on_a_sample_of_judged_answers():
    # Worse answers, but only 10 judged: not evidence; acceptance is within tolerance.
    few_answers = ArmStats(
        2, generations=30, candidates=300, accepted=140, answers_judged=10, answers_correct=0
    )
    decision = decide_canary(few_answers, PRODUCTION, CONFIG)
    assert decision.action == "promote", decision.reason
    assert "answer accuracy not compared (10 / 40 judged answers < 20)" in decision.reason
    many = ArmStats(2, generations=30, candidates=300, accepted=140, answers_judged=20, answers_correct=10)
    decision = decide_canary(many, PRODUCTION, CONFIG)
    assert decision.action == "rollback"
    assert decision.reason.endswith("answer accuracy 50.0 vs 75.0 (tolerance 5) on 20 / 40 judged answers")
    assert decision.to_dict()["canary"]["answer_accuracy"] == 50.0
