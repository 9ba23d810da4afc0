"""One prefill per request (``ForkEngine``) against repeated rows (``RepeatedRowsEngine``).

On CPU in fp32 both engines give the same candidates for the same seed, candidate for candidate;
the fork encodes each request's image once for the answer and the rationale steps together.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from illume.generation.engine import DecodeJob, Engine, Prompt
from illume.generation.generator import GenerateRequest, Generator, SamplingParams, make_engine
from illume.generation.hf_engine import ForkEngine, RepeatedRowsEngine, shared_prefix_length
from illume.generation.prompts import answer_prompt, rationale_prompt
from illume.generation.sampling import RowSpec
from tests.unit.generation.conftest import ADAPTERS, count_fed_tokens, count_images


def _request(
    image, answer: str | None, question: str = "what colour is the square?", **sampling
) -> GenerateRequest:
    params = {"n": 4, "temperatures": (0.7,), "seed": 11, "max_new_tokens": 8, "top_k_fraction": 0.5}
    params.update(sampling)
    return GenerateRequest(image=image, question=question, answer=answer, sampling=SamplingParams(**params))


def _mixed_batch(images) -> list[GenerateRequest]:
    """Requests that differ in answer (given or not), prompt length, n, temperatures and lengths."""
    return [
        _request(images[0], None, n=6, temperatures=(0.3, 0.9), seed=1),
        _request(
            images[1],
            "yes",
            question="is there a blue circle?",
            temperatures=(1.2,),
            max_new_tokens=12,
            seed=2,
        ),
        _request(images[2], "2", question="how many triangles are there?", n=3, top_k_fraction=0.2, seed=3),
        _request(
            images[3], None, n=5, temperatures=(0.0, 2.0), top_k_fraction=1.0, top_p=0.8, max_new_tokens=3
        ),
    ]


def _signature(result) -> tuple:
    """Everything a candidate reports; log-probabilities up to float rounding."""
    candidates = tuple(
        (c.index, c.text, c.temperature, c.token_count, c.finish_reason, round(c.mean_logprob, 4))
        for c in result.candidates
    )
    return result.answer, result.answer_generated, candidates


def test_fork_equals_repeated_rows_candidate_for_candidate(loaded, images):
    requests = _mixed_batch(images)
    fork, repeated = Generator(loaded, engine="fork"), Generator(loaded, engine="repeated")
    with count_images(loaded.model) as fork_images:
        forked = fork.generate(requests)
    with count_images(loaded.model) as repeated_images:
        reference = repeated.generate(requests)
    assert [_signature(r) for r in forked] == [_signature(r) for r in reference]
    assert sum(len(r.candidates) for r in forked) > len(requests)  # the comparison is not vacuous
    # One image encoding per request, answer step included; repeated rows encode one per row.
    assert fork_images[0] == len(requests)
    pending = sum(r.answer is None for r in requests)
    assert repeated_images[0] == pending + sum(r.sampling.n for r in requests)


def test_answer_and_rationale_steps_share_one_prefill(loaded, images):
    fork = Generator(loaded, engine="fork")
    for answer in (None, "red"):
        with count_images(loaded.model) as counted:
            fork.generate([_request(images[0], answer)])
        assert counted[0] == 1


def test_fork_equals_repeated_rows_with_mixed_adapters(lora_loaded, images):
    base = [
        _request(images[0], None, n=4, temperatures=(0.5, 1.5)),
        _request(images[1], "blue", max_new_tokens=6),
    ]
    requests = [replace(r, adapter=a) for r in base for a in (*ADAPTERS, None)]
    fork, repeated = Generator(lora_loaded, engine="fork"), Generator(lora_loaded, engine="repeated")
    with count_images(lora_loaded.model) as counted:
        forked = fork.generate(requests)
    reference = repeated.generate(requests)
    assert [_signature(r) for r in forked] == [_signature(r) for r in reference]
    assert counted[0] == len(requests)
    # Each adapter really changes the candidates, so a fork that ignored adapters would fail above.
    for i in range(0, len(requests), 3):
        assert len({_signature(r) for r in forked[i : i + 3]}) == 3


def test_a_request_alone_equals_it_in_a_mixed_batch(lora_loaded, images):
    requests = [
        replace(r, adapter=a)
        for r, a in zip(_mixed_batch(images), (*ADAPTERS, None, ADAPTERS[0]), strict=True)
    ]
    fork = Generator(lora_loaded, engine="fork")
    batched = fork.generate(requests)
    assert [_signature(r) for r in batched] == [_signature(fork.generate([r])[0]) for r in requests]


def test_the_rationale_prefill_feeds_only_what_the_answer_prompt_lacks(loaded, images):
    engine = ForkEngine(loaded)
    question = "is there a blue circle?"
    (answer_state,) = engine.prefill([Prompt(images[1], answer_prompt(question))])
    rationale = Prompt(images[1], rationale_prompt(question, "yes"))
    with count_fed_tokens(loaded.model) as fed, count_images(loaded.model) as encoded:
        (continued,) = engine.prefill([rationale], reuse=[answer_state])
    (fresh,) = engine.prefill([rationale])
    shared = shared_prefix_length(answer_state.token_ids, fresh.token_ids)
    assert shared == len(answer_state.token_ids)  # the answer prompt is a prefix here
    assert (fed[0], encoded[0]) == (len(fresh.token_ids) - shared, 0)
    assert continued.token_ids == fresh.token_ids
    assert torch.allclose(continued.logits, fresh.logits, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(continued.layers, fresh.layers, strict=True):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


def test_a_state_of_another_adapter_or_image_is_not_reused(lora_loaded, images):
    engine = ForkEngine(lora_loaded)
    question = "what colour is the square?"
    (state,) = engine.prefill([Prompt(images[0], answer_prompt(question), ADAPTERS[0])])
    others = [
        Prompt(images[0], rationale_prompt(question, "red"), ADAPTERS[1]),
        Prompt(images[0], rationale_prompt(question, "red"), None),
        Prompt(images[1], rationale_prompt(question, "red"), ADAPTERS[0]),
    ]
    with count_images(lora_loaded.model) as encoded:
        continued = engine.prefill(others, reuse=[state] * len(others))
    assert encoded[0] == len(others)
    fresh = engine.prefill(others)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(continued, fresh, strict=True))


def test_rows_are_yielded_as_they_finish_and_leave_the_batch(loaded, images):
    engine = ForkEngine(loaded)
    (state,) = engine.prefill([Prompt(images[0], rationale_prompt("what colour is the square?", "red"))])
    long = RowSpec(temperature=1.0, top_k=10, top_p=1.0, max_new_tokens=6, seed=1, min_new_tokens=6)
    short = replace(long, max_new_tokens=2, min_new_tokens=0, seed=2)
    widths: list[int] = []
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[0]))
    try:
        order = [
            (f.row, len(f.token_ids), f.finish_reason)
            for f in engine.decode([DecodeJob(state, [long, short])])
        ]
    finally:
        handle.remove()
    assert order[0][0] == 1 and order[0][1] <= 2  # the short row comes first
    assert order[1] == (0, 6, "length")
    assert widths[0] == 2 and widths[-1] == 1  # the finished row stopped costing compute


def test_decoding_leaves_the_state_unchanged(loaded, images):
    engine = ForkEngine(loaded)
    (state,) = engine.prefill([Prompt(images[2], rationale_prompt("how many triangles are there?", "2"))])
    rows = [RowSpec(temperature=1.0, top_k=10, top_p=1.0, max_new_tokens=5, seed=s) for s in range(3)]
    first = sorted(engine.decode([DecodeJob(state, rows)]), key=lambda f: f.row)
    again = sorted(
        engine.decode([DecodeJob(state, rows), DecodeJob(state, rows[:1])]), key=lambda f: (f.job, f.row)
    )
    # Same tokens; log-probabilities only up to the rounding of another batch shape.
    assert [(f.row, f.token_ids, f.finish_reason) for f in first] == [
        (f.row, f.token_ids, f.finish_reason) for f in again[:3]
    ]
    assert [f.logprob_sum for f in first] == pytest.approx([f.logprob_sum for f in again[:3]], abs=1e-5)
    assert again[3].token_ids == first[0].token_ids


def test_engine_choice():
    class Model:  # only the family decides
        pass

    other = SimpleNamespace(model_type="mllama", model=Model())
    assert isinstance(make_engine(other, "auto"), RepeatedRowsEngine)
    with pytest.raises(ValueError, match="mllama"):
        make_engine(other, "fork")
    llava = SimpleNamespace(model_type="llava", model=Model())
    assert isinstance(make_engine(llava, "auto"), ForkEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine(llava, "vllm")
    assert isinstance(make_engine(llava, "auto"), Engine) and isinstance(
        make_engine(llava, "repeated"), Engine
    )
