"""Offline evaluation of a model (optionally with an adapter) on a VQA-X style data set.

Contract: ``evaluate(model_dir, items, ...)`` (or ``evaluate_generator`` on a loaded ``Generator``)
runs three measurements per item, batched through ``Generator.generate``:

1. **answers**: the greedy answer to ``Q: {q} A:``; answer accuracy is exact match (lower-cased,
   stripped, final period dropped) against any of the item's answers;
2. **explanations**: one greedy rationale (temperature 0) per item, scored against all the item's
   gold explanations with BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap, percent);
3. **acceptance**: ``n`` sampled candidates (split across ``temperatures``, top-k 10%, as in the
   paper) judged by every critic; acceptance per candidate and per question (share of questions
   with at least one accepted candidate: the paper's "4% at round 0"), plus the greedy rationale's
   acceptance.

Which answer the rationales explain (``condition_on``): ``"gold"`` (default) puts the gold answer
into ``Q: {q} A: {answer}, seeing that``, as ILLUME's training iterations sample rationales and as
its evaluation script does with ``--ground_truth``; explanation scores then measure the rationale
alone, not the answer. ``"model"`` uses the model's own greedy answer (the reference script's
default), so a wrong answer also costs explanation scores.

Every score is reported overall and per question family (``item.extra["family"]``; items without
one are grouped under ``"other"``). Sampling seeds derive from ``(seed, question_id)``, so an item
gets the same candidates whatever ``limit``, ``batch_size`` or the order of items.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from illume.critics import CRITICS, Critic, critic_input, make_critic
from illume.data.vqax import VQAXItem
from illume.evaluation.metrics import acceptance, answer_accuracy, caption_scores, normalise_answer
from illume.generation.generator import GenerateRequest, Generator, SamplingParams, chunked
from illume.images import load_image_file
from illume.seeds import derived_seed

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
EMPTY_PREDICTION = "<empty>"  # pycocoevalcap cannot score an empty string; this scores as a miss
NO_FAMILY = "other"


@dataclass(frozen=True)
class ItemResult:
    """What the model did on one item."""

    question_id: str
    family: str
    answer: str  # the gold (majority) answer
    predicted_answer: str
    correct: bool
    conditioned_on: str  # the answer the rationales explain
    greedy_rationale: str
    greedy_accepted: dict[str, bool]
    candidates: list[str]
    accepted: dict[str, list[bool]]  # critic -> verdict per candidate


@dataclass(frozen=True)
class GroupScores:
    """Scores over a group of items (all, or one family)."""

    items: int
    answer_accuracy: float
    captions: dict[str, float]
    acceptance: dict[str, dict[str, float]]  # critic -> per_candidate, per_question, greedy, candidates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """The result of one evaluation run."""

    overall: GroupScores
    per_family: dict[str, GroupScores]
    settings: dict[str, Any]
    seconds: float
    samples: list[ItemResult] = field(default_factory=list)

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "overall": self.overall.to_dict(),
            "per_family": {k: v.to_dict() for k, v in self.per_family.items()},
            "settings": self.settings,
            "seconds": self.seconds,
        }
        if samples:
            out["samples"] = [asdict(s) for s in self.samples]
        return out

    def format_table(self) -> str:
        """A plain-text table: one row per family and one for all items."""
        critics = list(self.overall.acceptance)
        captions = [m for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if m in self.overall.captions]
        header = ["group", "items", "answer acc", *captions]
        for c in critics:
            header += [f"{c} acc/cand", f"{c} acc/q", f"{c} greedy"]
        rows = [[name, *_cells(g, captions, critics)] for name, g in sorted(self.per_family.items())]
        rows.append(["all", *_cells(self.overall, captions, critics)])
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
        ]
        s = self.settings
        lines.append(
            f"model={s.get('model')} adapter={s.get('adapter')} n={s.get('n')} "
            f"temperatures={s.get('temperatures')} seed={s.get('seed')} condition_on={s.get('condition_on')} "
            f"({self.seconds:.1f} s)"
        )
        return "\n".join(lines)


def _cells(g: GroupScores, captions: Sequence[str], critics: Sequence[str]) -> list[str]:
    cells = [str(g.items), f"{100 * g.answer_accuracy:.2f}"]
    cells += [f"{g.captions.get(m, math.nan):.2f}" for m in captions]
    for c in critics:
        a = g.acceptance[c]
        cells += [
            f"{100 * a['per_candidate']:.2f}",
            f"{100 * a['per_question']:.2f}",
            f"{100 * a['greedy']:.2f}",
        ]
    return cells


def item_seed(seed: int, question_id: str) -> int:
    """The sampling seed of one item (independent of batching and order)."""
    return derived_seed("illume-eval", seed, question_id)


def family_of(item: VQAXItem) -> str:
    return str(item.extra.get("family") or NO_FAMILY)


def evaluate_generator(
    generator: Generator,
    items: Sequence[VQAXItem],
    *,
    adapter: str | None = None,
    critics: Sequence[Critic] | None = None,
    n: int = 10,
    temperatures: Sequence[float] = (0.3, 0.9),
    top_k_fraction: float = 0.1,
    max_new_tokens: int = 100,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    condition_on: Literal["gold", "model"] = "gold",
    meteor: bool = True,
    tokenize: bool = True,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Evaluate the model behind ``generator`` (with the installed ``adapter``, or the base model)."""
    from tqdm import tqdm

    if condition_on not in ("gold", "model"):
        raise ValueError(f"condition_on must be 'gold' or 'model', not {condition_on!r}")
    critics = list(critics) if critics is not None else [make_critic(name) for name in CRITICS]
    started = time.perf_counter()
    chosen = list(items)[:limit] if limit is not None else list(items)
    results: list[ItemResult] = []
    bar = tqdm(total=len(chosen), desc="evaluating", unit="item", disable=not progress)
    try:
        for chunk in chunked(chosen, batch_size):
            results.extend(
                _evaluate_chunk(
                    generator,
                    chunk,
                    adapter=adapter,
                    critics=critics,
                    sampling=SamplingParams(
                        n=n,
                        temperatures=tuple(temperatures),
                        top_k_fraction=top_k_fraction,
                        max_new_tokens=max_new_tokens,
                        seed=seed,
                    ),
                    condition_on=condition_on,
                )
            )
            bar.update(len(chunk))
    finally:
        bar.close()
    by_id = {item.question_id: item for item in chosen}
    names = [c.name for c in critics]
    families = sorted({r.family for r in results})
    groups = {f"family/{f}": [r.question_id for r in results if r.family == f] for f in families}
    groups["all"] = [r.question_id for r in results]
    scored = [r for r in results if by_id[r.question_id].explanations]
    captions = caption_scores_by_group(
        {r.question_id: r.greedy_rationale for r in scored},
        {r.question_id: list(by_id[r.question_id].explanations) for r in scored},
        groups,
        meteor=meteor,
        tokenize=tokenize,
    )
    overall = score_group(results, by_id, names, captions.get("all", {}))
    per_family = {
        f: score_group([r for r in results if r.family == f], by_id, names, captions.get(f"family/{f}", {}))
        for f in families
    }
    return EvalReport(
        overall=overall,
        per_family=per_family,
        settings={
            **dict(settings or {}),
            "adapter": (settings or {}).get("adapter", adapter),
            "n": n,
            "temperatures": list(temperatures),
            "top_k_fraction": top_k_fraction,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "limit": limit,
            "items": len(chosen),
            "condition_on": condition_on,
            "critics": names,
        },
        seconds=time.perf_counter() - started,
        samples=results,
    )


