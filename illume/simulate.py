"""``illume simulate``: a simulated critic plays the human through the public gRPC API.

For each round it asks the running server for candidates on a pool of train items of the default
model's synthetic world (with their gold answers, as ILLUME's clients do), judges every candidate
with a critic (the fact critic, or the paper's ROUGE-L critic against the gold rationales),
submits the judgements with SubmitFeedback, asks for a tuning round (StartTuningRound) and waits
for it (while the server refuses for want of held-out evidence, it judges the next batch of train
items and asks again, as a live server's annotators would keep judging), then measures the
production adapter on val items under the fact critic. It prints one table row per round. Like
``illume.client`` it talks only to the wire API.

With ``select`` ("active" or "random") it plays an annotator of the judging queue instead of
judging everything it generated: each round it sends ``traffic`` times as many generations as it
judges (client traffic, logged), then takes ``pool_per_round`` items from NextItem with that
selection and judges those. The judgement count is the same either way, so the rounds' results
compare what the queue's choice of items is worth.

With ``mislabel`` it is a drill for the gate: on every generation the server trains on (not held
out) it marks none of the candidates its critic accepts and, as fitting, the first one it rejects
(``"one"``: a careless annotator) or every one it rejects (``"inverted"``: an adversary); or
(``"wrong-answer"``) it asks again for the item with a wrong answer (another answer to the same
kind of question in the pool, ``wrong_answer``) and marks every candidate of that generation
fitting, leaving the first unjudged. Held-out generations are judged honestly. So the round
trains on wrong rationales and the served gate decides on an honest held-out split (docs/STUDY.md,
"The gate drill").

Judging requests carry a sampling seed derived from ``sampling_seed`` and the item's question id
(``item_seed``), so the same command against the same server samples the same candidates; with
``sampling_seed`` None the server chooses one per request, as before.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illume.adapters import PRODUCTION
from illume.critics import FactCritic, critic_input, make_critic
from illume.data import VQAXItem
from illume.errors import InvalidRequest
from illume.evaluation.metrics import answer_accuracy
from illume.seeds import derived_seed

TERMINAL = {"promoted", "rejected", "failed"}
# How the gate drill judges the training split ("": honestly; see the module docstring).
MISLABEL = ("", "one", "inverted", "wrong-answer")
# The controller's refusal while the gate's held-out split is short (illume.evaluation.gate).
EVIDENCE_WAIT = "waiting for held-out evidence"


class WaitingForEvidence(Exception):
    """The server will not start a round until more judged generations are held out."""


@dataclass
class RoundRow:
    """One printed row."""

    round: int
    feedback: int = 0
    accepted: int = 0
    rationale_rows: int = 0
    answer_rows: int = 0
    state: str = ""
    reason: str = ""
    adapter: str = "base"
    val_accept_candidate: float = 0.0
    val_accept_question: float = 0.0
    val_answer_accuracy: float = 0.0
    held_out: dict[str, Any] = field(default_factory=dict)


def _image_bytes(item: VQAXItem) -> bytes:
    return Path(item.image_path).read_bytes()


def check_drill(mislabel: str, select: str) -> None:
    """Raise ``InvalidRequest`` (one line) for a drill that cannot run as asked."""
    if mislabel not in MISLABEL:
        raise InvalidRequest(f"mislabel is one of {sorted(MISLABEL)}, not {mislabel!r}")
    if mislabel == "wrong-answer" and select:
        raise InvalidRequest("the wrong-answer drill asks again for each item it judges: not with select")


def wrong_answer(item: VQAXItem, pool: list[VQAXItem]) -> str:
    """A wrong answer to ``item``'s question: the commonest answer in ``pool`` to a question of the
    same family and first three words that is none of the item's answers (then of the family
    alone); raises when the pool has none."""
    family = item.extra.get("family")
    stem = item.question.split()[:3]
    for same in (lambda o: o.question.split()[:3] == stem, lambda o: True):
        answers = Counter(
            other.answer
            for other in pool
            if other.extra.get("family") == family and same(other) and other.answer not in item.answers
        )
        if answers:
            return answers.most_common(1)[0][0]
    raise ValueError(f"no wrong answer for {item.question_id!r} in a pool of {len(pool)} items")


def item_seed(sampling_seed: int | None, question_id: str) -> int | None:
    """The sampling seed of the judging request for ``question_id`` (None: the server's choice)."""
    return None if sampling_seed is None else derived_seed("illume-simulate", sampling_seed, question_id)


class Simulator:
    """Drives rounds against a server (``client`` is an ``illume.client.IllumeClient`` with admin rights)."""

    def __init__(
        self,
        client: Any,
        critic: str = "fact",
        n: int = 10,
        concurrency: int = 8,
        namespace: str = "",
        log: Callable[[str], None] = print,
        select: str = "",
        traffic: int = 3,
        sampling_seed: int | None = None,
        mislabel: str = "",
    ) -> None:
        check_drill(mislabel, select)
        self.client = client
        self.mislabel = mislabel
        self.sampling_seed = sampling_seed
        self.critic = make_critic(critic)
        self.fact = FactCritic()
        self.n = n
        self.concurrency = concurrency
        self.namespace = namespace
        self.log = log
        self.select = select
        self.traffic = traffic
        self.generated: dict[str, VQAXItem] = {}  # generation id -> the item it was generated for
        self.answer_pool: list[VQAXItem] = []  # where the wrong-answer drill finds wrong answers

    def _generate_for(self, item: VQAXItem, answer: str | None = None) -> Any:
        """Candidates for ``item`` with its gold answer, or ``answer`` (logged by the server)."""
        return self.client.generate(
            _image_bytes(item),
            item.question,
            answer or item.answer,
            n=self.n,
            seed=item_seed(self.sampling_seed, item.question_id),
            namespace=self.namespace,
            timeout=600,
        )

    def feedback_round(self, items: list[VQAXItem], round_index: int) -> tuple[int, int]:
        """Generate for ``items``, judge, submit; returns (feedback submitted, accepted candidates)."""

        def one(item: VQAXItem) -> tuple[int, int]:
            generation = self._generate_for(item)
            if self.mislabel == "wrong-answer" and not generation.held_out:
                wrong = self._generate_for(item, wrong_answer(item, self.answer_pool))
                return 1, self._submit(wrong, [c.candidate_id for c in wrong.candidates], round_index)
            return 1, self._judge(generation, item, round_index)

        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(one, items))
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def _judge(self, generation: Any, item: VQAXItem, round_index: int) -> int:
        """Judge a generation's candidates with the critic and submit; returns the fitting count."""
        verdicts = self.critic.judge_all([c.text for c in generation.candidates], critic_input(item))
        honest = not self.mislabel or generation.held_out
        fitting = [
            c.candidate_id
            for c, v in zip(generation.candidates, verdicts, strict=True)
            if v.accepted == honest
        ]
        if self.mislabel == "one" and not honest:
            fitting = fitting[:1]
        return self._submit(generation, fitting, round_index)

    def _submit(self, generation: Any, fitting: list[str], round_index: int) -> int:
        """Submit ``fitting`` (none fit when empty) with the answer judged right; the fitting count."""
        self.client.submit_feedback(
            generation.generation_id,
            fitting=fitting,
            none_fit=not fitting,
            answer_correct=True,
            idempotency_key=f"sim-{round_index}-{generation.generation_id}",
            namespace=self.namespace,
        )
        return len(fitting)

    def log_traffic(self, items: list[VQAXItem]) -> None:
        """Generate for ``items`` as client traffic (logged, not judged here)."""

        def one(item: VQAXItem) -> None:
            self.generated[self._generate_for(item).generation_id] = item

        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(one, items))

    def judge_from_queue(self, budget: int, round_index: int) -> tuple[int, int]:
        """Judge up to ``budget`` items the queue hands out (``select``); (judged, accepted)."""
        judged = accepted = 0
        while judged < budget:
            handed = self.client.next_item(self.namespace, selection=self.select, timeout=600)
            if not handed.has_item:
                break
            item = self.generated.get(handed.generation.generation_id)
            if item is None:  # another client's generation: not ours to judge
                self.client.submit_feedback(
                    handed.generation.generation_id,
                    skipped=True,
                    idempotency_key=f"sim-skip-{handed.generation.generation_id}",
                    namespace=self.namespace,
                )
                continue
            accepted += self._judge(handed.generation, item, round_index)
            judged += 1
        return judged, accepted

    def _wait(self, round_id: str, deadline: float) -> Any:
        record = self.client.get_round(round_id, timeout=30)
        while record.state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(2)
            record = self.client.get_round(round_id, timeout=30)
        return record

    def run_tuning_round(self, timeout_s: float = 3600) -> Any:
        """Start a round on everything submitted so far and wait for it.

        The server's controller may have started one by itself while feedback arrived; then that
        round is awaited and a new one started, so the round measured saw all the feedback.
        Raises ``WaitingForEvidence`` when the server refuses for want of held-out evidence: only
        more judgements help then, and waiting would not."""
        import grpc

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                started = self.client.start_round(self.namespace, force=True, timeout=60)
                return self._wait(started.round_id, deadline)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                    raise
                if EVIDENCE_WAIT in (exc.details() or ""):
                    raise WaitingForEvidence(exc.details()) from exc
                active = self.client.list_rounds(self.namespace, page_size=1, timeout=30).rounds
                if active and active[0].state not in TERMINAL:
                    self._wait(active[0].round_id, deadline)
                else:
                    time.sleep(2)

    def measure(self, items: list[VQAXItem], adapter: str = "") -> tuple[float, float, float]:
        """Val acceptance under the fact critic (per candidate, per question) and answer accuracy."""

        def one(item: VQAXItem) -> tuple[list[bool], str]:
            reply = self.client.generate(
                _image_bytes(item),
                item.question,
                None,
                n=self.n,
                seed=7,
                adapter=adapter,
                namespace=self.namespace,
                ephemeral=True,
                timeout=600,
            )
            ctx = critic_input(item)
            rationale_reply = self.client.generate(
                _image_bytes(item),
                item.question,
                item.answer,
                n=self.n,
                seed=7,
                adapter=adapter,
                namespace=self.namespace,
                ephemeral=True,
                timeout=600,
            )
            verdicts = [
                v.accepted for v in self.fact.judge_all([c.text for c in rationale_reply.candidates], ctx)
            ]
            return verdicts, reply.answer

        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(one, items))
        flat = [v for verdicts, _ in results for v in verdicts]
        per_candidate = sum(flat) / len(flat) if flat else 0.0
        per_question = sum(any(v) for v, _ in results) / len(results) if results else 0.0
        accuracy = answer_accuracy(
            {str(i): answer for i, (_, answer) in enumerate(results)},
            {str(i): list(item.answers) for i, item in enumerate(items)},
        )
        return per_candidate, per_question, accuracy

    def _judge_batch(self, pool: list[VQAXItem], index: int, size: int, round_index: int) -> tuple[int, int]:
        """Judge the ``index``-th batch of ``size`` pool items (judged, accepted); with ``select``,
        log ``traffic`` times as many generations and judge what the queue hands out."""
        if self.select:
            per_batch = size * self.traffic
            self.log_traffic(pool[index * per_batch : (index + 1) * per_batch])
            return self.judge_from_queue(size, round_index)
        return self.feedback_round(pool[index * size : (index + 1) * size], round_index)

    def run(
        self, train: list[VQAXItem], val: list[VQAXItem], rounds: int, pool_per_round: int, seed: int = 0
    ) -> list[RoundRow]:
        """Play ``rounds`` rounds of ``pool_per_round`` judged train items each (more while the server
        waits for held-out evidence) and measure production on ``val`` after each."""
        rng = random.Random(seed)
        self.answer_pool = list(train)
        pool = list(train)
        rng.shuffle(pool)
        rows = [RoundRow(round=0)]
        rows[0].val_accept_candidate, rows[0].val_accept_question, rows[0].val_answer_accuracy = self.measure(
            val, adapter="base"
        )
        self.log(format_row(rows[0]))
        batches = iter(range(len(pool)))
        for r in range(1, rounds + 1):
            row = RoundRow(round=r)
            while True:
                feedback, accepted = self._judge_batch(pool, next(batches), pool_per_round, r)
                row.feedback, row.accepted = row.feedback + feedback, row.accepted + accepted
                try:
                    record = self.run_tuning_round()
                    break
                except WaitingForEvidence as wait:
                    # As on a live server: the round starts once enough judged items are held out.
                    self.log(f"round {r}: {wait}; judging {pool_per_round} more items")
                    if feedback == 0:
                        raise
            row.state, row.reason = record.state, record.reason
            row.rationale_rows, row.answer_rows = record.rationale_rows, record.answer_rows
            scores = json.loads(record.scores_json or "{}")
            row.held_out = scores.get("gate", {})
            row.adapter = f"rationale-v{record.adapter_version}" if record.state == "promoted" else PRODUCTION
            row.val_accept_candidate, row.val_accept_question, row.val_answer_accuracy = self.measure(val)
            rows.append(row)
            self.log(format_row(row))
        return rows


HEADER = (
    "round | feedback | accepted | rationale rows | answer rows | state | val accept/cand | "
    "val accept/question | val answer acc | held-out ROUGE-L cand/prod | reason"
)


def format_row(row: RoundRow) -> str:
    gate = row.held_out or {}
    cand = gate.get("candidate", {}).get("held_out", {})
    prod = gate.get(PRODUCTION, {}).get("held_out", {})
    held = f"{cand.get('ROUGE-L', float('nan')):.1f}/{prod.get('ROUGE-L', float('nan')):.1f}" if cand else "-"
    return (
        f"{row.round} | {row.feedback} | {row.accepted} | {row.rationale_rows} | {row.answer_rows} | "
        f"{row.state or '-'} | {100 * row.val_accept_candidate:.1f}% | "
        f"{100 * row.val_accept_question:.1f}% | {100 * row.val_answer_accuracy:.1f}% | {held} | {row.reason}"
    )
