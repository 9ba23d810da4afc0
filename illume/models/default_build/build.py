"""Building the default model: tokenizer, architecture, staged pretraining, checkpoints, export.

Contract: ``build(out_dir, work_dir, config)`` trains the default model from scratch and writes a
standard LLaVA checkpoint directory (``LlavaForConditionalGeneration`` weights in float16
safetensors, tokenizer, processor, generation config) plus ``manifest.json``. The result is a pure
function of ``config``: initialisation, data (``illume.models.default_build.data``) and the order of
every operation are seeded, torch runs with deterministic algorithms and a fixed thread count.

Training runs in stages (``BuildConfig.stages``); ``work_dir`` holds ``checkpoint.pt`` (model,
auxiliary heads, optimiser, stage and step), written atomically every ``save_every`` steps and at
the end of each stage. A build that is interrupted and started again with the same config resumes
from that checkpoint and produces the same weights as an uninterrupted build. A checkpoint of a
different config is refused rather than resumed.

Auxiliary heads predict every 16 px cell's colour, shape and size (or "empty") from the vision
tower's patch features and from the projector's output. They exist only during training: the
exported checkpoint is a plain ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from illume.models.default_build.data import (
    CELL_COLOURS,
    CELL_HEADS,
    CELL_SHAPES,
    CELL_SIZES,
    KINDS,
    Batch,
    TextEncoder,
    draw_items,
    make_batch,
    reserved_scenes,
)
from illume.world import FAMILIES, WorldConfig, generate, lexicon

PROMPT_WORDS = ("q", "a", ":", ",", "?", "seeing", "that")


@dataclass(frozen=True)
class Stage:
    """One stage of the curriculum."""

    name: str
    steps: int
    lr: float
    warmup: int = 100
    # Share of rows of each kind (answer, rationale, true, caption: see data.KINDS).
    mix: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    family_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    aux_weight: float = 1.0
    vision_lr_scale: float = 1.0
    lm: bool = True
    # Weight of the loss that pulls each projected patch token towards the sum of the word
    # embeddings of its object's colour, shape and size plus its cell's relational code (zero for
    # an empty cell), so the language model sees the image in the same vectors as the words that
    # describe it.
    embed_weight: float = 0.0
    # Scenes hold 1..max_objects objects (the world's default is 6): fewer objects early make the
    # binding of question words to patches easier to find.
    max_objects: int = 6
    # Weights of the distractor kinds (irrelevant, wrong_answer, partly_false) in rationale rows.
    distractor_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Put the question's words under the loss too, not just what follows "A:".
    question_loss: bool = False


# Family weights (attribute, existence, count, spatial, comparison) of the stages that drill the
# two-hop families: finding the objects that two descriptions denote is what takes steps.
_TWO_HOP = (1, 1, 1, 3, 3)
_FOCUS = (0.5, 0.5, 0.5, 1.5, 3.5)
_SPATIAL = (0.5, 0.5, 0.5, 4, 1.5)
# Numbers below are written as the shipped build's checkpoint hashed them (0 and 0.0 hash
# differently in BuildConfig.digest), so `make default-model` resumes that checkpoint.


def _drill(name: str, max_objects: int, steps: int, family_weights: tuple[float, ...]) -> Stage:
    """A stage of answer rows only, in scenes of at most ``max_objects``, families as weighted."""
    return Stage(
        f"{name}-{max_objects}",
        steps=steps,
        lr=5e-4,
        warmup=20,
        mix=(1, 0, 0, 0),
        embed_weight=1.0,
        max_objects=max_objects,
        family_weights=family_weights,
        question_loss=True,
    )


# Scenes of up to three objects: three answer rows in four and captions, the two-hop families
# weighted up.
_GROW = Stage(
    "grow-3",
    steps=500,
    lr=1e-3,
    warmup=30,
    mix=(0.75, 0, 0, 0.25),
    embed_weight=1.0,
    max_objects=3,
    family_weights=_TWO_HOP,
    question_loss=True,
)

# Full scenes (1-6 objects): answers and captions, the two-hop families weighted up.
_ANSWERS = Stage(
    "answers",
    steps=1800,
    lr=1e-3,
    warmup=30,
    mix=(0.6, 0, 0, 0.4),
    embed_weight=1.0,
    family_weights=(1, 1, 1, 2.5, 2.5),
    question_loss=True,
)

# The "seeing that" text: distractor rationales (never gold), a few random true statements, answers
# and captions kept in the mix; spatial questions, which this stage unlearns fastest, weighted up.
_RATIONALES = Stage(
    "rationales",
    steps=400,
    lr=3e-4,
    warmup=30,
    mix=(0.35, 0.45, 0.1, 0.1),
    embed_weight=1.0,
    family_weights=(1, 1, 1, 3, 1.5),
    question_loss=True,
)

DEFAULT_STAGES = (
    # 1. The vision tower alone, on dense per-cell labels (colour, shape, size or empty; row, col).
    Stage("vision", steps=80, lr=2e-3, warmup=20, lm=False),
    # 2. Scenes of one or two objects: captions and answers; patch tokens pulled towards the word
    #    embeddings of what they show, so words and patches meet in one space. From here on the
    #    question's words are under the loss too.
    Stage(
        "small",
        steps=400,
        lr=1e-3,
        warmup=100,
        mix=(0.5, 0.0, 0.0, 0.5),
        embed_weight=1.0,
        max_objects=2,
        question_loss=True,
    ),
    # 3-5. Scenes that grow to three, then four objects; three answer rows in four, the two-hop
    #    families weighted up: a description now has to pick its object out of several. Scenes of
    #    three objects get 400 more steps (grow-3b), as in every trial of the relational cell code.
    _GROW,
    replace(_GROW, name="grow-3b", steps=400),
    replace(_GROW, name="grow-4", steps=700, max_objects=4),
    # 6. Full scenes (1-6 objects): answers and captions, the two-hop families still weighted up.
    _ANSWERS,
    # 7-9. Focused drill: answer rows only, mostly comparison and spatial, scenes of 2, 3, 4 objects.
    *(_drill("focus", n, steps, _FOCUS) for n, steps in ((2, 100), (3, 300), (4, 300))),
    # 10-12. The same drill for spatial questions, in scenes of 3, 4 and up to 6 objects.
    *(_drill("spatial", n, 300, _SPATIAL) for n in (3, 4, 6)),
    # 13. The answers stage again, shorter and lower, so the other families come back.
    replace(_ANSWERS, name="consolidate", steps=400, lr=5e-4, warmup=20, family_weights=(1, 1, 1, 1.5, 1.5)),
    # 14. The "seeing that" text (see _RATIONALES).
    _RATIONALES,
    # 15-16. A last spatial drill and a short rationale stage at a low LR: the full-scene stages
    #    above take back part of what the spatial drill taught; this keeps more of it.
    replace(_drill("spatial", 6, 400, _SPATIAL), name="spatial-6b", lr=3e-4),
    replace(_RATIONALES, name="rationales-2", steps=200, lr=2e-4, warmup=20),
)

# Fields that do not change the weights (left out of the checkpoint digests).
_NOT_HASHED = ("save_every", "eval_every", "eval_items", "extra")


@dataclass(frozen=True)
class BuildConfig:
    """Everything the build depends on (hashed into the checkpoint and the manifest)."""

    seed: int = 0
    data_seed: int = 0
    world_seed: int = 0
    reserve: int = 2000
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    rope_theta: float = 1e6
    # Initialise each language-model attention head with W_k = W_q, so that at the start a word
    # attends to the image tokens that carry the same word embedding (see Stage.embed_weight).
    tied_qk_init: bool = False
    # Standard deviation of the language model's input embeddings at initialisation (Llama's
    # default is 0.02); larger keeps a word's identity visible in the residual stream.
    embed_init_std: float = 1.0
    # Standard deviation of the relational cell code added to each occupied cell's embedding target
    # (see relational_cell_code; 0 leaves the target the bare word-embedding sum) and its seed.
    cell_code_std: float = 0.5
    cell_code_seed: int = 7
    batch_size: int = 64
    threads: int = 1
    save_every: int = 100
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    weight_decay: float = 0.05
    clip: float = 1.0
    eval_items: int = 500
    eval_every: int = 300
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, stages: int | None = None) -> str:
        """Hash of what determines the weights after the first ``stages`` stages (all: None)."""
        data = {k: v for k, v in self.to_json().items() if k not in _NOT_HASHED}
        data["stages"] = data["stages"][: len(self.stages) if stages is None else stages]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS ("full" strategy)


def build_tokenizer():
    """The word-level tokenizer over the world's lexicon and the prompt words (deterministic)."""
    from illume.models.tiny import train_word_tokenizer

    words = list(dict.fromkeys([*lexicon(), *PROMPT_WORDS]))
    return train_word_tokenizer(words, ["<image>"])


