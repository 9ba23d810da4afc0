"""The world's small grammar: parse rationales and questions, check them against a scene graph.

Contract:

- ``parse_rationale(text)`` turns a rationale into a list of statements or raises ``ParseError``.
  Statements are joined by separators (",", ".", ";", "and", "but", "while", "whereas",
  "because", "since", "as", "so"); the split is searched, not fixed, so "and" may still join two
  nouns ("the square and the circle are both red") or two adjectives ("the square is small and
  red") inside one statement. Agreement (is/are, a/an, singular/plural) is enforced: ungrammatical
  text does not parse.
- ``evaluate(statement, scene)`` says whether the statement is true in the scene and which
  *claims* it makes. A definite description ("the square") must denote exactly one object,
  otherwise the statement is false (a failed presupposition, not an unknown).
- Claims are what coverage is judged on: ``Pos(F)`` "an object with features F exists",
  ``All(G, P, positive)`` "every object with G has (or lacks) P", ``Count(F, n)``. Features are
  ``(key, value)`` pairs: attributes, and ``(relation, object_id)`` once a landmark is resolved.
- ``derive_requirements(question, answer, scene)`` gives the facts an answer depends on, in the
  JSON form the generator stores in ``facts``; ``covers(claims, requirement)`` decides whether the
  claims entail one of them.

Only the words in ``illume.world.vocab`` are known; everything else is a parse error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from illume.world.scene import Feature, matching, object_features
from illume.world.vocab import (
    COLOURS,
    GENERIC_NOUNS,
    INVERSE_RELATION,
    LOCATION_NOUNS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    SYNONYMS,
    plural,
)

SEPARATORS = frozenset({",", ".", ";", "and", "but", "while", "whereas", "because", "since", "as"})
_PUNCTUATION = frozenset({",", ".", ";"})
_LEADING = ("because", "since", "as", "seeing that", "and")
_ATTR_NOUNS = {"colour": "colour", "shape": "shape", "size": "size"}
_ATTR_NOUNS_PL = {"colours": "colour", "shapes": "shape", "sizes": "size"}
_MAX_TOKENS = 100


class ParseError(ValueError):
    """The text is not a sentence of the world's grammar."""


# ---------------------------------------------------------------------------------------------
# Syntax trees


@dataclass(frozen=True)
class Desc:
    """A nominal: attribute features plus relational modifiers ("object left of the circle")."""

    attrs: tuple[Feature, ...]
    rels: tuple[tuple[str, Ref], ...] = ()


@dataclass(frozen=True)
class Ref:
    """A determiner phrase. ``det``: the, only, the_pl, all, a, no, num."""

    det: str
    desc: Desc
    num: int = 0


@dataclass(frozen=True)
class Exists:
    """ "there is a X" (n=None: at least one) or "there are N X" (exactly n)."""

    desc: Desc
    n: int | None = None


@dataclass(frozen=True)
class PFeat:
    """Predicate: the subject has these attributes and relations."""

    attrs: tuple[Feature, ...] = ()
    rels: tuple[tuple[str, Ref], ...] = ()


@dataclass(frozen=True)
class PCompare:
    """Predicate: larger/smaller than a landmark (sizes are binary, so this fixes both sizes)."""

    larger: bool
    other: Ref


@dataclass(frozen=True)
class PSame:
    """Predicate: same (or different) value of ``key`` as ``other`` or, when None, among subjects."""

    key: str
    other: Ref | None
    same: bool


@dataclass(frozen=True)
class POnly:
    """Predicate: "is the only X"."""

    desc: Desc


Pred = PFeat | PCompare | PSame | POnly


@dataclass(frozen=True)
class Copula:
    """Subject(s), optionally negated predicate."""

    subjects: tuple[Ref, ...]
    pred: Pred
    negated: bool = False


@dataclass(frozen=True)
class Elided:
    """ "so is the circle": the previous statement's predicate, for new subjects."""

    subjects: tuple[Ref, ...]


Statement = Exists | Copula | Elided


# ---------------------------------------------------------------------------------------------
# Tokens


