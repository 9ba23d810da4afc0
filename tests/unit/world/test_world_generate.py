"""The generator: determinism, disjoint splits, unique references, correct answers, balance."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from illume.data import load_vqax
from illume.world import FAMILIES, WorldConfig, build_world, generate, render_scene, scene_key, world_texts
from illume.world.__main__ import main as world_main
from illume.world.grammar import derive_requirements
from illume.world.vocab import lexicon
from tests.unit.world import world_oracle

SIZES = {"train": 60, "val": 20, "test": 20}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    build_world(tmp_path / "a", SIZES, seed=11)
    build_world(tmp_path / "b", SIZES, seed=11)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) == sum(SIZES.values()) + 4  # images + three splits + world.json
    assert a == b


def test_different_seeds_differ() -> None:
    a = generate(SIZES, seed=1)
    b = generate(SIZES, seed=2)
    keys_a = {scene_key(i.scene) for s in a.values() for i in s}
    keys_b = {scene_key(i.scene) for s in b.values() for i in s}
    assert len(keys_a & keys_b) < 5
    assert [i.question for i in a["train"]] != [i.question for i in b["train"]]


def test_splits_are_disjoint(world) -> None:
    seen: dict[tuple, str] = {}
    images: dict[str, str] = {}
    for split, items in world.items():
        for item in items:
            key = scene_key(item.scene)
            assert key not in seen, f"{item.question_id} repeats a scene of {seen.get(key)}"
            seen[key] = split
            digest = hashlib.sha256(render_scene(item.scene).tobytes()).hexdigest()
            assert digest not in images, f"{item.question_id} repeats the image of {images.get(digest)}"
            images[digest] = item.question_id
    assert {i.question_id for s in world.values() for i in s} == {
        f"{split}-{n:06d}" for split, items in world.items() for n in range(len(items))
    }


def test_scenes_are_well_formed(items) -> None:
    for item in items:
        objs = item.scene["objects"]
        assert 1 <= len(objs) <= 6
        cells = [(o["row"], o["col"]) for o in objs]
        assert len(set(cells)) == len(cells), "one object per cell"
        assert all(0 <= r < 4 and 0 <= c < 4 for r, c in cells)
        assert [o["id"] for o in objs] == [f"o{i}" for i in range(len(objs))]


def test_answers_recomputed_from_the_scene(items) -> None:
    """An independent regex reader checks every answer and that every 'the X' is unique."""
    for item in items:
        assert world_oracle.answer(item.scene, item.question) == item.answer, item.question


def test_stored_facts_match_the_critics_derivation(items) -> None:
    for item in items:
        stored = [{k: v for k, v in f.items() if k != "landmark"} for f in item.facts]
        assert derive_requirements(item.question, item.answer, item.scene) == stored, item.question


def test_families_and_yes_no_are_balanced(items) -> None:
    families = Counter(i.family for i in items)
    assert set(families) == set(FAMILIES)
    assert max(families.values()) - min(families.values()) <= len(FAMILIES)
    for family in ("existence", "comparison"):
        answers = Counter(i.answer for i in items if i.family == family)
        assert set(answers) == {"yes", "no"}
        assert abs(answers["yes"] - answers["no"]) <= 1, (family, answers)


def test_answers_are_single_words(items) -> None:
    for item in items:
        assert item.answer and " " not in item.answer
        assert item.question.endswith("?") and item.question == item.question.lower()


def test_gold_rationales_style(items) -> None:
    vocabulary = set(lexicon())
    for item in items:
        assert len(item.rationales) >= 4, item.question
        assert len(set(item.rationales)) == len(item.rationales)
        for r in item.rationales:
            assert r == r.lower().strip() and not r.endswith("."), r
            assert set(r.split()) <= vocabulary, r


def test_export_loads_through_vqax(tmp_path: Path) -> None:
    written = build_world(tmp_path, SIZES, seed=3)
    for split, size in SIZES.items():
        loaded = load_vqax(tmp_path / f"{split}.json")
        assert len(loaded) == size
        by_id = {i.question_id: i for i in written[split]}
        for item in loaded:
            assert item.image_path.is_file()
            assert set(item.extra) >= {"scene", "family", "facts"}
            assert item.explanations == by_id[item.question_id].explanations
            assert item.answer == by_id[item.question_id].answer
    from PIL import Image

    with Image.open(loaded[0].image_path) as image:
        assert image.size == (64, 64)


def test_module_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world_main(["--out", str(tmp_path), "--train", "5", "--val", "2", "--test", "2", "--seed", "4"])
    assert "train=5" in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.png"))) == 9


def test_config_is_respected() -> None:
    config = WorldConfig(image_size=96, grid=3, max_objects=4)
    items = generate({"train": 30}, seed=0, config=config)["train"]
    for item in items:
        assert item.scene["grid"] == 3 and len(item.scene["objects"]) <= 4
        assert render_scene(item.scene).size == (96, 96)
    with pytest.raises(ValueError):
        WorldConfig(image_size=65, grid=4)


def test_world_texts_cover_everything(world) -> None:
    items = world["val"][:20]
    texts = list(world_texts(items, distractors=2))
    for item in items:
        assert item.question in texts and item.answer in texts
        assert set(item.rationales) <= set(texts)
    vocabulary = set(lexicon())
    words = {w for t in texts for w in t.replace("?", " ?").split()}
    assert words <= vocabulary, words - vocabulary


def test_generation_is_fast() -> None:
    import time

    start = time.perf_counter()
    generate({"train": 1000}, seed=5)
    assert time.perf_counter() - start < 5