def build_model(config: BuildConfig, tokenizer) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 4,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    llava_config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava_config)
    if config.embed_init_std != 0.02:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, config.embed_init_std)
    if config.tied_qk_init:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.k_proj.weight.copy_(layer.self_attn.q_proj.weight)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
    )
    return model


class AuxHeads(nn.Module):
    """Per-cell colour/shape/size classifiers on vision features and on projected features."""

    def __init__(
        self,
        vision_hidden: int,
        text_hidden: int,
        grid: int = 4,
        word_ids: torch.Tensor | None = None,
        cell_code: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        # Token id of each cell label value (colour, shape, size; -1 for "empty"), for embedding_loss.
        self.register_buffer(
            "word_ids", word_ids if word_ids is not None else torch.full((3, 6), -1), persistent=False
        )
        # The vector added to each occupied cell's embedding target (zeros: none); derived from the
        # config, so not saved with the heads.
        self.register_buffer(
            "cell_code",
            cell_code if cell_code is not None else torch.zeros(grid * grid, text_hidden),
            persistent=False,
        )
        self.grid = grid
        total = sum(CELL_HEADS.values()) + 2 * grid
        self.vision = nn.Linear(vision_hidden, total)
        self.text = nn.Linear(text_hidden, total)

    def loss(self, head: nn.Linear, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the cell labels, plus each patch's row and column (kept explicit
        in the features so spatial questions can use them)."""
        logits = head(feats[:, 1:])  # patch tokens (index 0 is CLS)
        cells = torch.cat([cells, _positions(self.grid, cells.shape[0])], dim=1)
        sizes = [*CELL_HEADS.values(), self.grid, self.grid]
        out, start = 0.0, 0
        for i, n in enumerate(sizes):
            part = logits[..., start : start + n]
            out = out + F.cross_entropy(part.reshape(-1, n), cells[:, i].reshape(-1))
            start += n
        return out / len(sizes)


# The relations of relational_cell_code: (name, holds(row_c, col_c, row_k, col_k)), in code order.
CELL_RELATIONS = (
    ("left_of", lambda rc, cc, rk, ck: rc == rk and cc < ck),
    ("right_of", lambda rc, cc, rk, ck: rc == rk and cc > ck),
    ("above", lambda rc, cc, rk, ck: cc == ck and rc < rk),
    ("below", lambda rc, cc, rk, ck: cc == ck and rc > rk),
)


def relational_cell_code(grid: int, dim: int, seed: int, std: float) -> torch.Tensor:
    """(grid * grid, dim) fixed vectors, one per cell (index row * grid + col).

    A cell's vector sums a random part of its own and, for every relation in ``CELL_RELATIONS`` and
    every cell k it stands in that relation to, a random part shared by all cells in that relation
    to k. "Left of cell k" is then one direction in the patch tokens, which a question about k can
    read with a single attention lookup; a row and a column vector would need a conjunction."""
    g = torch.Generator().manual_seed(seed)
    cells = grid * grid
    own = torch.randn(cells, dim, generator=g) * std
    rel = torch.randn(len(CELL_RELATIONS), cells, dim, generator=g) * std
    code = own.clone()
    for c in range(cells):
        for ri, (_, holds) in enumerate(CELL_RELATIONS):
            for k in range(cells):
                if holds(*divmod(c, grid), *divmod(k, grid)):
                    code[c] += rel[ri, k]
    return code


def label_word_ids(tokenizer) -> torch.Tensor:
    """(3, 6) token ids of the cell label values (-1 for "none" and for padding)."""
    out = torch.full((3, 6), -1, dtype=torch.long)
    for i, values in enumerate((CELL_COLOURS, CELL_SHAPES, CELL_SIZES)):
        for j, value in enumerate(values[1:], start=1):
            out[i, j] = tokenizer.convert_tokens_to_ids(value)
    return out


def _positions(grid: int, batch: int) -> torch.Tensor:
    index = torch.arange(grid * grid)
    return torch.stack([index // grid, index % grid]).unsqueeze(0).expand(batch, 2, grid * grid)


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision features as LLaVA selects them, projected features) for a batch of images."""
    inner = model.model
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1]
    return hidden, inner.multi_modal_projector(hidden)


