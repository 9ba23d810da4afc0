"""Tiny vision-language models built from configs for the unit tests (random weights, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from illume.models.tiny import build_tiny_vlm

TEXTS = [
    "q: what colour is the square? a: red, seeing that the square is red",
    "q: is there a blue circle? a: yes, seeing that there is a blue circle left of the square",
    "q: how many triangles are there? a: 2, seeing that two green triangles are above the circle",
    "the small yellow square is right of the large purple triangle and below the circle",
] * 4


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """The text the tiny models' tokenizers are trained on."""
    return TEXTS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """Builds (once per session) and returns the directory of a tiny checkpoint per architecture."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_vlm(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), TEXTS, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    colours = ["red", "blue", "green", "yellow"]
    return [Image.new("RGB", (32 + 8 * i, 32), c) for i, c in enumerate(colours)]
