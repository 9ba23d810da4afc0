"""Training snapshots: the immutable set of rows one tuning round trains on.

Contract (docs/ARCHITECTURE.md, "What a round trains"):

- input: ``JudgedItem`` records, one per judged generation, of every round so far (the caller
  passes the accumulated history; items of earlier rounds keep contributing);
- **rationale rows**: every accepted rationale of every judged, non-held-out item, deduplicated per
  question (``JudgedItem.item_id``) after ILLUME's normalisation (lower-case, strip); the first
  occurrence (in input order) is kept, stripped but with its case;
- a judgement whose answer was judged wrong (``answer_correct is False``) contributes nothing: its
  accepted rationales justify a wrong answer;
- **answer rows** (replay): one per question that has no accepted rationale in any round and at
  least one judgement whose answer was not judged wrong (the latest one judged right, else the
  latest unjudged one, gives the answer), drawn with a seeded RNG; about
  ``replay_ratio`` x the number of rationale rows, capped by how many such questions exist. With
  ``replay_explained`` a question with rationale rows may give an answer row too (the paper's
  answer rows are any VQA question's answer); the default keeps them apart;
- **replay passes**: with ``replay_passes = P > 1`` the snapshot draws ``P`` x as many answer rows,
  every one a different question, and ``pass_rows(p)`` gives pass ``p``'s share: all rationale
  rows and every ``P``-th answer row (from the ``p``-th on, in stored order). A round that trains
  epoch ``e`` on pass ``e mod P`` never repeats a replay question within ``P`` epochs. Why: a small
  model memorises the replay questions it sees five times, and the answers on other questions
  slip (docs/TRAINING.md, "Answer rows seen once"). With ``P = 1`` every epoch sees every row;
- **replay pool** (optional): when the judged questions cannot give ``replay_ratio`` x the
  rationale rows (a small feedback pool never can), answer rows are topped up from
  ``replay_pool``, a fixed set of questions with known answers (``ReplayItem``; for example a
  curated VQA set of the deployment's domain), drawn with a seeded RNG, never a question that was
  judged; their source ids carry the prefix ``pool:``;
- held-out items (the gate's split) and unjudged items never reach a row;
- **what people said** (``SnapshotConfig.acceptance``, an ``AcceptanceRule``): an item that carries
  its ``judgements`` (``from_store.judged_items``) gets its accepted rationales from them, candidate
  by candidate: a candidate fits when an annotator marked it fitting (rule ``"selected"``) or rated
  it at least ``min_fitting_rating`` (rule ``"rating>=3"``); its weight is the rating's
  ``rating_weights`` entry (default 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0), ``unrated_weight`` (1.0) for a
  candidate selected without a rating. Several endorsements of one text (annotators, duplicates of
  the question) give one row with the highest weight and the rule that gave it. Corrected
  rationales (the annotators' own text) train only with ``train_corrected`` (off by default; rule
  ``"corrected"``, ``corrected_weight``). An item without judgements (hand-built) trains its
  ``accepted`` texts as ``"selected"`` with weight 1.0;
- **annotator reliability** (``SnapshotConfig.reliability``, ``illume.training.reliability``): the
  judgements of annotators whose Cohen's kappa against the others is too low (and those named in
  ``flagged_annotators``, e.g. the store's uncleared flags) are left out before anything else --
  never with a single annotator, never all of them; then no annotator may stand alone behind more
  than ``max_share_of_rationale_rows`` of the rationale rows: the excess rows of an annotator over
  the cap are dropped, its oldest judgements kept. One annotator: nothing changes;
- every rationale row carries its ``weight`` and ``rule``; the manifest repeats them per row with
  the annotators and feedback ids behind it (``rationale_provenance``), the agreement table, the
  excluded annotators and the rows the cap dropped;
- ``rationale_loss_weight = #answer rows per pass / sum of the rationale rows' weights`` (the
  paper's, which it is when every weight is 1), 1.0 when either is 0: rationale rows together still
  weigh as much as the answer rows, and the row weights share that out;
- prompts are ILLUME's: ``rationale_prompt(q, a)`` -> ``" " + rationale``, ``answer_prompt(q)`` ->
  ``" " + answer``. The end-of-sequence token is model-specific, so it is not part of the stored
  target: the trainer appends the tokenizer's EOS id to every target;
- the snapshot is immutable (frozen dataclasses, tuples); ``sha256`` is computed over a canonical
  JSON (sorted keys, no whitespace, UTF-8) of the config and the rows, so the same inputs give the
  same hash on every machine and any change to a row (its weight and rule included) changes it.
  ``replay_passes``, ``replay_explained``, ``acceptance`` and ``reliability`` enter it only when
  they differ from their defaults, a row's ``weight`` only when it is not 1.0 and its ``rule`` only
  when it is not ``"selected"``, so snapshots written before they existed keep their hash. The
  manifest (source ids, counts, provenance) is derived data and not hashed.

Rows are ordered deterministically: rationale rows by question id (then first occurrence), answer
rows by question id, so the hash does not depend on the order questions were judged in.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from illume.generation.prompts import answer_prompt, rationale_prompt
from illume.store.types import CandidateRecord, Judgement
from illume.training.reliability import (
    ReliabilityConfig,
    annotator_agreement,
    annotators_to_exclude,
    apply_share_cap,
    with_admin_clears,
)

SNAPSHOT_FORMAT = 1
RowKind = Literal["rationale", "answer"]
SELECTED_RULE = "selected"  # the rule of a candidate an annotator marked fitting
CORRECTED_RULE = "corrected"  # an annotator's own rationale (only with train_corrected)


def normalise_rationale(text: str) -> str:
    """ILLUME's normalisation before comparing rationales: lower-case and strip."""
    return text.lower().strip()


