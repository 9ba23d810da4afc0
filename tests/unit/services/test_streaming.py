"""Streamed generation in the core (``Generator.stream``), without Ray: events in finish order,
duplicates dropped in finish order, the unary result unchanged, and a cancelled request's rows
dropped from the decode while the rest of its batch is unaffected. The served stream over real
gRPC is tests/integration/services/test_streaming.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from illume.generation.engine import DecodeJob, Finished, Prompt
from illume.generation.generator import (
    AnswerReady,
    CandidateReady,
    GenerateRequest,
    Generator,
    RequestDone,
    SamplingParams,
)
from illume.models import ModelSettings, load_model

QUESTION = "what colour is the square?"


@pytest.fixture(scope="module")
def generator(tiny_dir) -> Generator:
    return Generator(load_model(ModelSettings(path=tiny_dir("llava"))), engine="fork")


def request(image, seed: int, answer: str | None = "red", **sampling) -> GenerateRequest:
    params = {"n": 4, "temperatures": (0.3, 1.5), "seed": seed, "max_new_tokens": 40, "top_k_fraction": 0.5}
    params.update(sampling)
    return GenerateRequest(image=image, question=QUESTION, answer=answer, sampling=SamplingParams(**params))


def test_a_streamed_request_gets_its_answer_then_candidates_in_finish_order(generator, images):
    requests = [request(images[0], seed=3, answer=None), request(images[1], seed=4)]
    events = list(generator.stream(requests, streamed=[True, False]))
    kinds = [(type(e).__name__, e.request) for e in events]
    first_candidate = next(i for i, e in enumerate(events) if isinstance(e, CandidateReady))
    assert {k for k in kinds[:first_candidate]} >= {("AnswerReady", 0), ("AnswerReady", 1)}
    assert all(e.request == 0 for e in events if isinstance(e, CandidateReady))  # only streamed ones
    sent = [e.candidate for e in events if isinstance(e, CandidateReady)]
    assert [c.index for c in sent] == list(range(len(sent)))
    # Rows end one token per step: a shorter row is sent no later than a longer one.
    assert [c.token_count for c in sent] == sorted(c.token_count for c in sent)
    assert len({c.token_count for c in sent}) > 1, "choose a seed whose rows end at different steps"
    done = {e.request: e.result for e in events if isinstance(e, RequestDone)}
    assert done[0].candidates == sent  # the result is what was sent, in that order
    unary = generator.generate(requests)
    assert signature(done[1]) == signature(unary[1])  # the request not streamed is Generate's
    assert {c.text for c in sent} == {c.text for c in unary[0].candidates}
    answer = next(e for e in events if isinstance(e, AnswerReady) and e.request == 0)
    assert answer.answer_generated and answer.answer == unary[0].answer


def signature(result) -> list[tuple]:
    return [
        (c.index, c.text, c.temperature, c.token_count, c.finish_reason, round(c.mean_logprob, 4))
        for c in result.candidates
    ]


class ScriptedEngine:
    """Rows end in a scripted order with scripted texts (duplicates on purpose)."""

    def __init__(self, script: Sequence[tuple[int, str]]) -> None:
        self.script = script  # (row, text) in finish order

    def prefill(self, prompts: Sequence[Prompt], reuse=None) -> list[Prompt]:
        return list(prompts)

    def decode(self, jobs: Sequence[DecodeJob]) -> Iterator[Finished]:
        for row, text in self.script:
            yield Finished(0, row, tuple(range(len(text))), text, "eos", -1.0)


def test_duplicates_are_dropped_in_finish_order_when_streamed_and_by_index_otherwise(generator, images):
    # Row 2 ends first with "b"; row 1 ends later with the same "b"; row 3 is empty.
    script = [(2, "b"), (0, "a"), (1, "b"), (3, "")]
    scripted = Generator(generator.loaded, engine=ScriptedEngine(script))
    one = [request(images[0], seed=1, temperatures=(0.3,))]
    events = list(scripted.stream(one, streamed=[True]))
    sent = [(e.candidate.index, e.candidate.text) for e in events if isinstance(e, CandidateReady)]
    assert sent == [(0, "b"), (1, "a")]  # the later-finishing "b" (row 1) is dropped
    (unary,) = scripted.generate(one)
    assert [(c.index, c.text) for c in unary.candidates] == [(0, "a"), (1, "b")]  # Generate: unchanged


def test_a_cancelled_request_loses_its_rows_and_the_batch_does_not_change(generator, images):
    short_and_long = request(images[0], seed=3, max_new_tokens=120)
    other = request(images[1], seed=4)
    sent: list[CandidateReady] = []

    def cancelled() -> bool:  # the client goes away after its first candidate
        return bool(sent)

    events = []
    for event in generator.stream(
        [short_and_long, other], streamed=[True, False], cancelled=[cancelled, None]
    ):
        events.append(event)
        if isinstance(event, CandidateReady):
            sent.append(event)
    done = {e.request: e for e in events if isinstance(e, RequestDone)}
    assert len(sent) == 1 and done[0].result is None
    assert done[0].rows_dropped == short_and_long.sampling.n - 1  # every row but the one sent
    # Its batch-mate is as if alone (log-probabilities up to float rounding: batch shapes differ).
    assert signature(done[1].result) == signature(generator.generate([other])[0])
    # Cancelled before its rationale step: no candidate work at all.
    events = list(generator.stream([short_and_long], streamed=[True], cancelled=[lambda: True]))
    assert [type(e) for e in events] == [AnswerReady, RequestDone]
    assert events[-1].rows_dropped == short_and_long.sampling.n
