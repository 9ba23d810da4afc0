"""The replay pool: questions with known answers that keep a round's answer rows at the ratio.

Contract:

- ``replay_items(items, prefix)`` turns answered VQA-X items into ``ReplayItem``s: the majority
  answer, and the image as ``prefix`` + its absolute path; items without an answer are skipped;
- ``replay_pool_from_vqax(path)`` reads a VQA-X JSON file (images beside it, as ``build_world``
  writes them) into ``ReplayItem``s: the majority answer, and the image as ``file:<absolute
  path>``; items without an answer are skipped;
- ``with_file_images(loader)`` wraps an image loader so that ``file:`` references are read from
  disk by ``load_image_file`` (decoded like a client image; every training worker must be able
  to read that path) and every other reference goes to ``loader`` (image sha256s of the feedback
  store).

Why: ILLUME mixes about ten answer-only rows into every rationale row so that answer accuracy does
not fall. A served deployment judges few questions per round, so the judged questions alone give
one or two; ``build_snapshot`` tops the rest up from this pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from illume.data import load_vqax
from illume.data.vqax import VQAXItem
from illume.images import load_image_file
from illume.training.snapshot import ReplayItem

FILE_PREFIX = "file:"


def replay_items(items: Iterable[VQAXItem], prefix: str = "") -> list[ReplayItem]:
    """The answered questions of ``items`` as replay items (image: ``prefix`` + absolute path)."""
    return [
        ReplayItem(
            item_id=item.question_id,
            image=prefix + str(Path(item.image_path).resolve()),
            question=item.question,
            answer=item.answer,
        )
        for item in items
        if item.answer
    ]


def replay_pool_from_vqax(path: str | Path) -> list[ReplayItem]:
    """The answered questions of a VQA-X file as replay items, images as ``file:`` references."""
    return replay_items(load_vqax(path), FILE_PREFIX)


def with_file_images(loader: Callable[[str], Image.Image]) -> Callable[[str], Image.Image]:
    """``loader`` that also reads ``file:`` references from disk."""

    def load(ref: str) -> Image.Image:
        if ref.startswith(FILE_PREFIX):
            return load_image_file(ref.removeprefix(FILE_PREFIX))
        return loader(ref)

    return load
