"""Generate the world's splits and export them in the VQA-X format.

Contract: ``generate(sizes, seed)`` is a pure function of its arguments: item ``i`` of a split is
drawn from a ``random.Random`` seeded with ``(seed, split, i, attempt)``, so the same seed gives the
same items, images and JSON bytes, and a different seed gives different ones. Splits are drawn in
the order train, val, test from split-specific seeds, and a scene already used by any earlier item
(of any split) is redrawn, so no image and no (scene, question) pair is shared between splits.
Families are assigned round-robin and yes/no answers alternate within the yes/no families, so both
are balanced. ``build_world`` writes ``<out>/{split}.json`` (via ``illume.data.save_vqax``, with
extras ``scene``, ``family``, ``facts``), ``<out>/images/*.png`` and ``<out>/world.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from illume.data.vqax import VQAXItem, save_vqax
from illume.world.language import gold_rationales
from illume.world.questions import FAMILIES, YES_NO_FAMILIES, Question, ask
from illume.world.scene import WorldConfig, render_scene, sample_scene, scene_key
from illume.world.vocab import lexicon

SPLITS: tuple[str, ...] = ("train", "val", "test")
WORLD_VERSION = 1
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True)
class WorldItem:
    """One generated item: a scene, a question about it, its answer, facts and gold rationales."""

    question_id: str
    split: str
    question: str
    answer: str
    family: str
    scene: dict[str, Any]
    facts: list[dict[str, Any]]
    rationales: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def asked(
        cls, question_id: str, split: str, family: str, scene: dict[str, Any], question: Question
    ) -> WorldItem:
        """The item for ``question`` about ``scene``, with the gold rationales its facts give."""
        return cls(
            question_id=question_id,
            split=split,
            question=question.question,
            answer=question.answer,
            family=family,
            scene=scene,
            facts=question.facts,
            rationales=tuple(gold_rationales(scene, family, question.facts)),
        )

    @property
    def image_name(self) -> str:
        return f"{self.question_id}.png"

    def to_vqax(self, image_dir: str | Path) -> VQAXItem:
        """As a VQA-X item; the scene graph, family and facts travel as extras."""
        return VQAXItem(
            question_id=self.question_id,
            question=self.question,
            answers=(self.answer,),
            explanations=self.rationales,
            image_name=self.image_name,
            image_path=Path(image_dir) / self.image_name,
            image_id=self.question_id,
            extra={"scene": self.scene, "family": self.family, "facts": self.facts, **self.extra},
        )


def _item_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"illume-world/{seed}/{split}/{index}/{attempt}")


def generate_split(
    split: str,
    size: int,
    seed: int = 0,
    config: WorldConfig = WorldConfig(),
    used_scenes: set[tuple] | None = None,
) -> list[WorldItem]:
    """Draw ``size`` items of one split; scenes in ``used_scenes`` are avoided (and added to it)."""
    used = used_scenes if used_scenes is not None else set()
    items = []
    for index in range(size):
        family = FAMILIES[index % len(FAMILIES)]
        want = None
        if family in YES_NO_FAMILIES:
            want = "yes" if (index // len(FAMILIES)) % 2 == 0 else "no"
        for attempt in range(_MAX_ATTEMPTS):
            rng = _item_rng(seed, split, index, attempt)
            scene = sample_scene(rng, config)
            key = scene_key(scene)
            if key in used:
                continue
            question = ask(family, scene, rng, want)
            if question is None:
                continue
            used.add(key)
            items.append(WorldItem.asked(f"{split}-{index:06d}", split, family, scene, question))
            break
        else:
            raise RuntimeError(f"could not draw item {index} of {split} in {_MAX_ATTEMPTS} attempts")
    return items


def generate(
    sizes: Mapping[str, int], seed: int = 0, config: WorldConfig = WorldConfig()
) -> dict[str, list[WorldItem]]:
    """Draw every split (train, val, test order first; any other names after, sorted)."""
    used: set[tuple] = set()
    order = [s for s in SPLITS if s in sizes] + sorted(s for s in sizes if s not in SPLITS)
    return {split: generate_split(split, sizes[split], seed, config, used) for split in order}


def build_world(
    out_dir: str | Path,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    config: WorldConfig = WorldConfig(),
) -> dict[str, list[VQAXItem]]:
    """Generate the world and write it as VQA-X JSON plus PNG images; returns the written items."""
    sizes = dict(sizes or {"train": 2000, "val": 200, "test": 200})
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[VQAXItem]] = {}
    for split, items in generate(sizes, seed, config).items():
        for item in items:
            render_scene(item.scene, config).save(images / item.image_name, format="PNG")
        written[split] = [item.to_vqax(images) for item in items]
        save_vqax(written[split], out / f"{split}.json")
    meta = {
        "version": WORLD_VERSION,
        "seed": seed,
        "sizes": sizes,
        "config": asdict(config),
        "families": list(FAMILIES),
        "vocabulary": lexicon(),
    }
    (out / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return written
