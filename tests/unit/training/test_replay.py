"""The replay pool: read from a VQA-X file, images resolved from disk, the rest from the store."""

from __future__ import annotations

from PIL import Image

from illume.training.replay import replay_pool_from_vqax, with_file_images
from illume.world import build_world


def test_a_world_file_becomes_replay_items_whose_images_load_from_disk(tmp_path):
    written = build_world(tmp_path / "w", {"train": 12, "val": 0, "test": 0}, seed=3)["train"]
    pool = replay_pool_from_vqax(tmp_path / "w" / "train.json")
    assert [(p.item_id, p.question, p.answer) for p in pool] == [
        (w.question_id, w.question, w.answer) for w in written
    ]
    store_refs: list[str] = []

    def from_store(ref: str) -> Image.Image:
        store_refs.append(ref)
        return Image.new("RGB", (2, 2))

    load = with_file_images(from_store)
    image = load(pool[0].image)
    expected = Image.open(written[0].image_path).convert("RGB")
    assert image.size == expected.size and image.tobytes() == expected.tobytes()
    assert store_refs == []
    load("ab" * 32)  # an image sha256 goes to the store's loader
    assert store_refs == ["ab" * 32]
