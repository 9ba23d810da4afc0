"""Fixtures of the store's unit tests: a fresh SQLite store in a temporary directory per test."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from illume.store import (
    FeedbackStore,
    GenerationRecord,
    NewCandidate,
    NewGeneration,
    StoreSettings,
    held_out_for,
)

_counter = itertools.count()


def image_bytes(held_out: bool, fraction: float = 0.1) -> bytes:
    """Fresh image bytes that fall on the asked side of the held-out split."""
    while True:
        data = f"image-{next(_counter)}".encode()
        if held_out_for(hashlib.sha256(data).hexdigest(), fraction) == held_out:
            return data


@pytest.fixture
def settings(tmp_path: Path) -> StoreSettings:
    return StoreSettings(url=f"sqlite:///{tmp_path}/feedback.db", image_dir=tmp_path / "images")


@pytest.fixture
def store(settings: StoreSettings) -> Iterator[FeedbackStore]:
    with FeedbackStore(settings) as st:
        yield st


MakeGeneration = Callable[..., GenerationRecord]


@pytest.fixture
def make_generation(store: FeedbackStore) -> MakeGeneration:
    """Records a generation with candidate texts ``texts`` (train split unless ``held_out``)."""

    def make(
        texts: tuple[str, ...] = ("the dog barks", "the dog is furry", "it is a cat"),
        *,
        question: str = "What animal is this?",
        answer: str = "a dog",
        namespace: str = "default",
        held_out: bool = False,
        adapter_version: str = "base",
        image: bytes | None = None,
    ) -> GenerationRecord:
        return store.record_generation(
            NewGeneration(
                namespace=namespace,
                image=image if image is not None else image_bytes(held_out, store.settings.held_out_fraction),
                question=question,
                answer=answer,
                answer_generated=False,
                candidates=[
                    NewCandidate(t, 0.3 if i % 2 == 0 else 0.9, len(t.split())) for i, t in enumerate(texts)
                ],
                sampling={"n": len(texts), "temperatures": [0.3, 0.9]},
                seed=1234,
                adapter_requested="",
                adapter_version=adapter_version,
                model_id="tiny",
            )
        )

    return make
