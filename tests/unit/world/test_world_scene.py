"""Scenes: rendering puts each object in its cell, relations follow the grid."""

from __future__ import annotations

import random

from illume.world import object_features, render_scene, sample_scene
from illume.world.vocab import BACKGROUND_RGB, COLOUR_RGB
from tests.unit.world import world_oracle


def test_each_object_is_drawn_centred_in_its_cell() -> None:
    rng = random.Random(0)
    for _ in range(50):
        scene = sample_scene(rng)
        image = render_scene(scene)
        occupied = {(o["row"], o["col"]) for o in scene["objects"]}
        for obj in scene["objects"]:
            assert image.getpixel((obj["x"], obj["y"])) == COLOUR_RGB[obj["colour"]]
        for row in range(4):
            for col in range(4):
                if (row, col) not in occupied:
                    cell = image.crop((col * 16, row * 16, col * 16 + 16, row * 16 + 16))
                    assert set(cell.getdata()) == {BACKGROUND_RGB}


def test_large_objects_cover_more_pixels_than_small() -> None:
    def drawn(size: str, shape: str) -> int:
        obj = {"id": "o0", "shape": shape, "colour": "red", "size": size, "row": 0, "col": 0}
        image = render_scene({"image_size": 64, "grid": 4, "objects": [obj]})
        return sum(1 for p in image.getdata() if p != BACKGROUND_RGB)

    for shape in ("circle", "square", "triangle", "diamond"):
        assert drawn("large", shape) > 2 * drawn("small", shape), shape


def test_relations_match_an_independent_reading() -> None:
    rng = random.Random(1)
    names = {"left_of": "left", "right_of": "right", "above": "above", "below": "below"}
    for _ in range(50):
        scene = sample_scene(rng)
        table = object_features(scene)
        for a in scene["objects"]:
            for b in scene["objects"]:
                for rel, name in names.items():
                    assert ((rel, b["id"]) in table[a["id"]]) == world_oracle.in_relation(a, b, name)
