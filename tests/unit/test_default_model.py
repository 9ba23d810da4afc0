"""The embedded default model (illume/default_model) and its builder (illume.models.default_build).

The shipped checkpoint must load through the standard Hugging Face classes, match its manifest,
answer a fixed val sample of the world well, and start the ILLUME loop with a low but non-zero
fact-critic acceptance (round 0). The builder's pieces are checked on a micro configuration:
tokenizer coverage, the training rows against the processor's own encoding, and that a build
resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from illume.models.default import PACKAGED_MODEL
from illume.models.default_build.build import (
    BuildConfig,
    Interrupted,
    Stage,
    batch_for,
    build_tokenizer,
    embedding_loss,
    relational_cell_code,
    train,
)
from illume.models.default_build.data import TextEncoder, draw_items, make_batch, pixel_values
from illume.models.default_build.export import MANIFEST, verify
from illume.world import generate, render_scene, world_texts

SAMPLE = 200  # val items of the fixed sample: the 200 that `illume eval --limit 200` measures


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((PACKAGED_MODEL / MANIFEST).read_text())


@pytest.fixture(scope="module")
def loaded():
    from illume.models.loading import ModelSettings, load_model

    return load_model(ModelSettings(path=PACKAGED_MODEL, device="cpu"))


@pytest.fixture(scope="module")
def val_items():
    from illume.models.default_build.measure import world_split

    return world_split("val", SAMPLE)


def test_checkpoint_is_a_plain_llava_that_loads_through_the_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(
        PACKAGED_MODEL, local_files_only=True, dtype=torch.float32
    )
    processor = AutoProcessor.from_pretrained(PACKAGED_MODEL, local_files_only=True, backend="pil")
    assert type(model) is LlavaForConditionalGeneration
    assert model.dtype == torch.float32  # stored as float16, loads into float32 on CPU
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__.endswith("Pil")


def test_checkpoint_matches_its_manifest_and_fits_the_size_budget(manifest):
    assert verify(PACKAGED_MODEL) == []
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(manifest["files"])
    weights = (PACKAGED_MODEL / "model.safetensors").stat().st_size
    assert weights <= 25 * 1024 * 1024
    assert manifest["dtype"] == "float16"
    assert "make default-model" in manifest["command"]
    assert manifest["build_config"]["seed"] == 0


def test_the_shipped_checkpoint_was_built_by_the_default_recipe(manifest):
    # `make default-model` must rebuild what ships: same stages, same seeds, same digest.
    assert manifest["build_config"] == json.loads(json.dumps(BuildConfig().to_json()))
    assert manifest["build_config_digest"] == BuildConfig().digest()


def test_answer_accuracy_on_a_fixed_val_sample(loaded, val_items):
    from illume.models.default_build.measure import measure

    figures = measure(loaded, val_items, n=1, temperatures=(0.0,))
    accuracy = figures["answer_accuracy"]
    assert accuracy["overall"] >= 0.9, accuracy
    assert min(v for k, v in accuracy.items() if k != "overall") >= 0.7, accuracy


def test_round_zero_acceptance_lies_in_the_target_band(loaded, val_items):
    from illume.models.default_build.measure import measure

    figures = measure(loaded, val_items[:50], n=10, temperatures=(0.3, 0.9), seed=0)
    share = figures["sampled"]["per_candidate"]["overall"]
    assert 0.02 <= share <= 0.30, figures["sampled"]


def test_tokenizer_covers_every_word_the_world_writes():
    tokenizer = build_tokenizer()
    items = generate({"train": 60}, seed=5)["train"]
    texts = [f"Q: {i.question} A: {i.answer}, seeing that x" for i in items] + list(world_texts(items))
    unk = tokenizer.unk_token_id
    for text in texts:
        ids = tokenizer(text.replace(" x", ""), add_special_tokens=False)["input_ids"]
        assert unk not in ids, text


def test_training_rows_match_what_the_processor_feeds_the_model():
    from illume.models.tiny import _llava_processor

    config = BuildConfig()
    tokenizer = build_tokenizer()
    processor = _llava_processor(tokenizer, config.image_size, config.patch_size, config.vision_hidden)
    items = draw_items(random.Random(3), 6, (1, 1, 1, 1, 1), set())
    batch = make_batch(
        items,
        ["answer", "rationale", "true"] * 2,
        random.Random(4),
        TextEncoder(tokenizer, config.image_tokens),
    )
    images = [render_scene(i.scene) for i in items]
    for row, item in enumerate(items):
        prompt = f"Q: {item.question} A:"
        encoded = processor(text=["<image>" + prompt], images=[images[row]], return_tensors="pt")
        n = encoded["input_ids"].shape[1]
        assert batch.input_ids[row, :n].tolist() == encoded["input_ids"][0].tolist()
        assert (batch.labels[row, :n] == -100).all()  # no loss on the image or the question
        labelled = batch.labels[row][batch.labels[row] != -100].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:1]) == item.answer
    captions = make_batch(
        items[:2], ["caption"] * 2, random.Random(5), TextEncoder(tokenizer, config.image_tokens)
    )
    head = 1 + config.image_tokens  # BOS and the image tokens; everything after them is labelled
    for row in range(2):
        text = captions.labels[row][captions.labels[row] != -100].tolist()
        assert captions.input_ids[row, head : head + len(text)].tolist() == text
        assert tokenizer.unk_token_id not in text
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values([i.scene for i in items]), expected, atol=1e-5)


def test_question_loss_labels_the_question_words_as_well():
    config = BuildConfig()
    tokenizer = build_tokenizer()
    encoder = TextEncoder(tokenizer, config.image_tokens)
    items = draw_items(random.Random(3), 4, (1, 1, 1, 1, 1), set())
    plain = make_batch(items, ["answer"] * 4, random.Random(4), encoder)
    asked = make_batch(items, ["answer"] * 4, random.Random(4), encoder, question_loss=True)
    assert torch.equal(plain.input_ids, asked.input_ids)
    head = 1 + config.image_tokens
    for row, item in enumerate(items):
        prompt = tokenizer(f"Q: {item.question} A:", add_special_tokens=False)["input_ids"]
        assert asked.labels[row, :head].eq(-100).all()  # never the BOS or the image tokens
        assert asked.labels[row, head : head + len(prompt)].tolist() == prompt
        assert plain.labels[row, head : head + len(prompt)].eq(-100).all()
        answer = asked.labels[row, head + len(prompt)].item()
        assert tokenizer.decode([answer]) == item.answer


def test_rationale_rows_never_carry_a_gold_rationale():
    tokenizer = build_tokenizer()
    encoder = TextEncoder(tokenizer, BuildConfig().image_tokens)
    items = draw_items(random.Random(7), 40, (1, 1, 1, 1, 1), set())
    batch = make_batch(items, ["rationale"] * len(items), random.Random(8), encoder)
    for row, item in enumerate(items):
        text = tokenizer.decode(
            batch.labels[row][batch.labels[row] != -100].tolist(), skip_special_tokens=True
        )
        if "seeing that" in text:
            rationale = text.split("seeing that", 1)[1].strip()
            assert rationale not in {g.lower() for g in item.rationales}


def test_batches_are_a_pure_function_of_the_step():
    config = BuildConfig()
    encoder = TextEncoder(build_tokenizer(), config.image_tokens)
    a = batch_for(config, 2, 17, encoder, set())
    b = batch_for(config, 2, 17, encoder, set())
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_the_cell_code_gives_each_relation_to_a_cell_one_shared_part():
    grid, dim = 4, 8
    code = relational_cell_code(grid, dim, seed=3, std=0.5)
    # The documented recipe, written as masks: own part, then one part per (relation, cell k).
    g = torch.Generator().manual_seed(3)
    own = torch.randn(grid * grid, dim, generator=g) * 0.5
    rel = torch.randn(4, grid * grid, dim, generator=g) * 0.5
    row, col = torch.arange(grid * grid).div(grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    same_row, same_col = row[:, None] == row[None], col[:, None] == col[None]
    holds = [  # [c, k]: c left of, right of, above, below k
        same_row & (col[:, None] < col[None]),
        same_row & (col[:, None] > col[None]),
        same_col & (row[:, None] < row[None]),
        same_col & (row[:, None] > row[None]),
    ]
    expected = own + sum(h.float() @ rel[r] for r, h in enumerate(holds))
    assert torch.allclose(code, expected, atol=1e-5)
    # Cell 0 (row 0, col 0) is left of cells 1-3 and above cells 4, 8, 12, and nothing else.
    assert torch.allclose(code[0], own[0] + rel[0, 1:4].sum(0) + rel[2, [4, 8, 12]].sum(0), atol=1e-5)
    assert torch.equal(code, relational_cell_code(grid, dim, seed=3, std=0.5))
    assert not torch.equal(code, relational_cell_code(grid, dim, seed=4, std=0.5))
    assert relational_cell_code(grid, dim, seed=3, std=0.0).eq(0).all()


def test_the_embedding_target_adds_the_cell_code_to_occupied_cells_only():
    words = torch.nn.Embedding(10, 4)
    model = type("M", (), {"get_input_embeddings": lambda self: words})()
    word_ids = torch.tensor([[-1, 1, 2], [-1, 3, 4], [-1, 5, 6]])  # (label, value) -> token; 0 is none
    cells = torch.tensor([[[1, 0, 2], [2, 0, 1], [1, 0, 1]]])  # one image, 3 cells; cell 1 is empty
    code = torch.randn(3, 4)
    table = words.weight.detach()
    occupied = torch.stack(
        [table[1] + table[4] + table[5] + code[0], torch.zeros(4), table[2] + table[3] + table[5] + code[2]]
    )
    projected = torch.cat([torch.zeros(1, 1, 4), occupied.unsqueeze(0)], dim=1)  # index 0 is CLS
    assert embedding_loss(model, projected, cells, word_ids, code).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(model, projected, cells, word_ids).item() > 0.01  # without the code: off target


def _micro(steps: int) -> BuildConfig:
    return BuildConfig(
        vision_hidden=16,
        vision_layers=1,
        vision_heads=2,
        text_hidden=16,
        text_layers=1,
        text_heads=2,
        text_intermediate=32,
        batch_size=4,
        reserve=5,
        eval_items=5,
        save_every=2,
        stages=(
            Stage("vision", 2, 1e-3, 1, lm=False),
            Stage("answers", steps, 1e-3, 1, mix=(0.4, 0.3, 0.1, 0.2), embed_weight=1.0),
        ),
    )


def test_a_resumed_build_ends_with_the_same_weights(tmp_path: Path):
    config = _micro(4)
    straight, _, _ = train(config, tmp_path / "straight", log=lambda _: None)
    with pytest.raises(Interrupted):  # stops mid-stage: optimiser state and step are in the checkpoint
        train(config, tmp_path / "resumed", log=lambda _: None, stop_after=4)
    with pytest.raises(RuntimeError, match="another build config"):
        train(replace(config, seed=1), tmp_path / "resumed", log=lambda _: None)
    resumed, _, _ = train(config, tmp_path / "resumed", log=lambda _: None)
    for (name, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
