"""Caption metrics agree with pycocoevalcap called directly; acceptance and accuracy by hand."""

import pytest

from illume.evaluation.metrics import acceptance, answer_accuracy, caption_scores

PREDICTIONS = {"1": "the square is red", "2": "there is a blue circle", "3": "two triangles are green"}
REFERENCES = {
    "1": ["the square is red", "the only square is red"],
    "2": ["a blue circle is in the picture", "there is one blue circle"],
    "3": ["there are two green triangles", "both triangles are green"],
}


def test_bleu_rouge_cider_equal_pycocoevalcap_on_whitespace_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores = caption_scores(PREDICTIONS, REFERENCES, tokenize=False, meteor=False)
    res = {k: [v] for k, v in PREDICTIONS.items()}
    bleu, _ = Bleu(4).compute_score(REFERENCES, res, verbose=0)
    assert scores["BLEU-4"] == pytest.approx(100 * bleu[3])
    assert scores["BLEU-1"] == pytest.approx(100 * bleu[0])
    assert scores["ROUGE-L"] == pytest.approx(100 * Rouge().compute_score(REFERENCES, res)[0])
    assert scores["CIDEr"] == pytest.approx(100 * Cider().compute_score(REFERENCES, res)[0])


def test_bleu_1_by_hand_for_an_exact_match():
    scores = caption_scores(
        {"1": "the square is red"}, {"1": ["The square is red"]}, tokenize=False, meteor=False
    )
    assert scores["BLEU-1"] == pytest.approx(100.0)
    assert scores["ROUGE-L"] == pytest.approx(100.0)


@pytest.mark.slow
def test_meteor_runs_offline_with_java():
    from illume.evaluation.metrics import java_available

    if not java_available():
        pytest.skip("no Java runtime")
    scores = caption_scores(PREDICTIONS, REFERENCES)
    assert 0 < scores["METEOR"] <= 100
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def test_acceptance_per_candidate_and_per_question():
    a = acceptance({"q1": [True, False, False], "q2": [False, False], "q3": [True, True]})
    assert (a.candidates, a.accepted_candidates, a.questions, a.accepted_questions) == (7, 3, 3, 2)
    assert a.per_candidate == pytest.approx(3 / 7)
    assert a.per_question == pytest.approx(2 / 3)


def test_answer_accuracy():
    assert answer_accuracy(
        {"a": "Red.", "b": "2", "c": "no"}, {"a": ["red"], "b": "3", "c": ["yes", "no"]}
    ) == (pytest.approx(2 / 3))
