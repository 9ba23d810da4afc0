"""illume simulate's annotator of the judging queue (illume/simulate.py, ``select``), against a
fake client: it logs traffic, judges only what NextItem hands it out of its own traffic (skipping
other clients' generations), and stops at its budget or when the queue is empty."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from illume.data import VQAXItem
from illume.errors import InvalidRequest
from illume.simulate import Simulator, WaitingForEvidence, item_seed, wrong_answer

GOLD = "the square is red because it is painted red"


class FakeClient:
    def __init__(self) -> None:
        self.generated: list[str] = []
        self.submitted: list[dict] = []
        self.selections: list[str] = []
        self.queue: list[str] | None = None
        self.seeds: list[int | None] = []

    def generate(self, image, question, answer, n, namespace, timeout, seed=None):
        gid = f"g{len(self.generated)}"
        self.generated.append(gid)
        self.seeds.append(seed)
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


class Refused(grpc.RpcError):
    """What the server's StartTuningRound raises for FAILED_PRECONDITION."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self) -> str:
        return self._details


class WaitingServer(FakeClient):
    """Refuses rounds until ``needed`` generations were judged, as the gate's evidence rule does."""

    def __init__(self, needed: int) -> None:
        super().__init__()
        self.needed = needed
        self.starts = 0

    def start_round(self, namespace, force, timeout):
        self.starts += 1
        judged = len(self.submitted)
        if judged < self.needed:
            raise Refused(f"waiting for held-out evidence: {judged // 5} of 10 items (min_items)")
        return SimpleNamespace(round_id=f"r{self.starts}")

    def get_round(self, round_id, timeout):
        return SimpleNamespace(
            state="promoted", reason="", rationale_rows=1, answer_rows=10, scores_json="{}", adapter_version=1
        )

    def generate(
        self, image, question, answer, n, namespace, timeout, seed=None, adapter="", ephemeral=False
    ):
        reply = super().generate(image, question, answer, n, namespace, timeout)
        reply.answer = "red"
        return reply


def test_a_round_waiting_for_held_out_evidence_gets_more_judgements_not_a_hang(tmp_path):
    client = WaitingServer(needed=5)
    lines: list[str] = []
    simulator = Simulator(client, critic="rouge_l", n=2, concurrency=1, log=lines.append)
    rows = simulator.run(items(tmp_path, 12), items(tmp_path, 1), rounds=2, pool_per_round=2)
    # Round 1 judged three batches of two before the server had enough evidence; round 2 one.
    assert [row.feedback for row in rows[1:]] == [6, 2]
    assert client.starts == 4
    assert sum("waiting for held-out evidence" in line for line in lines) == 2


def test_a_round_that_can_never_get_evidence_stops_when_the_pool_runs_out(tmp_path):
    simulator = Simulator(WaitingServer(needed=100), critic="rouge_l", n=2, concurrency=1, log=lambda _: None)
    with pytest.raises(WaitingForEvidence):
        simulator.run(items(tmp_path, 4), items(tmp_path, 1), rounds=1, pool_per_round=2)


def test_judging_requests_carry_a_seed_per_item_so_a_rerun_samples_the_same_candidates(tmp_path):
    batch = items(tmp_path, 4)
    seeded = [FakeClient(), FakeClient()]
    for client in seeded:
        Simulator(
            client, critic="rouge_l", n=2, concurrency=1, sampling_seed=3, log=lambda _: None
        ).feedback_round(batch, 1)
    first, again = sorted(seeded[0].seeds), sorted(seeded[1].seeds)
    assert first == again and len(set(first)) == 4  # the same per item, different between items
    assert all(0 <= seed < 2**63 for seed in first)
    assert item_seed(3, "0") in first and item_seed(4, "0") not in first
    unseeded = FakeClient()
    Simulator(unseeded, critic="rouge_l", n=2, concurrency=1, log=lambda _: None).feedback_round(batch, 1)
    assert unseeded.seeds == [None] * 4  # the server chooses