def normalise(text: str) -> str:
    """Lower-case and strip, as ILLUME does before scoring."""
    return text.lower().strip()


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens, with "," "." ";" "?" as tokens and synonyms mapped to canonical words."""
    t = normalise(text)
    t = t.replace("there's", "there is").replace("isn't", "is not").replace("aren't", "are not")
    t = re.sub(r"([,.;?])", r" \1 ", t)
    tokens = [SYNONYMS.get(w, w) for w in t.split()]
    while tokens and tokens[-1] in {".", "!"}:
        tokens.pop()
    return tokens


_SING_SHAPES = {s: s for s in SHAPES}
_PL_SHAPES = {plural(s): s for s in SHAPES}
_SING_GENERIC = set(GENERIC_NOUNS)
_PL_GENERIC = {plural(g) for g in GENERIC_NOUNS}
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {str(i): i for i in range(10)}
_REL_PHRASES: list[tuple[tuple[str, ...], str]] = [
    (("to", "the", "left", "of"), "left_of"),
    (("on", "the", "left", "of"), "left_of"),
    (("left", "of"), "left_of"),
    (("to", "the", "right", "of"), "right_of"),
    (("on", "the", "right", "of"), "right_of"),
    (("right", "of"), "right_of"),
    (("above",), "above"),
    (("below",), "below"),
]


def _adjective(word: str) -> Feature | None:
    if word in COLOURS:
        return ("colour", word)
    if word in SIZES:
        return ("size", word)
    return None


def _article_ok(article: str, next_word: str) -> bool:
    vowel = next_word[:1] in "aeiou"
    return (article == "an") == vowel


class _Parser:
    """Backtracking recursive descent over one token segment; every rule yields (node, next)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.t = list(tokens)
        self.n = len(self.t)

    # -- helpers ------------------------------------------------------------------------------
    def at(self, i: int) -> str:
        return self.t[i] if i < self.n else ""

    def words(self, i: int, seq: Sequence[str]) -> int | None:
        """Index after ``seq`` if the tokens at ``i`` spell it."""
        if tuple(self.t[i : i + len(seq)]) == tuple(seq):
            return i + len(seq)
        return None

    def article(self, i: int) -> int | None:
        if self.at(i) in {"a", "an"} and _article_ok(self.at(i), self.at(i + 1)):
            return i + 1
        return None

    def number(self, i: int) -> tuple[int, int] | None:
        w = self.at(i)
        return (_NUMBERS[w], i + 1) if w in _NUMBERS else None

    def location(self, i: int) -> int | None:
        if self.at(i) == "in" and self.at(i + 1) == "the" and self.at(i + 2) in LOCATION_NOUNS:
            return i + 3
        return None

    # -- noun phrases -------------------------------------------------------------------------
    def desc(self, i: int, pl: bool) -> Iterator[tuple[Desc, int]]:
        attrs: list[Feature] = []
        j = i
        while (feat := _adjective(self.at(j))) is not None:
            if any(k == feat[0] for k, _ in attrs):
                return  # "the red blue square": two values of one attribute
            attrs.append(feat)
            j += 1
        noun = self.at(j)
        shapes, generic = (_PL_SHAPES, _PL_GENERIC) if pl else (_SING_SHAPES, _SING_GENERIC)
        if noun in shapes:
            attrs.append(("shape", shapes[noun]))
        elif noun not in generic or (noun in {"one", "ones"} and not attrs):
            return  # "the one" alone is anaphora, which the grammar does not resolve
        j += 1
        if (k := self.location(j)) is not None:
            j = k
        base = Desc(tuple(attrs))
        # Longest reading first: the relational modifier, then the bare nominal.
        k = j
        if self.at(k) in {"that", "which"} and self.at(k + 1) == ("are" if pl else "is"):
            k += 2
        for (rel, landmark), end in self.relation(k):
            yield Desc(tuple(attrs), ((rel, landmark),)), end
        yield base, j

    def definite(self, i: int) -> Iterator[tuple[Ref, int]]:
        """A singular definite landmark: "the (only) X"."""
        if self.at(i) != "the":
            return
        if self.at(i + 1) == "only":
            for d, j in self.desc(i + 2, pl=False):
                yield Ref("only", d), j
        for d, j in self.desc(i + 1, pl=False):
            yield Ref("the", d), j

    def relation(self, i: int) -> Iterator[tuple[tuple[str, Ref], int]]:
        for phrase, rel in _REL_PHRASES:
            if (j := self.words(i, phrase)) is not None:
                for ref, k in self.definite(j):
                    yield (rel, ref), k

    def subject(self, i: int) -> Iterator[tuple[tuple[Ref, ...], str, int]]:
        """Subjects with their verb number: 'sing', 'pl' or 'any'."""
        w = self.at(i)
        if w == "both":
            for refs, _, j in self._coordinated(i + 1):
                yield refs, "pl", j
            return
        if w == "the":
            yield from ((refs, "pl", j) for refs, _, j in self._coordinated(i))
            for ref, j in self.definite(i):
                yield (ref,), "sing", j
            for d, j in self.desc(i + 1, pl=True):
                yield (Ref("the_pl", d),), "pl", j
        elif w == "all":
            j = i + 1
            j = self.words(j, ("of", "the")) or self.words(j, ("the",)) or j
            for d, k in self.desc(j, pl=True):
                yield (Ref("all", d),), "pl", k
        elif w in {"every", "each"}:
            for d, k in self.desc(i + 1, pl=False):
                yield (Ref("all", d),), "sing", k
        elif self.article(i) is not None:
            for d, k in self.desc(i + 1, pl=False):
                yield (Ref("a", d),), "sing", k
        elif w == "one" and self.words(i + 1, ("of", "the")):
            for d, k in self.desc(i + 3, pl=True):
                yield (Ref("a", d),), "sing", k
        elif w == "none" and self.words(i + 1, ("of", "the")):
            for d, k in self.desc(i + 3, pl=True):
                yield (Ref("no", d),), "any", k
        elif w == "no":
            for d, k in self.desc(i + 1, pl=False):
                yield (Ref("no", d),), "sing", k
            for d, k in self.desc(i + 1, pl=True):
                yield (Ref("no", d),), "pl", k
        else:
            j = i + 1 if w in {"exactly", "only", "just"} else i
            if (num := self.number(j)) is not None:
                n, k = num
                if n == 1 and j > i:
                    for d, m in self.desc(k, pl=False):
                        yield (Ref("num", d, 1),), "sing", m
                elif n >= 2:
                    if self.words(k, ("of", "the")):
                        k += 2
                    for d, m in self.desc(k, pl=True):
                        yield (Ref("num", d, n),), "pl", m

    def _coordinated(self, i: int) -> Iterator[tuple[tuple[Ref, ...], str, int]]:
        for first, j in self.definite(i):
            if self.at(j) == "and":
                for second, k in self.definite(j + 1):
                    yield (first, second), "pl", k

    # -- predicates ---------------------------------------------------------------------------
    def predicate(self, i: int, pl: bool) -> Iterator[tuple[Pred, int]]:
        # Adjectives: "red", "small and red".
        if (a := _adjective(self.at(i))) is not None:
            if self.at(i + 1) == "and" and (b := _adjective(self.at(i + 2))) is not None and b[0] != a[0]:
                yield PFeat((a, b)), i + 3
            yield PFeat((a,)), i + 1
        # Nominal: "a large square", "circles", "a triangle left of the circle".
        start = i if pl else self.article(i)
        if start is not None:
            for d, j in self.desc(start, pl=pl):
                yield PFeat(d.attrs, d.rels), j
        # "the only red object"
        if not pl and self.words(i, ("the", "only")):
            for d, j in self.desc(i + 2, pl=False):
                yield POnly(d), j
        # "left of the red circle"
        for (rel, ref), j in self.relation(i):
            yield PFeat((), ((rel, ref),)), j
        # "larger than the circle"
        if self.at(i) in {"larger", "smaller"} and self.at(i + 1) == "than":
            for ref, j in self.definite(i + 2):
                yield PCompare(self.at(i) == "larger", ref), j
        yield from self._sameness(i, pl)
        # "is in the picture"
        if (j := self.location(i)) is not None:
            yield PFeat(), j

    def _sameness(self, i: int, pl: bool) -> Iterator[tuple[Pred, int]]:
        if (j := self.words(i, ("the", "same"))) is not None and self.at(j) in _ATTR_NOUNS:
            key = _ATTR_NOUNS[self.at(j)]
            if self.at(j + 1) == "as":
                for ref, k in self.definite(j + 2):
                    yield PSame(key, ref, True), k
            elif pl:
                yield PSame(key, None, True), j + 1
        if (j := self.article(i)) is not None and self.at(j) == "different" and self.at(j + 1) in _ATTR_NOUNS:
            key = _ATTR_NOUNS[self.at(j + 1)]
            if self.at(j + 2) in {"from", "than", "to"}:
                for ref, k in self.definite(j + 3):
                    yield PSame(key, ref, False), k
        if pl:
            j = i + 2 if self.words(i, ("of", "different")) else i + 1 if self.at(i) == "different" else None
            if j is not None and self.at(j) in _ATTR_NOUNS_PL:
                yield PSame(_ATTR_NOUNS_PL[self.at(j)], None, False), j + 1

    def possession(self, i: int, pl: bool) -> Iterator[tuple[Pred, int]]:
        """After "has/have": "the same colour (as X)", "different colours", "a different size from X"."""
        yield from self._sameness(i, pl)

    # -- statements ---------------------------------------------------------------------------
    def statement(self) -> Iterator[Statement]:
        n = self.n
        # A trailing "in the picture" qualifies the whole statement.
        trailing = n >= 3 and self.location(n - 3) == n and self.location(n - 6) != n - 3
        ends = [n, n - 3] if trailing else [n]
        for end in ends:
            for st, j in self._statement(0):
                if j == end:
                    yield st

    def _statement(self, i: int) -> Iterator[tuple[Statement, int]]:
        if self.at(i) == "so" and self.at(i + 1) in {"is", "are"}:
            for subjects, number, j in self.subject(i + 2):
                if number == "any" or (number == "pl") == (self.at(i + 1) == "are"):
                    yield Elided(subjects), j
        yield from self._existential(i)
        yield from self._attribute_of(i)
        for subjects, number, j in self.subject(i):
            verbs = {"sing": ("is",), "pl": ("are",), "any": ("is", "are")}[number]
            has = {"sing": ("has",), "pl": ("have",), "any": ("has", "have")}[number]
            pl = number == "pl" or (number == "any" and self.at(j) == "are")
            if self.at(j) in verbs:
                k = j + 1
                negated = self.at(k) == "not"
                k += negated
                if self.at(k) in {"also", "both", "all"}:
                    if self.at(k) != "also" and not pl:
                        continue
                    k += 1
                for pred, m in self.predicate(k, pl):
                    if (t := self.words(m, ("too",)) or self.words(m, ("as", "well"))) is not None:
                        yield Copula(subjects, pred, negated), t
                    yield Copula(subjects, pred, negated), m
            elif self.at(j) in has:
                for pred, m in self.possession(j + 1, pl):
                    yield Copula(subjects, pred, False), m

    def _existential(self, i: int) -> Iterator[tuple[Statement, int]]:
        j = None
        if self.at(i) == "there" and self.at(i + 1) in {"is", "are"}:
            j, verb = i + 2, self.at(i + 1)
        elif self.at(i) == "the" and self.at(i + 1) in LOCATION_NOUNS:
            if self.at(i + 2) in {"shows", "contains", "has"}:
                j, verb = i + 3, "any"
            elif self.words(i + 2, ("does", "not")) and self.at(i + 4) in {"show", "contain", "have"}:
                # "the picture does not contain a green square": nothing of the kind.
                for d, m in self._negated_quantity(i + 5):
                    yield Exists(d, 0), m
                return
        elif self.at(i) in {"i", "you", "we"} and self.at(i + 1) in {"can", "see"}:
            j = i + 1 + (self.at(i + 1) == "can")
            if self.at(j) != "see":
                return
            j, verb = j + 1, "any"
        if j is None:
            return
        if verb != "any" and self.at(j) == "not":
            # "there is not a green square", "there aren't any green squares"
            for d, m in self._negated_quantity(j + 1):
                if verb == "is" or self.at(j + 1) == "any":
                    yield Exists(d, 0), m
            return
        for n, pl, k in self._quantity(j):
            if verb != "any" and (verb == "are") != pl:
                continue
            for d, m in self.desc(k, pl=pl):
                yield Exists(d, n), m

    def _negated_quantity(self, i: int) -> Iterator[tuple[Desc, int]]:
        """After a negated verb: "a green square", "any green squares"."""
        if (j := self.article(i)) is not None:
            yield from self.desc(j, pl=False)
        elif self.at(i) == "any":
            yield from self.desc(i + 1, pl=True)

    def _quantity(self, i: int) -> Iterator[tuple[int | None, bool, int]]:
        """(exact count or None for "some", plural noun?, next)."""
        w = self.at(i)
        if (j := self.article(i)) is not None:
            if self.at(j) == "single":
                yield 1, False, j + 1
            else:
                yield None, False, j
        elif w == "no":
            yield 0, False, i + 1
            yield 0, True, i + 1
        elif w == "some":
            yield None, True, i + 1
        else:
            j = i + 1 if w in {"exactly", "only", "just"} else i
            if (num := self.number(j)) is not None:
                n, k = num
                if n >= 1:
                    yield n, n != 1, k

    def _attribute_of(self, i: int) -> Iterator[tuple[Statement, int]]:
        """ "the colour of the square is red", "the shape of the blue object is a circle"."""
        if self.at(i) != "the" or self.at(i + 1) not in _ATTR_NOUNS or self.at(i + 2) != "of":
            return
        key = _ATTR_NOUNS[self.at(i + 1)]
        for ref, j in self.definite(i + 3):
            if self.at(j) != "is":
                continue
            k = j + 1
            if key == "shape" and self.article(k) is not None:
                k += 1
            value = self.at(k)
            if (key == "shape" and value in _SING_SHAPES) or (_adjective(value) or ("", ""))[0] == key:
                yield Copula((ref,), PFeat(((key, value),))), k + 1


