"""Wording of the world: noun phrases, unique referring expressions and gold rationale templates.

Contract: ``gold_rationales(scene, family, facts)`` renders the gold rationales of an item from its
structured ``facts`` (the same JSON the fact critic checks), so a rationale states exactly the
facts that justify the answer. All text is lower-case with no final period, in the style that
continues "Q: ... A: {answer}, seeing that ...". Rendering the templates with a *wrong* fact (one
value changed) gives a fluent but false rationale; the distractor generator relies on that, which
is why every template here is false whenever its fact is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from illume.world.scene import matching
from illume.world.vocab import INVERSE_RELATION, RELATION_TEXT, RELATIONS, article, number_word, plural

_KEY_ORDER = ("shape", "colour", "size")


def np_text(attrs: Mapping[str, str], plural_form: bool = False) -> str:
    """Bare noun phrase: "large red square", "red object", "squares"."""
    words = [attrs[k] for k in ("size", "colour") if k in attrs]
    noun = attrs.get("shape", "object")
    return " ".join([*words, plural(noun) if plural_form else noun])


def the(attrs: Mapping[str, str]) -> str:
    """Definite description, with a relational modifier when ``attrs`` holds a resolved relation."""
    return "the " + np_text(attrs)


def a(attrs: Mapping[str, str]) -> str:
    text = np_text(attrs)
    return f"{article(text)} {text}"


def predicate(key: str, value: str) -> str:
    """How a value is predicated: "red", "large", "a square"."""
    return f"{article(value)} {value}" if key == "shape" else value


def plural_predicate(attrs: Mapping[str, str]) -> str:
    """Plural predicate: "red" for one adjective, else a plural noun phrase ("red squares")."""
    if "shape" not in attrs and len(attrs) == 1:
        return next(iter(attrs.values()))
    return np_text(attrs, plural_form=True)


def attributes(obj: Mapping[str, Any]) -> dict[str, str]:
    return {k: obj[k] for k in _KEY_ORDER}


def unique_descriptions(
    scene: Mapping[str, Any],
    obj: Mapping[str, Any],
    exclude: Iterable[str] = (),
    require: Iterable[str] = (),
) -> list[dict[str, str]]:
    """Attribute subsets of ``obj`` that denote it alone, shortest first (shape-bearing first)."""
    excluded, required = set(exclude), set(require)
    keys = [k for k in _KEY_ORDER if k not in excluded]
    out = []
    for size in range(len(keys) + 1):
        for combo in combinations(keys, size):
            if not required <= set(combo):
                continue
            attrs = {k: obj[k] for k in combo}
            if len(matching(scene, attrs.items())) == 1:
                out.append(attrs)
    return out


def landmark_text(scene: Mapping[str, Any], obj_id: str) -> str:
    """The shortest unique definite description of an object (raises if it has none)."""
    obj = next(o for o in scene["objects"] if o["id"] == obj_id)
    descs = unique_descriptions(scene, obj)
    if not descs:
        raise ValueError(f"{obj_id} has no unique description")
    return the(descs[0])


def split_ref(ref: Mapping[str, str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Attributes and (relation, landmark id) pairs of a fact's reference."""
    attrs = {k: v for k, v in ref.items() if k not in RELATIONS}
    rels = [(k, v) for k, v in ref.items() if k in RELATIONS]
    return attrs, rels


def ref_text(scene: Mapping[str, Any], ref: Mapping[str, str]) -> str:
    """Definite description for a fact's reference: "the square", "the object left of the red circle"."""
    attrs, rels = split_ref(ref)
    text = the(attrs)
    for rel, landmark in rels:
        text += f" {RELATION_TEXT[rel]} {landmark_text(scene, landmark)}"
    return text


# ---------------------------------------------------------------------------------------------
# Gold rationale templates, one function per kind of fact


def _attribute(
    scene: Mapping[str, Any],
    ref: Mapping[str, str],
    key: str,
    value: str,
    landmark: Mapping[str, str] | None = None,
) -> list[str]:
    attrs, rels = split_ref(ref)
    pv = predicate(key, value)
    if rels:
        return _spatial(scene, rels[0], key, value, landmark)
    full = {**attrs, key: value}
    return [
        f"{the(attrs)} is {pv}",
        f"the only {np_text(attrs)} in the picture is {pv}",
        f"there is {a(full)} in the image",
        f"the {key} of {the(attrs)} is {pv}",
        f"the picture shows {a(full)}",
    ]


