"""Fixtures of the study's tests: a tiny study (a world of 12 train items) and a tiny random LLaVA."""

from __future__ import annotations

from pathlib import Path

import pytest

from illume.generation.prompts import answer_prompt, rationale_prompt
from illume.models.tiny import build_tiny_vlm
from illume.study import StudyConfig, StudyContext
from illume.training import SnapshotConfig, TrainConfig
from illume.training.loop import LoopConfig
from illume.world import build_world, world_texts

SEED = 3


def tiny_study(rounds: int = 2) -> StudyConfig:
    loop = LoopConfig(
        n=3,
        temperatures=(1.0,),
        top_k_fraction=1.0,
        max_new_tokens=6,
        batch_size=4,
        val_limit=None,
        eval_critics=("fact", "rouge_l"),
        eval_n=2,
        eval_baseline=False,
        meteor=False,
        rouge_threshold=0.05,  # a random model must get something accepted by the ROUGE-L critic
        snapshot=SnapshotConfig(replay_ratio=1),
        train=TrainConfig(learning_rate=0.05, epochs=1, batch_size=4),
    )
    return StudyConfig(world_train=12, world_val=4, world_test=3, pool_size=8, rounds=rounds, loop=loop)


@pytest.fixture(scope="session")
def study_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory holding world SEED at the tiny study's sizes (the study loads it from there)."""
    work = tmp_path_factory.mktemp("study-work")
    build_world(work / "worlds" / f"seed-{SEED}", sizes=tiny_study().world_sizes(), seed=SEED)
    return work


@pytest.fixture(scope="session")
def study_model(tmp_path_factory: pytest.TempPathFactory, study_work) -> Path:
    from illume.data import load_vqax

    world = study_work / "worlds" / f"seed-{SEED}"
    items = [item for split in ("train", "val", "test") for item in load_vqax(world / f"{split}.json")]
    texts = [*world_texts(items, distractors=2), rationale_prompt("what", "yes"), answer_prompt("what")]
    return build_tiny_vlm("llava", tmp_path_factory.mktemp("study-llava"), texts, image_size=32, patch_size=8)


@pytest.fixture
def study_context(study_work, study_model, tmp_path) -> StudyContext:
    """A fresh records directory (and runs directory) over the shared world, per test."""
    work = tmp_path / "work"
    (work / "worlds").mkdir(parents=True)
    (work / "worlds" / f"seed-{SEED}").symlink_to(study_work / "worlds" / f"seed-{SEED}")
    return StudyContext(
        model_dir=study_model,
        work=work,
        records=tmp_path / "records",
        study=tiny_study(),
        provenance={"git_commit": "test"},
        progress=False,
        log=lambda line: None,
    )
