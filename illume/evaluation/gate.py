"""The promotion gate: score a candidate adapter and the current production on the same items.

Contract (docs/ARCHITECTURE.md, "The gate"):

- **held-out set** (always): ``GateItem``s built from held-out generations of real feedback (never
  trained on, see ``illume.training.from_store.gate_items``); the references of an item are the
  rationales annotators accepted for it. ``score(generator, adapter, items, config)`` decodes one
  greedy rationale per item for the item's stored answer (``Q: {q} A: {answer}, seeing that``,
  temperature 0, at most ``max_new_tokens``) and returns ILLUME's caption scores (percent, as
  ``illume.evaluation.metrics.caption_scores``) against the references, plus ``items``;
- **held-out answers** (when ``answer_accuracy`` is among the held-out set's metrics): the model
  also answers each item whose answer is known (``GateItem.answer_known``: the client sent it, or an
  annotator judged the model's answer right) greedily from ``Q: {q} A:``; ``answer_accuracy`` is
  the percent that match it (ILLUME's answer normalisation) and ``answer_items`` how many were
  answered. Why: the rationale metrics never look at answers, and a round that explains well can
  still answer worse (docs/STUDY.md);
- **held-out preference** (when ``preference_accuracy`` is among the held-out set's metrics): on
  each item with both accepted (``references``) and rejected candidates (``GateItem.rejected``),
  the model's training loss of every one of them as the rationale of the item's answer
  (``rationale_losses``); ``preference_accuracy`` is the mean share of (accepted, rejected) pairs
  ranked right (lower loss on the accepted one, ties half), in percent, on ``preference_items``
  items. Both sides rank the same judged texts, where the caption scores compare each side's
  greedy rationale with candidates production sampled (docs/STUDY.md, "A gate that ranks");
- **curated sets** (optional): VQA-X style items with gold explanations, scored by
  ``score_curated`` through ``illume.evaluation.evaluate.evaluate_generator``: the caption scores of the
  greedy rationale, ``answer_accuracy`` and, per critic, ``acceptance/<critic>`` (share of
  questions with an accepted sampled candidate), ``acceptance/<critic>/per_candidate`` and
  ``acceptance/<critic>/greedy`` -- all in percent, so every tolerance is in points;
- ``decide(candidate, production, config)`` takes scores keyed by set name (``held_out`` and the
  curated set names; a flat score dict means the held-out set alone) and promotes only if, in every
  configured set, the candidate is not worse than production by more than the metric's tolerance on
  every configured metric. A set (or metric) missing from the candidate's or production's scores,
  a non-finite score, or the two sides scored on different numbers of items refuses promotion.
  A refusal's reason names each failing metric with both scores, the tolerance, the drop and the
  items scored on each side (``held_out/ROUGE-L 24.60 < production 39.30 - 2 (a drop of 14.70
  points on 12 / 12 items)``); a promotion's names the items and every metric's delta. A metric
  with its own evidence count (``answer_accuracy``: ``answer_items``; ``preference_accuracy``:
  ``preference_items``) is compared only when that count reaches ``min_items`` on both sides;
  below it the metric is skipped with a note naming the count (a deployment whose clients send no
  answers has no answers to check), and different counts on the two sides refuse;
- **too few items**: a set with fewer than ``min_items`` items refuses promotion (too little
  evidence), unless the set's ``allow_empty`` is set, in which case the set is skipped (with a
  note in the reason). Skipping covers both an empty and a too-small set, so more evidence never
  makes the gate stricter. If every set is skipped, the decision promotes (an operator who allows
  an empty held-out set at the start of a deployment accepts that the first rounds are unguarded).
  ``waiting_for_evidence(config, items)`` says why a round must not start yet (the same rule,
  applied before training: the LoopController and the round job wait for the split to fill).

The gate is deterministic: greedy decoding and seeded sampling, so re-scoring gives the same
numbers, and the candidate and production are scored on identical items.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from illume.adapters import PRODUCTION
from illume.critics import make_critic
from illume.evaluation.metrics import normalise_answer
from illume.generation.generator import GenerateRequest, Generator, SamplingParams, chunked
from illume.generation.prompts import rationale_prompt

HELD_OUT = "held_out"
ITEMS_KEY = "items"
DEFAULT_METRICS = ("ROUGE-L", "BLEU-4", "CIDEr")
ANSWER_ACCURACY = "answer_accuracy"
ANSWER_ITEMS = "answer_items"
PREFERENCE = "preference_accuracy"
PREFERENCE_ITEMS = "preference_items"
# Metrics measured on a subset of the items, with the key of that subset's size.
EVIDENCE_KEYS = {ANSWER_ACCURACY: ANSWER_ITEMS, PREFERENCE: PREFERENCE_ITEMS}
# What makes an item part of that subset (for the reason when the subset is too small).
_EVIDENCE_OF = {ANSWER_ITEMS: "answers known", PREFERENCE_ITEMS: "accepted and rejected candidates"}


@dataclass(frozen=True)
class GateItem:
    """One held-out item: the image (or a zero-argument loader), question, answer and references.

    ``answer_known``: the answer is a reference for the answer check (the client's, or one an
    annotator judged right), not only what production answered. ``rejected``: the item's
    candidates no annotator marked fitting (the preference check ranks ``references`` above
    them)."""

    generation_id: str
    image: Image.Image | Callable[[], Image.Image]
    question: str
    answer: str
    references: Sequence[str] = field(default_factory=tuple)
    answer_known: bool = True
    rejected: Sequence[str] = field(default_factory=tuple)

    def load_image(self) -> Image.Image:
        return self.image if isinstance(self.image, Image.Image) else self.image()


class GateSetConfig(BaseModel):
    """How one scored set takes part in the decision."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: tuple[str, ...] = Field(
        DEFAULT_METRICS,
        description="Score keys compared ('*' and '?' match within one '/' segment, e.g. 'acceptance/*'); "
        "the candidate may not fall below production by more than the metric's tolerance on any of them.",
    )
    tolerance: dict[str, float] = Field(
        default_factory=dict, description="Allowed drop per metric, in points (percent units)."
    )
    default_tolerance: float = Field(1.0, ge=0, description="Allowed drop of a metric not in 'tolerance'.")
    min_items: int = Field(20, ge=0, description="Fewer scored items than this is too little evidence.")
    allow_empty: bool = Field(
        False,
        description="Skip this set instead of refusing when it has fewer than min_items items "
        "(including none), e.g. while a new deployment has no held-out feedback yet.",
    )

    def tolerance_for(self, metric: str) -> float:
        return float(self.tolerance.get(metric, self.default_tolerance))