def _spatial(
    scene: Mapping[str, Any],
    rel: tuple[str, str],
    key: str,
    value: str,
    landmark_desc: Mapping[str, str] | None = None,
) -> list[str]:
    relation, landmark_id = rel
    landmark = the(landmark_desc) if landmark_desc else landmark_text(scene, landmark_id)
    where = f"{RELATION_TEXT[relation]} {landmark}"
    pv = predicate(key, value)
    out = [
        f"the object {where} is {pv}",
        f"the only object {where} is {pv}",
        f"there is {a({key: value})} {where}",
        f"{a({key: value})} is {where}",
    ]
    # "the triangle is left of the red circle" only where "the triangle" alone is unambiguous.
    if len(matching(scene, [(key, value)])) == 1:
        out.append(f"{the({key: value})} is {where}")
        out.append(f"{landmark} is {RELATION_TEXT[INVERSE_RELATION[relation]]} {the({key: value})}")
    return out


def _exists(scene: Mapping[str, Any], feats: Mapping[str, str]) -> list[str]:
    out = [
        f"there is {a(feats)} in the picture",
        f"the picture contains {a(feats)}",
        f"{a(feats)} is in the image",
        f"one of the objects is {a(feats)}",
    ]
    n = len(matching(scene, feats.items()))
    if n >= 2:
        out.append(f"there are {number_word(n)} {np_text(feats, plural_form=True)} in the picture")
    return out


def _none(scene: Mapping[str, Any], feats: Mapping[str, str]) -> list[str]:
    out = [
        f"there is no {np_text(feats)} in the picture",
        f"there are no {np_text(feats, plural_form=True)}",
        f"the picture has no {np_text(feats)}",
        f"none of the objects is {a(feats)}",
    ]
    if "shape" in feats and len(feats) == 2:
        ((other_key, other_value),) = [(k, v) for k, v in feats.items() if k != "shape"]
        shape = feats["shape"]
        out.append(f"no {shape} in the image is {other_value}")
        same_shape = matching(scene, [("shape", shape)])
        values = {o[other_key] for o in same_shape}
        if not same_shape:
            out.append(f"there are no {plural(shape)} in the picture")
        elif len(values) == 1 and other_value not in values:
            (v,) = values
            if len(same_shape) == 1:
                out.append(f"the only {shape} is {v}")
            else:
                out.append(f"all the {plural(shape)} are {v}")
    return out


def _count(scene: Mapping[str, Any], feats: Mapping[str, str], n: int) -> list[str]:
    if n == 0:
        return [
            f"there are no {np_text(feats, plural_form=True)}",
            f"there is no {np_text(feats)} in the picture",
            f"the picture has no {np_text(feats, plural_form=True)}",
            f"none of the objects are {plural_predicate(feats)}",
        ]
    if n == 1:
        out = [
            f"there is one {np_text(feats)}",
            f"there is only one {np_text(feats)} in the picture",
            f"the picture contains exactly one {np_text(feats)}",
        ]
        found = matching(scene, feats.items())
        if len(found) == 1:
            other = next(k for k in ("shape", "colour", "size") if k not in feats)
            out.append(f"the only {np_text(feats)} is {predicate(other, found[0][other])}")
        return out
    word, pl = number_word(n), np_text(feats, plural_form=True)
    return [
        f"there are {word} {pl}",
        f"there are {n} {pl} in the picture",
        f"the picture contains {word} {pl}",
        f"{word} of the objects are {plural_predicate(feats)}",
        f"i can see {word} {pl}",
    ]


def _pair(scene: Mapping[str, Any], facts: Sequence[Mapping[str, Any]]) -> list[str]:
    fa, fb = facts
    ta, tb = ref_text(scene, fa["ref"]), ref_text(scene, fb["ref"])
    key, va, vb = fa["key"], fa["value"], fb["value"]
    pa, pb = predicate(key, va), predicate(key, vb)
    if va == vb:
        both = plural(va) if key == "shape" else va
        return [
            f"{ta} and {tb} are both {both}",
            f"both {ta} and {tb} are {both}",
            f"{ta} is {pa} and {tb} is {pb} too",
            f"{ta} is {pa} and {tb} is also {pb}",
        ]
    out = [
        f"{ta} is {pa} and {tb} is {pb}",
        f"{ta} is {pa} but {tb} is {pb}",
        f"{tb} is {pb} while {ta} is {pa}",
        f"{ta} is {pa} whereas {tb} is {pb}",
    ]
    if key == "size":
        big, small = (ta, tb) if va == "large" else (tb, ta)
        out[2:2] = [f"{big} is larger than {small}", f"{small} is smaller than {big}"]
    return out


def gold_rationales(scene: Mapping[str, Any], family: str, facts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The gold rationales of an item, rendered from its facts (duplicates dropped, order kept)."""
    if family == "comparison":
        out = _pair(scene, facts)
    else:
        (fact,) = facts
        kind = fact["kind"]
        if kind == "attr":
            out = _attribute(scene, fact["ref"], fact["key"], fact["value"], fact.get("landmark"))
        elif kind == "exists":
            out = _exists(scene, fact["features"])
        elif family == "existence":
            out = _none(scene, fact["features"])
        else:
            out = _count(scene, fact["features"], int(fact["n"]))
    return list(dict.fromkeys(out))
