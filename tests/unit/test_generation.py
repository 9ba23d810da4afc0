"""ILLUME generation on tiny random-weight models: sampling rules, batching, adapters."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from illume.generation.generator import GenerateRequest, Generator, SamplingParams, top_k_count
from illume.generation.hf_engine import encode
from illume.generation.prompts import rationale_prompt
from illume.models import ModelSettings, load_model


@pytest.fixture(scope="module", params=["llava", "idefics3", "llava-repeated"])
def generator(request, tiny_dir) -> Generator:
    """The default engine (one prefill per request) on both families, and the repeated-rows engine."""
    arch, _, engine = request.param.partition("-")
    return Generator(load_model(ModelSettings(path=tiny_dir(arch))), engine=engine or "auto")


def _request(image, question="what colour is the square?", answer="red", **sampling) -> GenerateRequest:
    params = {"n": 4, "temperatures": (0.7,), "seed": 11, "max_new_tokens": 8, "top_k_fraction": 0.5}
    params.update(sampling)
    return GenerateRequest(image=image, question=question, answer=answer, sampling=SamplingParams(**params))


def _texts(result) -> list[str]:
    return [c.text for c in result.candidates]


def _signature(result) -> list[tuple]:
    """What must not depend on the batch (log-probabilities only up to float rounding)."""
    return [
        (c.text, c.temperature, c.token_count, c.finish_reason, round(c.mean_logprob, 4))
        for c in result.candidates
    ]


def test_top_k_of_one_token_is_greedy_decoding(generator, images):
    vocab = generator.loaded.vocab_size
    one_token = _request(images[0], n=3, top_k_fraction=1.0 / vocab, temperatures=(1.5,), seed=1)
    result = generator.generate([one_token])[0]
    loaded = generator.loaded
    encoded = encode(loaded, [rationale_prompt(one_token.question, "red")], [images[0]])
    greedy = loaded.model.generate(
        **encoded,
        do_sample=False,
        max_new_tokens=8,
        suppress_tokens=[t for t in loaded.tokenizer.all_special_ids if t != loaded.tokenizer.eos_token_id],
    )
    continuation = greedy[0, encoded["input_ids"].shape[1] :]
    eos = loaded.tokenizer.eos_token_id
    tokens = continuation.tolist()
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    expected = loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # All three samples are the same greedy text, so duplicates leave exactly one candidate.
    assert _texts(result) == [expected]
    assert top_k_count(1.0 / vocab, vocab) == 1


def test_temperature_zero_is_greedy_too(generator, images):
    vocab = generator.loaded.vocab_size
    greedy = generator.generate([_request(images[0], n=2, top_k_fraction=1.0 / vocab)])[0]
    cold = generator.generate([_request(images[0], n=2, temperatures=(0.0,), top_k_fraction=1.0)])[0]
    assert _texts(greedy) == _texts(cold)


def test_same_seed_same_candidates_other_seed_other_candidates(generator, images):
    a = generator.generate([_request(images[1], n=6, temperatures=(1.5,), top_k_fraction=1.0, seed=5)])[0]
    b = generator.generate([_request(images[1], n=6, temperatures=(1.5,), top_k_fraction=1.0, seed=5)])[0]
    c = generator.generate([_request(images[1], n=6, temperatures=(1.5,), top_k_fraction=1.0, seed=6)])[0]
    assert _signature(a) == _signature(b)
    assert _texts(a) != _texts(c)
    assert a.seed == 5 and c.seed == 6


def test_higher_temperature_gives_more_distinct_candidates(generator, images):
    # Random tiny models have nearly flat logits, so "cold" must be very cold to become greedy.
    cold = generator.generate([_request(images[2], n=8, temperatures=(1e-5,), top_k_fraction=1.0, seed=3)])[0]
    hot = generator.generate([_request(images[2], n=8, temperatures=(3.0,), top_k_fraction=1.0, seed=3)])[0]
    assert len(cold.candidates) == 1
    assert len(hot.candidates) > 4
    assert hot.candidates[0].mean_logprob < cold.candidates[0].mean_logprob


def test_candidates_are_split_across_temperatures_and_unique(generator, images):
    result = generator.generate([_request(images[0], n=6, temperatures=(0.3, 0.9), top_k_fraction=1.0)])[0]
    texts = _texts(result)
    assert len(texts) == len(set(texts)) <= 6
    assert {round(c.temperature, 3) for c in result.candidates} <= {0.3, 0.9}
    assert [c.index for c in result.candidates] == list(range(len(texts)))
    assert SamplingParams(n=5, temperatures=(0.3, 0.9)).temperature_plan() == [0.3, 0.3, 0.3, 0.9, 0.9]


def test_max_new_tokens_bounds_every_candidate(generator, images):
    result = generator.generate([_request(images[3], n=4, max_new_tokens=3, top_k_fraction=1.0)])[0]
    assert all(c.token_count <= 3 for c in result.candidates)
    assert all(c.finish_reason == "length" for c in result.candidates if c.token_count == 3)


def test_eos_stops_a_candidate(generator, images):
    """Make EOS the only choice after three generated tokens: every candidate stops there with 'eos'."""
    eos = generator.loaded.tokenizer.eos_token_id
    head = generator.model.get_output_embeddings()
    calls = {"n": 0}

    def force_eos_after_three(_module, _inputs, output):
        calls["n"] += 1
        if calls["n"] > 3:  # calls 1-3 (the prompt, then two steps) choose tokens 1-3
            output = output.clone()
            output[..., eos] = 1e4
        return output

    handle = head.register_forward_hook(force_eos_after_three)
    try:
        result = generator.generate([_request(images[0], n=4, max_new_tokens=10, top_k_fraction=1.0)])[0]
    finally:
        handle.remove()
    assert result.candidates
    assert all(c.finish_reason == "eos" and c.token_count == 3 for c in result.candidates)


def test_answer_step_when_no_answer_is_given(generator, images):
    question = "what colour is the square?"
    result = generator.generate([_request(images[0], question=question, answer=None)])[0]
    assert result.answer_generated
    answers, _ = generator._answers([_request(images[0], question=question, answer=None)])
    assert result.answer == answers[0]  # the greedy answer is what the rationale prompt used
    given = generator.generate([_request(images[0], answer="blue")])[0]
    assert not given.answer_generated and given.answer == "blue"


def test_a_mixed_batch_equals_the_same_requests_one_by_one(generator, images):
    requests = [
        _request(images[0], answer=None, temperatures=(0.3, 0.9), n=4, seed=1),
        _request(images[1], question="is there a blue circle?", answer="yes", temperatures=(1.2,), seed=2),
        _request(images[2], answer="2", top_k_fraction=0.2, max_new_tokens=5, n=3, seed=3),
        _request(images[3], answer=None, temperatures=(0.0, 2.0), top_k_fraction=1.0, top_p=0.8, n=2, seed=4),
    ]
    batched = generator.generate(requests)
    alone = [generator.generate([r])[0] for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert b.answer == a.answer
        assert _signature(b) == _signature(a)


# --- adapters --------------------------------------------------------------------------------


def _random_lora(model, seed: int):
    from peft import LoraConfig

    from illume.models import lora_target_regex

    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=16, target_modules=lora_target_regex(model), init_lora_weights=False)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_dir):
    """Two random (non-zero) LoRA adapters for the tiny LLaVA, saved like trained ones."""
    from peft import get_peft_model

    dirs = []
    for seed in (1, 2):
        loaded = load_model(ModelSettings(path=tiny_dir("llava")))
        peft_model = get_peft_model(loaded.model, _random_lora(loaded.model, seed))
        out = tmp_path_factory.mktemp(f"adapter-{seed}")
        peft_model.save_pretrained(out)
        dirs.append(out)
    return dirs


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_dir, adapter_dirs, images):
    from peft import PeftModel

    loaded = load_model(ModelSettings(path=tiny_dir("llava")))
    plain = Generator(load_model(ModelSettings(path=tiny_dir("llava"))))
    loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dirs[0], adapter_name="rationale-v1")
    loaded.model.load_adapter(adapter_dirs[1], adapter_name="rationale-v2", is_trainable=False)
    generator = Generator(loaded)
    assert generator.adapter_names() == ["rationale-v1", "rationale-v2"]
    base = _request(images[0], n=3, temperatures=(0.0,), top_k_fraction=1.0)
    requests = [replace(base, adapter="rationale-v1"), replace(base, adapter="rationale-v2"), base]
    mixed = generator.generate(requests)
    alone = [generator.generate([r])[0] for r in requests]
    assert [_signature(r) for r in mixed] == [_signature(r) for r in alone]
    # The base rows of a peft model equal the plain model, and the adapters really change the output.
    assert _signature(mixed[2]) == _signature(plain.generate([base])[0])
    assert len({tuple(_texts(r)) for r in mixed}) == 3
    with pytest.raises(KeyError):
        generator.generate([replace(base, adapter="rationale-v9")])


def test_min_new_tokens_holds_eos_back(generator, images):
    """EOS forced from the first step is held back until min_new_tokens tokens exist."""
    eos = generator.loaded.tokenizer.eos_token_id
    head = generator.model.get_output_embeddings()

    def always_eos(_module, _inputs, output):
        output = output.clone()
        output[..., eos] = 1e4
        return output

    handle = head.register_forward_hook(always_eos)
    try:
        result = generator.generate([_request(images[0], n=2, max_new_tokens=8, min_new_tokens=5)])[0]
        plain = generator.generate([_request(images[0], n=2, max_new_tokens=8)])[0]
    finally:
        handle.remove()
    assert all(c.token_count == 5 and c.finish_reason == "eos" for c in result.candidates)
    assert plain.candidates == []  # every candidate was empty, so nothing is returned


@pytest.mark.gpu
def test_cuda_greedy_candidates_equal_cpu(tiny_dir, images):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = Generator(load_model(ModelSettings(path=tiny_dir("llava"), device="cpu")))
    gpu = Generator(load_model(ModelSettings(path=tiny_dir("llava"), device="cuda", dtype="float32")))
    request = _request(images[0], n=1, temperatures=(0.0,), top_k_fraction=1.0)
    assert _texts(gpu.generate([request])[0]) == _texts(cpu.generate([request])[0])
