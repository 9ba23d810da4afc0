"""Annotator reliability: chance-corrected agreement on overlap items, flags, and a per-annotator cap.

Contract:

- input: the judged records of one namespace -- anything with ``candidates`` (each with a
  ``candidate_id``) and ``judgements`` (``illume.store.types.Judgement``: the current revision of
  each annotator's judgement), i.e. ``GenerationRecord`` as ``FeedbackStore.iter_judged`` yields it,
  or the ``JudgedItem`` that ``illume.training.from_store.judged_items`` builds from one;
- **decisions**: every current, non-skipped judgement decides each candidate of its generation:
  fits or does not fit. ``decide(judgement, candidate_id)`` says which; by default a candidate fits
  when the annotator marked it fitting, and ``build_snapshot`` passes its acceptance rule (so a
  rating of 3 or more counts too), so agreement is measured on the decision training uses. A
  ``none_fit`` judgement decides "does not fit" for every candidate it did not rate as fitting;
  ``skipped`` decides nothing. A judgement of a generation without candidates decides nothing;
- **overlap item**: a generation with decisions of at least two annotators. For annotator ``a`` the
  reference decision on a candidate is the majority of the OTHER annotators' decisions on it; a tie
  (an even split) is no reference and that decision is left out;
- **kappa**: Cohen's kappa of ``a``'s decisions against the references, pooled over all of ``a``'s
  overlap items: ``(p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the
  agreement two raters with these marginal "fits" rates would reach by chance.

Why kappa and not raw agreement: few candidates fit (typically 10-20 % of ten sampled
rationales), so an annotator who marks nothing, or marks at random at the base rate, still agrees
with the others on 70-85 % of the decisions. Kappa subtracts the agreement the marginals give by
chance: about 0 for random marking and for "never fits", about 0.5-0.7 for an honest annotator who
gets one decision in ten wrong.

Degenerate cases: when ``p_e == 1`` (both sides said "does not fit" -- or "fits" -- on every
shared decision) kappa is undefined; it is reported as ``None`` and never raises a flag (there is
nothing to disagree about). An annotator with no reference decisions gets ``None`` too.

- **flags**: ``annotator_agreement`` flags an annotator only when all of these hold: kappa is not
  None, kappa < ``flag_below_kappa``, the annotator has at least ``min_overlap_items`` overlap
  items, and the namespace has at least ``min_annotators`` annotators with decisions on overlap
  items. Why the last one: with two annotators a disagreement cannot be attributed to either (their
  kappas are equal), and the only annotator of a namespace has no overlap at all, so is never
  flagged. Every annotator gets a one-line ``reason``.
- **share cap** (``apply_share_cap``): no single annotator may stand behind more than
  ``max_share_of_rationale_rows`` of a snapshot's rationale rows. A row counts against an
  annotator only when that annotator is its only backer (a row another annotator also accepted
  has a second person vouching for it and is never dropped by the cap). The effective share is
  ``max(max_share, 1 / k)``, ``k`` the annotators behind the rows, so an equal split is always
  allowed and the cap can never empty a snapshot; with one annotator nothing is capped. The limit
  ``c`` is the largest row count such that, with every annotator cut to at most ``c`` sole rows,
  each one's share of the remaining rows is within the effective share; an annotator over it keeps
  its first ``c`` rows in the order the caller gives (``build_snapshot``: oldest judgement first),
  so the result is deterministic.

Nothing here reads the store; ``illume.training.from_store`` and ``build_snapshot`` call in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from illume.store.types import Judgement

Decide = Callable[[Judgement, str], bool]


class ReliabilityConfig(BaseModel):
    """How annotators' agreement is judged and how much one annotator may weigh in a snapshot."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    exclude_flagged: bool = Field(
        True,
        description="Leave the judgements of flagged annotators out of snapshots (never those of a "
        "namespace's only annotator, never all annotators).",
    )
    min_overlap_items: int = Field(
        20,
        ge=1,
        description="Overlap items (generations another annotator also judged) an annotator needs "
        "before a low kappa flags them; below it the kappa is reported but raises no flag.",
    )
    flag_below_kappa: float = Field(
        0.2,
        ge=-1.0,
        le=1.0,
        description="Flag an annotator whose Cohen's kappa against the other annotators' majority is "
        "below this (0.2: at most slight agreement beyond chance; random marking gives about 0).",
    )
    min_annotators: int = Field(
        3,
        ge=2,
        description="Annotators with decisions on overlap items a namespace needs before anyone is "
        "flagged (with two, a disagreement cannot be attributed to either).",
    )
    max_share_of_rationale_rows: float | None = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Cap on the share of a snapshot's rationale rows that rest on one annotator's "
        "judgement alone (raised to 1/k with k annotators, so an equal split always fits; None: no cap).",
    )


