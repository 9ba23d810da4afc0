"""Pretraining data of the default model, drawn on the fly from the synthetic world.

Contract: ``Stream(config)`` yields batches that are a pure function of ``(config, step)``: step
``s`` of stage ``k`` draws its scenes and questions from ``random.Random`` seeded with
``(data_seed, stage, s)``, so a build resumed from a checkpoint sees exactly the batches it would
have seen without the interruption. Scenes of the evaluation world (``reserve`` items of each of
its train, val and test splits, seed ``world_seed``) are never drawn, so no val or test image is
trained on.

Each row is one item (a rendered scene and a question of one of the five families) and one text:

- ``answer``: ``Q: {question} A: {answer}`` + EOS;
- ``rationale``: ``Q: {question} A: {answer}, seeing that {distractor}`` + EOS, where the
  distractor is fluent but not aligned (``illume.world.tagged_distractors``: true but irrelevant,
  a gold template with one wrong value, or partly false) -- never a gold rationale;
- ``true``: ``Q: {question} A: {answer}, seeing that {true statement}`` + EOS, where the
  statement is a random true statement about the scene (chosen without looking at the question,
  so it is sometimes relevant by chance; this is the knob that sets round-0 acceptance);
- ``caption``: no question, just a description of the scene after the image: several true
  statements (attributes, relations, counts) joined by commas, + EOS. This is the dense grounding
  signal (every word depends on the image) that teaches the language model to read the patches.

The loss covers the continuation after ``A:`` (all the text, for captions), and the question's
words too in stages that ask for it: predicting "circle" after "the small" means looking up which
object a half-read description denotes, the lookup that spatial and comparison questions need.
Every row also carries dense per-cell labels from the scene graph (colour, shape, size or empty
for each of the 4x4 cells), the curriculum signal of the vision tower's auxiliary heads.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from illume.world import FAMILIES, WorldConfig, WorldItem, generate, render_scene
from illume.world.distractors import _true_statements, tagged_distractors
from illume.world.language import a, attributes, landmark_text, np_text, predicate, the, unique_descriptions
from illume.world.questions import YES_NO_FAMILIES, ask
from illume.world.scene import matching, related, sample_scene, scene_key
from illume.world.vocab import COLOURS, RELATION_TEXT, RELATIONS, SHAPES, SIZES, number_word

KINDS = ("answer", "rationale", "true", "caption")

# Per-cell label vocabularies; index 0 is "empty cell".
CELL_COLOURS = ("none", *COLOURS)
CELL_SHAPES = ("none", *SHAPES)
CELL_SIZES = ("none", *SIZES)
CELL_HEADS = {"colour": len(CELL_COLOURS), "shape": len(CELL_SHAPES), "size": len(CELL_SIZES)}
# OpenAI CLIP normalisation (what CLIPImageProcessor applies by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reserved_scenes(world_seed: int, reserve: int, config: WorldConfig = WorldConfig()) -> set[tuple]:
    """Scene keys of the first ``reserve`` items of the evaluation world's train, val and test."""
    splits = generate({"train": reserve, "val": reserve, "test": reserve}, world_seed, config)
    return {scene_key(item.scene) for items in splits.values() for item in items}


def draw_items(
    rng: random.Random,
    n: int,
    family_weights: Sequence[float],
    reserved: set[tuple],
    config: WorldConfig = WorldConfig(),
) -> list[WorldItem]:
    """``n`` items with families drawn by ``family_weights`` (yes/no answers balanced by coin)."""
    items = []
    while len(items) < n:
        family = rng.choices(FAMILIES, weights=family_weights)[0]
        want = rng.choice(("yes", "no")) if family in YES_NO_FAMILIES else None
        scene = sample_scene(rng, config)
        if scene_key(scene) in reserved:
            continue
        question = ask(family, scene, rng, want)
        if question is None:
            continue
        items.append(WorldItem.asked(f"pt-{len(items)}", "pretrain", family, scene, question))
    return items


def _count_text(feats: dict[str, str], n: int, rng: random.Random) -> str:
    if n == 0:
        return f"there are no {np_text(feats, plural_form=True)}"
    number = str(n) if rng.random() < 0.5 else number_word(n)
    if n == 1:
        return f"there is {number} {np_text(feats)}"
    return f"there are {number} {np_text(feats, plural_form=True)}"


