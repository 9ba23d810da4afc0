"""The architecture matrix, in process: every family loads, generates, forks exactly and takes LoRA.

Each family is a tiny random checkpoint built here (``architectures.py``) and loaded through
``illume.models.load_model`` with the Pillow image processors, as a user's checkpoint would be.
For each: a request without an answer and one with an answer (n=4, two temperatures, plus a
request of another single temperature) generate; the one-prefill ``ForkEngine`` gives exactly the
candidates of ``RepeatedRowsEngine`` for the same seeds, candidate for candidate (CPU, fp32), and
encodes each request's image once; a LoRA adapter on the language model's attention (the
training round's target selection), saved and loaded under its served name, changes the
candidates, and a batch mixing it with the base model forks exactly. docs/ARCHITECTURES.md has
the table.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from PIL import Image

from illume.adapters import served_name
from illume.generation.generator import GenerateRequest, GenerateResult, Generator, SamplingParams
from illume.generation.hf_engine import PREFIX_LM_MODEL_TYPES, ForkEngine, fork_supported
from illume.models import ModelSettings, load_model
from illume.models.loading import LoadedModel
from illume.training.round import (
    IGNORE_INDEX,
    TrainConfig,
    _lora_config,
    encode_row,
    load_adapter_model,
    train_round,
)
from illume.training.snapshot import JudgedItem, Snapshot, SnapshotConfig, build_snapshot
from tests.unit.generation.architectures import ARCHITECTURES, IMAGE_TOKENS, Architecture

ADAPTER = served_name("matrix", 1)


def _param(arch: Architecture):
    missing = [m for m in arch.requires if importlib.util.find_spec(m) is None]
    reason = f"{arch.name} needs {', '.join(missing)} (not installed); see docs/ARCHITECTURES.md"
    return pytest.param(arch, id=arch.name, marks=[pytest.mark.skip(reason=reason)] if missing else [])


@pytest.fixture(scope="module", params=[_param(a) for a in ARCHITECTURES])
def family(request, tmp_path_factory, tiny_texts) -> tuple[Architecture, Path, Path]:
    """The family, its tiny checkpoint and a random (non-zero) LoRA adapter saved beside it."""
    arch: Architecture = request.param
    torch.manual_seed(0)
    checkpoint = arch.build(tmp_path_factory.mktemp(f"arch-{arch.name}"), tiny_texts)
    trainer = load_model(ModelSettings(path=checkpoint))
    config = _lora_config(trainer, TrainConfig())
    config.init_lora_weights = False  # a trained adapter is not the identity; a fresh one would be
    torch.manual_seed(1)
    peft_model = get_peft_model(trainer.model, config)
    adapter = tmp_path_factory.mktemp(f"adapter-{arch.name}")
    peft_model.save_pretrained(adapter)
    return arch, checkpoint, adapter


@pytest.fixture(scope="module")
def loaded(family) -> LoadedModel:
    return load_model(ModelSettings(path=family[1]))


@pytest.fixture(scope="module")
def with_adapter(family) -> LoadedModel:
    """The family's model serving the adapter under its served name beside the base model."""
    loaded = load_model(ModelSettings(path=family[1]))
    loaded.model = load_adapter_model(loaded.model, family[2], adapter_name=ADAPTER)
    loaded.model.eval()
    return loaded


IMAGES = [Image.new("RGB", (40, 32), "red"), Image.new("RGB", (32, 48), "blue")]


def _requests() -> list[GenerateRequest]:
    """Without and with an answer, at two temperatures (0.3, 0.9) and at one other (1.5)."""
    requests = []
    for temperatures, seed in (((0.3, 0.9), 3), ((1.5,), 4)):
        sampling = SamplingParams(
            n=4, temperatures=temperatures, seed=seed, max_new_tokens=8, top_k_fraction=0.5
        )
        requests += [
            GenerateRequest(image=IMAGES[0], question="what colour is the square?", sampling=sampling),
            GenerateRequest(
                image=IMAGES[1], question="is there a blue circle?", answer="yes", sampling=sampling
            ),
        ]
    return requests


def _signature(result: GenerateResult) -> tuple:
    """Everything a candidate reports but its mean log-probability (see ``_assert_same``)."""
    candidates = tuple(
        (c.index, c.text, c.temperature, c.token_count, c.finish_reason) for c in result.candidates
    )
    return result.answer, result.answer_generated, result.adapter, candidates


def _assert_same(results: list[GenerateResult], expected: list[GenerateResult]) -> None:
    """Candidate for candidate the same; log-probabilities up to float rounding (1e-4)."""
    assert [_signature(r) for r in results] == [_signature(r) for r in expected]
    logprobs = [c.mean_logprob for r in results for c in r.candidates]
    assert logprobs == pytest.approx([c.mean_logprob for r in expected for c in r.candidates], abs=1e-4)


@contextmanager
def _vision_calls(model: torch.nn.Module, name: str) -> Iterator[list[int]]:
    """Counts the forward calls of the family's vision encoder (module ``name``)."""
    module = next(m for n, m in model.named_modules() if n.split(".")[-1] == name)
    counted = [0]
    handle = module.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
    try:
        yield counted
    finally:
        handle.remove()


