"""The paper's ROUGE-L critic: coco-caption ROUGE-L (beta 1.2), threshold 0.7, 3-character rule."""

import pytest

from illume.critics import CriticInput, RougeLCritic, rouge_l
from illume.critics.rouge import lcs_length


def _hand_rouge(lcs, cand_len, ref_len, beta=1.2):
    p, r = lcs / cand_len, lcs / ref_len
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_lcs():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("x y".split(), "a b".split()) == 0


@pytest.mark.parametrize(
    ("candidate", "references", "expected"),
    [
        ("the square is red", ["the square is red"], 1.0),
        # LCS "the square red" = 3 of 4 candidate tokens and 3 of 5 reference tokens.
        ("the square is red", ["the big square looks red"], _hand_rouge(3, 4, 5)),
        # Precision and recall are each maximised over the references (coco-caption's variant):
        # p = max(2/3, 3/3) = 1 and r = max(2/2, 3/6) = 1, so 1.0 though neither reference is matched.
        ("a red square", ["a square", "there is a red square here"], 1.0),
        ("cat", ["dog"], 0.0),
    ],
)
def test_rouge_l_matches_hand_computation(candidate, references, expected):
    assert rouge_l(candidate, references) == pytest.approx(expected)


def test_rouge_l_equals_pycocoevalcap():
    from pycocoevalcap.rouge.rouge import Rouge

    cand, refs = (
        "the small square is left of the circle",
        ["a square is left of a circle", "circle right of square"],
    )
    assert rouge_l(cand, refs) == pytest.approx(Rouge().calc_score([cand], refs))


def test_threshold_and_minimum_length():
    critic = RougeLCritic()
    item = CriticInput(question="q", answer="a", references=["The square is red"])
    assert critic.judge("  THE SQUARE IS RED ", item).accepted  # lower-cased and stripped first
    verdict = critic.judge("the square is big", item)  # 3 of 4 tokens: F = 0.75
    assert verdict.score == pytest.approx(0.75) and verdict.accepted
    assert not critic.judge("the square", item).accepted  # p = 1, r = 0.5 -> 0.59
    assert critic.judge("is", CriticInput("q", "a", references=["is"])).score == 0.0  # under 3 characters
    assert critic.judge("red", CriticInput("q", "a", references=["red"])).accepted