def scene_caption(scene: dict[str, Any], rng: random.Random, k: int = 5) -> str:
    """``k`` random true statements about the scene: objects, attributes, relations, counts."""
    objs = scene["objects"]
    pool = []
    for obj in objs:
        pool.append(f"there is {a(attributes(obj))}")
        descs = unique_descriptions(scene, obj)
        if descs:
            d = rng.choice(descs[:3])
            pool.extend(
                f"{the(d)} is {predicate(key, obj[key])}"
                for key in ("colour", "shape", "size")
                if key not in d
            )
    unique = {o["id"] for o in objs if unique_descriptions(scene, o)}
    for x in objs:
        for y in objs:
            if x["id"] in unique and y["id"] in unique:
                pool.extend(
                    f"{landmark_text(scene, x['id'])} is {RELATION_TEXT[r]} {landmark_text(scene, y['id'])}"
                    for r in RELATIONS
                    if related(x, y, r)
                )
    for _ in range(4):
        keys = rng.choice((("colour",), ("shape",), ("colour", "shape"), ("size",)))
        values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
        feats = {key: rng.choice(values[key]) for key in keys}
        pool.append(_count_text(feats, len(matching(scene, feats.items())), rng))
    pool = list(dict.fromkeys(pool))
    rng.shuffle(pool)
    return " , ".join(pool[:k])


def cell_labels(scene: dict[str, Any]) -> np.ndarray:
    """(3, grid*grid) int labels: colour, shape, size per cell in reading order; 0 = empty."""
    grid = int(scene.get("grid", 4))
    out = np.zeros((3, grid * grid), dtype=np.int64)
    for obj in scene["objects"]:
        cell = obj["row"] * grid + obj["col"]
        out[0, cell] = CELL_COLOURS.index(obj["colour"])
        out[1, cell] = CELL_SHAPES.index(obj["shape"])
        out[2, cell] = CELL_SIZES.index(obj["size"])
    return out


def pixel_values(scenes: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Rendered scenes normalised as CLIPImageProcessor does for a 64x64 input (no resize)."""
    arrays = np.stack([np.asarray(render_scene(s), dtype=np.float32) for s in scenes]) / 255.0
    arrays = (arrays - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 outside the continuation
    cells: torch.Tensor  # (B, 3, grid*grid)
    families: list[str]


class TextEncoder:
    """Turns (question, continuation) pairs into token rows with the image tokens in front."""

    def __init__(self, tokenizer: Any, image_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")

    def encode(
        self, prompts: Sequence[str], continuations: Sequence[str], question_loss: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(input ids, attention mask, labels). The labels cover the continuation, and the prompt
        too when ``question_loss`` is set."""
        tok = self.tokenizer
        p_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        c_ids = tok(list(continuations), add_special_tokens=False)["input_ids"]
        head = [tok.bos_token_id] + [self.image_id] * self.image_tokens
        rows, labels = [], []
        for p, c in zip(p_ids, c_ids, strict=True):
            tail = [*c, tok.eos_token_id]
            rows.append(head + p + tail)
            asked = p if question_loss else [-100] * len(p)
            labels.append([-100] * len(head) + asked + tail)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lbl) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(r)] = torch.tensor(lbl)
            mask[i, : len(r)] = 1
        return ids, mask, lab


def make_batch(
    items: Sequence[WorldItem],
    kinds: Sequence[str],
    rng: random.Random,
    encoder: TextEncoder,
    distractor_weights: dict[str, float] | None = None,
    question_loss: bool = False,
) -> Batch:
    """One batch: each item paired with a text of its kind (see ``KINDS``); ``question_loss`` puts
    the question words under the loss as well."""
    prompts, conts = [], []
    for item, kind in zip(items, kinds, strict=True):
        if kind == "caption":
            prompts.append("")
            conts.append(scene_caption(item.scene, rng))
            continue
        prompts.append(f"Q: {item.question} A:")
        rationale = None
        if kind == "rationale":
            tagged = tagged_distractors(item, rng, 3)
            if distractor_weights and tagged:
                weights = [distractor_weights.get(k, 1.0) for _, k in tagged]
                if sum(weights) > 0:
                    rationale = rng.choices([t for t, _ in tagged], weights=weights)[0]
            elif tagged:
                rationale = rng.choice(tagged)[0]
        elif kind == "true":
            truths = _true_statements(item.scene)
            if truths:
                rationale = rng.choice(truths)
        conts.append(f" {item.answer}" if rationale is None else f" {item.answer}, seeing that {rationale}")
    ids, mask, labels = encoder.encode(prompts, conts, question_loss)
    cells = torch.from_numpy(np.stack([cell_labels(i.scene) for i in items]))
    return Batch(pixel_values([i.scene for i in items]), ids, mask, labels, cells, [i.family for i in items])