def _parse_statement(tokens: Sequence[str]) -> Statement | None:
    for st in _Parser(tokens).statement():
        return st
    return None


def parse_statement(text: str) -> Statement:
    """Parse exactly one statement."""
    st = _parse_statement(tokenize(text))
    if st is None:
        raise ParseError(f"not a statement: {text!r}")
    return st


def split_statements(tokens: Sequence[str]) -> list[tuple[list[str], Statement]] | None:
    """Cut a token list at separators so every piece parses (search over cut points, memoised)."""
    n = len(tokens)
    memo: dict[int, list[tuple[list[str], Statement]] | None] = {}
    cache: dict[tuple[int, int], Statement | None] = {}

    def piece(i: int, j: int) -> Statement | None:
        if (i, j) not in cache:
            cache[(i, j)] = _parse_statement(tokens[i:j])
        return cache[(i, j)]

    def solve(i: int) -> list[tuple[list[str], Statement]] | None:
        if i in memo:
            return memo[i]
        memo[i] = None
        for j in range(i + 1, n + 1):
            if j < n and tokens[j] not in SEPARATORS:
                continue
            st = piece(i, j)
            if st is None:
                continue
            if j == n:
                memo[i] = [(list(tokens[i:j]), st)]
                return memo[i]
            # A separator is one word or mark, or a mark then a word (", and"); "and and" is not.
            k = j + 1
            if tokens[j] in _PUNCTUATION and k < n and tokens[k] in SEPARATORS - _PUNCTUATION:
                k += 1
            if k == n:
                continue  # trailing separator: a cut-off sentence
            rest = solve(k)
            if rest is not None:
                memo[i] = [(list(tokens[i:j]), st), *rest]
                return memo[i]
        return None

    return solve(0)