def test_loads_through_the_project_loader(family, loaded):
    arch = family[0]
    assert loaded.model_type == arch.model_type
    assert not loaded.model.training and loaded.dtype == torch.float32
    assert fork_supported(loaded)
    from illume.generation.hf_engine import encode

    ids = encode(loaded, ["q:"], [Image.new("RGB", (32, 32))])["input_ids"]
    assert int((ids == loaded.model.config.image_token_id).sum()) == IMAGE_TOKENS[arch.name]


def test_generates_with_and_without_an_answer(loaded):
    generator = Generator(loaded)  # "auto": the fork engine for every family of the matrix
    assert isinstance(generator.engine, ForkEngine)
    requests = _requests()
    results = generator.generate(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.answer_generated == (request.answer is None)
        # A random model's greedy answer may be cut to nothing at its first comma; that is fine.
        assert isinstance(result.answer, str) if request.answer is None else result.answer == request.answer
        assert 1 <= len(result.candidates) <= 4
        assert all(c.text and c.token_count <= 8 for c in result.candidates)
        assert {c.temperature for c in result.candidates} <= set(request.sampling.temperatures)
        assert len({c.text for c in result.candidates}) == len(result.candidates)
    assert {c.temperature for c in results[0].candidates} == {0.3, 0.9}
    # The same seeds give the same candidates, alone or in the batch.
    _assert_same(generator.generate(requests[2:]), results[2:])


def test_fork_equals_repeated_rows_candidate_for_candidate(family, loaded):
    arch = family[0]
    requests = _requests()
    fork, repeated = Generator(loaded, engine="fork"), Generator(loaded, engine="repeated")
    with _vision_calls(loaded.model, arch.vision) as calls:
        forked = fork.generate(requests)
    reference = repeated.generate(requests)
    _assert_same(forked, reference)
    assert sum(len(r.candidates) for r in forked) > len(requests)  # not vacuous
    # One image encoding per request, the answer step included, except for a prefix-LM family,
    # whose rationale prompt cannot continue the answer prompt's cache.
    pending = sum(r.answer is None for r in requests)
    prefix_lm = loaded.model_type in PREFIX_LM_MODEL_TYPES
    assert calls[0] == len(requests) + (pending if prefix_lm else 0)


def test_lora_on_the_language_model_changes_candidates_and_forks_exactly(family, with_adapter):
    arch = family[0]
    model = with_adapter.model
    lora = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    layers = model.get_base_model().config.get_text_config().num_hidden_layers
    assert len(lora) == layers * 4  # q, k, v, o of every layer
    assert all(f".{arch.language_model}." in name and f".{arch.vision}." not in name for name in lora)

    base = _requests()[:2]
    requests = [replace(r, adapter=a) for r in base for a in (ADAPTER, None)]
    fork, repeated = Generator(with_adapter, engine="fork"), Generator(with_adapter, engine="repeated")
    forked = fork.generate(requests)
    _assert_same(forked, repeated.generate(requests))
    for adapted, plain in zip(forked[::2], forked[1::2], strict=True):
        assert adapted.adapter == ADAPTER and plain.adapter is None
        assert _signature(adapted)[3] != _signature(plain)[3]


def _one_row_snapshot(question: str, answer: str, target: str) -> Snapshot:
    rows = [
        JudgedItem(
            item_id=f"q{k}",
            image=f"img{k}",
            question=question,
            answer=answer,
            accepted=(target,),
            answer_correct=True,
            generation_id=f"g{k}",
            feedback_ids=(f"f{k}",),
        )
        for k in range(2)
    ]
    return build_snapshot(rows, SnapshotConfig(replay_ratio=1, seed=0))


def test_one_lora_round_trains_and_changes_candidates(family, loaded, tmp_path):
    """A training round runs on the family (its rows encode with labels on the target only) and the
    adapter it saves changes what the model generates."""
    checkpoint = family[1]
    snapshot = _one_row_snapshot("what is it?", "yes", "the ball is red")
    row = next(r for r in snapshot.rows if r.kind == "rationale")
    encoded = encode_row(loaded, row, IMAGES[0])
    target = encoded["labels"][0] != IGNORE_INDEX
    assert 0 < int(target.sum()) < target.numel()
    if loaded.model_type == "paligemma":
        assert bool((encoded["token_type_ids"][0][target] == 1).all())
        assert bool((encoded["token_type_ids"][0][: int(target.nonzero()[0])] == 0).all())
    config = TrainConfig(epochs=1, batch_size=2, learning_rate=5e-2, seed=0)
    result = train_round(
        snapshot,
        config,
        model_dir=checkpoint,
        image_loader=lambda ref: IMAGES[int(ref[-1]) % len(IMAGES)],
        out_dir=tmp_path / "adapter",
    )
    assert result.steps >= 1 and math.isfinite(result.final_loss)
    trained = load_model(ModelSettings(path=checkpoint))
    trained.model = load_adapter_model(trained.model, result.adapter_dir, adapter_name=ADAPTER)
    trained.model.eval()
    request = _requests()[0]
    base = Generator(loaded).generate([request])
    tuned = Generator(trained).generate([replace(request, adapter=ADAPTER)])
    assert _signature(tuned[0]) != _signature(base[0])