class CuratedSetConfig(GateSetConfig):
    """A curated evaluation set (VQA-X format) folded into the gate's decision."""

    metrics: tuple[str, ...] = Field(
        (*DEFAULT_METRICS, "answer_accuracy", "acceptance/*"),
        description="Score keys compared; 'acceptance/*' matches every critic's question acceptance.",
    )
    path: Path | None = Field(None, description="VQA-X JSON file of the set (loaded by the caller).")
    image_dir: Path | None = Field(None, description="Directory of the set's images (default: beside path).")
    limit: int | None = Field(None, ge=1, description="Score at most this many items (the first ones).")
    critics: tuple[str, ...] = Field(("rouge_l", "fact"), description="Critics judging sampled candidates.")
    n: int = Field(10, ge=1, description="Sampled candidates per item for acceptance.")
    temperatures: tuple[float, ...] = Field((0.3, 0.9), description="Sampling temperatures (the paper's).")
    seed: int = Field(0, description="Sampling seed (per item, derived from the question id).")


class GateConfig(GateSetConfig):
    """The promotion gate: the held-out set's rules, decoding settings and optional curated sets."""

    max_new_tokens: int = Field(100, ge=1, description="Longest greedy rationale, in tokens (the paper's).")
    batch_size: int = Field(8, ge=1, description="Items per generate call.")
    tokenize: bool = Field(
        True,
        description="PTB-tokenise before scoring (needs Java, as the reference evaluation); "
        "False splits on whitespace (faster).",
    )
    curated: dict[str, CuratedSetConfig] = Field(
        default_factory=dict, description="Curated sets by name (not 'held_out'), scored like evaluation."
    )

    def greedy_sampling(self) -> SamplingParams:
        """Greedy decoding: one candidate at temperature 0 (n=1, top-k over the whole vocabulary)."""
        return SamplingParams(
            n=1, temperatures=(0.0,), top_k_fraction=1.0, max_new_tokens=self.max_new_tokens
        )

    def sets(self) -> dict[str, GateSetConfig]:
        """Every set in the decision: the held-out set first, then the curated ones."""
        if HELD_OUT in self.curated:
            raise ValueError(f"a curated set may not be called {HELD_OUT!r}")
        return {HELD_OUT: self, **self.curated}


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict with the scores it compared (keyed by set name)."""

    promote: bool
    reason: str
    candidate: dict[str, Any]
    production: dict[str, Any]
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "candidate": self.candidate,
            PRODUCTION: self.production,
            "checks": self.checks,
        }


# --- scoring ---------------------------------------------------------------------------------


def greedy_rationales(
    generator: Generator, adapter: str | None, items: Sequence[GateItem], config: GateConfig
) -> list[str]:
    """One greedy rationale per item for the item's answer (batched, in item order)."""
    sampling = config.greedy_sampling()
    out: list[str] = []
    for chunk in chunked(list(items), config.batch_size):
        requests = [
            GenerateRequest(
                image=item.load_image(),
                question=item.question,
                answer=item.answer,
                sampling=sampling,
                adapter=adapter,
            )
            for item in chunk
        ]
        for result in generator.generate(requests):
            out.append(result.candidates[0].text if result.candidates else "")
    return out