@dataclass(frozen=True)
class AnnotatorAgreement:
    """One annotator's agreement with the others on the generations they judged together."""

    annotator: str
    overlap_items: int  # generations this annotator and at least one other decided
    decisions: int  # candidate decisions with a (non-tied) reference from the others
    agreement: float | None  # raw observed agreement (None without decisions)
    kappa: float | None  # Cohen's kappa (None: undefined, see the module docstring)
    flagged: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JudgedRecord(Protocol):
    """What the agreement reads of a judged generation (``GenerationRecord``, ``JudgedItem``)."""

    @property
    def candidates(self) -> Sequence[Any]: ...

    @property
    def judgements(self) -> Sequence[Judgement]: ...


def marked_fitting(judgement: Judgement, candidate_id: str) -> bool:
    """The plain decision: the annotator marked the candidate fitting."""
    return candidate_id in judgement.fitting_candidate_ids


def candidate_decisions(record: JudgedRecord, decide: Decide = marked_fitting) -> dict[str, dict[str, bool]]:
    """annotator -> candidate id -> fits, for every current non-skipped judgement of ``record``."""
    ids = [c.candidate_id for c in record.candidates]
    decisions: dict[str, dict[str, bool]] = {}
    for judgement in record.judgements:
        if judgement.verdict == "skipped" or not ids:
            continue
        decisions[judgement.annotator_id] = {cid: bool(decide(judgement, cid)) for cid in ids}
    return decisions


