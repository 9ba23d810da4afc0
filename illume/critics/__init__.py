"""Critics judge candidate rationales: the paper's ROUGE-L critic and others behind one interface.

``make_critic(name)`` is the one way to get a critic by its configured name (``rouge_l``, ``fact``);
``critic_input(item)`` is what every critic sees for a VQA-X style item (its gold explanations as
references, its scene graph and other extras).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from illume.critics.base import Critic, CriticInput, Verdict
from illume.critics.fact import FactCritic
from illume.critics.rouge import PAPER_THRESHOLD, RougeLCritic, rouge_l

if TYPE_CHECKING:
    from illume.data.vqax import VQAXItem

CRITICS: dict[str, type[Critic]] = {RougeLCritic.name: RougeLCritic, FactCritic.name: FactCritic}


def make_critic(name: str, rouge_threshold: float = PAPER_THRESHOLD) -> Critic:
    """The critic configured as ``name``; ``rouge_threshold`` applies to the ROUGE-L critic."""
    if name == RougeLCritic.name:
        return RougeLCritic(threshold=rouge_threshold)
    if name in CRITICS:
        return CRITICS[name]()
    raise ValueError(f"unknown critic {name!r}; choose from {', '.join(sorted(CRITICS))}")


def critic_input(item: VQAXItem, answer: str | None = None) -> CriticInput:
    """What a critic sees for one item: the gold explanations as references, the scene and the
    other extras; ``answer`` is the one the rationales explain (the item's own when None)."""
    scene = item.extra.get("scene")
    return CriticInput(
        question=item.question,
        answer=item.answer if answer is None else answer,
        references=tuple(item.explanations),
        scene=scene if isinstance(scene, Mapping) else None,
        extra=dict(item.extra),
    )


__all__ = [
    "CRITICS",
    "Critic",
    "CriticInput",
    "FactCritic",
    "RougeLCritic",
    "Verdict",
    "critic_input",
    "make_critic",
    "rouge_l",
]