def score(
    generator: Generator,
    adapter: str | None,
    items: Sequence[GateItem],
    config: GateConfig | None = None,
    *,
    tokenize: bool | None = None,
    meteor: bool | None = None,
) -> dict[str, float]:
    """Caption scores (percent) of the greedy rationales of ``adapter`` (None: base) against the
    items' references, plus ``items``. METEOR is computed only if asked or configured."""
    from illume.evaluation.evaluate import caption_scores_by_group

    config = config or GateConfig()
    usable = [item for item in items if item.references]
    if not usable:
        return {ITEMS_KEY: 0.0}
    predictions = greedy_rationales(generator, adapter, usable, config)
    keys = [f"{i}:{item.generation_id}" for i, item in enumerate(usable)]
    scores = caption_scores_by_group(
        dict(zip(keys, predictions, strict=True)),
        {k: list(item.references) for k, item in zip(keys, usable, strict=True)},
        {"all": keys},
        meteor=meteor if meteor is not None else "METEOR" in config.metrics,
        tokenize=tokenize if tokenize is not None else config.tokenize,
    )["all"]
    out = {ITEMS_KEY: float(len(usable)), **scores}
    if any(metric_matches(m, ANSWER_ACCURACY) for m in config.metrics):
        out |= answer_scores(generator, adapter, usable, config)
    if any(metric_matches(m, PREFERENCE) for m in config.metrics):
        out |= preference_scores(generator, adapter, usable, config)
    return out


def greedy_answers(
    generator: Generator, adapter: str | None, items: Sequence[GateItem], config: GateConfig
) -> list[str]:
    """The model's own greedy answer to each item's question (batched, in item order)."""
    # The answer step runs before any rationale; one rationale token keeps the rest cheap.
    sampling = SamplingParams(n=1, temperatures=(0.0,), top_k_fraction=1.0, max_new_tokens=1)
    out: list[str] = []
    for chunk in chunked(list(items), config.batch_size):
        requests = [
            GenerateRequest(
                image=item.load_image(), question=item.question, sampling=sampling, adapter=adapter
            )
            for item in chunk
        ]
        out.extend(result.answer for result in generator.generate(requests))
    return out


