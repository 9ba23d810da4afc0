"""The canary's decision on live feedback counts (``illume.evaluation.canary.decide_canary``):
a short sample waits until ``max_wait_s``, then ``on_timeout`` decides (promote by default,
whatever the short sample shows); a full sample is compared however long it took.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from illume.evaluation.canary import ArmStats, CanaryConfig, decide_canary

CONFIG = CanaryConfig(enabled=True, min_sample=20, max_acceptance_drop=5, max_answer_drop=5)
PRODUCTION = ArmStats(1, generations=40, candidates=400, accepted=200, answers_judged=40, answers_correct=30)


def test_too_small_a_sample_on_either_side_waits():
    small = ArmStats(2, generations=19, candidates=190, accepted=0, answers_judged=19, answers_correct=0)
    decision = decide_canary(small, PRODUCTION, CONFIG)
    assert decision.action == "wait"
    assert decision.reason == (
        "canary v2 vs production v1: waiting for live feedback: 19 / 40 judged generations "
        "(need 20 on each side; at most 86400 s, then promote)"
    )


# A short sample that looks bad: the timeout decides by on_timeout, not by these few judgements.
SHORT = ArmStats(3, generations=4, candidates=40, accepted=0, answers_judged=4, answers_correct=0)
SHORT_PRODUCTION = ArmStats(2, generations=7, candidates=70, accepted=35, answers_judged=7, answers_correct=7)


def test_a_short_sample_still_waits_before_max_wait_s():
    decision = decide_canary(SHORT, SHORT_PRODUCTION, CONFIG, waited_s=86399.9)
    assert decision.action == "wait"
    assert not decision.timed_out


def test_a_short_sample_at_the_timeout_is_promoted_by_default():
    decision = decide_canary(SHORT, SHORT_PRODUCTION, CONFIG, waited_s=86400.0)
    assert decision.action == "promote"
    assert decision.timed_out and decision.to_dict()["timed_out"] is True
    assert decision.reason == (
        "canary v3 vs production v2: promoted after waiting 86400 s (max_wait_s 86400): 4 / 7 "
        "judged generations (need 20 on each side); the gate's held-out evidence stands"
    )


def test_a_short_sample_at_the_timeout_is_rolled_back_with_on_timeout_rollback():
    config = CONFIG.model_copy(update={"max_wait_s": 3600.0, "on_timeout": "rollback"})
    assert decide_canary(SHORT, SHORT_PRODUCTION, config, waited_s=3599.0).action == "wait"
    decision = decide_canary(SHORT, SHORT_PRODUCTION, config, waited_s=5000.0)
    assert decision.action == "rollback" and decision.timed_out
    assert decision.reason == (
        "canary v3 vs production v2: rolled back after waiting 5000 s (max_wait_s 3600): 4 / 7 "
        "judged generations (need 20 on each side); on_timeout is rollback"
    )


def test_a_full_sample_is_compared_however_long_it_took():
    harmful = ArmStats(2, generations=30, candidates=300, accepted=0, answers_judged=30, answers_correct=0)
    decision = decide_canary(harmful, PRODUCTION, CONFIG, waited_s=10 * 86400.0)
    assert decision.action == "rollback" and not decision.timed_out
    assert "per-candidate acceptance 0.0 vs 50.0" in decision.reason


def test_max_wait_s_must_be_positive():
    with pytest.raises(ValidationError):
        CanaryConfig(max_wait_s=0)
    with pytest.raises(ValidationError):
        CanaryConfig(on_timeout="wait")


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
