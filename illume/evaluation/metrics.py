"""Evaluation metrics ILLUME reports: caption scores, critic acceptance, answer accuracy.

Caption scores are pycocoevalcap's BLEU-1..4, METEOR (Java, offline), ROUGE-L and CIDEr of one
prediction per item against all its references; SPICE is never used (it downloads jars). Texts are
lower-cased and stripped (ILLUME's normalisation) and, by default, tokenised with coco-caption's
PTB tokenizer (Java) as in the reference evaluation; ``tokenize=False`` only splits on whitespace.

Acceptance is reported per candidate (share of candidates a critic accepts) and per question
(share of questions with at least one accepted candidate: the paper's "4% at round 0").
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from illume.critics.rouge import normalise


def _prepare(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], tokenize: bool
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    missing = set(predictions) - set(references)
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references (e.g. {sorted(missing)[0]!r})")
    res = {k: [normalise(v)] for k, v in predictions.items()}
    gts = {k: [normalise(r) for r in references[k]] for k in predictions}
    if tokenize:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    return res, gts


def java_available() -> bool:
    """METEOR and the PTB tokenizer need a Java runtime."""
    return shutil.which("java") is not None


def caption_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    tokenize: bool = True,
    meteor: bool = True,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (in percent, as the paper reports them)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        return {}
    res, gts = _prepare(predictions, references, tokenize and java_available())
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = 100 * value
    if meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["METEOR"] = 100 * scorer.compute_score(gts, res)[0]
        finally:
            stop_meteor(scorer)
    scores["ROUGE-L"] = float(100 * Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(100 * Cider().compute_score(gts, res)[0])
    return scores


def stop_meteor(scorer: object) -> None:
    """End METEOR's Java process now rather than at garbage collection."""
    process = getattr(scorer, "meteor_p", None)
    if process is not None and process.poll() is None:
        process.stdin.close()
        process.kill()
        process.wait()


@dataclass(frozen=True)
class Acceptance:
    """Critic acceptance over a set of questions."""

    candidates: int
    accepted_candidates: int
    questions: int
    accepted_questions: int

    @property
    def per_candidate(self) -> float:
        return self.accepted_candidates / self.candidates if self.candidates else 0.0

    @property
    def per_question(self) -> float:
        return self.accepted_questions / self.questions if self.questions else 0.0


def acceptance(verdicts_by_question: Mapping[str, Sequence[bool]]) -> Acceptance:
    """Acceptance per candidate and per question from each question's candidate verdicts."""
    flat = [v for verdicts in verdicts_by_question.values() for v in verdicts]
    return Acceptance(
        candidates=len(flat),
        accepted_candidates=sum(flat),
        questions=len(verdicts_by_question),
        accepted_questions=sum(any(v) for v in verdicts_by_question.values()),
    )


def normalise_answer(answer: str) -> str:
    """Answers compare lower-cased, stripped, without a final period."""
    return answer.lower().strip().rstrip(".").strip()


def answer_accuracy(predicted: Mapping[str, str], gold: Mapping[str, Sequence[str] | str]) -> float:
    """Share of questions whose predicted answer matches a gold answer (exact after normalising)."""
    if not predicted:
        return 0.0
    hits = 0
    for key, answer in predicted.items():
        golds = gold[key]
        options = [golds] if isinstance(golds, str) else list(golds)
        hits += normalise_answer(answer) in {normalise_answer(g) for g in options}
    return hits / len(predicted)
