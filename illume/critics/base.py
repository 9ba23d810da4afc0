"""The critic interface.

A critic scores one candidate rationale for one (image, question, answer) item and decides whether
it "fits". Simulated critics stand in for the human of ILLUME's loop: the paper's ROUGE-L critic
compares with gold explanations; a fact critic checks statements against a scene graph. Every
critic receives the same ``CriticInput`` and may ignore fields it does not need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CriticInput:
    """What a critic may look at for one item."""

    question: str
    answer: str
    references: Sequence[str] = ()
    scene: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A critic's judgement of one candidate: a score in [0, 1] and whether it fits."""

    score: float
    accepted: bool
    reason: str = ""


class Critic(ABC):
    """Judges candidate rationales; subclasses implement ``judge``."""

    name: str = "critic"

    @abstractmethod
    def judge(self, candidate: str, item: CriticInput) -> Verdict:
        """Score one candidate for one item."""

    def judge_all(self, candidates: Sequence[str], item: CriticInput) -> list[Verdict]:
        """Score several candidates of one item (override to batch)."""
        return [self.judge(c, item) for c in candidates]

    def accepts(self, candidate: str, item: CriticInput) -> bool:
        return self.judge(candidate, item).accepted
