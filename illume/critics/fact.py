"""A simulated critic that checks a rationale against the synthetic world's scene graph.

Contract: ``FactCritic().judge(candidate, item)`` lower-cases and strips the candidate, parses it
with the world's grammar (``illume.world.grammar``) into statements, checks each statement
against the scene graph, and checks that the statements together entail every fact the answer
depends on. Those facts come from ``item.extra["facts"]`` when present (the generator stores them),
otherwise they are derived from ``item.question``, ``item.answer`` and the scene. The scene graph
is ``item.scene`` or, failing that, ``item.extra["scene"]``.

- ``accepted`` is strict: every statement parses and is true, no statement is repeated, and every
  required fact is covered.
- ``score`` is the share of required facts covered, and 0 when the text does not parse, a
  statement is false, or there is no scene to check against.
- ``reason`` is one line saying why.

Unlike ROUGE-L it needs no references: it accepts any wording the grammar knows, and rejects
fluent text that is false or beside the point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from illume.critics.base import Critic, CriticInput, Verdict
from illume.world import grammar


class FactCritic(Critic):
    """Accepts a rationale whose statements are all true and together justify the answer."""

    name = "fact"

    def __init__(self, use_stored_facts: bool = True) -> None:
        # Stored facts are exact; deriving them from the question is the fallback for items that
        # do not carry them (e.g. a client's own question about a world image).
        self.use_stored_facts = use_stored_facts

    def requirements(self, item: CriticInput) -> list[dict[str, Any]]:
        """The facts the item's answer depends on (ValueError when they cannot be known)."""
        facts = item.extra.get("facts") if self.use_stored_facts else None
        if facts:
            return list(facts)
        scene = _scene(item)
        if scene is None:
            raise ValueError("no scene graph")
        return grammar.derive_requirements(item.question, item.answer, scene)

    def judge(self, candidate: str, item: CriticInput) -> Verdict:
        text = grammar.normalise(candidate)
        scene = _scene(item)
        if scene is None:
            return Verdict(0.0, False, "no scene graph to check against")
        try:
            required = self.requirements(item)
        except ValueError as exc:
            return Verdict(0.0, False, f"cannot tell what the answer depends on: {exc}")
        try:
            pieces = grammar.parse_rationale(text)
        except grammar.ParseError as exc:
            return Verdict(0.0, False, f"unparseable: {exc}")
        seen: set[str] = set()
        claims: list[grammar.Claim] = []
        for piece, statement in pieces:
            if piece in seen:
                return Verdict(0.0, False, f"repeats itself: {piece!r}")
            seen.add(piece)
            evaluation = grammar.evaluate(statement, scene)
            if not evaluation.true:
                return Verdict(0.0, False, f"false: {piece!r} ({evaluation.reason})")
            claims.extend(evaluation.claims)
        return _coverage(claims, required)


def _scene(item: CriticInput) -> Mapping[str, Any] | None:
    scene = item.scene if item.scene is not None else item.extra.get("scene")
    return scene if isinstance(scene, Mapping) and "objects" in scene else None


def _coverage(claims: Sequence[grammar.Claim], required: Sequence[Mapping[str, Any]]) -> Verdict:
    if not required:
        return Verdict(0.0, False, "no facts to justify")
    missing = [r for r in required if not grammar.covers(claims, r)]
    score = 1.0 - len(missing) / len(required)
    if missing:
        return Verdict(score, False, f"true but misses: {grammar.describe_requirement(missing[0])}")
    return Verdict(score, True, f"all true and covers {len(required)} fact(s)")
