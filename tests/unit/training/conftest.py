"""Fixtures of the training tests: a small world and a tiny random LLaVA whose tokenizer knows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from illume.data.vqax import VQAXItem
from illume.generation.prompts import answer_prompt, rationale_prompt
from illume.models.tiny import build_tiny_vlm
from illume.training import JudgedItem, SnapshotConfig, build_snapshot
from illume.world import build_world, world_texts


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[VQAXItem]]:
    return build_world(tmp_path_factory.mktemp("world"), sizes={"train": 16, "val": 10, "test": 0}, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_world) -> Path:
    items = tiny_world["train"] + tiny_world["val"]
    # The prompts' own words ("q", ":", "a", "seeing", "that") are not in the world's texts.
    texts = [*world_texts(items, distractors=2), rationale_prompt("what", "yes"), answer_prompt("what")]
    return build_tiny_vlm("llava", tmp_path_factory.mktemp("tiny-llava"), texts, image_size=32, patch_size=8)


def judged_from(items: list[VQAXItem], with_rationale: int, per_question: int = 1) -> list[JudgedItem]:
    """Judged items: the first ``with_rationale`` accept ``per_question`` gold explanations, the rest none."""
    return [
        JudgedItem(
            item_id=item.question_id,
            image=str(item.image_path),
            question=item.question,
            answer=item.answer,
            accepted=item.explanations[:per_question] if k < with_rationale else (),
            answer_correct=True,
            generation_id=f"g-{item.question_id}",
            feedback_ids=(f"f-{item.question_id}",),
        )
        for k, item in enumerate(items)
    ]


@pytest.fixture(scope="session")
def small_snapshot(tiny_world):
    """3 rationale rows and 6 answer-only rows from the world's training split."""
    return build_snapshot(judged_from(tiny_world["train"], 3), SnapshotConfig(replay_ratio=2, seed=0))
