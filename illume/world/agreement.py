"""How often the fact critic and the paper's ROUGE-L critic agree on the world's rationales.

Contract: ``critic_agreement(items, candidates_by_item)`` judges every candidate of every item with
``FactCritic`` (against the scene graph and facts) and ``RougeLCritic`` (against the item's gold
rationales, or the *other* gold rationales with ``leave_one_out=True``) and counts the four
outcomes. ``sampled_candidates`` stands in for a model's samples until a trained model exists:
distractor rationales plus lightly perturbed gold rationales. ``python -m illume.world.agreement``
prints the figures that docs/WORLD.md reports.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from illume.critics.base import CriticInput
from illume.critics.fact import FactCritic
from illume.critics.rouge import RougeLCritic
from illume.data.vqax import VQAXItem, load_vqax
from illume.world.build import WorldItem, generate
from illume.world.distractors import KINDS, tagged_distractors
from illume.world.vocab import COLOURS, SHAPES, SIZES

_SWAPS = {**{c: COLOURS for c in COLOURS}, **{s: SHAPES for s in SHAPES}, **{s: SIZES for s in SIZES}}


@dataclass(frozen=True)
class Agreement:
    """Outcome counts of two critics over the same candidates."""

    both_accept: int = 0
    both_reject: int = 0
    fact_only: int = 0
    rouge_only: int = 0

    @property
    def total(self) -> int:
        return self.both_accept + self.both_reject + self.fact_only + self.rouge_only

    @property
    def agreement(self) -> float:
        return (self.both_accept + self.both_reject) / self.total if self.total else 0.0

    @property
    def kappa(self) -> float:
        """Cohen's kappa: agreement beyond what the two acceptance rates give by chance."""
        n = self.total
        if not n:
            return 0.0
        pf = (self.both_accept + self.fact_only) / n
        pr = (self.both_accept + self.rouge_only) / n
        chance = pf * pr + (1 - pf) * (1 - pr)
        return (self.agreement - chance) / (1 - chance) if chance < 1 else 1.0

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "agreement": self.agreement, "kappa": self.kappa}


def _item_fields(item: WorldItem | VQAXItem) -> tuple[str, str, str, tuple[str, ...], dict[str, Any]]:
    if isinstance(item, VQAXItem):
        return item.question_id, item.question, item.answer, item.explanations, item.extra
    extra = {"scene": item.scene, "facts": item.facts, "family": item.family}
    return item.question_id, item.question, item.answer, tuple(item.rationales), extra


def critic_agreement(
    items: Sequence[WorldItem | VQAXItem],
    candidates_by_item: Mapping[str, Sequence[str]],
    *,
    leave_one_out: bool = False,
    fact: FactCritic | None = None,
    rouge: RougeLCritic | None = None,
) -> Agreement:
    """Count how the two critics' decisions line up over every (item, candidate)."""
    fact = fact or FactCritic()
    rouge = rouge or RougeLCritic()
    counts = {"both_accept": 0, "both_reject": 0, "fact_only": 0, "rouge_only": 0}
    for item in items:
        qid, question, answer, golds, extra = _item_fields(item)
        for candidate in candidates_by_item.get(qid, ()):
            refs = list(golds)
            if leave_one_out and candidate in refs:
                refs.remove(candidate)
            inp = CriticInput(question, answer, tuple(refs), extra.get("scene"), extra)
            f, r = fact.judge(candidate, inp).accepted, rouge.judge(candidate, inp).accepted
            key = (
                "both_accept"
                if f and r
                else "both_reject"
                if not (f or r)
                else "fact_only"
                if f
                else "rouge_only"
            )
            counts[key] += 1
    return Agreement(**counts)


def perturb(text: str, rng: random.Random) -> str:
    """A light edit of a rationale, as a sampling model might make: one word dropped, doubled,
    swapped with its neighbour or changed to another value of its attribute, or the tail cut off."""
    words = text.split()
    if len(words) < 3:
        return text
    op = rng.choice(("drop", "double", "swap", "value", "value", "truncate", "location"))
    i = rng.randrange(len(words))
    if op == "drop":
        del words[i]
    elif op == "double":
        words.insert(i, words[i])
    elif op == "swap" and i + 1 < len(words):
        words[i], words[i + 1] = words[i + 1], words[i]
    elif op == "value":
        spots = [j for j, w in enumerate(words) if w in _SWAPS]
        if spots:
            j = rng.choice(spots)
            words[j] = rng.choice([v for v in _SWAPS[words[j]] if v != words[j]])
    elif op == "truncate":
        words = words[: max(2, len(words) - rng.randint(1, 3))]
    else:
        words += ["in", "the", rng.choice(("picture", "image"))]
    return " ".join(words)


def sampled_candidates(
    items: Sequence[WorldItem | VQAXItem], seed: int = 0, distractors: int = 4, perturbed: int = 4
) -> dict[str, dict[str, list[str]]]:
    """Stand-in model samples, by kind (the distractor kinds and "perturbed"), then by question id."""
    out: dict[str, dict[str, list[str]]] = {kind: {} for kind in (*KINDS, "perturbed")}
    for item in items:
        qid, _, _, golds, _ = _item_fields(item)
        rng = random.Random(f"agreement/{seed}/{qid}")
        for text, kind in tagged_distractors(item, rng, distractors):
            out[kind].setdefault(qid, []).append(text)
        out["perturbed"][qid] = list(dict.fromkeys(perturb(rng.choice(golds), rng) for _ in range(perturbed)))
    return out


def agreement_report(items: Sequence[WorldItem | VQAXItem], seed: int = 0) -> dict[str, Agreement]:
    """The figures of docs/WORLD.md: gold (leave-one-out), then each kind of stand-in sample."""
    golds = {_item_fields(i)[0]: list(_item_fields(i)[3]) for i in items}
    report = {"gold (leave-one-out)": critic_agreement(items, golds, leave_one_out=True)}
    sampled = Agreement()
    for kind, candidates in sampled_candidates(items, seed).items():
        report[f"sampled: {kind.replace('_', ' ')}"] = agreement = critic_agreement(items, candidates)
        sampled = sampled + agreement
    report["sampled: all"] = sampled
    return report


def format_report(report: Mapping[str, Agreement]) -> str:
    header = "| candidates | n | both accept | both reject | fact only | ROUGE-L only | agreement | kappa |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, a in report.items():
        n = a.total or 1
        lines.append(
            f"| {name} | {a.total} | {a.both_accept} ({a.both_accept / n:.1%}) | "
            f"{a.both_reject} ({a.both_reject / n:.1%}) | {a.fact_only} ({a.fact_only / n:.1%}) | "
            f"{a.rouge_only} ({a.rouge_only / n:.1%}) | {a.agreement:.1%} | {a.kappa:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illume.world.agreement", description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="items to draw (ignored with --data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="a built world's VQA-X JSON file instead of fresh items")
    args = parser.parse_args(argv)
    items: Sequence[WorldItem | VQAXItem] = (
        load_vqax(args.data) if args.data else generate({"test": args.n}, seed=args.seed)["test"]
    )
    print(format_report(agreement_report(items, args.seed)))


if __name__ == "__main__":
    main()