@pytest.mark.parametrize(("mislabel", "wrong"), [("one", ["c1"]), ("inverted", ["c1", "c2"])])
def test_the_gate_drill_mislabels_what_the_server_trains_on_and_judges_held_out_honestly(
    tmp_path, mislabel, wrong
):
    client = FakeClient()
    original = client.generate

    def generate(*args, **kwargs):  # every other generation is held out by the server
        reply = original(*args, **kwargs)
        gid = reply.generation_id
        reply.candidates.append(SimpleNamespace(candidate_id=f"{gid}-c2", text="two dogs run on grass"))
        reply.held_out = len(client.generated) % 2 == 0
        return reply

    client.generate = generate
    simulator = Simulator(client, critic="rouge_l", n=3, concurrency=1, mislabel=mislabel, log=lambda _: None)
    simulator.feedback_round(items(tmp_path, 4), round_index=1)
    fitting = {v["generation_id"]: v["fitting"] for v in client.submitted}
    # Training split (g0, g2): the candidates the critic rejects; held out (g1, g3): the gold one.
    assert fitting == {
        "g0": [f"g0-{c}" for c in wrong],
        "g1": ["g1-c0"],
        "g2": [f"g2-{c}" for c in wrong],
        "g3": ["g3-c0"],
    }
    assert not any(v["none_fit"] for v in client.submitted)


def test_an_unknown_drill_is_refused():
    with pytest.raises(InvalidRequest, match="mislabel is one of"):
        Simulator(FakeClient(), mislabel="all")
    with pytest.raises(InvalidRequest, match="not with select"):
        Simulator(FakeClient(), mislabel="wrong-answer", select="active")


def _asked(question: str, answer: str, family: str, k: int = 0, image: Path = Path("red.png")) -> VQAXItem:
    extra = {"family": family}
    return VQAXItem(f"q{k}-{answer}", question, (answer,), (GOLD,), image.name, image, extra=extra)


def test_a_wrong_answer_is_the_commonest_other_answer_to_the_same_kind_of_question():
    item = _asked("what colour is the square?", "red", "attribute")
    pool = [
        item,
        _asked("what colour is the circle?", "blue", "attribute", 1),
        _asked("what colour is the star?", "green", "attribute", 2),
        _asked("what colour is the disc?", "green", "attribute", 3),
        _asked("what shape is the red thing?", "circle", "attribute", 4),
        _asked("what colour is the sky?", "yellow", "existence", 5),
    ]
    assert wrong_answer(item, pool) == "green"
    shape = _asked("what shape is the blue thing?", "square", "attribute")
    assert wrong_answer(shape, pool) == "circle"
    alone = _asked("is there a square?", "yes", "existence")
    assert wrong_answer(alone, pool) == "yellow"  # no question alike: the family's
    with pytest.raises(ValueError, match="no wrong answer"):
        wrong_answer(_asked("how many?", "2", "count"), pool)


def test_the_wrong_answer_drill_asks_again_with_a_wrong_answer_and_marks_every_candidate(tmp_path):
    client = FakeClient()
    original = client.generate
    asked: list[str] = []

    def generate(image, question, answer, **kwargs):
        asked.append(answer)
        reply = original(image, question, answer, **kwargs)
        reply.held_out = False
        return reply

    client.generate = generate
    simulator = Simulator(
        client, critic="rouge_l", n=2, concurrency=1, mislabel="wrong-answer", log=lambda _: None
    )
    image = tmp_path / "red.png"
    image.write_bytes(b"not decoded here")
    square = _asked("what colour is the square?", "red", "attribute", image=image)
    simulator.answer_pool = [square, _asked("what colour is the circle?", "blue", "attribute", 1)]
    simulator.feedback_round([square], round_index=1)
    assert asked == ["red", "blue"]  # the first generation is left unjudged
    (judged,) = client.submitted
    assert judged["generation_id"] == "g1" and judged["fitting"] == ["g1-c0", "g1-c1"]
    assert judged["answer_correct"]