def parse_rationale(text: str) -> list[tuple[str, Statement]]:
    """Split a rationale into (statement text, statement); raise ParseError when impossible."""
    tokens = tokenize(text)
    changed = True
    while changed and tokens:  # "because the square is red", "seeing that ..."
        changed = False
        for lead in _LEADING:
            words = lead.split()
            if tokens[: len(words)] == words and len(tokens) > len(words):
                tokens = tokens[len(words) :]
                changed = True
    if not tokens:
        raise ParseError("empty rationale")
    if len(tokens) > _MAX_TOKENS:
        raise ParseError(f"longer than {_MAX_TOKENS} tokens")
    bad = [w for w in tokens if not re.fullmatch(r"[a-z0-9]+|[,.;]", w)]
    if bad:
        raise ParseError(f"unexpected token {bad[0]!r}")
    pieces = split_statements(tokens)
    if pieces is None:
        raise ParseError(f"not in the world's grammar: {' '.join(tokens)!r}")
    out: list[tuple[str, Statement]] = []
    for toks, st in pieces:
        if isinstance(st, Elided):
            previous = out[-1][1] if out else None
            if not isinstance(previous, Copula):
                raise ParseError(f"nothing for {' '.join(toks)!r} to refer back to")
            st = Copula(st.subjects, previous.pred, previous.negated)
        out.append((" ".join(toks), st))
    return out