@dataclass(frozen=True)
class JudgedItem:
    """One judged generation: what the critic saw and which candidates it accepted.

    ``item_id`` names the question (a data set's question id; in production the question key the
    feedback log assigns); several judged generations of one question (one per round) share it.
    ``image`` is a reference that the trainer's ``image_loader`` resolves (a file path or an image
    sha256 in an artifact store). ``candidates`` and ``judgements`` (the store's records: the
    current revision of every annotator's judgement) are what people said; when ``judgements`` is
    not empty the snapshot derives the accepted rationales from them under its ``AcceptanceRule``
    and ``accepted`` is only a summary (the candidates marked fitting).
    """

    item_id: str
    image: str
    question: str
    answer: str
    accepted: tuple[str, ...] = ()
    answer_correct: bool | None = None
    generation_id: str = ""
    feedback_ids: tuple[str, ...] = ()
    judged: bool = True
    held_out: bool = False
    round: int = 0
    candidates_judged: int = 0
    candidates: tuple[CandidateRecord, ...] = ()
    judgements: tuple[Judgement, ...] = ()

    def __post_init__(self) -> None:
        # Accept any sequence from callers but keep the record immutable.
        for name in ("accepted", "feedback_ids", "candidates", "judgements"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def answer_verdict(judgements: Iterable[Judgement]) -> bool | None:
    """False if any judgement says the answer is wrong, else True if any says right, else None."""
    verdicts = [j.answer_correct for j in judgements if j.answer_correct is not None]
    if False in verdicts:
        return False
    return True if verdicts else None


@dataclass(frozen=True)
class ReplayItem:
    """A question with a known answer that may fill answer-only replay rows (see the contract)."""

    item_id: str
    image: str  # a reference the trainer's image loader resolves
    question: str
    answer: str


class AcceptanceRule(BaseModel):
    """Which judged candidates train, and with what loss weight (see the module contract)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_fitting_rating: int | None = Field(
        3,
        ge=1,
        le=4,
        description="A candidate rated at least this (1-4) fits even when it was not marked fitting "
        "(None: only marked candidates fit).",
    )
    rating_weights: tuple[float, float, float, float] = Field(
        (0.25, 0.5, 0.75, 1.0),
        description="Loss weight of a fitting candidate rated 1, 2, 3, 4 (a marked candidate with a "
        "rating takes its rating's weight).",
    )
    unrated_weight: float = Field(
        1.0, gt=0, description="Loss weight of a candidate marked fitting without a rating."
    )
    train_corrected: bool = Field(
        False,
        description="Train on the annotators' corrected rationales (their own text; the operator's "
        "opt-in, off by default).",
    )
    corrected_weight: float = Field(1.0, gt=0, description="Loss weight of a corrected rationale.")

    @field_validator("rating_weights")
    @classmethod
    def _positive(cls, weights: tuple[float, ...]) -> tuple[float, ...]:
        if any(w <= 0 for w in weights):
            raise ValueError("rating weights must be > 0")
        return weights

    @property
    def rating_rule(self) -> str:
        return f"rating>={self.min_fitting_rating}"

    def endorsement(self, judgement: Judgement, candidate_id: str) -> tuple[str, float] | None:
        """(rule, weight) when ``judgement`` makes the candidate fit, else None."""
        if judgement.verdict == "skipped":
            return None
        rating = judgement.ratings.get(candidate_id)
        weight = self.rating_weights[rating - 1] if rating is not None else self.unrated_weight
        if candidate_id in judgement.fitting_candidate_ids:
            return SELECTED_RULE, weight
        if rating is not None and self.min_fitting_rating is not None and rating >= self.min_fitting_rating:
            return self.rating_rule, weight
        return None

    def fits(self, judgement: Judgement, candidate_id: str) -> bool:
        """The candidate decision under this rule (what the reliability check compares)."""
        return self.endorsement(judgement, candidate_id) is not None


class SnapshotConfig(BaseModel):
    """How a snapshot is built from judged items."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replay_ratio: float = Field(
        10.0, ge=0, description="Answer-only replay rows per rationale row (the paper: about 10)."
    )
    seed: int = Field(0, description="Seed of the draw of replay questions.")
    max_rationales_per_question: int | None = Field(
        None, ge=1, description="Keep at most this many accepted rationales per question (None: all)."
    )
    replay_passes: int = Field(
        1,
        ge=1,
        description="Training passes the answer rows are drawn for: replay_ratio per rationale row for "
        "each pass, every row a different question, so epochs cycling through the passes never repeat "
        "a replay question (1: every epoch trains on the same answer rows).",
    )
    replay_explained: bool = Field(
        False,
        description="Also draw answer rows from questions that have rationale rows (False: only "
        "from judged questions without one, then the replay pool).",
    )
    acceptance: AcceptanceRule = Field(
        default_factory=AcceptanceRule,
        description="How judgements (marks, ratings, corrections) become rationale rows and weights.",
    )
    reliability: ReliabilityConfig = Field(
        default_factory=ReliabilityConfig,
        description="Annotator agreement: flagged annotators left out, per-annotator share cap.",
    )