class _Capture:
    """Forward hook keeping the projector's input and output of the last call."""

    def __init__(self) -> None:
        self.inp: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def __call__(self, module, args, output) -> None:
        self.inp, self.out = args[0], output


def lr_at(stage: Stage, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, heads: nn.Module, config: BuildConfig, stage: Stage):
    vision, other = [], []
    for name, p in model.named_parameters():
        (vision if ".vision_tower." in f".{name}" else other).append(p)
    groups = [
        {"params": vision, "scale": stage.vision_lr_scale},
        {"params": other + list(heads.parameters()), "scale": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)


def batch_for(config: BuildConfig, stage_index: int, step: int, encoder: TextEncoder, reserved: set) -> Batch:
    stage = config.stages[stage_index]
    rng = random.Random(f"default-model/{config.data_seed}/{stage_index}/{step}")
    world = WorldConfig() if stage.max_objects >= 6 else WorldConfig(max_objects=stage.max_objects)
    items = draw_items(rng, config.batch_size, stage.family_weights, reserved, world)
    kinds = rng.choices(KINDS, weights=stage.mix, k=len(items))
    weights = dict(zip(("irrelevant", "wrong_answer", "partly_false"), stage.distractor_weights, strict=True))
    return make_batch(items, kinds, rng, encoder, weights, stage.question_loss)


def training_loss(model, heads, capture: _Capture, batch: Batch, stage: Stage) -> tuple[torch.Tensor, dict]:
    if not stage.lm:
        hidden, projected = image_features(model, batch.pixel_values)
        aux = heads.loss(heads.vision, hidden, batch.cells) + heads.loss(heads.text, projected, batch.cells)
        return aux, {"aux": aux.item()}
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    )
    logits = out.logits[:, :-1].float()
    target = batch.labels[:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    aux = heads.loss(heads.vision, capture.inp, batch.cells) + heads.loss(
        heads.text, capture.out, batch.cells
    )
    parts = {"lm": lm.item(), "aux": aux.item()}
    loss = lm + stage.aux_weight * aux
    if stage.embed_weight:
        embed = embedding_loss(model, capture.out, batch.cells, heads.word_ids, heads.cell_code)
        parts["embed"] = embed.item()
        loss = loss + stage.embed_weight * embed
    return loss, parts


def embedding_loss(
    model,
    projected: torch.Tensor,
    cells: torch.Tensor,
    word_ids: torch.Tensor,
    cell_code: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative squared distance of each projected patch token to its target: the sum of the word
    embeddings of its object's colour, shape and size, plus the cell's ``cell_code`` row when the
    cell holds an object (an empty cell's target is zero)."""
    table = model.get_input_embeddings().weight.detach()
    target = 0.0
    for i in range(cells.shape[1]):
        ids = word_ids[i][cells[:, i]]  # (B, cells); -1 for an empty cell
        target = target + table[ids.clamp(min=0)] * (ids >= 0).unsqueeze(-1)
    if cell_code is not None:
        occupied = (cells[:, 0] > 0).unsqueeze(-1)  # colour "none" marks an empty cell
        target = target + cell_code.to(table.dtype) * occupied
    pred = projected[:, 1:]
    return ((pred - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean().clamp(min=1e-6)


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def quick_eval(model, encoder: TextEncoder, items, batch_size: int = 100) -> dict[str, float]:
    """Teacher-forced answer accuracy: the first continuation token is the (one-token) answer."""
    from illume.models.default_build.data import make_batch as mk

    model.eval()
    right: dict[str, list[int]] = {f: [] for f in FAMILIES}
    rng = random.Random(0)
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            b = mk(chunk, ["answer"] * len(chunk), rng, encoder)
            logits = model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values
            ).logits
            for r, item in enumerate(chunk):
                pos = int((b.labels[r] != -100).nonzero()[0])
                right[item.family].append(int(logits[r, pos - 1].argmax() == b.labels[r, pos]))
    model.train()
    out = {f: sum(v) / max(1, len(v)) for f, v in right.items()}
    out["overall"] = sum(sum(v) for v in right.values()) / max(1, sum(len(v) for v in right.values()))
    return out


class Interrupted(RuntimeError):
    """The build stopped early on purpose (``stop_after``); its checkpoint is saved."""


def train(
    config: BuildConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Run (or resume) every stage; returns the trained model, its tokenizer and training records.

    ``stop_after`` ends this call after that many optimiser steps, with a checkpoint saved, by
    raising ``Interrupted`` (for time-boxed runs and for testing resumption)."""
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    torch.manual_seed(config.seed + 1)
    grid = config.image_size // config.patch_size
    heads = AuxHeads(
        config.vision_hidden,
        config.text_hidden,
        grid,
        label_word_ids(tokenizer),
        relational_cell_code(grid, config.text_hidden, config.cell_code_seed, config.cell_code_std),
    )
    capture = _Capture()
    model.model.multi_modal_projector.register_forward_hook(capture)
    encoder = TextEncoder(tokenizer, config.image_tokens)
    reserved = reserved_scenes(config.world_seed, config.reserve)
    val = generate({"train": 0, "val": config.eval_items}, config.world_seed)["val"]

    ckpt_path = work_dir / "checkpoint.pt"
    records: dict[str, Any] = {"stages": {}, "seconds": 0.0}
    start_stage, start_step, opt_state = 0, 0, None
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        # A checkpoint stands for the stages it has started; later stages may change freely.
        started = ckpt["stage"] + (1 if ckpt["step"] else 0)
        if ckpt["config_digest"] != config.digest(started):
            raise RuntimeError(f"{ckpt_path} belongs to another build config; remove {work_dir} to rebuild")
        model.load_state_dict(ckpt["model"])
        heads.load_state_dict(ckpt["heads"])
        start_stage, start_step, opt_state = ckpt["stage"], ckpt["step"], ckpt["optimizer"]
        records = ckpt["records"]
        log(f"resumed from {ckpt_path}: stage {start_stage} step {start_step}")

    model.train()
    steps_here = 0
    for si in range(start_stage, len(config.stages)):
        stage = config.stages[si]
        opt = make_optimizer(model, heads, config, stage)
        step0 = start_step if si == start_stage else 0
        if si == start_stage and opt_state is not None:
            opt.load_state_dict(opt_state)
        t0 = time.time()
        for step in range(step0, stage.steps):
            batch = batch_for(config, si, step, encoder, reserved)
            lr = lr_at(stage, step)
            for group in opt.param_groups:
                group["lr"] = lr * group["scale"]
            loss, parts = training_loss(model, heads, capture, batch, stage)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), config.clip)
            opt.step()
            done = step + 1
            steps_here += 1
            stopping = stop_after is not None and steps_here >= stop_after
            if done % 50 == 0 or done == stage.steps:
                elapsed = time.time() - t0
                log(
                    f"stage {stage.name} step {done}/{stage.steps} lr {lr:.2e} "
                    + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                    + f" ({elapsed / (done - step0):.2f} s/step)"
                )
            if done % config.save_every == 0 or done == stage.steps or stopping:
                records["seconds"] += time.time() - t0
                t0 = time.time()
                step0 = done
                at_end = done == stage.steps
                if stage.lm and (at_end or done % config.eval_every == 0) and not stopping:
                    acc = quick_eval(model, encoder, val)
                    records["stages"][stage.name] = {"val_answer_accuracy_teacher_forced": acc}
                    log(f"stage {stage.name} step {done}: val answer accuracy {json.dumps(acc)}")
                _save(
                    ckpt_path,
                    {
                        "config_digest": config.digest(si + 1),
                        "model": model.state_dict(),
                        "heads": heads.state_dict(),
                        "optimizer": opt.state_dict() if not at_end else None,
                        "stage": si + 1 if at_end else si,
                        "step": 0 if at_end else done,
                        "records": records,
                    },
                )
            if stopping:
                raise Interrupted(f"stopped after {steps_here} steps at stage {stage.name} step {done}")
        opt_state = None
    model.eval()
    return model, tokenizer, records