def _evaluate_chunk(
    generator: Generator,
    chunk: Sequence[VQAXItem],
    *,
    adapter: str | None,
    critics: Sequence[Critic],
    sampling: SamplingParams,
    condition_on: str,
) -> list[ItemResult]:
    images = [load_image_file(item.image_path) for item in chunk]
    greedy = SamplingParams(
        n=1, temperatures=(0.0,), top_k_fraction=1.0, max_new_tokens=sampling.max_new_tokens
    )
    # One generate call: the answer step (+ a greedy rationale for the model's answer), the greedy
    # rationale for the gold answer and the sampled candidates. With condition_on="model" the
    # sampled requests carry no answer, so the generator answers them (greedy: the same answer).
    given = (lambda item: item.answer) if condition_on == "gold" else (lambda item: None)
    requests: list[GenerateRequest] = []
    for item, image in zip(chunk, images, strict=True):
        requests.append(
            GenerateRequest(image=image, question=item.question, sampling=greedy, adapter=adapter)
        )
    if condition_on == "gold":
        for item, image in zip(chunk, images, strict=True):
            requests.append(
                GenerateRequest(
                    image=image, question=item.question, answer=item.answer, sampling=greedy, adapter=adapter
                )
            )
    for item, image in zip(chunk, images, strict=True):
        params = SamplingParams(**{**sampling.__dict__, "seed": item_seed(sampling.seed, item.question_id)})
        requests.append(
            GenerateRequest(
                image=image, question=item.question, answer=given(item), sampling=params, adapter=adapter
            )
        )
    replies = generator.generate(requests)
    k = len(chunk)
    answered, sampled = replies[:k], replies[-k:]
    greedy_replies = replies[k : 2 * k] if condition_on == "gold" else answered
    out = []
    for i, item in enumerate(chunk):
        predicted = answered[i].answer
        conditioned = item.answer if condition_on == "gold" else predicted
        view = critic_input(item, conditioned)
        greedy_text = greedy_replies[i].candidates[0].text if greedy_replies[i].candidates else ""
        candidates = [c.text for c in sampled[i].candidates]
        accepted = {c.name: [v.accepted for v in c.judge_all(candidates, view)] for c in critics}
        greedy_accepted = {c.name: bool(greedy_text) and c.judge(greedy_text, view).accepted for c in critics}
        out.append(
            ItemResult(
                question_id=item.question_id,
                family=family_of(item),
                answer=item.answer,
                predicted_answer=predicted,
                correct=normalise_answer(predicted) in {normalise_answer(a) for a in item.answers},
                conditioned_on=conditioned,
                greedy_rationale=greedy_text,
                greedy_accepted=greedy_accepted,
                candidates=candidates,
                accepted=accepted,
            )
        )
    return out