@dataclass(frozen=True)
class SnapshotRow:
    """One supervised row: the image, the prompt, and the target the loss is taken on."""

    kind: RowKind
    source_id: str
    image: str
    prompt: str
    target: str
    weight: float = 1.0  # the row's own loss weight (rationale rows: from the acceptance rule)
    rule: str = ""  # what made a rationale row ("selected", "rating>=3", "corrected"); "" for answers

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source_id": self.source_id,
            "image": self.image,
            "prompt": self.prompt,
            "target": self.target,
            "weight": self.weight,
            "rule": self.rule,
        }

    def hashed_dict(self) -> dict[str, Any]:
        """The row as the hash sees it: ``weight`` 1.0 and rule ``"selected"`` left out, so rows
        written before weights existed keep their hash."""
        body = self.to_dict()
        if self.weight == 1.0:
            del body["weight"]
        if self.rule in ("", SELECTED_RULE):
            del body["rule"]
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SnapshotRow:
        row = dict(data)
        if row["kind"] == "rationale":
            row.setdefault("rule", SELECTED_RULE)  # a snapshot of before the rules: all selected
        row["weight"] = float(row.get("weight", 1.0))
        return cls(**row)


@dataclass(frozen=True)
class SnapshotManifest:
    """Where the rows came from (derived; not part of the hash)."""

    rationale_sources: tuple[str, ...]  # question ids with at least one rationale row
    answer_sources: tuple[str, ...]  # question ids drawn for replay
    generation_ids: tuple[str, ...]  # judged generations that contributed a rationale row
    feedback_ids: tuple[str, ...]  # feedback records behind the rationale rows
    judged_items: int
    held_out_items: int
    unjudged_items: int
    wrong_answer_questions: int
    replay_candidates: int  # questions eligible for replay (before the draw)
    duplicates_dropped: int
    pool_sources: tuple[str, ...] = ()  # replay-pool items drawn to top up the answer rows
    # One entry per rationale row, in row order: source_id, rule, weight, annotators, feedback_ids.
    rationale_provenance: tuple[dict[str, Any], ...] = ()
    annotator_agreement: tuple[dict[str, Any], ...] = ()  # reliability.AnnotatorAgreement rows
    excluded_annotators: tuple[str, ...] = ()  # whose judgements were left out
    capped_rows: int = 0  # rationale rows dropped by the per-annotator share cap

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Snapshot:
    """An immutable training snapshot (build it with ``build_snapshot``)."""

    rows: tuple[SnapshotRow, ...]
    config: SnapshotConfig
    rationale_loss_weight: float
    manifest: SnapshotManifest
    sha256: str = field(default="")

    @property
    def rationale_rows(self) -> int:
        return sum(r.kind == "rationale" for r in self.rows)

    @property
    def answer_rows(self) -> int:
        return sum(r.kind == "answer" for r in self.rows)

    @property
    def passes(self) -> int:
        return self.config.replay_passes

    def pass_rows(self, index: int) -> tuple[SnapshotRow, ...]:
        """The rows of pass ``index`` (mod the passes): every rationale row, that pass's answer rows."""
        p = index % self.passes
        answers = [r for r in self.rows if r.kind == "answer"]
        return tuple(r for r in self.rows if r.kind == "rationale") + tuple(answers[p :: self.passes])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "sha256": self.sha256,
            "config": self.config.model_dump(),
            "rationale_loss_weight": self.rationale_loss_weight,
            "rows": [r.to_dict() for r in self.rows],
            "manifest": self.manifest.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the snapshot as JSON (what a tuning job reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        """Rebuild a snapshot and verify its hash (ValueError when it does not match)."""
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown snapshot format {data.get('format')!r}")
        config = SnapshotConfig(**data["config"])
        rows = tuple(SnapshotRow.from_dict(row) for row in data["rows"])
        manifest_raw = dict(data["manifest"])
        manifest = SnapshotManifest(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in manifest_raw.items()}
        )
        weight = float(data["rationale_loss_weight"])
        digest = snapshot_sha256(rows, config, weight)
        if digest != data["sha256"]:
            raise ValueError(f"snapshot hash mismatch: stored {data['sha256']}, computed {digest}")
        return cls(rows=rows, config=config, rationale_loss_weight=weight, manifest=manifest, sha256=digest)

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        return cls.from_dict(json.loads(Path(path).read_text()))


