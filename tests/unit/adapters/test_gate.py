"""The promotion gate: decisions on hand-made scores, and real scoring on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest

from illume.adapters.cache import AdapterCache
from illume.data.vqax import VQAXItem
from illume.evaluation.gate import (
    CuratedSetConfig,
    GateConfig,
    GateItem,
    answer_scores,
    decide,
    evaluate_gate,
    greedy_answers,
    greedy_rationales,
    pairs_ranked_right,
    preference_scores,
    rationale_losses,
    score,
    score_curated,
)

GOOD = {"items": 30, "ROUGE-L": 40.0, "BLEU-4": 15.0, "CIDEr": 50.0}


def _with(**changes):
    scores = dict(GOOD)
    scores.update({k.replace("_", "-"): v for k, v in changes.items()})
    return scores


def test_promotes_a_candidate_within_tolerance_on_every_metric():
    config = GateConfig(default_tolerance=1.0, tolerance={"CIDEr": 3.0})
    decision = decide(_with(ROUGE_L=39.5, CIDEr=47.5), GOOD, config)
    assert decision.promote, decision.reason
    assert decision.reason.startswith("promoted") and "held_out/CIDEr -2.50" in decision.reason
    assert decision.candidate["held_out"]["ROUGE-L"] == 39.5
    assert decision.production["held_out"] == GOOD
    assert {c["metric"] for c in decision.checks} == {"ROUGE-L", "BLEU-4", "CIDEr"}


def test_refuses_a_drop_beyond_tolerance_on_any_metric():
    config = GateConfig(default_tolerance=1.0, tolerance={"CIDEr": 3.0})
    decision = decide(_with(BLEU_4=13.9, ROUGE_L=45.0), GOOD, config)
    assert not decision.promote
    assert "held_out/BLEU-4 13.90 < production 15.00 - 1" in decision.reason
    assert not decide(_with(CIDEr=46.9), GOOD, config).promote
    # Metrics outside the configured set do not count.
    assert decide(_with(BLEU_4=0.0), GOOD, config.model_copy(update={"metrics": ("ROUGE-L",)})).promote


def test_too_few_items_refuse_unless_allowed():
    few = {**GOOD, "items": 3}
    refused = decide(few, few, GateConfig(min_items=20))
    assert not refused.promote and "3 items < min_items 20" in refused.reason
    empty = {"items": 0}
    assert not decide(empty, empty, GateConfig()).promote
    allowed = decide(empty, empty, GateConfig(allow_empty=True))
    assert allowed.promote and allowed.reason.startswith("promoted without evidence")
    assert decide(few, few, GateConfig(allow_empty=True)).promote  # more evidence is never stricter
    # min_items 0 does not make an empty set evidence: it is skipped (allow_empty) or refused.
    assert decide(empty, empty, GateConfig(min_items=0, allow_empty=True)).promote
    refused_empty = decide(empty, empty, GateConfig(min_items=0))
    assert not refused_empty.promote and "0 items < min_items 1" in refused_empty.reason


def test_missing_or_broken_scores_refuse():
    config = GateConfig()
    no_cider = {k: v for k, v in GOOD.items() if k != "CIDEr"}
    assert "CIDEr: missing" in decide(no_cider, GOOD, config).reason
    assert not decide(_with(ROUGE_L=float("nan")), GOOD, config).promote
    assert "different item counts" in decide({**GOOD, "items": 29}, GOOD, config).reason
    assert "no candidate scores" in decide({}, GOOD, config).reason


def test_curated_sets_are_folded_into_the_same_decision():
    curated = {"items": 50, "ROUGE-L": 44.0, "BLEU-4": 19.0, "CIDEr": 60.0, "answer_accuracy": 85.0}
    curated.update({"acceptance/rouge_l": 30.0, "acceptance/fact": 40.0, "acceptance/fact/greedy": 1.0})
    config = GateConfig(curated={"vqax": CuratedSetConfig(tolerance={"acceptance/fact": 2.0})})
    production = {"held_out": GOOD, "vqax": curated}
    ok = decide({"held_out": GOOD, "vqax": {**curated, "acceptance/fact": 38.5}}, production, config)
    assert ok.promote, ok.reason
    assert {c["metric"] for c in ok.checks if c["set"] == "vqax"} == {
        "ROUGE-L",
        "BLEU-4",
        "CIDEr",
        "answer_accuracy",
        "acceptance/fact",
        "acceptance/rouge_l",
    }
    worse = decide({"held_out": GOOD, "vqax": {**curated, "acceptance/fact": 37.0}}, production, config)
    assert not worse.promote and "vqax/acceptance/fact" in worse.reason
    wrong = decide({"held_out": GOOD, "vqax": {**curated, "answer_accuracy": 80.0}}, production, config)
    assert not wrong.promote and "vqax/answer_accuracy" in wrong.reason
    assert "vqax: no candidate scores" in decide({"held_out": GOOD}, production, config).reason
    with pytest.raises(ValueError):
        GateConfig(curated={"held_out": CuratedSetConfig()}).sets()


# --- real scoring on the tiny model ----------------------------------------------------------


def _items(images, references):
    questions = ["what colour is the square?", "is there a blue circle?", "how many triangles are there?"]
    answers = ["red", "yes", "2"]
    return [
        GateItem(f"g{i}", (lambda img=images[i]: img), questions[i], answers[i], refs)
        for i, refs in enumerate(references)
    ]


def test_score_and_evaluate_gate_on_the_tiny_model(generator, adapter_store, adapters, images, tmp_path):
    config = GateConfig(max_new_tokens=8, tokenize=False, min_items=3)
    probe = _items(images, [["x"]] * 3)
    base_texts = greedy_rationales(generator, None, probe, config)
    # References are the base model's own greedy rationales: the base scores perfectly.
    items = _items(images, [[t or "empty"] for t in base_texts])
    base = score(generator, None, items, config)
    assert base["items"] == 3 and base["ROUGE-L"] == pytest.approx(100.0) and set(base) >= {"BLEU-4", "CIDEr"}
    assert "METEOR" not in base
    assert score(generator, None, [*items, GateItem("g9", images[0], "q?", "a", [])], config) == base

    v1 = adapters["rationale-v1"]
    AdapterCache(generator, adapter_store, work_dir=tmp_path / "cache").ensure(v1.name, v1.uri, v1.manifest)
    candidate = score(generator, v1.name, items, config)
    assert candidate["ROUGE-L"] < base["ROUGE-L"]
    decision = evaluate_gate(generator, v1.name, None, items, config)
    assert not decision.promote and decision.production["held_out"] == base
    assert evaluate_gate(generator, None, None, items, config).promote
    assert score(generator, None, [], config) == {"items": 0.0}


def test_score_checks_answers_only_where_they_are_known_and_asked_for(generator, images):
    config = GateConfig(max_new_tokens=4, tokenize=False, min_items=1)
    asked = config.model_copy(update={"metrics": (*config.metrics, "answer_accuracy")})
    probe = _items(images, [["x"]] * 3)
    own = greedy_answers(generator, None, probe, asked)
    assert len(own) == 3 and all(isinstance(a, str) and a for a in own)
    assert "answer_accuracy" not in score(generator, None, probe, config)  # not asked for
    # The references are the model's own answers, then one of them is changed.
    right = [dataclasses.replace(item, answer=a) for item, a in zip(probe, own, strict=True)]
    scores = score(generator, None, right, asked)
    assert (scores["answer_accuracy"], scores["answer_items"]) == (100.0, 3.0)
    one_wrong = [*right[:2], dataclasses.replace(right[2], answer=own[2] + " not")]
    assert score(generator, None, one_wrong, asked)["answer_accuracy"] == pytest.approx(200 / 3)
    # An answer nobody vouched for is no reference.
    unknown = [*right[:2], dataclasses.replace(right[2], answer_known=False)]
    assert answer_scores(generator, None, unknown, asked) == {"answer_accuracy": 100.0, "answer_items": 2.0}
    unknown_all = [dataclasses.replace(item, answer_known=False) for item in right]
    assert answer_scores(generator, None, unknown_all, asked) == {"answer_items": 0.0}


def test_pairs_ranked_right_counts_accepted_below_rejected_and_ties_as_half():
    assert pairs_ranked_right([1.0], [2.0, 3.0]) == 1.0
    assert pairs_ranked_right([1.0, 4.0], [2.0, 3.0]) == 0.5
    assert pairs_ranked_right([2.0], [2.0, 1.0]) == 0.25


def test_preference_ranks_the_judged_candidates_under_each_adapter(
    generator, adapter_store, adapters, images, tmp_path
):
    config = GateConfig(batch_size=2, metrics=("preference_accuracy",))
    texts = ["the square is red", "a blue circle sits on the left", "zz qq"]
    probe = _items(images, [["x"]] * 3)
    base = [rationale_losses(generator, None, item, texts, config.batch_size) for item in probe]
    assert all(len(losses) == 3 and all(loss > 0 for loss in losses) for losses in base)
    # Accepted: the text the base model finds likelier; rejected: the other two.
    ordered = [[t for _, t in sorted(zip(losses, texts, strict=True))] for losses in base]
    right = [
        dataclasses.replace(item, references=o[:1], rejected=o[1:])
        for item, o in zip(probe, ordered, strict=True)
    ]
    assert preference_scores(generator, None, right, config) == {
        "preference_accuracy": 100.0,
        "preference_items": 3.0,
    }
    wrong = [
        dataclasses.replace(item, references=o[2:], rejected=o[:2])
        for item, o in zip(probe, ordered, strict=True)
    ]
    assert preference_scores(generator, None, wrong, config)["preference_accuracy"] == 0.0
    # Items without a rejected candidate are no evidence; score() adds the check when asked.
    unranked = [dataclasses.replace(right[0], rejected=()), *right[1:]]
    assert preference_scores(generator, None, unranked, config)["preference_items"] == 2.0
    assert preference_scores(generator, None, unranked[:1], config) == {"preference_items": 0.0}
    assert (
        score(generator, None, right, config.model_copy(update={"max_new_tokens": 4}))["preference_items"]
        == 3
    )
    # Each row runs under its adapter: the candidate's losses are its own, and the base model's
    # are unchanged once the model carries the adapter.
    v1 = adapters["rationale-v1"]
    AdapterCache(generator, adapter_store, work_dir=tmp_path / "cache").ensure(v1.name, v1.uri, v1.manifest)
    with_adapter = rationale_losses(generator, v1.name, probe[0], texts, config.batch_size)
    assert with_adapter != pytest.approx(base[0], abs=1e-4)
    assert rationale_losses(generator, None, probe[0], texts, config.batch_size) == pytest.approx(
        base[0], abs=1e-4
    )


def test_score_curated_reports_answers_acceptance_and_captions(generator, images, tmp_path):
    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    items = [
        VQAXItem(f"q{i}", "what colour is the square?", ("red",), ("the square is red",), p.name, p)
        for i, p in enumerate(paths)
    ]
    config = CuratedSetConfig(critics=("rouge_l",), n=2, min_items=1)
    scores = score_curated(generator, None, items, config, tokenize=False, max_new_tokens=6)
    assert scores["items"] == 2
    assert {"ROUGE-L", "BLEU-4", "CIDEr", "answer_accuracy", "acceptance/rouge_l"} <= set(scores)
    assert 0 <= scores["answer_accuracy"] <= 100 and 0 <= scores["acceptance/rouge_l"] <= 100
