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
  ``replay_ratio`` x the number of rationale rows, capped by how many such questions exist;
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
- ``rationale_loss_weight = #answer rows per pass / #rationale rows`` (the paper's), 1.0 when either
  count is 0;
- prompts are ILLUME's: ``rationale_prompt(q, a)`` -> ``" " + rationale``, ``answer_prompt(q)`` ->
  ``" " + answer``. The end-of-sequence token is model-specific, so it is not part of the stored
  target: the trainer appends the tokenizer's EOS id to every target;
- the snapshot is immutable (frozen dataclasses, tuples); ``sha256`` is computed over a canonical
  JSON (sorted keys, no whitespace, UTF-8) of the config and the rows, so the same inputs give the
  same hash on every machine and any change to a row changes it. ``replay_passes`` enters it only
  when it is not 1, so snapshots written before it existed keep their hash. The manifest (source
  ids, counts) is derived data and not hashed.

Rows are ordered deterministically: rationale rows by question id (then first occurrence), answer
rows by question id, so the hash does not depend on the order questions were judged in.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from illume.generation.prompts import answer_prompt, rationale_prompt

SNAPSHOT_FORMAT = 1
RowKind = Literal["rationale", "answer"]


def normalise_rationale(text: str) -> str:
    """ILLUME's normalisation before comparing rationales: lower-case and strip."""
    return text.lower().strip()


@dataclass(frozen=True)
class JudgedItem:
    """One judged generation: what the critic saw and which candidates it accepted.

    ``item_id`` names the question (a data set's question id; in production the question key the
    feedback log assigns); several judged generations of one question (one per round) share it.
    ``image`` is a reference that the trainer's ``image_loader`` resolves (a file path or an image
    sha256 in an artifact store).
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

    def __post_init__(self) -> None:
        # Accept any sequence from callers but keep the record immutable.
        object.__setattr__(self, "accepted", tuple(self.accepted))
        object.__setattr__(self, "feedback_ids", tuple(self.feedback_ids))


@dataclass(frozen=True)
class ReplayItem:
    """A question with a known answer that may fill answer-only replay rows (see the contract)."""

    item_id: str
    image: str  # a reference the trainer's image loader resolves
    question: str
    answer: str


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


@dataclass(frozen=True)
class SnapshotRow:
    """One supervised row: the image, the prompt, and the target the loss is taken on."""

    kind: RowKind
    source_id: str
    image: str
    prompt: str
    target: str

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "source_id": self.source_id,
            "image": self.image,
            "prompt": self.prompt,
            "target": self.target,
        }


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
        rows = tuple(SnapshotRow(**row) for row in data["rows"])
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
    if dumped["replay_passes"] == 1:
        del dumped["replay_passes"]  # the hash of a snapshot written before passes existed
    body = {
        "format": SNAPSHOT_FORMAT,
        "config": dumped,
        "rationale_loss_weight": weight,
        "rows": [r.to_dict() for r in rows],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def snapshot_sha256(rows: Sequence[SnapshotRow], config: SnapshotConfig, weight: float) -> str:
    return hashlib.sha256(canonical_json(rows, config, weight)).hexdigest()


def loss_weight(answer_rows: float, rationale_rows: int) -> float:
    """The paper's rationale loss weight: #answer rows / #rationale rows (1.0 if either is 0)."""
    if answer_rows == 0 or rationale_rows == 0:
        return 1.0
    return answer_rows / rationale_rows


def build_snapshot(
    judged_items: Iterable[JudgedItem],
    config: SnapshotConfig | None = None,
    replay_pool: Sequence[ReplayItem] = (),
) -> Snapshot:
    """Build the snapshot of one round from the judged items of all rounds so far (and the
    replay pool, when the judged questions give too few answer rows)."""
    config = config or SnapshotConfig()
    items = list(judged_items)
    usable = [i for i in items if i.judged and not i.held_out]
    # Per question: first occurrence of every accepted rationale (after normalisation).
    rationales: dict[str, list[tuple[str, JudgedItem]]] = {}
    seen: dict[str, set[str]] = {}
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
        keys = seen.setdefault(item.item_id, set())
        for text in item.accepted:
            key = normalise_rationale(text)
            if not key:
                continue
            if key in keys:
                duplicates += 1
                continue
            keys.add(key)
            rationales.setdefault(item.item_id, []).append((text.strip(), item))
    limit = config.max_rationales_per_question
    rationale_rows: list[SnapshotRow] = []
    generation_ids: list[str] = []
    feedback_ids: list[str] = []
    for qid in sorted(rationales):
        for text, item in rationales[qid][:limit] if limit else rationales[qid]:
            rationale_rows.append(
                SnapshotRow(
                    kind="rationale",
                    source_id=qid,
                    image=item.image,
                    prompt=rationale_prompt(item.question, item.answer),
                    target=" " + text,
                )
            )
            if item.generation_id and item.generation_id not in generation_ids:
                generation_ids.append(item.generation_id)
            for fid in item.feedback_ids:
                if fid not in feedback_ids:
                    feedback_ids.append(fid)
    eligible = sorted(q for q in replay_source if q not in rationales)
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
    weight = loss_weight(len(answer_rows) / config.replay_passes, len(rationale_rows))
    manifest = SnapshotManifest(
        rationale_sources=tuple(sorted(rationales)),
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
    )
    return Snapshot(
        rows=rows,
        config=config,
        rationale_loss_weight=weight,
        manifest=manifest,
        sha256=snapshot_sha256(rows, config, weight),
    )


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
    "JudgedItem",
    "ReplayItem",
    "Snapshot",
    "SnapshotConfig",
    "SnapshotManifest",
    "SnapshotRow",
    "build_snapshot",
    "canonical_json",
    "loss_weight",
    "normalise_rationale",
    "snapshot_sha256",
]
