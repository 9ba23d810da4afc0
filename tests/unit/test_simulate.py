"""illume simulate's annotator of the judging queue (illume/simulate.py, ``select``), against a
fake client: it logs traffic, judges only what NextItem hands it out of its own traffic (skipping
other clients' generations), and stops at its budget or when the queue is empty."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from illume.data import VQAXItem
from illume.simulate import Simulator

GOLD = "the square is red because it is painted red"


class FakeClient:
    def __init__(self) -> None:
        self.generated: list[str] = []
        self.submitted: list[dict] = []
        self.selections: list[str] = []
        self.queue: list[str] | None = None

    def generate(self, image, question, answer, n, namespace, timeout):
        gid = f"g{len(self.generated)}"
        self.generated.append(gid)
        candidates = [SimpleNamespace(candidate_id=f"{gid}-c0", text=GOLD)]
        candidates.append(SimpleNamespace(candidate_id=f"{gid}-c1", text="a cat sits on a mat"))
        return SimpleNamespace(generation_id=gid, candidates=candidates)

    def next_item(self, namespace, selection, timeout):
        self.selections.append(selection)
        if self.queue is None:  # another client's generation first, then ours newest first
            self.queue = ["foreign", *reversed(self.generated)]
        if not self.queue:
            return SimpleNamespace(has_item=False)
        gid = self.queue.pop(0)
        candidates = [SimpleNamespace(candidate_id=f"{gid}-c0", text=GOLD)]
        return SimpleNamespace(
            has_item=True, generation=SimpleNamespace(generation_id=gid, candidates=candidates)
        )

    def submit_feedback(self, generation_id, **kwargs):
        self.submitted.append({"generation_id": generation_id, **kwargs})


def items(tmp_path: Path, count: int) -> list[VQAXItem]:
    image = tmp_path / "red.png"
    image.write_bytes(b"not decoded here")
    return [
        VQAXItem(str(k), f"what colour is square {k}?", ("red",), (GOLD,), "red.png", image)
        for k in range(count)
    ]


def test_the_queue_annotator_judges_its_own_traffic_up_to_its_budget(tmp_path):
    client = FakeClient()
    simulator = Simulator(client, critic="rouge_l", n=2, select="active", concurrency=1, log=lambda _: None)
    simulator.log_traffic(items(tmp_path, 4))
    judged, accepted = simulator.judge_from_queue(budget=2, round_index=1)
    assert (judged, accepted) == (2, 2)
    assert client.selections == ["active"] * 3
    skipped, *verdicts = client.submitted
    assert skipped["generation_id"] == "foreign" and skipped["skipped"]
    assert [v["generation_id"] for v in verdicts] == ["g3", "g2"]
    assert all(v["fitting"] == [f"{v['generation_id']}-c0"] for v in verdicts)


def test_the_queue_annotator_stops_when_nothing_is_left(tmp_path):
    client = FakeClient()
    simulator = Simulator(client, critic="rouge_l", n=2, select="random", concurrency=1, log=lambda _: None)
    simulator.log_traffic(items(tmp_path, 2))
    assert simulator.judge_from_queue(budget=10, round_index=1) == (2, 2)
    assert client.selections[-1] == "random" and len(client.selections) == 4  # foreign, g1, g0, empty
