"""Token-budget admission in the Generator deployment, without a cluster: ``TokenAdmission`` as
Serve's ``batch_size_fn`` (a batch never exceeds the budget nor ``max_batch_size``; a request that
does not fit waits for a later batch and is never dropped), driven through Ray Serve's real
``@serve.batch`` queue, and the replica's INVALID_ARGUMENT for a request above the budget."""

from __future__ import annotations

import asyncio
import random

import pytest
from PIL import Image

from illume.generation.generator import GenerateRequest, RequestCost, SamplingParams
from services.generator import GenerateOutcome, GenerateWork, GeneratorDeployment, TokenAdmission


def work(tokens: int, tag: int = 0) -> GenerateWork:
    request = GenerateRequest(image=Image.new("RGB", (8, 8)), question=f"q{tag}?")
    return GenerateWork(request=request, cost=RequestCost(prompt_tokens=tokens, n=0, max_new_tokens=0))


def test_size_fits_exactly_when_count_and_tokens_both_fit():
    rng = random.Random(0)
    for _ in range(2000):
        budget, slots = rng.randint(1, 5000), rng.randint(1, 16)
        admission = TokenAdmission(budget, slots)
        works = [work(rng.randint(1, budget)) for _ in range(rng.randint(1, 20))]
        tokens = sum(w.cost.total for w in works)
        assert admission.fits(works) == (len(works) <= slots and tokens <= budget), (budget, slots, tokens)


@pytest.fixture
def outside_a_replica(monkeypatch):
    """Serve's batch queue reads the replica's config only to log a warning; there is none here."""
    from ray.serve import batching

    monkeypatch.setattr(
        batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda s: None
    )


def test_serve_batches_never_exceed_the_budget_and_drop_nothing(outside_a_replica):
    from ray import serve

    budget, slots = 1000, 4
    admission = TokenAdmission(budget, slots)
    batches: list[list[GenerateWork]] = []

    @serve.batch(max_batch_size=slots, batch_wait_timeout_s=0.02, batch_size_fn=admission.size)
    async def run(works: list[GenerateWork]) -> list[str]:
        batches.append(works)
        await asyncio.sleep(0.005)  # a running batch: later arrivals queue meanwhile
        return [w.request.question for w in works]

    rng = random.Random(1)
    works = [work(rng.choice([50, 200, 400, 700, 1000]), tag=i) for i in range(60)]

    async def main() -> list[str]:
        return await asyncio.gather(*(run(w) for w in works))

    answers = asyncio.run(main())
    assert answers == [w.request.question for w in works]  # every request answered, its own answer
    assert sorted(id(w) for b in batches for w in b) == sorted(id(w) for w in works)  # once each
    for batch in batches:
        assert len(batch) <= slots and sum(w.cost.total for w in batch) <= budget, batch
    assert any(sum(w.cost.total for w in b) > budget * 0.6 for b in batches)  # the budget was used
    assert max(len(b) for b in batches) > 1


class Router:
    def prepare_ref(self, ref: str, namespace: str) -> None:
        pass

    def stop(self) -> None:
        pass


class Core:
    """Counts a request as the real ``Generator.request_cost`` would report it."""

    loaded = type("Loaded", (), {"model_id": "tiny"})()

    def request_cost(self, request: GenerateRequest) -> RequestCost:
        answer = 10 if request.answer is None else 0
        return RequestCost(30, request.sampling.n, request.sampling.max_new_tokens, answer)


def test_a_request_above_the_budget_is_invalid_argument_with_its_numbers():
    cls = GeneratorDeployment.func_or_class
    replica = cls.__new__(cls)  # only what generate() touches before batching
    replica._queued, replica.adapters, replica.core = 0, Router(), Core()
    replica.admission = TokenAdmission(1000, 4)
    big = GenerateRequest(
        image=Image.new("RGB", (8, 8)), question="q?", sampling=SamplingParams(n=10, max_new_tokens=100)
    )
    outcome: GenerateOutcome = asyncio.run(replica.generate(GenerateWork(request=big)))
    assert outcome.error_code == "INVALID_ARGUMENT"
    assert outcome.error_reason == (
        "request needs 1040 tokens (prompt 30 + n x max_new_tokens 10 x 100 + answer 10); the budget is 1000"
    )
    assert replica._queued == 0
