"""Every string of the world, for training the default model's tokenizer.

Kept apart from ``build`` (which makes items) and ``distractors`` (which reads them), so neither
imports the other's consumer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from illume.data.vqax import VQAXItem
from illume.world.build import WorldItem
from illume.world.distractors import distractor_rationales
from illume.world.vocab import lexicon


def world_texts(items: Iterable[WorldItem | VQAXItem], distractors: int = 5, seed: int = 0) -> Iterator[str]:
    """Every string of the world, for tokenizer training: the lexicon, then per item the question,
    answer, gold rationales and ``distractors`` distractor rationales (seeded)."""
    yield from lexicon()
    for item in items:
        yield item.question
        yield item.answer
        yield from item.rationales if isinstance(item, WorldItem) else item.explanations
        if distractors:
            qid = item.question_id
            yield from distractor_rationales(item, random.Random(f"texts/{seed}/{qid}"), distractors)