def cohen_kappa(pairs: Sequence[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa of two binary raters over ``pairs`` (None when undefined: no pairs, p_e == 1)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first = sum(a for a, _ in pairs) / n
    second = sum(b for _, b in pairs) / n
    expected = first * second + (1 - first) * (1 - second)
    if expected >= 1.0 - 1e-12:
        return None  # both sides constant and equal: agreement by construction, nothing to measure
    return (observed - expected) / (1.0 - expected)


def _majority(votes: Sequence[bool]) -> bool | None:
    yes = sum(votes)
    if 2 * yes == len(votes):
        return None  # a tie is no reference
    return 2 * yes > len(votes)


def annotator_agreement(
    records: Iterable[JudgedRecord],
    config: ReliabilityConfig | None = None,
    decide: Decide = marked_fitting,
) -> list[AnnotatorAgreement]:
    """Per-annotator agreement with the others' majority, sorted by annotator (see the contract)."""
    config = config or ReliabilityConfig()
    pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    overlap: dict[str, int] = defaultdict(int)
    annotators: set[str] = set()
    overlapping: set[str] = set()
    for record in records:
        decisions = candidate_decisions(record, decide)
        annotators.update(decisions)
        if len(decisions) < 2:
            continue
        overlapping.update(decisions)
        for annotator, own in decisions.items():
            overlap[annotator] += 1
            others = [d for a, d in decisions.items() if a != annotator]
            for cid, fits in own.items():
                reference = _majority([d[cid] for d in others])
                if reference is not None:
                    pairs[annotator].append((fits, reference))
    return [
        _assess(annotator, overlap[annotator], pairs[annotator], len(overlapping), config)
        for annotator in sorted(annotators)
    ]


def _assess(
    annotator: str,
    overlap_items: int,
    pairs: Sequence[tuple[bool, bool]],
    overlapping_annotators: int,
    config: ReliabilityConfig,
) -> AnnotatorAgreement:
    kappa = cohen_kappa(pairs)
    agreement = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    flagged = False
    if overlap_items == 0:
        reason = "no overlap with another annotator"
    elif kappa is None:
        reason = "kappa undefined (no reference decisions, or every shared decision the same)"
    elif overlapping_annotators < config.min_annotators:
        reason = f"only {overlapping_annotators} annotators overlap (need {config.min_annotators} to flag)"
    elif overlap_items < config.min_overlap_items:
        reason = f"{overlap_items} overlap items (need {config.min_overlap_items} to flag)"
    elif kappa < config.flag_below_kappa:
        flagged = True
        reason = f"kappa {kappa:.3f} < {config.flag_below_kappa} on {overlap_items} overlap items"
    else:
        reason = f"kappa {kappa:.3f} >= {config.flag_below_kappa}"
    return AnnotatorAgreement(
        annotator=annotator,
        overlap_items=overlap_items,
        decisions=len(pairs),
        agreement=agreement,
        kappa=kappa,
        flagged=flagged,
        reason=reason,
    )


def with_admin_clears(
    agreements: Sequence[AnnotatorAgreement], cleared_at_overlap: Mapping[str, int], config: ReliabilityConfig
) -> list[AnnotatorAgreement]:
    """The agreements with an admin's clear applied: an annotator whose flag an admin cleared (flagged
    then with ``cleared_at_overlap[annotator]`` overlap items) is not flagged again until
    ``config.min_overlap_items`` more overlap items have been judged since, so the clear holds
    until there is new evidence, and then the check decides afresh."""
    out = []
    for found in agreements:
        at = cleared_at_overlap.get(found.annotator)
        if found.flagged and at is not None and found.overlap_items < at + config.min_overlap_items:
            found = replace(
                found,
                flagged=False,
                reason=f"{found.reason}; cleared by an admin at {at} overlap items, checked again at "
                f"{at + config.min_overlap_items}",
            )
        out.append(found)
    return out


def annotators_to_exclude(
    agreements: Sequence[AnnotatorAgreement],
    annotators: Iterable[str],
    config: ReliabilityConfig,
    flagged_elsewhere: Iterable[str] = (),
) -> frozenset[str]:
    """Whose judgements a snapshot leaves out: the flagged ones (and ``flagged_elsewhere``, e.g. the
    store's uncleared flags) among ``annotators`` -- none when that would leave nobody (which also
    covers a namespace's only annotator), none unless ``config.exclude_flagged``."""
    present = frozenset(annotators)
    if not config.exclude_flagged or len(present) < 2:
        return frozenset()
    flagged = {a.annotator for a in agreements if a.flagged} | set(flagged_elsewhere)
    excluded = frozenset(flagged & present)
    return frozenset() if excluded == present else excluded


def share_cap_limit(sole_rows: Mapping[str, int], shared_rows: int, share: float) -> int | None:
    """The largest per-annotator count of sole rows within ``share`` of the rows left (None: no cut).

    With every annotator cut to ``c`` the largest count is ``c`` and the rows left are ``shared_rows
    + sum(min(n, c))``, concave in ``c``; ``c <= share * rows left`` therefore holds on an interval
    from 0 (where it always holds), and a binary search finds its end."""
    if not sole_rows:
        return None

    def fits(limit: int) -> bool:
        kept = [min(n, limit) for n in sole_rows.values()]
        return max(kept) <= share * (shared_rows + sum(kept)) + 1e-9

    top = max(sole_rows.values())
    if fits(top):
        return None
    low, high = 0, top  # fits(low) holds, fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def apply_share_cap(row_backers: Sequence[frozenset[str]], max_share: float | None) -> tuple[bool, ...]:
    """Which rows to keep under the cap; rows come in keep-first order (see the contract)."""
    annotators = frozenset().union(*row_backers) if row_backers else frozenset()
    if max_share is None or len(annotators) < 2:
        return tuple(True for _ in row_backers)
    share = max(max_share, 1.0 / len(annotators))
    sole: dict[str, int] = defaultdict(int)
    for backers in row_backers:
        if len(backers) == 1:
            sole[next(iter(backers))] += 1
    shared = len(row_backers) - sum(sole.values())
    limit = share_cap_limit(sole, shared, share)
    if limit is None:
        return tuple(True for _ in row_backers)
    taken: dict[str, int] = defaultdict(int)
    keep = []
    for backers in row_backers:
        if len(backers) != 1:
            keep.append(True)
            continue
        owner = next(iter(backers))
        taken[owner] += 1
        keep.append(taken[owner] <= limit)
    return tuple(keep)


__all__ = [
    "AnnotatorAgreement",
    "JudgedRecord",
    "ReliabilityConfig",
    "annotator_agreement",
    "annotators_to_exclude",
    "apply_share_cap",
    "candidate_decisions",
    "cohen_kappa",
    "marked_fitting",
    "share_cap_limit",
]
