"""Scene graphs of the synthetic world: sampling, features, relations and rendering.

Contract: a scene graph is a JSON-able dict ``{"image_size", "grid", "objects": [...]}``; each
object is ``{"id", "shape", "colour", "size", "row", "col", "x", "y"}`` with one object per grid
cell, ids ``o0..`` in reading order (row, then column). The same scene always renders to the same
pixels. Spatial relations are grid relations: ``a`` is *left of* ``b`` when both sit in the same
row and ``a``'s column is smaller; *above* when both sit in the same column and ``a``'s row is
smaller. The grammar, the generator and the tests all use ``object_features`` so they share this
one definition.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw

from illume.world.vocab import BACKGROUND_RGB, COLOUR_RGB, COLOURS, SHAPES, SIZES

Scene = dict[str, Any]
Feature = tuple[str, str]


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world; the defaults give 64x64 images on a 4x4 grid of 16 px cells."""

    image_size: int = 64
    grid: int = 4
    min_objects: int = 1
    max_objects: int = 6
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    # Weights of 1..max objects: few single-object scenes (little to ask, and only 640 exist).
    count_weights: tuple[float, ...] = (0.05, 0.13, 0.2, 0.22, 0.21, 0.19)

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError("image_size must be a multiple of grid")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid*grid")
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS))
        if unknown or set(self.sizes) - set(SIZES):
            raise ValueError(f"values outside the world's vocabulary: {sorted(unknown)}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid


def sample_scene(rng: random.Random, config: WorldConfig = WorldConfig()) -> Scene:
    """Draw a scene: a number of objects, distinct cells, independent attributes."""
    counts = list(range(config.min_objects, config.max_objects + 1))
    weights = [config.count_weights[n - 1] if n - 1 < len(config.count_weights) else 0.1 for n in counts]
    n = rng.choices(counts, weights=weights)[0]
    cells = rng.sample(range(config.grid * config.grid), n)
    raw = []
    for cell in cells:
        row, col = divmod(cell, config.grid)
        raw.append(
            (row, col, rng.choice(config.shapes), rng.choice(config.colours), rng.choice(config.sizes))
        )
    raw.sort()
    objects = []
    for i, (row, col, shape, colour, size) in enumerate(raw):
        objects.append(
            {
                "id": f"o{i}",
                "shape": shape,
                "colour": colour,
                "size": size,
                "row": row,
                "col": col,
                "x": col * config.cell + config.cell // 2,
                "y": row * config.cell + config.cell // 2,
            }
        )
    return {"image_size": config.image_size, "grid": config.grid, "objects": objects}


def scene_key(scene: Mapping[str, Any]) -> tuple:
    """A hashable identity of a scene: two scenes with one key render to the same image."""
    objs = tuple(sorted((o["row"], o["col"], o["shape"], o["colour"], o["size"]) for o in scene["objects"]))
    return (scene.get("image_size"), scene.get("grid"), objs)


def related(a: Mapping[str, Any], b: Mapping[str, Any], relation: str) -> bool:
    """Whether ``a`` stands in ``relation`` to ``b`` on the grid (see the module docstring)."""
    if a["id"] == b["id"]:
        return False
    if relation == "left_of":
        return a["row"] == b["row"] and a["col"] < b["col"]
    if relation == "right_of":
        return a["row"] == b["row"] and a["col"] > b["col"]
    if relation == "above":
        return a["col"] == b["col"] and a["row"] < b["row"]
    if relation == "below":
        return a["col"] == b["col"] and a["row"] > b["row"]
    raise ValueError(f"unknown relation {relation!r}")


def object_features(scene: Mapping[str, Any]) -> dict[str, frozenset[Feature]]:
    """Every feature each object has: its attributes and ``(relation, other_id)`` pairs.

    The table is cached per scene content and shared: read it, never mutate it.
    """
    objs = tuple((o["id"], o["row"], o["col"], o["shape"], o["colour"], o["size"]) for o in scene["objects"])
    return _features(objs)


@lru_cache(maxsize=4096)
def _features(objs: tuple[tuple[str, int, int, str, str, str], ...]) -> dict[str, frozenset[Feature]]:
    # Cached: the critic and the generator ask about the same few scenes over and over.
    out: dict[str, frozenset[Feature]] = {}
    for ida, ra, ca, shape, colour, size in objs:
        feats: set[Feature] = {("shape", shape), ("colour", colour), ("size", size)}
        for idb, rb, cb, *_ in objs:
            if ida == idb:
                continue
            if ra == rb:
                feats.add(("left_of" if ca < cb else "right_of", idb))
            if ca == cb:
                feats.add(("above" if ra < rb else "below", idb))
        out[ida] = frozenset(feats)
    return out


def matching(scene: Mapping[str, Any], features: Iterable[Feature]) -> list[dict[str, Any]]:
    """Objects that have all the given features."""
    wanted = set(features)
    table = object_features(scene)
    return [o for o in scene["objects"] if wanted <= table[o["id"]]]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> Sequence[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(shape)


def render_scene(scene: Mapping[str, Any], config: WorldConfig | None = None) -> Image.Image:
    """Draw a scene with Pillow: light background, each object centred in its cell."""
    size = int(scene.get("image_size", config.image_size if config else 64))
    grid = int(scene.get("grid", config.grid if config else 4))
    cell = size / grid
    image = Image.new("RGB", (size, size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        cx = obj["col"] * cell + cell / 2 - 0.5
        cy = obj["row"] * cell + cell / 2 - 0.5
        # Large fills most of the cell; small about half of it, so size is visible at 16 px.
        r = cell * (0.42 if obj["size"] == "large" else 0.24)
        fill = COLOUR_RGB[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            s = r * 0.88  # a square of the same "radius" looks bigger than a circle; shrink it
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(list(_shape_points(obj["shape"], cx, cy, r)), fill=fill)
    return image