# ---------------------------------------------------------------------------------------------
# Semantics


@dataclass(frozen=True)
class Pos:
    features: frozenset[Feature]


@dataclass(frozen=True)
class All:
    guard: frozenset[Feature]
    features: frozenset[Feature]
    positive: bool = True


@dataclass(frozen=True)
class Count:
    features: frozenset[Feature]
    n: int


Claim = Pos | All | Count


class FalseStatement(Exception):
    """Raised inside evaluation with the reason a statement is false."""


@dataclass
class Evaluation:
    """Truth of one statement and the claims it makes."""

    true: bool
    claims: list[Claim]
    reason: str = ""


def _say(desc: Desc) -> str:
    attrs = dict(desc.attrs)
    words = [attrs[k] for k in ("size", "colour") if k in attrs] + [attrs.get("shape", "object")]
    return " ".join(words) + (" (with its position)" if desc.rels else "")


class _Semantics:
    def __init__(self, scene: Mapping[str, Any]) -> None:
        self.scene = scene
        self.table = object_features(scene)
        self.claims: list[Claim] = []

    def resolve(self, desc: Desc) -> frozenset[Feature]:
        """Features of a description with landmarks replaced by their object ids."""
        feats = set(desc.attrs)
        for rel, landmark in desc.rels:
            obj = self.unique(landmark)
            feats.add((rel, obj["id"]))
        return frozenset(feats)

    def unique(self, ref: Ref) -> dict[str, Any]:
        feats = self.resolve(ref.desc)
        found = matching(self.scene, feats)
        if len(found) != 1:
            what = "no" if not found else "more than one"
            raise FalseStatement(f"there is {what} {_say(ref.desc)}")
        # A definite description presupposes what it says: "the red square" tells the square is red.
        self.claims.append(Pos(feats))
        if ref.det == "only":
            self.claims.append(Count(feats, 1))
        return found[0]

    def members(self, ref: Ref) -> tuple[frozenset[Feature], list[dict[str, Any]]]:
        feats = self.resolve(ref.desc)
        if ref.det in {"the", "only"}:
            return feats, [self.unique(ref)]
        return feats, matching(self.scene, feats)

    def has(self, obj: Mapping[str, Any], feats: frozenset[Feature]) -> bool:
        return feats <= self.table[obj["id"]]

    # -- statements ---------------------------------------------------------------------------
    def exists(self, st: Exists) -> None:
        feats = self.resolve(st.desc)
        found = len(matching(self.scene, feats))
        if st.n is None:
            if not found:
                raise FalseStatement(f"there is no {_say(st.desc)}")
            self.claims.append(Pos(feats))
            return
        if found != st.n:
            raise FalseStatement(f"there are {found}, not {st.n}, of {_say(st.desc)}")
        self.claims.append(Count(feats, st.n))
        if st.n:
            self.claims.append(Pos(feats))

    def copula(self, st: Copula) -> None:
        if isinstance(st.pred, PSame) and st.pred.other is None:
            self._sameness_among(st)
            return
        for subject in st.subjects:
            self._one_subject(subject, st.pred, st.negated)

    def _sameness_among(self, st: Copula) -> None:
        pred = st.pred
        assert isinstance(pred, PSame)
        objs: list[dict[str, Any]] = []
        for subject in st.subjects:
            objs.extend(self.members(subject)[1])
        if len(objs) < 2:
            raise FalseStatement("fewer than two objects to compare")
        values = {o[pred.key] for o in objs}
        if (len(values) == 1) != pred.same:
            raise FalseStatement(f"their {pred.key}s are {'different' if pred.same else 'the same'}")

    def _pred_features(self, pred: Pred) -> frozenset[Feature] | None:
        if isinstance(pred, PFeat):
            return self.resolve(Desc(pred.attrs, pred.rels))
        if isinstance(pred, POnly):
            return self.resolve(pred.desc)
        return None

    def _holds(self, obj: dict[str, Any], pred: Pred, pfeats: frozenset[Feature] | None) -> bool:
        if isinstance(pred, PFeat):
            assert pfeats is not None
            return self.has(obj, pfeats)
        if isinstance(pred, POnly):
            assert pfeats is not None
            return [o["id"] for o in matching(self.scene, pfeats)] == [obj["id"]]
        if isinstance(pred, PCompare):
            other = self.unique(pred.other)
            if other["id"] == obj["id"]:
                return False
            big, small = (obj, other) if pred.larger else (other, obj)
            return big["size"] == "large" and small["size"] == "small"
        other = self.unique(pred.other) if pred.other is not None else None
        if other is None or other["id"] == obj["id"]:
            return False
        return (obj[pred.key] == other[pred.key]) == pred.same

    def _one_subject(self, subject: Ref, pred: Pred, negated: bool) -> None:
        feats, objs = self.members(subject)
        pfeats = self._pred_features(pred)
        holding = [o for o in objs if self._holds(o, pred, pfeats) != negated]
        det = subject.det
        if det in {"the", "only", "the_pl", "all"}:
            if det == "the_pl" and len(objs) < 2:
                raise FalseStatement(f"there are not several {_say(subject.desc)}s")
            if not objs:
                raise FalseStatement(f"there is no {_say(subject.desc)}")
            if len(holding) != len(objs):
                what = (
                    f"the {_say(subject.desc)}" if det in {"the", "only"} else f"every {_say(subject.desc)}"
                )
                raise FalseStatement(f"the predicate does not hold of {what}")
        elif det == "a" and not holding:
            raise FalseStatement(f"no {_say(subject.desc)} fits")
        elif det == "no" and holding:
            raise FalseStatement(f"some {_say(subject.desc)} fits")
        elif det == "num" and len(holding) != subject.num:
            raise FalseStatement(f"{len(holding)}, not {subject.num}, {_say(subject.desc)} fit")
        if negated:
            if pfeats is not None and len(pfeats) == 1 and det in {"the", "only", "the_pl", "all"}:
                self.claims.append(All(feats, pfeats, positive=False))
            return
        self._claims(subject, feats, objs, pred, pfeats)

    def _claims(
        self,
        subject: Ref,
        feats: frozenset[Feature],
        objs: list[dict[str, Any]],
        pred: Pred,
        pfeats: frozenset[Feature] | None,
    ) -> None:
        det = subject.det
        universal = det in {"the", "only", "the_pl", "all"}
        if isinstance(pred, PFeat | POnly):
            assert pfeats is not None
            if det == "no":
                self.claims.append(Count(feats | pfeats, 0))
                return
            if det == "num":
                self.claims.append(Count(feats | pfeats, subject.num))
            self.claims.append(Pos(feats | pfeats))
            if universal and isinstance(pred, PFeat):
                self.claims.append(All(feats, pfeats))
            if isinstance(pred, POnly):
                self.claims.append(Count(pfeats, 1))
            # "the triangle is left of the circle" also says "the circle is right of the triangle".
            if det in {"the", "only"}:
                for rel, landmark in pred.rels if isinstance(pred, PFeat) else ():
                    lfeats = self.resolve(landmark.desc)
                    self.claims.append(Pos(lfeats | {(INVERSE_RELATION[rel], objs[0]["id"])}))
        elif isinstance(pred, PCompare) and det in {"the", "only", "a", "the_pl", "all"}:
            big, small = ("large", "small") if pred.larger else ("small", "large")
            self.claims.append(Pos(feats | {("size", big)}))
            self.claims.append(Pos(self.resolve(pred.other.desc) | {("size", small)}))
        elif isinstance(pred, PSame) and pred.same and pred.other is not None and det != "no":
            # "the square is the same colour as the red circle" says the square is red.
            ofeats = self.resolve(pred.other.desc)
            for k, v in ofeats:
                if k == pred.key:
                    self.claims.append(Pos(feats | {(k, v)}))
            for k, v in feats:
                if k == pred.key:
                    self.claims.append(Pos(ofeats | {(k, v)}))


