"""Measuring a checkpoint on the world: answer accuracy and round-0 fact-critic acceptance.

Contract: ``measure(model_dir, items, ...)`` loads the checkpoint through the serving path
(``illume.models.loading.load_model``, ``illume.generation.generator.Generator``), so what it measures is
what the server would produce:

- answers: ``Q: {q} A:`` decoded greedily (the request carries no answer); accuracy is the share
  of items whose cleaned, lower-cased answer equals the gold answer, overall and per family;
- round 0: for each item, ``n`` candidates at the given temperatures (top-k 10% of the vocabulary)
  continue ``Q: {q} A: {gold answer}, seeing that``; the fact critic judges every unique
  candidate. ``per_candidate`` is accepted / unique candidates; ``per_question`` is the share of
  items with at least one accepted candidate. Greedy rationales (temperature 0) are reported the
  same way when asked for (``greedy=True``), as the SFT check uses them.

It is a small stand-in for ``illume eval`` with the same definitions, used by the build's tests and
manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from illume.critics.base import CriticInput
from illume.critics.fact import FactCritic
from illume.generation.generator import GenerateRequest, Generator, SamplingParams
from illume.models.loading import LoadedModel, ModelSettings, load_model
from illume.world import FAMILIES, WorldItem, generate, render_scene


def world_split(split: str = "val", n: int = 200, seed: int = 0) -> list[WorldItem]:
    """The items ``illume eval`` builds when given no data: ``split`` alone, ``n`` items, ``seed``."""
    return generate({split: n}, seed)[split]


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _by_family(items: Sequence[WorldItem], flags: Sequence[Any], reduce=_share) -> dict[str, float]:
    out = {f: reduce([x for it, x in zip(items, flags, strict=True) if it.family == f]) for f in FAMILIES}
    out["overall"] = reduce(list(flags))
    return out


def measure(
    model: str | Path | LoadedModel,
    items: Sequence[WorldItem],
    *,
    n: int = 10,
    temperatures: tuple[float, ...] = (0.3, 0.9),
    seed: int = 0,
    greedy: bool = False,
    batch: int = 16,
    adapter: str | None = None,
) -> dict[str, Any]:
    loaded = (
        model if isinstance(model, LoadedModel) else load_model(ModelSettings(path=Path(model), device="cpu"))
    )
    generator = Generator(loaded)
    critic = FactCritic()
    images = [render_scene(it.scene) for it in items]
    correct: list[bool] = []
    for i in range(0, len(items), batch * 4):
        chunk = range(i, min(len(items), i + batch * 4))
        results = generator.generate(
            [
                GenerateRequest(
                    images[j],
                    items[j].question,
                    None,
                    SamplingParams(n=1, temperatures=(0.0,), max_new_tokens=1),
                    adapter,
                )
                for j in chunk
            ]
        )
        correct.extend(
            r.answer.strip().lower() == items[j].answer for j, r in zip(chunk, results, strict=True)
        )
    out: dict[str, Any] = {"items": len(items), "answer_accuracy": _by_family(items, correct)}
    plans = [("sampled", SamplingParams(n=n, temperatures=temperatures, seed=seed))]
    if greedy:
        plans.append(("greedy", SamplingParams(n=1, temperatures=(0.0,), seed=seed)))
    examples = []
    for name, sampling in plans:
        accepted_counts: list[tuple[int, int]] = []
        for i in range(0, len(items), batch):
            chunk = range(i, min(len(items), i + batch))
            results = generator.generate(
                [
                    GenerateRequest(images[j], items[j].question, items[j].answer, sampling, adapter)
                    for j in chunk
                ]
            )
            for j, result in zip(chunk, results, strict=True):
                item = items[j]
                ci = CriticInput(
                    item.question, item.answer, item.rationales, item.scene, {"facts": item.facts}
                )
                verdicts = [critic.judge(c.text, ci) for c in result.candidates]
                accepted_counts.append((sum(v.accepted for v in verdicts), len(verdicts)))
                if name == "sampled" and len(examples) < 8:
                    examples.append(
                        {
                            "question": item.question,
                            "answer": item.answer,
                            "candidates": [
                                (c.text, v.accepted) for c, v in zip(result.candidates, verdicts, strict=True)
                            ][:4],
                        }
                    )
        per_candidate = _by_family(
            items, accepted_counts, lambda xs: sum(a for a, _ in xs) / max(1, sum(t for _, t in xs))
        )
        per_question = _by_family(items, [a > 0 for a, _ in accepted_counts])
        out[name] = {
            "per_candidate": per_candidate,
            "per_question": per_question,
            "candidates_per_question": sum(t for _, t in accepted_counts) / max(1, len(accepted_counts)),
        }
    out["examples"] = examples
    return out
