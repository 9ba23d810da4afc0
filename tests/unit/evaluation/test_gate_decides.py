"""The gate's reasons name the evidence: a refusal names the metric, both scores, the tolerance,
the drop and the items on each side; a round waits while the held-out split is too small."""

from __future__ import annotations

from illume.evaluation.gate import GateConfig, decide, waiting_for_evidence

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
