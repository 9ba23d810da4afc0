"""SubmissionBatcher (services/servicers/feedback.py): concurrent SubmitFeedback writes of one
Ingress replica go to the FeedbackLog together, each caller getting its own result."""

from __future__ import annotations

import asyncio

import pytest

from illume.errors import NotFound
from services.servicers.feedback import SubmissionBatcher


class FakeLog:
    def __init__(self, delay: float = 0.01, fail_call: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.fail_call = fail_call

    async def send(self, submissions: list[str]) -> list:
        self.batches.append(list(submissions))
        await asyncio.sleep(self.delay)
        if self.fail_call == len(self.batches):
            raise ConnectionError("the FeedbackLog restarted")
        return [NotFound(f"no {s}") if s.startswith("missing") else f"receipt-{s}" for s in submissions]


def test_concurrent_writes_share_calls_and_each_gets_its_own_receipt():
    log = FakeLog()

    async def run() -> list:
        batcher = SubmissionBatcher(log.send, max_batch=8, max_in_flight=2)
        return await asyncio.gather(*(batcher.submit(f"s{k}") for k in range(20)))

    assert asyncio.run(run()) == [f"receipt-s{k}" for k in range(20)]
    assert sorted(s for b in log.batches for s in b) == sorted(f"s{k}" for k in range(20))
    assert len(log.batches) <= 5 and max(len(b) for b in log.batches) <= 8


def test_an_idle_batcher_sends_at_once():
    log = FakeLog(delay=0.0)

    async def run() -> str:
        batcher = SubmissionBatcher(log.send)
        return await asyncio.wait_for(batcher.submit("only"), timeout=1)

    assert asyncio.run(run()) == "receipt-only"
    assert log.batches == [["only"]]


def test_errors_reach_only_their_callers():
    log = FakeLog(fail_call=2)

    async def run() -> list:
        batcher = SubmissionBatcher(log.send, max_batch=4, max_in_flight=1)
        calls = [batcher.submit(name) for name in ("a", "missing-b", "c", "d", "e")]
        return await asyncio.gather(*calls, return_exceptions=True)

    a, missing, c, d, e = asyncio.run(run())
    assert log.batches == [["a", "missing-b", "c", "d"], ["e"]]
    assert (a, c, d) == ("receipt-a", "receipt-c", "receipt-d")
    assert isinstance(missing, NotFound)
    assert isinstance(e, ConnectionError)  # the second call failed whole: only its write fails


def test_a_failed_call_does_not_stall_later_writes():
    log = FakeLog(fail_call=1)

    async def run() -> str:
        batcher = SubmissionBatcher(log.send, max_in_flight=1)
        with pytest.raises(ConnectionError):
            await batcher.submit("x")
        return await batcher.submit("y")

    assert asyncio.run(run()) == "receipt-y"