def canonical_json(rows: Sequence[SnapshotRow], config: SnapshotConfig, weight: float) -> bytes:
    """The bytes the snapshot hash is taken over."""
    dumped = config.model_dump()
    # Settings at their defaults stay out: the hash of a snapshot written before they existed.
    if dumped["replay_passes"] == 1:
        del dumped["replay_passes"]
    if not dumped["replay_explained"]:
        del dumped["replay_explained"]
    if config.acceptance == AcceptanceRule():
        del dumped["acceptance"]
    if config.reliability == ReliabilityConfig():
        del dumped["reliability"]
    body = {
        "format": SNAPSHOT_FORMAT,
        "config": dumped,
        "rationale_loss_weight": weight,
        "rows": [r.hashed_dict() for r in rows],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def snapshot_sha256(rows: Sequence[SnapshotRow], config: SnapshotConfig, weight: float) -> str:
    return hashlib.sha256(canonical_json(rows, config, weight)).hexdigest()


def loss_weight(answer_rows: float, rationale_rows: float) -> float:
    """The paper's rationale loss weight: #answer rows / #rationale rows (1.0 if either is 0).

    ``rationale_rows`` is the sum of the rationale rows' own weights (their count when all are 1)."""
    if answer_rows == 0 or rationale_rows == 0:
        return 1.0
    return answer_rows / rationale_rows


@dataclass
class _Rationale:
    """One accepted rationale of a question before it becomes a row (mutable while merging)."""

    text: str  # stripped, as first seen
    item: JudgedItem  # where it was first seen: its image and prompt make the row
    rule: str
    weight: float
    annotators: set[str] = field(default_factory=set)
    feedback_ids: list[str] = field(default_factory=list)
    oldest: tuple[str, str] = ("\uffff", "")  # (time, feedback id) of its oldest judgement

    def endorse(self, endorsement: _Endorsement) -> None:
        # The strongest endorsement decides the weight: one person's "4" is not undone by another's "3".
        if endorsement.weight > self.weight:
            self.rule, self.weight = endorsement.rule, endorsement.weight
        if endorsement.annotator:
            self.annotators.add(endorsement.annotator)
        for fid in endorsement.feedback_ids:
            if fid not in self.feedback_ids:
                self.feedback_ids.append(fid)
        if endorsement.annotator:
            self.oldest = min(self.oldest, (endorsement.when, endorsement.feedback_ids[0]))


@dataclass(frozen=True)
class _Endorsement:
    """One reason a text trains: a judgement that accepted it (or a hand-built item's text)."""

    text: str
    rule: str
    weight: float
    annotator: str  # "" for a hand-built item's accepted text
    feedback_ids: tuple[str, ...]
    when: str = ""
    origin: str = ""  # which text of the item: a candidate id, "accepted:<k>", "corrected:<feedback id>"


def _endorsements(item: JudgedItem, rule: AcceptanceRule) -> list[_Endorsement]:
    """The accepted texts of one item with their rule and weight, candidate order, corrections last."""
    if not item.judgements:
        return [
            _Endorsement(text, SELECTED_RULE, 1.0, "", item.feedback_ids, origin=f"accepted:{k}")
            for k, text in enumerate(item.accepted)
        ]
    judging = [j for j in item.judgements if j.verdict != "skipped"]
    found: list[_Endorsement] = []
    for candidate in sorted(item.candidates, key=lambda c: c.index):
        for j in judging:
            endorsed = rule.endorsement(j, candidate.candidate_id)
            if endorsed is not None:
                found.append(
                    _Endorsement(
                        candidate.text,
                        *endorsed,
                        j.annotator_id,
                        (j.feedback_id,),
                        _when(j),
                        candidate.candidate_id,
                    )
                )
    if rule.train_corrected:
        found += [
            _Endorsement(
                j.corrected_rationale,
                CORRECTED_RULE,
                rule.corrected_weight,
                j.annotator_id,
                (j.feedback_id,),
                _when(j),
                f"corrected:{j.feedback_id}",
            )
            for j in judging
            if j.corrected_rationale.strip()
        ]
    return found


def _when(judgement: Judgement) -> str:
    return judgement.created_at.isoformat() if judgement.created_at else ""


def _without_annotators(item: JudgedItem, excluded: frozenset[str]) -> JudgedItem:
    """``item`` as if the ``excluded`` annotators had never judged it."""
    if not excluded or not any(j.annotator_id in excluded for j in item.judgements):
        return item
    kept = tuple(j for j in item.judgements if j.annotator_id not in excluded)
    judging = [j for j in kept if j.verdict != "skipped"]
    return replace(
        item,
        judgements=kept,
        judged=bool(judging),  # judged by excluded annotators only: as if never judged
        answer_correct=answer_verdict(judging),
        feedback_ids=tuple(j.feedback_id for j in judging),
        accepted=(),
    )


def _annotators(items: Iterable[JudgedItem]) -> set[str]:
    return {j.annotator_id for i in items for j in i.judgements if j.verdict != "skipped"}


def build_snapshot(
    judged_items: Iterable[JudgedItem],
    config: SnapshotConfig | None = None,
    replay_pool: Sequence[ReplayItem] = (),
    flagged_annotators: Iterable[str] = (),
    cleared_annotators: Mapping[str, int] | None = None,
) -> Snapshot:
    """Build the snapshot of one round from the judged items of all rounds so far (and the
    replay pool, when the judged questions give too few answer rows).

    ``flagged_annotators`` are left out like the ones the agreement check flags (the store's
    uncleared flags; see ``illume.training.from_store.flagged_annotators``).
    ``cleared_annotators`` (annotator -> overlap items when flagged; the store's cleared flags) are
    not flagged by the check again until they have new evidence (``reliability.with_admin_clears``)."""
    config = config or SnapshotConfig()
    items = list(judged_items)
    agreements = with_admin_clears(
        annotator_agreement(items, config.reliability, decide=config.acceptance.fits),
        cleared_annotators or {},
        config.reliability,
    )
    excluded = annotators_to_exclude(
        agreements, _annotators(i for i in items if i.judged), config.reliability, flagged_annotators
    )
    items = [_without_annotators(i, excluded) for i in items]
    usable = [i for i in items if i.judged and not i.held_out]
    # Per question: first occurrence of every accepted rationale (after normalisation).
    rationales: dict[str, dict[str, _Rationale]] = {}
    replay_source: dict[str, JudgedItem] = {}  # the judgement whose answer a replay row would use
    questions: set[str] = set()
    duplicates = 0
    for item in usable:
        questions.add(item.item_id)
        if item.answer_correct is False:
            continue  # a rationale of a wrong answer is not trained on, nor is the answer
        best = replay_source.get(item.item_id)
        if best is None or best.answer_correct is None or item.answer_correct is True:
            replay_source[item.item_id] = item  # prefer the latest answer judged right
        known = rationales.setdefault(item.item_id, {})
        texts_of_item: set[str] = set()  # one count per text of the item, whoever endorsed it
        for endorsement in _endorsements(item, config.acceptance):
            key = normalise_rationale(endorsement.text)
            if not key:
                continue
            if endorsement.origin not in texts_of_item:
                texts_of_item.add(endorsement.origin)
                duplicates += key in known
            if key not in known:
                known[key] = _Rationale(endorsement.text.strip(), item, endorsement.rule, endorsement.weight)
            known[key].endorse(endorsement)
    rationales = {q: found for q, found in rationales.items() if found}
    limit = config.max_rationales_per_question
    chosen = [r for qid in sorted(rationales) for r in list(rationales[qid].values())[:limit]]
    chosen, capped = _cap_per_annotator(chosen, config.reliability.max_share_of_rationale_rows)
    rationale_rows: list[SnapshotRow] = []
    generation_ids: list[str] = []
    feedback_ids: list[str] = []
    for r in chosen:
        rationale_rows.append(
            SnapshotRow(
                kind="rationale",
                source_id=r.item.item_id,
                image=r.item.image,
                prompt=rationale_prompt(r.item.question, r.item.answer),
                target=" " + r.text,
                weight=r.weight,
                rule=r.rule,
            )
        )
        if r.item.generation_id and r.item.generation_id not in generation_ids:
            generation_ids.append(r.item.generation_id)
        for fid in r.feedback_ids:
            if fid not in feedback_ids:
                feedback_ids.append(fid)
    trained = {row.source_id for row in rationale_rows}
    eligible = sorted(q for q in replay_source if config.replay_explained or q not in rationales)
    wanted_total = round(config.replay_ratio * len(rationale_rows)) * config.replay_passes
    wanted = min(len(eligible), wanted_total)
    drawn = sorted(random.Random(f"illume-snapshot/{config.seed}").sample(eligible, wanted))
    answer_rows = [
        SnapshotRow(
            kind="answer",
            source_id=qid,
            image=replay_source[qid].image,
            prompt=answer_prompt(replay_source[qid].question),
            target=" " + replay_source[qid].answer.strip(),
        )
        for qid in drawn
    ]
    pool = _draw_pool(replay_pool, questions, wanted_total - len(answer_rows), config.seed)
    answer_rows += [
        SnapshotRow(
            kind="answer",
            source_id=f"pool:{item.item_id}",
            image=item.image,
            prompt=answer_prompt(item.question),
            target=" " + item.answer.strip(),
        )
        for item in pool
    ]
    rows = tuple(rationale_rows + answer_rows)
    weight = loss_weight(len(answer_rows) / config.replay_passes, sum(r.weight for r in rationale_rows))
    manifest = SnapshotManifest(
        rationale_sources=tuple(sorted(trained)),
        answer_sources=tuple(drawn),
        generation_ids=tuple(generation_ids),
        feedback_ids=tuple(feedback_ids),
        judged_items=len(usable),
        held_out_items=sum(i.held_out for i in items),
        unjudged_items=sum(not i.judged and not i.held_out for i in items),
        wrong_answer_questions=len(questions - set(replay_source)),
        replay_candidates=len(eligible),
        duplicates_dropped=duplicates,
        pool_sources=tuple(item.item_id for item in pool),
        rationale_provenance=tuple(_provenance(r) for r in chosen),
        annotator_agreement=tuple(a.to_dict() for a in agreements),
        excluded_annotators=tuple(sorted(excluded)),
        capped_rows=capped,
    )
    return Snapshot(
        rows=rows,
        config=config,
        rationale_loss_weight=weight,
        manifest=manifest,
        sha256=snapshot_sha256(rows, config, weight),
    )


def _cap_per_annotator(chosen: list[_Rationale], max_share: float | None) -> tuple[list[_Rationale], int]:
    """The rationales left under the per-annotator share cap (oldest judgements kept), and how many
    it dropped; the survivors keep their order."""
    by_age = sorted(range(len(chosen)), key=lambda k: chosen[k].oldest)
    keep = apply_share_cap([frozenset(chosen[k].annotators) for k in by_age], max_share)
    kept = {k for k, ok in zip(by_age, keep, strict=True) if ok}
    return [r for k, r in enumerate(chosen) if k in kept], len(chosen) - len(kept)


def _provenance(r: _Rationale) -> dict[str, Any]:
    return {
        "source_id": r.item.item_id,
        "rule": r.rule,
        "weight": r.weight,
        "annotators": sorted(r.annotators),
        "feedback_ids": list(r.feedback_ids),
    }


def _draw_pool(
    pool: Sequence[ReplayItem], judged_questions: set[str], wanted: int, seed: int
) -> list[ReplayItem]:
    """Up to ``wanted`` pool items (seeded, in item-id order), none of them a judged question."""
    if wanted <= 0 or not pool:
        return []
    candidates = sorted((i for i in pool if i.item_id not in judged_questions), key=lambda i: i.item_id)
    drawn = random.Random(f"illume-snapshot/{seed}/pool").sample(candidates, min(wanted, len(candidates)))
    return sorted(drawn, key=lambda i: i.item_id)


__all__ = [
    "AcceptanceRule",
    "JudgedItem",
    "ReplayItem",
    "Snapshot",
    "SnapshotConfig",
    "SnapshotManifest",
    "SnapshotRow",
    "answer_verdict",
    "build_snapshot",
    "canonical_json",
    "loss_weight",
    "normalise_rationale",
    "snapshot_sha256",
]