def answer_scores(
    generator: Generator, adapter: str | None, items: Sequence[GateItem], config: GateConfig
) -> dict[str, float]:
    """``answer_accuracy`` (percent) of ``adapter``'s greedy answers on the items whose answer is
    known, and ``answer_items``; no accuracy when no answer is known."""
    known = [item for item in items if item.answer_known]
    if not known:
        return {ANSWER_ITEMS: 0.0}
    predicted = greedy_answers(generator, adapter, known, config)
    hits = sum(
        normalise_answer(p) == normalise_answer(item.answer) for p, item in zip(predicted, known, strict=True)
    )
    return {ANSWER_ACCURACY: 100.0 * hits / len(known), ANSWER_ITEMS: float(len(known))}


def rationale_losses(
    generator: Generator, adapter: str | None, item: GateItem, texts: Sequence[str], batch_size: int
) -> list[float]:
    """``adapter``'s mean token loss (cross-entropy, nats) of each text as the rationale of the
    item's answer, in text order: the training objective's loss on that row (image, the rationale
    prompt, the text and EOS)."""
    from illume.generation.hf_engine import adapter_kwargs
    from illume.training.round import collate, encode_row, pad_token_id, row_losses
    from illume.training.snapshot import SnapshotRow

    loaded = generator.loaded
    image = item.load_image()
    prompt = rationale_prompt(item.question, item.answer)
    source = item.generation_id
    rows = [
        SnapshotRow(kind="rationale", source_id=source, image="", prompt=prompt, target=f" {text}")
        for text in texts
    ]
    examples = [encode_row(loaded, row, image) for row in rows]
    out: list[float] = []
    with generator.lock, torch.inference_mode():
        for chunk in chunked(examples, batch_size):
            batch = {k: v.to(loaded.device) for k, v in collate(chunk, pad_token_id(loaded)).items()}
            kwargs = adapter_kwargs(loaded.model, [adapter] * len(chunk))
            out.extend(float(x) for x in row_losses(loaded.model, batch, loaded.dtype, **kwargs))
    return out


def pairs_ranked_right(accepted: Sequence[float], rejected: Sequence[float]) -> float:
    """The share of (accepted, rejected) pairs whose accepted text has the lower loss (ties: half)."""
    wins = sum(1.0 if a < r else 0.5 if a == r else 0.0 for a in accepted for r in rejected)
    return wins / (len(accepted) * len(rejected))


def preference_scores(
    generator: Generator, adapter: str | None, items: Sequence[GateItem], config: GateConfig
) -> dict[str, float]:
    """``preference_accuracy`` (percent): over the items with both accepted and rejected
    candidates, the mean share of (accepted, rejected) pairs that ``adapter`` ranks right (lower
    loss on the accepted one), and ``preference_items``.

    Why: both sides rank the same judged candidates, so neither is measured against its own
    outputs; the caption metrics compare each side's greedy rationale with references production
    sampled, which favours production (docs/STUDY.md, "A gate that ranks")."""
    ranked = [item for item in items if item.references and item.rejected]
    if not ranked:
        return {PREFERENCE_ITEMS: 0.0}
    shares = []
    for item in ranked:
        texts = [*item.references, *item.rejected]
        losses = rationale_losses(generator, adapter, item, texts, config.batch_size)
        split = len(item.references)
        shares.append(pairs_ranked_right(losses[:split], losses[split:]))
    return {PREFERENCE: 100.0 * sum(shares) / len(shares), PREFERENCE_ITEMS: float(len(ranked))}


def score_curated(
    generator: Generator,
    adapter: str | None,
    items: Sequence[Any],
    config: CuratedSetConfig,
    *,
    critics: Sequence[Any] | None = None,
    tokenize: bool = True,
    max_new_tokens: int = 100,
    batch_size: int = 8,
) -> dict[str, float]:
    """Scores of a curated VQA-X set (``VQAXItem``s with gold explanations), all in percent."""
    from illume.evaluation.evaluate import evaluate_generator

    critics = list(critics) if critics is not None else [make_critic(name) for name in config.critics]
    report = evaluate_generator(
        generator,
        items,
        adapter=adapter,
        critics=critics,
        n=config.n,
        temperatures=config.temperatures,
        max_new_tokens=max_new_tokens,
        seed=config.seed,
        limit=config.limit,
        batch_size=batch_size,
        meteor=any(metric_matches(m, "METEOR") for m in config.metrics),
        tokenize=tokenize,
        progress=False,
    )
    overall = report.overall
    out: dict[str, float] = {ITEMS_KEY: float(overall.items), **overall.captions}
    out["answer_accuracy"] = 100 * overall.answer_accuracy
    for name, values in overall.acceptance.items():
        out[f"acceptance/{name}"] = 100 * values["per_question"]
        out[f"acceptance/{name}/per_candidate"] = 100 * values["per_candidate"]
        out[f"acceptance/{name}/greedy"] = 100 * values["greedy"]
    return out


