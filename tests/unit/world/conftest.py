"""Shared fixtures: one small generated world, drawn once per session."""

from __future__ import annotations

import pytest

from illume.world import WorldItem, generate


@pytest.fixture(scope="session")
def world() -> dict[str, list[WorldItem]]:
    return generate({"train": 400, "val": 100, "test": 100}, seed=7)


@pytest.fixture(scope="session")
def items(world: dict[str, list[WorldItem]]) -> list[WorldItem]:
    return [item for split in world.values() for item in split]
