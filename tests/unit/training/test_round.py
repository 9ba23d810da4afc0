"""One LoRA tuning round on a tiny random LLaVA: encoding, loss masking, weights, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from illume.images import load_image_file
from illume.models import ModelSettings, load_model
from illume.training import SnapshotConfig, TrainConfig, build_snapshot, snapshot_loss, train_round
from illume.training.round import IGNORE_INDEX, collate, encode_row
from tests.unit.training.conftest import judged_from

# A high learning rate so a handful of rows visibly moves a tiny model in a few epochs.
FAST = TrainConfig(learning_rate=0.1, lora_alpha=32, epochs=4, batch_size=4, lora_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(ModelSettings(path=tiny_model))


@pytest.fixture(scope="module")
def trained(tiny_model, small_snapshot, tmp_path_factory):
    """One round at FAST settings; the prepare_model hook keeps the trained model for inspection."""
    seen: dict = {"epochs": []}

    def keep(model):
        seen["model"] = model
        return model

    result = train_round(
        small_snapshot,
        FAST,
        lambda epoch, metrics: seen["epochs"].append((epoch, metrics)),
        model_dir=tiny_model,
        out_dir=tmp_path_factory.mktemp("round") / "adapter",
        prepare_model=keep,
    )
    return result, seen


def test_encoding_puts_the_loss_on_the_target_and_eos_only(loaded, small_snapshot):
    tokenizer = loaded.tokenizer
    for row in (small_snapshot.rows[0], small_snapshot.rows[-1]):  # a rationale row and an answer row
        example = encode_row(loaded, row, load_image_file(row.image))
        ids, labels = example["input_ids"][0], example["labels"][0]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept[-1] == tokenizer.eos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept[:-1]) == row.target.strip().lower()
        # Everything before the target (image tokens, prompt) is masked.
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert loaded.image_placeholder not in tokenizer.decode(ids[first:])
        assert tokenizer.decode(ids[:first], skip_special_tokens=True).endswith(
            row.prompt.lower().split(" a:")[-1].strip()
        )
    rows = [encode_row(loaded, r, load_image_file(r.image)) for r in small_snapshot.rows[:3]]
    batch = collate(rows, tokenizer.pad_token_id)
    lengths = [r["input_ids"].shape[1] for r in rows]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["pixel_values"].shape[0] == 3
    for i, n in enumerate(lengths):  # right padding, masked out of attention and loss
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()


def test_a_round_trains_the_adapter_and_leaves_the_base_alone(trained, tiny_model, small_snapshot):
    result, seen = trained
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "illume_round.json"} <= files
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"] and "vision" not in config["target_modules"]
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert tensors and all("language_model" in k for k in tensors)
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it
    base = load_model(ModelSettings(path=tiny_model)).model.state_dict()
    model = seen["model"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    compared = 0
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(value, base[key]), name
        compared += 1
    assert compared == len(base)
    meta = json.loads((result.adapter_dir / "illume_round.json").read_text())
    assert meta["snapshot_sha256"] == small_snapshot.sha256 == result.snapshot_sha256
    assert meta["adapter_sha256"] == result.adapter_sha256 and len(result.adapter_sha256) == 64
    assert (result.rationale_rows, result.answer_rows, result.rationale_loss_weight) == (3, 6, 2.0)
    assert result.initialised_from == "base"


def test_reporter_sees_every_epoch_and_the_loss_falls(trained, tiny_model, small_snapshot):
    result, seen = trained
    assert [e for e, _ in seen["epochs"]] == [1, 2, 3, 4]
    first, last = seen["epochs"][0][1], seen["epochs"][-1][1]
    assert set(first) >= {
        "loss",
        "objective",
        "rationale_loss",
        "answer_loss",
        "rows",
        "steps",
        "seconds",
        "learning_rate",
    }
    assert first["rows"] == len(small_snapshot.rows) and last["steps"] == 4 * 3  # 9 rows, batches of 4
    assert last["rationale_loss"] < first["rationale_loss"] and last["answer_loss"] < first["answer_loss"]
    # loss is the weighted mean row loss: w = 2 for the 3 rationale rows, 1 for the 6 answer rows
    expected = (3 * 2 * last["rationale_loss"] + 6 * last["answer_loss"]) / 12
    assert last["loss"] == pytest.approx(expected, rel=1e-5)
    before = snapshot_loss(small_snapshot, model_dir=tiny_model)
    after = snapshot_loss(small_snapshot, model_dir=tiny_model, adapter_dir=result.adapter_dir)
    assert after["loss"] < before["loss"] - 0.05
    assert after["rationale_loss"] < before["rationale_loss"]


def _tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_model, small_snapshot, tmp_path):
    config = FAST.model_copy(update={"lora_dropout": 0.1})
    a = train_round(small_snapshot, config, model_dir=tiny_model, out_dir=tmp_path / "a")
    b = train_round(small_snapshot, config, model_dir=tiny_model, out_dir=tmp_path / "b")
    c = train_round(
        small_snapshot, config.model_copy(update={"seed": 1}), model_dir=tiny_model, out_dir=tmp_path / "c"
    )
    ta, tb, tc = _tensors(a.adapter_dir), _tensors(b.adapter_dir), _tensors(c.adapter_dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.adapter_sha256 == b.adapter_sha256 != c.adapter_sha256
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_max_steps_and_init_from_parent(trained, tiny_model, small_snapshot, tmp_path):
    parent, _ = trained
    steps = train_round(
        small_snapshot, FAST.model_copy(update={"max_steps": 2}), model_dir=tiny_model, out_dir=tmp_path / "s"
    )
    assert steps.steps == 2 and len(steps.epochs) == 1
    child = train_round(
        small_snapshot,
        FAST.model_copy(update={"init_from": "parent", "epochs": 1}),
        model_dir=tiny_model,
        out_dir=tmp_path / "child",
        parent_adapter=parent.adapter_dir,
    )
    assert child.initialised_from == str(parent.adapter_dir)
    # Continuing the parent starts where it ended: the first epoch's loss is already low.
    assert child.epochs[0]["loss"] < parent.epochs[0]["loss"]
    ignored = train_round(
        small_snapshot,
        FAST.model_copy(update={"max_steps": 1}),
        model_dir=tiny_model,
        out_dir=tmp_path / "fresh",
        parent_adapter=parent.adapter_dir,
    )
    assert ignored.initialised_from == "base"  # init_from="base" (the default) ignores the parent


def test_a_linear_schedule_decays_the_rate_to_zero_over_the_planned_steps(
    trained, tiny_model, small_snapshot, tmp_path
):
    _, seen = trained
    assert [m["learning_rate"] for _, m in seen["epochs"]] == [0.1] * 4  # constant: the default
    rates = []
    linear = FAST.model_copy(update={"lr_schedule": "linear"})
    train_round(small_snapshot, linear, lambda e, m: rates.append(m["learning_rate"]), model_dir=tiny_model,
                out_dir=tmp_path / "linear")  # fmt: skip
    # 4 epochs of 3 batches: after epoch e the rate is 0.1 x (1 - 3e / 12).
    assert rates == pytest.approx([0.075, 0.05, 0.025, 0.0])
    capped = []
    train_round(small_snapshot, linear.model_copy(update={"max_steps": 4}), lambda e, m: capped.append(m),
                model_dir=tiny_model, out_dir=tmp_path / "capped")  # fmt: skip
    assert [m["steps"] for m in capped] == [3, 4]  # max_steps ends the second epoch early
    assert [m["learning_rate"] for m in capped] == pytest.approx([0.025, 0.0])


def test_an_empty_snapshot_is_refused(tiny_model, tmp_path):
    from illume.training import build_snapshot

    with pytest.raises(ValueError, match="no rows"):
        train_round(build_snapshot([]), FAST, model_dir=tiny_model, out_dir=tmp_path / "x")


def test_each_epoch_trains_on_its_own_replay_pass(tiny_model, tiny_world, tmp_path):
    snapshot = build_snapshot(
        judged_from(tiny_world["train"], 3), SnapshotConfig(replay_ratio=2, replay_passes=2, seed=0)
    )
    assert (snapshot.rationale_rows, snapshot.answer_rows) == (3, 12)
    images: list[str] = []
    per_epoch: list[tuple[set[str], dict]] = []

    def loader(ref: str):
        images.append(ref)
        return load_image_file(ref)

    def reporter(epoch: int, metrics: dict) -> None:
        per_epoch.append((set(images), metrics))
        images.clear()

    train_round(snapshot, FAST, reporter, model_dir=tiny_model, image_loader=loader, out_dir=tmp_path / "a")
    assert [m["rows"] for _, m in per_epoch] == [9, 9, 9, 9]  # 3 rationale rows + 6 answer rows
    answer_images = [{r.image for r in snapshot.pass_rows(p) if r.kind == "answer"} for p in (0, 1)]
    rationale_images = {r.image for r in snapshot.rows if r.kind == "rationale"}
    assert [seen for seen, _ in per_epoch] == [rationale_images | answer_images[e % 2] for e in range(4)]
    assert answer_images[0] != answer_images[1]
    # Rationale rows weigh the answer rows of one pass (6 / 3), as in a one-pass snapshot.
    last = per_epoch[-1][1]
    expected = (3 * 2 * last["rationale_loss"] + 6 * last["answer_loss"]) / 12
    assert last["loss"] == pytest.approx(expected, rel=1e-5)
