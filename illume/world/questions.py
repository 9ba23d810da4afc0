"""Question families of the world: each draws a question about a scene with its answer and facts.

Contract: ``ask(family, scene, rng, want)`` returns a ``Question`` or None when the scene cannot
carry that family (the caller draws another scene). Every definite description in a question
denotes exactly one object; spatial questions are asked only where the object in that relation is
unique; answers are single words ("red", "yes", "3", "square", "large"). ``want`` ("yes"/"no")
steers yes/no families so the caller can balance them. ``facts`` is the JSON list of requirements
that the fact critic checks (see ``illume.world.grammar``); it is built here from what the
generator knows, independently of the critic's own derivation from the question text.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

from illume.world.language import a, np_text, the, unique_descriptions
from illume.world.scene import matching, related
from illume.world.vocab import COLOURS, RELATION_TEXT, RELATIONS, SHAPES, SIZES

FAMILIES: tuple[str, ...] = ("attribute", "existence", "count", "spatial", "comparison")
YES_NO_FAMILIES: frozenset[str] = frozenset({"existence", "comparison"})
_VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    facts: list[dict[str, Any]]


def _attr_fact(ref: Mapping[str, str], key: str, value: str) -> dict[str, Any]:
    return {"kind": "attr", "ref": dict(ref), "key": key, "value": value}


def _pick_description(descs: list[dict[str, str]], rng: random.Random) -> dict[str, str]:
    # Mostly the shortest description (how people refer), sometimes a longer one for variety.
    return descs[0] if len(descs) == 1 or rng.random() < 0.7 else rng.choice(descs[1:])


def _attribute(scene: Mapping[str, Any], rng: random.Random, want: str | None) -> Question | None:
    objs = list(scene["objects"])
    rng.shuffle(objs)
    key = rng.choices(("colour", "shape", "size"), weights=(0.4, 0.4, 0.2))[0]
    for obj in objs:
        descs = unique_descriptions(scene, obj, exclude=[key])
        if descs:
            ref = _pick_description(descs, rng)
            return Question(f"what {key} is {the(ref)}?", obj[key], [_attr_fact(ref, key, obj[key])])
    return None


def _spatial(scene: Mapping[str, Any], rng: random.Random, want: str | None) -> Question | None:
    objs = scene["objects"]
    options = []
    for landmark in objs:
        if not unique_descriptions(scene, landmark):
            continue
        for relation in RELATIONS:
            found = matching(scene, [(relation, landmark["id"])])
            if len(found) == 1:
                options.append((found[0], relation, landmark))
    if not options:
        return None
    target, relation, landmark = rng.choice(options)
    assert related(target, landmark, relation)
    ldesc = _pick_description(unique_descriptions(scene, landmark), rng)
    key = rng.choices(("colour", "shape", "size"), weights=(0.4, 0.4, 0.2))[0]
    where = f"{RELATION_TEXT[relation]} {the(ldesc)}"
    if key == "shape" and rng.random() < 0.5:
        question = f"what shape is {where}?"
    else:
        question = f"what {key} is the object {where}?"
    fact = _attr_fact({relation: landmark["id"]}, key, target[key])
    fact["landmark"] = ldesc  # how the question words the landmark, so the rationales can too
    return Question(question, target[key], [fact])


def _existence(scene: Mapping[str, Any], rng: random.Random, want: str | None) -> Question | None:
    want = want or rng.choice(("yes", "no"))
    second = rng.choices(("colour", "size"), weights=(0.75, 0.25))[0]
    objs = scene["objects"]
    if want == "yes":
        obj = rng.choice(objs)
        feats = {second: obj[second], "shape": obj["shape"]}
        return Question(f"is there {a(feats)}?", "yes", [{"kind": "exists", "features": feats}])
    # A near miss is a better question: a shape that is present, in a value it does not have.
    present = [o["shape"] for o in objs]
    candidates = [
        {second: v, "shape": s}
        for s in SHAPES
        for v in _VALUES[second]
        if not matching(scene, [(second, v), ("shape", s)])
    ]
    near = [c for c in candidates if c["shape"] in present]
    pool = near if near and rng.random() < 0.8 else candidates
    if not pool:
        return None
    feats = rng.choice(pool)
    return Question(f"is there {a(feats)}?", "no", [{"kind": "count", "features": feats, "n": 0}])


def _count(scene: Mapping[str, Any], rng: random.Random, want: str | None) -> Question | None:
    # Draw the answer first, uniformly over the counts this scene can give (zero less often), so
    # "1" does not dominate; then a description with that count.
    by_count: dict[int, list[dict[str, str]]] = {}
    for keys, weight in (("colour",), 4), (("shape",), 4), (("colour", "shape"), 2), (("size",), 1):
        for values in product(*(_VALUES[k] for k in keys)):
            feats = dict(zip(keys, values, strict=True))
            by_count.setdefault(len(matching(scene, feats.items())), []).extend([feats] * weight)
    counts = sorted(by_count)
    n = rng.choices(counts, weights=[0.3 if c == 0 else 1.0 for c in counts])[0]
    feats = rng.choice(by_count[n])
    question = f"how many {np_text(feats, plural_form=True)} are there?"
    return Question(question, str(n), [{"kind": "count", "features": feats, "n": n}])


def _comparison(scene: Mapping[str, Any], rng: random.Random, want: str | None) -> Question | None:
    want = want or rng.choice(("yes", "no"))
    objs = scene["objects"]
    kind = rng.choice(("colour", "shape", "size", "larger", "smaller"))
    key = kind if kind in _VALUES else "size"
    pairs = [(x, y) for x in objs for y in objs if x["id"] != y["id"]]
    rng.shuffle(pairs)
    for x, y in pairs:
        if kind == "larger":
            yes = x["size"] == "large" and y["size"] == "small"
        elif kind == "smaller":
            yes = x["size"] == "small" and y["size"] == "large"
        else:
            yes = x[key] == y[key]
        if yes != (want == "yes"):
            continue
        dx = unique_descriptions(scene, x, exclude=[key])
        dy = unique_descriptions(scene, y, exclude=[key])
        if not dx or not dy:
            continue
        rx, ry = _pick_description(dx, rng), _pick_description(dy, rng)
        if kind in {"larger", "smaller"}:
            question = f"is {the(rx)} {kind} than {the(ry)}?"
        else:
            question = f"are {the(rx)} and {the(ry)} the same {key}?"
        facts = [_attr_fact(rx, key, x[key]), _attr_fact(ry, key, y[key])]
        return Question(question, want, facts)
    return None


_ASKERS = {
    "attribute": _attribute,
    "existence": _existence,
    "count": _count,
    "spatial": _spatial,
    "comparison": _comparison,
}


def ask(
    family: str, scene: Mapping[str, Any], rng: random.Random, want: str | None = None
) -> Question | None:
    """A question of ``family`` about ``scene`` (None when the scene cannot carry one)."""
    return _ASKERS[family](scene, rng, want)
