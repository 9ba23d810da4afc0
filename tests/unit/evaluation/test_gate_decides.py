"""The gate's reasons name the evidence: a refusal names the metric, both scores, the tolerance,
the drop and the items on each side; a round waits while the held-out split is too small."""

from __future__ import annotations

from illume.evaluation.gate import DEFAULT_METRICS, GateConfig, decide, waiting_for_evidence

PRODUCTION = {"items": 12.0, "ROUGE-L": 39.3, "BLEU-4": 15.0, "CIDEr": 80.0}


def test_a_refusal_names_the_metric_drop_and_the_items_on_both_sides():
    harmful = {"items": 12.0, "ROUGE-L": 24.6, "BLEU-4": 15.0, "CIDEr": 80.0}
    decision = decide(harmful, PRODUCTION, GateConfig(min_items=10, default_tolerance=2.0))
    assert not decision.promote
    assert decision.reason == (
        "refused: held_out/ROUGE-L 24.60 < production 39.30 - 2 (a drop of 14.70 points on 12 / 12 items)"
    )


def test_a_promotion_names_its_evidence_and_every_delta():
    neutral = {"items": 12.0, "ROUGE-L": 38.3, "BLEU-4": 15.5, "CIDEr": 79.0}
    decision = decide(neutral, PRODUCTION, GateConfig(min_items=10, default_tolerance=2.0))
    assert decision.promote, decision.reason
    assert decision.reason.startswith("promoted: within tolerance on held_out 12 items (")
    assert "held_out/ROUGE-L -1.00" in decision.reason and "held_out/BLEU-4 +0.50" in decision.reason


def test_a_round_waits_for_the_held_out_split_to_reach_min_items():
    config = GateConfig(min_items=10, allow_empty=False)
    assert waiting_for_evidence(config, 4) == "waiting for held-out evidence: 4 of 10 items (min_items)"
    assert waiting_for_evidence(config, 10) is None and waiting_for_evidence(config, 50) is None
    # min_items 0 still needs one item (no item is never evidence); allow_empty never waits.
    assert waiting_for_evidence(GateConfig(min_items=0), 0) == (
        "waiting for held-out evidence: 0 of 1 items (min_items)"
    )
    assert waiting_for_evidence(GateConfig(min_items=10, allow_empty=True), 0) is None


ANSWERS = GateConfig(
    min_items=10,
    default_tolerance=2.0,
    metrics=(*DEFAULT_METRICS, "answer_accuracy"),
    tolerance={"answer_accuracy": 5.0},
)


def test_a_round_that_explains_as_well_but_answers_worse_is_refused_on_its_answers():
    answers = {"answer_accuracy": 100.0, "answer_items": 16.0}
    worse = {**PRODUCTION, "items": 16.0, "answer_accuracy": 93.75, "answer_items": 16.0}
    decision = decide(worse, {**PRODUCTION, "items": 16.0, **answers}, ANSWERS)
    assert not decision.promote
    assert decision.reason == (
        "refused: held_out/answer_accuracy 93.75 < production 100.00 - 5 "
        "(a drop of 6.25 points on 16 / 16 items)"
    )
    # One answer lost in 24 is within 5 points; the promotion names the answers' delta.
    within = decide(
        {**PRODUCTION, "items": 24.0, "answer_accuracy": 95.83, "answer_items": 24.0},
        {**PRODUCTION, "items": 24.0, "answer_accuracy": 100.0, "answer_items": 24.0},
        ANSWERS,
    )
    assert within.promote and "held_out/answer_accuracy -4.17" in within.reason


def test_answers_are_compared_on_their_own_evidence():
    # Answers known on fewer than min_items items: not compared, and the reason says so.
    few = {**PRODUCTION, "answer_accuracy": 50.0, "answer_items": 4.0}
    decision = decide(few, {**PRODUCTION, "answer_accuracy": 100.0, "answer_items": 4.0}, ANSWERS)
    assert decision.promote, decision.reason
    assert (
        "held_out/answer_accuracy not compared: 4 items with answers known < min_items 10" in decision.reason
    )
    none = decide({**PRODUCTION, "answer_items": 0.0}, {**PRODUCTION, "answer_items": 0.0}, ANSWERS)
    assert none.promote and "0 items with answers known" in none.reason
    # The two sides answered different items: refused.
    uneven = decide(
        {**PRODUCTION, "answer_accuracy": 90.0, "answer_items": 11.0},
        {**PRODUCTION, "answer_accuracy": 90.0, "answer_items": 12.0},
        ANSWERS,
    )
    assert (
        not uneven.promote and "answer_accuracy: scored on different item counts (11 vs 12)" in uneven.reason
    )
    # Scores without any answer keys (an older scorer) are missing, as any configured metric.
    assert "held_out/answer_accuracy: missing" in decide(PRODUCTION, PRODUCTION, ANSWERS).reason


PREFERENCE = GateConfig(
    min_items=10, metrics=("preference_accuracy", "ROUGE-L"), tolerance={"preference_accuracy": 5.0}
)


def test_preference_is_compared_on_the_items_with_accepted_and_rejected_candidates():
    def scored(preference: float, items: float) -> dict[str, float]:
        return {**PRODUCTION, "preference_accuracy": preference, "preference_items": items}

    worse = decide(scored(60.0, 12.0), scored(70.0, 12.0), PREFERENCE)
    assert worse.reason == (
        "refused: held_out/preference_accuracy 60.00 < production 70.00 - 5 "
        "(a drop of 10.00 points on 12 / 12 items)"
    )
    # Ranking better promotes even where the greedy rationale is further from production's samples.
    better = decide({**scored(75.0, 12.0), "ROUGE-L": 38.5}, scored(70.0, 12.0), PREFERENCE)
    assert better.promote and "held_out/preference_accuracy +5.00" in better.reason
    few = decide(scored(0.0, 4.0), scored(100.0, 4.0), PREFERENCE)
    assert few.promote and (
        "held_out/preference_accuracy not compared: 4 items with accepted and rejected candidates "
        "< min_items 10" in few.reason
    )