def caption_scores_by_group(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    groups: Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
    tokenize: bool = True,
) -> dict[str, dict[str, float]]:
    """``caption_scores`` for several groups of ids, starting Java (PTB tokenizer, METEOR) once.

    Texts are normalised and PTB-tokenised once for all groups; each group is then scored with
    ``caption_scores(tokenize=False, meteor=False)`` and METEOR through one shared scorer.
    """
    from illume.critics.rouge import normalise
    from illume.evaluation.metrics import java_available, stop_meteor

    preds = {k: normalise(v) or EMPTY_PREDICTION for k, v in predictions.items()}
    refs = {k: [normalise(r) for r in references[k]] for k in predictions}
    java = java_available()
    if tokenize and java and preds:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        joined = {f"p/{k}": [{"caption": v}] for k, v in preds.items()}
        joined.update({f"r/{k}": [{"caption": r} for r in v] for k, v in refs.items()})
        tokens = PTBTokenizer().tokenize(joined)
        preds = {k: tokens[f"p/{k}"][0] or EMPTY_PREDICTION for k in preds}
        refs = {k: tokens[f"r/{k}"] for k in refs}
    out: dict[str, dict[str, float]] = {}
    for name, ids in groups.items():
        ids = [i for i in ids if i in preds]
        scores = caption_scores(
            {i: preds[i] for i in ids}, {i: refs[i] for i in ids}, tokenize=False, meteor=False
        )
        out[name] = {k: float(v) for k, v in scores.items()}
    if meteor and java and preds:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            for name, ids in groups.items():
                ids = [i for i in ids if i in preds]
                if ids:
                    value = scorer.compute_score({i: refs[i] for i in ids}, {i: [preds[i]] for i in ids})[0]
                    out[name]["METEOR"] = 100 * float(value)
        finally:
            stop_meteor(scorer)
    return {name: {m: out[name][m] for m in CAPTION_METRICS if m in out[name]} for name in out}


def score_group(
    results: Sequence[ItemResult],
    items: Mapping[str, VQAXItem],
    critics: Sequence[str],
    captions: Mapping[str, float],
) -> GroupScores:
    """Answer accuracy and critic acceptance over ``results``, with the group's caption scores."""
    accuracy = answer_accuracy(
        {r.question_id: r.predicted_answer for r in results},
        {r.question_id: list(items[r.question_id].answers) for r in results},
    )
    accepted: dict[str, dict[str, float]] = {}
    for name in critics:
        a = acceptance({r.question_id: r.accepted[name] for r in results})
        accepted[name] = {
            "per_candidate": a.per_candidate,
            "per_question": a.per_question,
            "greedy": sum(r.greedy_accepted[name] for r in results) / len(results) if results else 0.0,
            "candidates": float(a.candidates),
        }
    return GroupScores(
        items=len(results), answer_accuracy=accuracy, captions=dict(captions), acceptance=accepted
    )


def load_generator(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: str = "auto",
    adapter_name: str = "evaluated",  # not "eval": peft would clash with nn.Module.eval
) -> tuple[Generator, str | None]:
    """A generator for ``model_dir`` with ``adapter_dir`` installed as ``adapter_name`` (if given)."""
    from illume.models import ModelSettings, load_model

    generator = Generator(load_model(ModelSettings(path=Path(model_dir), device=device)))
    if adapter_dir is None:
        return generator, None
    from illume.training.round import load_adapter_model

    generator.loaded.model = load_adapter_model(generator.model, adapter_dir, adapter_name=adapter_name)
    return generator, adapter_name


def evaluate(
    model_dir: str | Path,
    items: Sequence[VQAXItem],
    *,
    adapter_dir: str | Path | None = None,
    critics: Sequence[Critic] | None = None,
    n: int = 10,
    temperatures: Sequence[float] = (0.3, 0.9),
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    condition_on: Literal["gold", "model"] = "gold",
    max_new_tokens: int = 100,
    top_k_fraction: float = 0.1,
    meteor: bool = True,
    tokenize: bool = True,
    device: str = "auto",
) -> EvalReport:
    """Load ``model_dir`` (and ``adapter_dir``) and evaluate it on ``items``; see the module docstring."""
    generator, adapter = load_generator(model_dir, adapter_dir, device)
    return evaluate_generator(
        generator,
        items,
        adapter=adapter,
        critics=critics,
        n=n,
        temperatures=temperatures,
        top_k_fraction=top_k_fraction,
        max_new_tokens=max_new_tokens,
        seed=seed,
        limit=limit,
        batch_size=batch_size,
        condition_on=condition_on,
        meteor=meteor,
        tokenize=tokenize,
        progress=progress,
        settings={"model": str(model_dir), "adapter": str(adapter_dir) if adapter_dir else None},
    )


__all__ = [
    "CAPTION_METRICS",
    "EvalReport",
    "GroupScores",
    "ItemResult",
    "caption_scores_by_group",
    "evaluate",
    "evaluate_generator",
    "item_seed",
    "load_generator",
    "score_group",
]