def score_all(
    generator: Generator,
    adapter: str | None,
    held_out: Sequence[GateItem],
    config: GateConfig,
    curated: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of one adapter on the held-out set and every configured curated set (keyed by set)."""
    out = {HELD_OUT: score(generator, adapter, held_out, config)}
    for name, set_config in config.curated.items():
        items = (curated or {}).get(name)
        if items is None:
            continue  # decide() refuses: a configured set without scores
        out[name] = score_curated(
            generator,
            adapter,
            items,
            set_config,
            tokenize=config.tokenize,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
        )
    return out


def evaluate_gate(
    generator: Generator,
    candidate: str,
    production: str | None,
    held_out: Sequence[GateItem],
    config: GateConfig,
    curated: Mapping[str, Sequence[Any]] | None = None,
) -> GateDecision:
    """Score ``candidate`` and ``production`` (None: the base model) on the same items and decide."""
    return decide(
        score_all(generator, candidate, held_out, config, curated),
        score_all(generator, production, held_out, config, curated),
        config,
    )


# --- the decision ----------------------------------------------------------------------------


def waiting_for_evidence(config: GateSetConfig, items: int) -> str | None:
    """Why a round must wait for the held-out set to fill (None: it may run). A set with fewer
    than ``min_items`` items (at least one) refuses promotion unless ``allow_empty``, so training
    before it fills is wasted; the reason names both counts."""
    needed = max(config.min_items, 1)
    if config.allow_empty or items >= needed:
        return None
    return f"waiting for held-out evidence: {items} of {needed} items (min_items)"


def _by_set(scores: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Scores keyed by set name; a flat dict of numbers is the held-out set's."""
    if scores and all(isinstance(v, int | float) for v in scores.values()):
        return {HELD_OUT: dict(scores)}
    return {str(k): dict(v) for k, v in scores.items()}


def metric_matches(pattern: str, key: str) -> bool:
    """Whether a score key matches a metric pattern: ``*`` and ``?`` never cross a ``/``."""
    regex = re.escape(pattern).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.fullmatch(regex, key) is not None


def _metrics_of(patterns: Sequence[str], cand: Mapping[str, float], prod: Mapping[str, float]) -> list[str]:
    keys = sorted((set(cand) | set(prod)) - {ITEMS_KEY, *EVIDENCE_KEYS.values()})
    out: list[str] = []
    for pattern in patterns:
        if "*" in pattern or "?" in pattern:
            matched = [k for k in keys if metric_matches(pattern, k)]
            out.extend(matched or [pattern])  # a pattern matching nothing is reported missing
        else:
            out.append(pattern)
    return list(dict.fromkeys(out))


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class _Skip:
    message: str
    refuse: bool


def _metric_evidence(
    set_name: str,
    metric: str,
    rules: GateSetConfig,
    cand: Mapping[str, Any],
    prod: Mapping[str, Any],
    items: float,
) -> float | _Skip:
    """The items ``metric`` was measured on (both sides), or why it is not compared."""
    key = EVIDENCE_KEYS.get(metric)
    if key is None or (key not in cand and key not in prod):
        return items
    on_candidate, on_production = _num(cand.get(key)), _num(prod.get(key))
    if math.isnan(on_candidate) or on_candidate != on_production:
        return _Skip(
            f"{set_name}/{metric}: scored on different item counts ({on_candidate:g} vs {on_production:g})",
            refuse=True,
        )
    if on_candidate < max(rules.min_items, 1):
        return _Skip(
            f"{set_name}/{metric} not compared: {on_candidate:g} items with {_EVIDENCE_OF[key]} "
            f"< min_items {max(rules.min_items, 1)}",
            refuse=False,
        )
    return on_candidate


def decide(candidate: Mapping[str, Any], production: Mapping[str, Any], config: GateConfig) -> GateDecision:
    """Promote only if no configured metric of any set drops by more than its tolerance."""
    cand_sets, prod_sets = _by_set(candidate), _by_set(production)
    failures: list[str] = []
    notes: list[str] = []
    checks: list[dict[str, Any]] = []
    judged: list[tuple[str, float]] = []  # (set, items) of each set that was evidence
    for set_name, rules in config.sets().items():
        cand, prod = cand_sets.get(set_name), prod_sets.get(set_name)
        if cand is None or prod is None:
            side = "candidate" if cand is None else PRODUCTION
            failures.append(f"{set_name}: no {side} scores")
            continue
        items, prod_items = _num(cand.get(ITEMS_KEY)), _num(prod.get(ITEMS_KEY))
        if math.isnan(items) or items != prod_items:
            failures.append(f"{set_name}: scored on different item counts ({items:g} vs {prod_items:g})")
            continue
        # No item is never evidence, even with min_items 0: its metrics do not exist.
        if items < max(rules.min_items, 1):
            message = f"{set_name}: {items:g} items < min_items {max(rules.min_items, 1)}"
            if rules.allow_empty:
                notes.append(message + " (skipped: allow_empty)")
            else:
                failures.append(message)
            continue
        judged.append((set_name, items))
        for metric in _metrics_of(rules.metrics, cand, prod):
            evidence = _metric_evidence(set_name, metric, rules, cand, prod, items)
            if isinstance(evidence, _Skip):
                (failures if evidence.refuse else notes).append(evidence.message)
                continue
            c, p = _num(cand.get(metric)), _num(prod.get(metric))
            tolerance = rules.tolerance_for(metric)
            ok = math.isfinite(c) and math.isfinite(p) and c >= p - tolerance
            checks.append(
                {
                    "set": set_name,
                    "metric": metric,
                    "candidate": c,
                    PRODUCTION: p,
                    "tolerance": tolerance,
                    "ok": ok,
                }
            )
            if not (math.isfinite(c) and math.isfinite(p)):
                failures.append(f"{set_name}/{metric}: missing or not finite ({c:g} vs {p:g})")
            elif not ok:
                # The reason names the drop and the evidence behind it (both sides' item counts).
                failures.append(
                    f"{set_name}/{metric} {c:.2f} < production {p:.2f} - {tolerance:g} "
                    f"(a drop of {p - c:.2f} points on {evidence:g} / {evidence:g} items)"
                )
    if failures:
        reason = "refused: " + "; ".join(failures)
        promote = False
    elif not judged:
        reason = "promoted without evidence: " + "; ".join(notes)
        promote = True
    else:
        deltas = ", ".join(
            f"{c['set']}/{c['metric']} {c['candidate'] - c['production']:+.2f}" for c in checks
        )
        evidence = ", ".join(f"{name} {n:g} items" for name, n in judged)
        reason = f"promoted: within tolerance on {evidence} ({deltas})" + (
            "; " + "; ".join(notes) if notes else ""
        )
        promote = True
    return GateDecision(
        promote=promote,
        reason=reason,
        candidate={k: dict(v) for k, v in cand_sets.items()},
        production={k: dict(v) for k, v in prod_sets.items()},
        checks=checks,
    )


__all__ = [
    "ANSWER_ACCURACY",
    "ANSWER_ITEMS",
    "HELD_OUT",
    "PREFERENCE",
    "PREFERENCE_ITEMS",
    "CuratedSetConfig",
    "GateConfig",
    "GateDecision",
    "GateItem",
    "GateSetConfig",
    "answer_scores",
    "decide",
    "evaluate_gate",
    "greedy_answers",
    "greedy_rationales",
    "pairs_ranked_right",
    "preference_scores",
    "rationale_losses",
    "score",
    "score_all",
    "score_curated",
    "waiting_for_evidence",
]
