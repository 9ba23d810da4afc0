"""Distractor rationales: fluent statements about the scene that do not justify the answer.

Contract: ``distractor_rationales(item, rng, k)`` returns up to ``k`` distinct strings in the gold
rationales' surface style, never a gold rationale and never one the fact critic would accept.
They are the default model's pretraining rationales, so the base model is fluent but not aligned
(ILLUME's starting point). Three kinds, see ``tagged_distractors``:

- ``irrelevant``: true statements about the scene that cover none of the item's facts;
- ``wrong_answer``: the gold templates rendered with one fact changed (one wrong value), so false;
- ``partly_false``: an irrelevant true statement joined to a false one about another object.

They are never stored in an item's ``explanation`` list.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from illume.data.vqax import VQAXItem
from illume.world import grammar
from illume.world.build import WorldItem
from illume.world.language import (
    a,
    attributes,
    gold_rationales,
    landmark_text,
    predicate,
    the,
    unique_descriptions,
)
from illume.world.scene import matching, related
from illume.world.vocab import COLOURS, RELATION_TEXT, RELATIONS, SHAPES, SIZES, number_word

KINDS: tuple[str, ...] = ("irrelevant", "wrong_answer", "partly_false")
_VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


def _fields(item: Any) -> tuple[dict[str, Any], str, list[dict[str, Any]], tuple[str, ...]]:
    """(scene, family, facts, golds) of a WorldItem or a VQAXItem carrying the world's extras."""
    if isinstance(item, VQAXItem):
        extra = item.extra
        return extra["scene"], extra["family"], extra["facts"], item.explanations
    return item.scene, item.family, item.facts, tuple(item.rationales)


def _true_statements(scene: Mapping[str, Any]) -> list[str]:
    out = []
    objs = scene["objects"]
    for obj in objs:
        descs = unique_descriptions(scene, obj)
        if descs:
            d = descs[0]
            out.extend(
                f"{the(d)} is {predicate(k, obj[k])}" for k in ("colour", "size", "shape") if k not in d
            )
        else:
            out.append(f"there is {a(attributes(obj))} in the picture")
    for x in objs:
        for y in objs:
            for relation in RELATIONS:
                if (
                    related(x, y, relation)
                    and unique_descriptions(scene, x)
                    and unique_descriptions(scene, y)
                ):
                    out.append(
                        f"{landmark_text(scene, x['id'])} is {RELATION_TEXT[relation]} "
                        f"{landmark_text(scene, y['id'])}"
                    )
    for colour in sorted({o["colour"] for o in objs}):
        n = len(matching(scene, [("colour", colour)]))
        out.append(
            f"there is one {colour} object" if n == 1 else f"there are {number_word(n)} {colour} objects"
        )
    return out


def _false_statements(scene: Mapping[str, Any], rng: random.Random) -> list[str]:
    """Statements with exactly one wrong attribute (false by construction)."""
    out = []
    for obj in scene["objects"]:
        descs = unique_descriptions(scene, obj)
        if descs:
            d = descs[0]
            for key in ("colour", "size", "shape"):
                if key not in d:
                    wrong = rng.choice([v for v in _VALUES[key] if v != obj[key]])
                    out.append(f"{the(d)} is {predicate(key, wrong)}")
        attrs = attributes(obj)
        key = rng.choice(("colour", "shape", "size"))
        wrong_attrs = {**attrs, key: rng.choice([v for v in _VALUES[key] if v != obj[key]])}
        if not matching(scene, wrong_attrs.items()):
            out.append(f"there is {a(wrong_attrs)} in the picture")
    return out


def _wrong_facts(facts: Sequence[Mapping[str, Any]], family: str, rng: random.Random) -> list[dict[str, Any]]:
    """The facts with one value changed."""
    changed = [dict(f) for f in facts]
    i = rng.randrange(len(changed))
    fact = changed[i]
    if fact["kind"] == "attr":
        fact["value"] = rng.choice([v for v in _VALUES[fact["key"]] if v != fact["value"]])
    elif fact["kind"] == "exists":
        changed[i] = {"kind": "count", "features": fact["features"], "n": 0}
    elif family == "existence":
        changed[i] = {"kind": "exists", "features": fact["features"]}
    else:
        n = int(fact["n"])
        fact["n"] = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    return changed


def _relevance(text: str, scene: Mapping[str, Any], facts: Sequence[Mapping[str, Any]]) -> tuple[bool, bool]:
    """(all statements true, covers any fact) by the world's grammar."""
    try:
        pieces = grammar.parse_rationale(text)
    except grammar.ParseError:
        return False, False
    claims: list[grammar.Claim] = []
    for _, st in pieces:
        ev = grammar.evaluate(st, scene)
        if not ev.true:
            return False, False
        claims.extend(ev.claims)
    return True, any(grammar.covers(claims, f) for f in facts)


def tagged_distractors(item: WorldItem | VQAXItem, rng: random.Random, k: int = 5) -> list[tuple[str, str]]:
    """Up to ``k`` distinct (text, kind) distractors, mixing the three kinds."""
    scene, family, facts, golds = _fields(item)
    gold_set = set(golds)
    truths = []
    for s in dict.fromkeys(_true_statements(scene)):
        true, covers_any = _relevance(s, scene, facts)
        # An irrelevant statement covers no fact at all: half a justification is not a distractor.
        if true and not covers_any:
            truths.append(s)
    falses = _false_statements(scene, rng)
    out: dict[str, str] = {}
    plan = [KINDS[i % len(KINDS)] for i in range(3 * k)]
    rng.shuffle(plan)
    for kind in plan:
        if len(out) >= k:
            break
        text = None
        if kind == "irrelevant" and truths:
            text = rng.choice(truths)
            if len(truths) > 1 and rng.random() < 0.3:
                other = rng.choice([t for t in truths if t != text])
                text = f"{text} and {other}"
        elif kind == "wrong_answer":
            wrong = gold_rationales(scene, family, _wrong_facts(facts, family, rng))
            if wrong:
                text = rng.choice(wrong)
        elif kind == "partly_false" and truths and falses:
            pair = [rng.choice(truths), rng.choice(falses)]
            rng.shuffle(pair)
            text = " and ".join(pair)
        if text and text not in gold_set and text not in out:
            out[text] = kind
    return list(out.items())


def distractor_rationales(item: WorldItem | VQAXItem, rng: random.Random, k: int = 5) -> list[str]:
    """Up to ``k`` fluent rationales that the fact critic rejects (see the module docstring)."""
    return [text for text, _ in tagged_distractors(item, rng, k)]