def evaluate(statement: Statement, scene: Mapping[str, Any]) -> Evaluation:
    """Truth of a statement in a scene, with the claims it makes when true."""
    sem = _Semantics(scene)
    try:
        if isinstance(statement, Exists):
            sem.exists(statement)
        else:
            sem.copula(statement)
    except FalseStatement as exc:
        return Evaluation(False, [], str(exc))
    return Evaluation(True, sem.claims)


# ---------------------------------------------------------------------------------------------
# Requirements: the facts an answer depends on


def features_to_json(feats: frozenset[Feature] | set[Feature]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in sorted(feats):
        if k in out:
            raise ValueError(f"two values for {k!r} in one description")
        out[k] = v
    return out


def features_from_json(data: Mapping[str, str]) -> frozenset[Feature]:
    return frozenset((str(k), str(v)) for k, v in data.items())


def answer_number(answer: str) -> int | None:
    a = normalise(answer)
    return _NUMBERS.get(a)


def derive_requirements(question: str, answer: str, scene: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The facts that justify ``answer`` to ``question`` in ``scene`` (ValueError if not a world question)."""
    tokens = tokenize(question)
    if tokens[-1:] == ["?"]:
        tokens = tokens[:-1]
    p = _Parser(tokens)
    sem = _Semantics(scene)
    ans = normalise(answer)
    n = len(tokens)
    try:
        # what colour is the square / what shape is left of the red circle
        if p.at(0) == "what" and p.at(1) in _ATTR_NOUNS and p.at(2) == "is":
            key = _ATTR_NOUNS[p.at(1)]
            for ref, j in p.definite(3):
                if j == n:
                    return [_attr_req(sem.resolve(ref.desc), key, ans)]
            for (rel, ref), j in p.relation(3):
                if j == n:
                    return [_attr_req(frozenset({(rel, sem.unique(ref)["id"])}), key, ans)]
        # is there a green circle
        if p.at(0) == "is" and p.at(1) == "there" and p.article(2) is not None:
            for d, j in p.desc(3, pl=False):
                if j == n:
                    feats = sem.resolve(d)
                    if ans in {"yes", "no"}:
                        kind = "exists" if ans == "yes" else "count"
                        req: dict[str, Any] = {"kind": kind, "features": features_to_json(feats)}
                        if ans == "no":
                            req["n"] = 0
                        return [req]
        # how many red objects are there
        if p.at(0) == "how" and p.at(1) == "many":
            for d, j in p.desc(2, pl=True):
                k = p.words(j, ("are", "there"))
                if k is not None and (k == n or p.location(k) == n):
                    count = answer_number(ans)
                    if count is not None:
                        return [{"kind": "count", "features": features_to_json(sem.resolve(d)), "n": count}]
        # are the square and the circle the same colour
        if p.at(0) == "are":
            for (a, b), _, j in p._coordinated(1):
                if p.words(j, ("the", "same")) and p.at(j + 2) in _ATTR_NOUNS and j + 3 == n:
                    key = _ATTR_NOUNS[p.at(j + 2)]
                    return [_attr_req(sem.resolve(r.desc), key, sem.unique(r)[key]) for r in (a, b)]
        # is the triangle larger than the circle
        if p.at(0) == "is":
            for a, j in p.definite(1):
                if p.at(j) in {"larger", "smaller"} and p.at(j + 1) == "than":
                    for b, k in p.definite(j + 2):
                        if k == n:
                            return [
                                _attr_req(sem.resolve(r.desc), "size", sem.unique(r)["size"]) for r in (a, b)
                            ]
    except FalseStatement as exc:
        raise ValueError(f"question does not fit the scene: {exc}") from exc
    raise ValueError(f"not a question of the world: {question!r}")


def _attr_req(ref: frozenset[Feature], key: str, value: str) -> dict[str, Any]:
    return {"kind": "attr", "ref": features_to_json(ref), "key": key, "value": value}


_ATTRIBUTE_KEYS = {"shape", "colour", "size"}


def covers(claims: Sequence[Claim], requirement: Mapping[str, Any]) -> bool:
    """Whether the claims entail the requirement (see the module docstring for the claim forms)."""
    kind = requirement["kind"]
    if kind == "attr":
        need = features_from_json(requirement["ref"]) | {(requirement["key"], requirement["value"])}
        return any(isinstance(c, Pos) and need <= c.features for c in claims)
    feats = features_from_json(requirement["features"])
    if kind == "exists":
        return any(
            (isinstance(c, Pos) and feats <= c.features)
            or (isinstance(c, Count) and c.n > 0 and feats <= c.features)
            for c in claims
        )
    if kind == "count":
        n = int(requirement["n"])
        if n > 0:
            return any(isinstance(c, Count) and c.n == n and c.features == feats for c in claims)
        return any(_entails_none(c, feats) for c in claims)
    raise ValueError(f"unknown requirement kind {kind!r}")


def _entails_none(claim: Claim, feats: frozenset[Feature]) -> bool:
    """Whether a claim rules out every object with ``feats``."""
    if isinstance(claim, Count):
        return claim.n == 0 and claim.features <= feats
    if isinstance(claim, All) and claim.guard <= feats:
        if claim.positive:
            have = dict(f for f in feats if f[0] in _ATTRIBUTE_KEYS)
            return any(k in have and have[k] != v for k, v in claim.features if k in _ATTRIBUTE_KEYS)
        return claim.features <= feats
    return False


def describe_requirement(requirement: Mapping[str, Any]) -> str:
    """A short human-readable form of a requirement, for critic reasons."""
    kind = requirement["kind"]
    if kind == "attr":
        ref = " ".join(f"{k}={v}" for k, v in sorted(requirement["ref"].items())) or "the object"
        return f"{requirement['key']} of [{ref}] is {requirement['value']}"
    feats = " ".join(f"{k}={v}" for k, v in sorted(requirement["features"].items())) or "objects"
    if kind == "exists":
        return f"some [{feats}] exists"
    return f"there are {requirement['n']} [{feats}]"
