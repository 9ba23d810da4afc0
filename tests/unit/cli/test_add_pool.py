"""``illume client add-pool``: a VQA-X file or directory uploaded to the judging pool in batches."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from illume.cli import client as cli
from illume.world import build_world


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[list, str]] = []
        self.seen: set[tuple[bytes, str]] = set()

    def add_pool_items(self, items, namespace, timeout):
        self.calls.append((items, namespace))
        new = [i for i in items if (i[0], i[1]) not in self.seen]
        self.seen |= {(i[0], i[1]) for i in items}
        return SimpleNamespace(added=len(new), already_present=len(items) - len(new), pending=len(self.seen))


def args(path, **more) -> argparse.Namespace:
    defaults = {
        "vqax": str(path),
        "image_dir": None,
        "limit": 0,
        "no_answer": False,
        "namespace": "ns",
        "timeout": 5,
    }
    return argparse.Namespace(**{**defaults, **more})


def test_a_vqax_directory_goes_up_in_batches_with_its_answers(tmp_path, capsys, monkeypatch):
    world = tmp_path / "world"
    build_world(world, {"train": 150, "val": 30, "test": 0}, seed=3)
    monkeypatch.setattr(cli, "POOL_BATCH", 64)
    fake = FakeClient()
    assert cli._add_pool(fake, args(world)) == 0
    sizes = [len(items) for items, _ in fake.calls]
    assert sum(sizes) == 180 and max(sizes) == 64 and {ns for _, ns in fake.calls} == {"ns"}
    image, question, answer = fake.calls[0][0][0]
    assert image[:4] == b"\x89PNG" and question.endswith("?") and answer
    assert "added 180, already present 0; 180 pool items wait" in capsys.readouterr().out


def test_one_file_a_limit_and_no_answers(tmp_path, capsys):
    world = tmp_path / "world"
    build_world(world, {"train": 20, "val": 0, "test": 0}, seed=4)
    fake = FakeClient()
    cli._add_pool(fake, args(world / "train.json", limit=5, no_answer=True))
    cli._add_pool(fake, args(world / "train.json", limit=5, no_answer=True))
    (first, _), (second, _) = fake.calls
    assert len(first) == 5 and all(answer == "" for _, _, answer in first) and first == second
    assert "added 0, already present 5" in capsys.readouterr().out.splitlines()[-1]
