"""The paper's simulated critic: coco-caption ROUGE-L against gold explanations.

ROUGE-L here is the coco-caption variant: whitespace tokens, longest common subsequence,
precision and recall each maximised over the references, F-measure with beta = 1.2. ILLUME
lower-cases and strips candidates and references before scoring, accepts a candidate whose score
is at least 0.7, and scores a candidate shorter than 3 characters as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from illume.critics.base import Critic, CriticInput, Verdict

COCO_BETA = 1.2
PAPER_THRESHOLD = 0.7
PAPER_MIN_CHARS = 3


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, references: Sequence[str], beta: float = COCO_BETA) -> float:
    """coco-caption ROUGE-L of one candidate against several references (tokens split on whitespace)."""
    cand_tokens = candidate.split()
    if not cand_tokens or not references:
        return 0.0
    precisions, recalls = [], []
    for reference in references:
        ref_tokens = reference.split()
        if not ref_tokens:
            continue
        lcs = lcs_length(cand_tokens, ref_tokens)
        precisions.append(lcs / len(cand_tokens))
        recalls.append(lcs / len(ref_tokens))
    if not precisions:
        return 0.0
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta**2) * p * r) / (r + beta**2 * p)


def normalise(text: str) -> str:
    """ILLUME's pre-scoring normalisation: lower-case and strip."""
    return text.lower().strip()


class RougeLCritic(Critic):
    """Accepts a candidate whose ROUGE-L against the item's references reaches ``threshold``."""

    name = "rouge_l"

    def __init__(self, threshold: float = PAPER_THRESHOLD, min_chars: int = PAPER_MIN_CHARS) -> None:
        self.threshold = threshold
        self.min_chars = min_chars

    def judge(self, candidate: str, item: CriticInput) -> Verdict:
        text = normalise(candidate)
        if len(text) < self.min_chars:
            return Verdict(0.0, False, f"shorter than {self.min_chars} characters")
        score = rouge_l(text, [normalise(r) for r in item.references])
        return Verdict(score, score >= self.threshold, f"rouge_l={score:.3f}")
