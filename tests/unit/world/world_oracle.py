"""An independent reading of the world's questions for the tests (regexes, not the grammar).

It recomputes answers straight from the scene graph so the generator's answers are checked by code
that shares nothing with it but the vocabulary.
"""

from __future__ import annotations

import re
from typing import Any

SHAPES = {"circle", "square", "triangle", "diamond"}
COLOURS = {"red", "green", "blue", "yellow", "purple"}
SIZES = {"small", "large"}
RELS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def in_relation(a: dict[str, Any], b: dict[str, Any], rel: str) -> bool:
    if a is b:
        return False
    if rel == "left":
        return a["row"] == b["row"] and a["col"] < b["col"]
    if rel == "right":
        return a["row"] == b["row"] and a["col"] > b["col"]
    if rel == "above":
        return a["col"] == b["col"] and a["row"] < b["row"]
    return a["col"] == b["col"] and a["row"] > b["row"]


def select(scene: dict[str, Any], phrase: str, plural: bool = False) -> list[dict[str, Any]]:
    """Objects a bare noun phrase ("large red square", "object above the circle") denotes."""
    m = re.fullmatch(r"(.+?) (left of|right of|above|below) the (.+)", phrase)
    if m:
        landmark = the(scene, m.group(3))
        base = select(scene, m.group(1), plural)
        return [o for o in base if in_relation(o, landmark, RELS[m.group(2)])]
    words = phrase.split()
    noun = words[-1][:-1] if plural else words[-1]
    out = list(scene["objects"])
    if noun in SHAPES:
        out = [o for o in out if o["shape"] == noun]
    else:
        assert noun == "object", phrase
    for w in words[:-1]:
        key = "colour" if w in COLOURS else "size" if w in SIZES else None
        assert key, phrase
        out = [o for o in out if o[key] == w]
    return out


def the(scene: dict[str, Any], phrase: str) -> dict[str, Any]:
    """The one object a definite description denotes; fails the test when it is not unique."""
    found = select(scene, phrase)
    assert len(found) == 1, f"'the {phrase}' denotes {len(found)} objects"
    return found[0]


def answer(scene: dict[str, Any], question: str) -> str:
    q = question.rstrip("?")
    if m := re.fullmatch(r"what (colour|shape|size) is (left of|right of|above|below) the (.+)", q):
        landmark = the(scene, m.group(3))
        found = [o for o in scene["objects"] if in_relation(o, landmark, RELS[m.group(2)])]
        assert len(found) == 1, question
        return found[0][m.group(1)]
    if m := re.fullmatch(r"what (colour|shape|size) is the (.+)", q):
        return the(scene, m.group(2))[m.group(1)]
    if m := re.fullmatch(r"is there an? (.+)", q):
        return "yes" if select(scene, m.group(1)) else "no"
    if m := re.fullmatch(r"how many (.+) are there", q):
        return str(len(select(scene, m.group(1), plural=True)))
    if m := re.fullmatch(r"are the (.+) and the (.+) the same (colour|shape|size)", q):
        a, b = the(scene, m.group(1)), the(scene, m.group(2))
        return "yes" if a[m.group(3)] == b[m.group(3)] else "no"
    if m := re.fullmatch(r"is the (.+) (larger|smaller) than the (.+)", q):
        a, b = the(scene, m.group(1)), the(scene, m.group(3))
        big, small = (a, b) if m.group(2) == "larger" else (b, a)
        return "yes" if big["size"] == "large" and small["size"] == "small" else "no"
    raise AssertionError(f"unknown question form: {question}")
