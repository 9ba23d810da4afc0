"""The judging queue: which item an annotator is handed next, leases, and uploaded pools.

Contract (docs/SERVING.md, "The judging queue"):

- ``next_item(namespace, annotator)`` hands out one generation of the namespace, or claims one
  pending pool item for generation, or returns None when nothing is left for that annotator.
- An annotator is never handed the same generation twice, nor one they already judged.
- An item handed out is leased to its annotator for ``lease_s``: while the lease runs and the
  holder has not judged it, no one else is handed it, except as an overlap item.
- An item is "taken" by its current non-skipped judgements plus the running leases of others who
  have not judged it. A fresh item has none; an overlap item has at least one judgement and is
  taken fewer than ``max_judgements`` times (an item only leased, not yet judged, is no one
  else's until its lease ends: there is nothing to agree with yet). With probability
  ``overlap_share`` (when one exists) the pick is an overlap item, so the agreement check
  (``illume.training.reliability``) gets shared items; otherwise a
  fresh item or pending pool item, at random for ``random_share`` of the picks (every pick in
  mode ``random``), else the one with the highest acquisition score (``illume.selection``). With no
  fresh item left, an overlap item is handed out. Held-out generations are handed out like any
  other: the gate needs their judgements.
- The choice is made on a read snapshot; the lease is written by the store's single writer, which
  re-checks that the item is still free, and falls back to the next choice if another annotator
  took it meanwhile. So two concurrent calls never lease one fresh item to two annotators.
- Pool items (``add_pool_items``): image + question (+ answer), stored once per (namespace, image,
  question). ``next_item`` returns a ``PoolClaim`` for a pool item it picks, reserved for
  ``POOL_CLAIM_S`` so that one caller generates it; the caller generates the candidates and
  ``attach_pool_generation`` links the generation and leases it to the annotator
  (``release_pool_claim`` frees a claim whose generation failed).
- ``image_in_namespace`` says whether a namespace holds an image (a generation or a pool item):
  images are stored by content hash and shared, so that is what a namespace's image read checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from illume.errors import InvalidRequest, NotFound
from illume.selection import ItemFeatures, SelectionConfig, acquisition_score, question_type
from illume.store import schema as s
from illume.store.feedback import FeedbackStore
from illume.store.registry import parse_version
from illume.store.types import GenerationRecord, new_id, normalize_namespace, rfc3339, utcnow

# A pending pool item picked by one NextItem call is reserved this long for its generation.
POOL_CLAIM_S = 300.0
MAX_POOL_ITEMS_PER_CALL = 500
MAX_REMAINING_COUNTED = 1000
# Further choices the writer may fall back to when the first was taken meanwhile.
FALLBACK_CHOICES = 20


@dataclass(frozen=True)
class HandedItem:
    """A generation leased to an annotator (its judgements left out)."""

    generation: GenerationRecord
    reason: str
    score: float
    lease_expires_at: datetime
    remaining: int


@dataclass(frozen=True)
class PoolClaim:
    """A pending pool item reserved for the caller, who generates its candidates."""

    item_id: str
    namespace: str
    image_sha256: str
    question: str
    answer: str
    score: float
    remaining: int


@dataclass(frozen=True)
class NewPoolItem:
    image: bytes
    question: str
    answer: str = ""


@dataclass(frozen=True)
class PoolUpload:
    added: int
    already_present: int
    pending: int


@dataclass(frozen=True)
class _Choice:
    kind: str  # "generation" or "pool"
    key: str  # generation id or pool item id
    reason: str
    score: float


@dataclass
class _View:
    """What one annotator's choice reads, from one read snapshot."""

    fresh: list[_Choice]
    overlap: list[_Choice]
    pool: list[_Choice]


def _eligible(reason: str, judged: int, held: int, max_judgements: int) -> bool:
    """Whether an item may be handed out as ``reason``: a fresh item is neither judged nor held by
    anyone; an overlap item has a judgement and is taken (judged or held) fewer than
    ``max_judgements`` times (module docstring)."""
    if reason == "overlap":
        return judged >= 1 and judged + held < max_judgements
    return judged + held == 0


def _insert_lease(
    conn: Connection,
    generation_id: str,
    annotator_id: str,
    namespace: str,
    reason: str,
    score: float,
    expires_at: float,
) -> None:
    conn.execute(
        s.item_leases.insert().values(
            generation_id=generation_id,
            annotator_id=annotator_id,
            namespace=namespace,
            reason=reason,
            score=score,
            handed_at=rfc3339(utcnow()),
            expires_at=expires_at,
        )
    )


def _pending_count(conn: Connection, namespace: str) -> int:
    """Pool items of ``namespace`` not generated yet."""
    pool = s.pool_items
    return int(
        conn.execute(
            select(func.count())
            .select_from(pool)
            .where(pool.c.namespace == namespace, pool.c.generation_id.is_(None))
        ).scalar_one()
    )


class JudgingQueue:
    """NextItem's queue over one ``FeedbackStore`` (the FeedbackLog deployment owns both)."""

    def __init__(
        self, store: FeedbackStore, config: SelectionConfig, rng: random.Random | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.rng = rng or random.Random()

    # -- handing out ---------------------------------------------------------------------------

    def next_item(
        self, namespace: str, annotator_id: str, now: float | None = None, mode: str = ""
    ) -> HandedItem | PoolClaim | None:
        """The next item for ``annotator_id`` in ``namespace`` (module docstring), leased or claimed."""
        namespace, mode = self._checked(namespace, annotator_id, mode)
        now = time.time() if now is None else now
        choices, remaining = self._plan(self._view(namespace, annotator_id, now), mode)
        if not choices:
            return None
        won = self.store._writer.run(self._lease_op(namespace, annotator_id, choices, now))
        return self._handed(namespace, won, now, remaining)

    async def anext_item(
        self, namespace: str, annotator_id: str, mode: str = ""
    ) -> HandedItem | PoolClaim | None:
        """``next_item`` for asyncio callers: the read in a thread, the lease in the group commit."""
        namespace, mode = self._checked(namespace, annotator_id, mode)
        now = time.time()
        view = await asyncio.to_thread(self._view, namespace, annotator_id, now)
        choices, remaining = self._plan(view, mode)
        if not choices:
            return None
        won = await self.store._await_op(self._lease_op(namespace, annotator_id, choices, now))
        return await asyncio.to_thread(self._handed, namespace, won, now, remaining)

    def _checked(self, namespace: str, annotator_id: str, mode: str) -> tuple[str, str]:
        """The normalised namespace and the selection mode to use (``InvalidRequest`` otherwise)."""
        if not annotator_id:
            raise InvalidRequest("annotator id is required")
        if mode not in ("", "active", "random"):
            raise InvalidRequest(f"selection must be active or random, not {mode!r}")
        return normalize_namespace(namespace), mode or self.config.mode

    def _plan(self, view: _View, mode: str) -> tuple[list[_Choice], int]:
        """The ranked choices, and how many items the annotator could still be handed after one."""
        remaining = min(
            MAX_REMAINING_COUNTED, max(0, len(view.fresh) + len(view.pool) + len(view.overlap) - 1)
        )
        return self._ranked_choices(view, mode), remaining

    def _handed(
        self, namespace: str, won: tuple[_Choice, Any] | None, now: float, remaining: int
    ) -> HandedItem | PoolClaim | None:
        if won is None:
            return None
        choice, pool_row = won
        if choice.kind == "pool":
            return PoolClaim(
                item_id=pool_row.item_id,
                namespace=namespace,
                image_sha256=pool_row.image_sha256,
                question=pool_row.question,
                answer=pool_row.answer,
                score=choice.score,
                remaining=remaining,
            )
        generation = self.store.get_generation(choice.key, namespace)
        return HandedItem(
            generation=replace(generation, judgements=()),
            reason=choice.reason,
            score=choice.score,
            lease_expires_at=_utc(now + self.config.lease_s),
            remaining=remaining,
        )

    def _ranked_choices(self, view: _View, mode: str) -> list[_Choice]:
        """The pick first, then fallbacks by score (module docstring, the order of preference)."""
        config, rng = self.config, self.rng
        fresh = view.fresh + view.pool
        by_score = sorted(fresh, key=lambda c: -c.score)
        overlap = sorted(view.overlap, key=lambda c: -c.score)
        if overlap and (not fresh or rng.random() < config.overlap_share):
            pick = overlap[0]
            rest = overlap[1:] + by_score
        elif fresh:
            if mode == "random" or rng.random() < config.random_share:
                pick = fresh[rng.randrange(len(fresh))]
                pick = replace(pick, reason="pool" if pick.kind == "pool" else "random", score=0.0)
            else:
                pick = by_score[0]
            rest = [c for c in by_score if c.key != pick.key] + overlap
        else:
            return []
        return [pick, *rest[:FALLBACK_CHOICES]]

    def _view(self, namespace: str, annotator_id: str, now: float) -> _View:
        g, c, f, lease, pool = s.generations, s.candidates, s.feedback, s.item_leases, s.pool_items
        config = self.config
        with self.store._read() as conn:
            window = conn.execute(
                select(g.c.generation_id, g.c.image_sha256, g.c.question, g.c.adapter_version)
                .where(g.c.namespace == namespace)
                .order_by(g.c.seq.desc())
                .limit(config.candidate_window)
            ).all()
            ids = [r.generation_id for r in window]
            texts: dict[str, list[str]] = defaultdict(list)
            logprobs: dict[str, list[float]] = defaultdict(list)
            if ids:
                for row in conn.execute(
                    select(c.c.generation_id, c.c.text, c.c.mean_logprob).where(c.c.generation_id.in_(ids))
                ):
                    texts[row.generation_id].append(row.text)
                    logprobs[row.generation_id].append(row.mean_logprob)
            current = and_(f.c.namespace == namespace, f.c.is_current.is_(True))
            judged = and_(current, f.c.verdict != "skipped")
            mine = set(
                conn.execute(
                    select(f.c.generation_id).where(current, f.c.annotator_id == annotator_id)
                ).scalars()
            )
            # Who handled the window's items (skips included: a skipper no longer holds one).
            window_judgements = (
                conn.execute(
                    select(f.c.generation_id, f.c.annotator_id, f.c.verdict).where(
                        current, f.c.generation_id.in_(ids)
                    )
                ).all()
                if ids
                else []
            )
            judged_images = set(
                conn.execute(
                    select(g.c.image_sha256)
                    .distinct()
                    .join(f, f.c.generation_id == g.c.generation_id)
                    .where(judged)
                ).scalars()
            )
            judged_types: Counter[str] = Counter()
            for question, count in conn.execute(
                select(g.c.question, func.count())
                .join(f, f.c.generation_id == g.c.generation_id)
                .where(judged)
                .group_by(g.c.question)
            ):
                judged_types[question_type(question)] += count
            # Leases that matter: this annotator's (never twice) and the running ones (held).
            leases = conn.execute(
                select(lease.c.generation_id, lease.c.annotator_id, lease.c.expires_at).where(
                    lease.c.namespace == namespace,
                    or_(lease.c.annotator_id == annotator_id, lease.c.expires_at > now),
                )
            ).all()
            pending = conn.execute(
                select(pool.c.item_id, pool.c.image_sha256, pool.c.question)
                .where(
                    pool.c.namespace == namespace,
                    pool.c.generation_id.is_(None),
                    or_(pool.c.claimed_until.is_(None), pool.c.claimed_until < now),
                )
                .order_by(pool.c.added_at)
                .limit(config.candidate_window)
            ).all()
        mine |= {r.generation_id for r in leases if r.annotator_id == annotator_id}
        handled = defaultdict(set)  # generation -> annotators with any current judgement
        judges: Counter[str] = Counter()
        for r in window_judgements:
            handled[r.generation_id].add(r.annotator_id)
            judges[r.generation_id] += r.verdict != "skipped"
        holders: Counter[str] = Counter()
        for r in leases:
            if r.expires_at > now and r.annotator_id not in handled[r.generation_id]:
                holders[r.generation_id] += 1
        newest = max((parse_version(r.adapter_version) or 0 for r in window), default=0)

        def score(image: str, question: str, gid: str | None, adapter_version: str) -> float:
            features = ItemFeatures(
                candidate_texts=texts.get(gid, []) if gid else [],
                mean_logprobs=logprobs.get(gid, []) if gid else [],
                image_judged=image in judged_images,
                question_type_judged=judged_types[question_type(question)],
                newest_adapter=gid is None or (parse_version(adapter_version) or 0) == newest,
            )
            return acquisition_score(features, config)

        fresh, overlap = [], []
        for r in window:
            if r.generation_id in mine:
                continue
            judged, held = judges[r.generation_id], holders[r.generation_id]
            for reason, choices in (("active", fresh), ("overlap", overlap)):
                if _eligible(reason, judged, held, config.max_judgements):
                    item_score = score(r.image_sha256, r.question, r.generation_id, r.adapter_version)
                    choices.append(_Choice("generation", r.generation_id, reason, item_score))
        pool_choices = [
            _Choice("pool", p.item_id, "pool", score(p.image_sha256, p.question, None, "")) for p in pending
        ]
        return _View(fresh=fresh, overlap=overlap, pool=pool_choices)

    def _lease_op(self, namespace: str, annotator_id: str, choices: Sequence[_Choice], now: float) -> Any:
        config = self.config
        f, lease, pool = s.feedback, s.item_leases, s.pool_items

        def still_free(conn: Connection, choice: _Choice) -> bool:
            gid = choice.key
            seen = (
                conn.execute(
                    select(lease.c.annotator_id).where(
                        lease.c.generation_id == gid, lease.c.annotator_id == annotator_id
                    )
                ).first()
                or conn.execute(
                    select(f.c.feedback_id)
                    .where(f.c.generation_id == gid, f.c.annotator_id == annotator_id)
                    .limit(1)
                ).first()
            )
            if seen:
                return False
            handled = {
                r.annotator_id: r.verdict
                for r in conn.execute(
                    select(f.c.annotator_id, f.c.verdict).where(
                        f.c.generation_id == gid, f.c.is_current.is_(True)
                    )
                )
            }
            judged = sum(1 for v in handled.values() if v != "skipped")
            held = sum(
                1
                for r in conn.execute(
                    select(lease.c.annotator_id).where(lease.c.generation_id == gid, lease.c.expires_at > now)
                )
                if r.annotator_id not in handled
            )
            return _eligible(choice.reason, judged, held, config.max_judgements)

        def op(conn: Connection) -> tuple[_Choice, Any] | None:
            for choice in choices:
                if choice.kind == "pool":
                    claimed = conn.execute(
                        update(pool)
                        .where(
                            pool.c.item_id == choice.key,
                            pool.c.generation_id.is_(None),
                            or_(pool.c.claimed_until.is_(None), pool.c.claimed_until < now),
                        )
                        .values(claimed_until=now + POOL_CLAIM_S)
                    ).rowcount
                    if claimed:
                        row = conn.execute(select(pool).where(pool.c.item_id == choice.key)).first()
                        return choice, row
                    continue
                if still_free(conn, choice):
                    expires_at = now + config.lease_s
                    _insert_lease(
                        conn, choice.key, annotator_id, namespace, choice.reason, choice.score, expires_at
                    )
                    return choice, None
            return None

        return op

    # -- pools ---------------------------------------------------------------------------------

    def add_pool_items(self, namespace: str, items: Sequence[NewPoolItem], added_by: str) -> PoolUpload:
        """Store items to be judged (module docstring); all or nothing."""
        namespace = normalize_namespace(namespace)
        if not 1 <= len(items) <= MAX_POOL_ITEMS_PER_CALL:
            raise InvalidRequest(f"give 1-{MAX_POOL_ITEMS_PER_CALL} pool items per call, not {len(items)}")
        prepared = []
        for k, item in enumerate(items):
            if not item.image:
                raise InvalidRequest(f"pool item {k}: image is empty")
            if not item.question.strip():
                raise InvalidRequest(f"pool item {k}: question is empty")
            prepared.append((hashlib.sha256(item.image).hexdigest(), item))
        if self.store._image_dir is not None:
            for sha, item in prepared:
                self.store._write_image_file(sha, item.image)
        return self.store._writer.run(self._pool_op(namespace, prepared, added_by))

    def _pool_op(self, namespace: str, prepared: Sequence[tuple[str, NewPoolItem]], added_by: str) -> Any:
        pool = s.pool_items
        store = self.store

        def op(conn: Connection) -> PoolUpload:
            added = present = 0
            now = rfc3339(utcnow())
            for sha, item in prepared:
                exists = conn.execute(
                    select(pool.c.item_id).where(
                        pool.c.namespace == namespace,
                        pool.c.image_sha256 == sha,
                        pool.c.question == item.question,
                    )
                ).first()
                if exists:
                    present += 1
                    continue
                store._keep_image(conn, sha, item.image, now)
                conn.execute(
                    pool.insert().values(
                        item_id=new_id(),
                        namespace=namespace,
                        image_sha256=sha,
                        question=item.question,
                        answer=item.answer,
                        added_at=now,
                        added_by=added_by,
                        claimed_until=None,
                        generation_id=None,
                    )
                )
                added += 1
            return PoolUpload(added=added, already_present=present, pending=_pending_count(conn, namespace))

        return op

    def pool_image(self, item_id: str) -> bytes:
        """The image bytes of a pool item (for its generation)."""
        with self.store._read() as conn:
            sha = conn.execute(
                select(s.pool_items.c.image_sha256).where(s.pool_items.c.item_id == item_id)
            ).scalar()
        if sha is None:
            raise NotFound(f"pool item {item_id} not found")
        return self.store.get_image(sha)

    def attach_pool_generation(
        self, claim: PoolClaim, generation_id: str, annotator_id: str, now: float | None = None
    ) -> HandedItem:
        """Link a claimed pool item to its generation and lease that generation to the annotator."""
        now = time.time() if now is None else now
        pool = s.pool_items
        config = self.config

        def op(conn: Connection) -> None:
            conn.execute(
                update(pool)
                .where(pool.c.item_id == claim.item_id)
                .values(generation_id=generation_id, claimed_until=None)
            )
            expires_at = now + config.lease_s
            _insert_lease(conn, generation_id, annotator_id, claim.namespace, "pool", claim.score, expires_at)

        self.store._writer.run(op)
        generation = self.store.get_generation(generation_id, claim.namespace)
        return HandedItem(
            generation=replace(generation, judgements=()),
            reason="pool",
            score=claim.score,
            lease_expires_at=_utc(now + config.lease_s),
            remaining=claim.remaining,
        )

    def release_pool_claim(self, item_id: str) -> None:
        """Free a pool item whose generation failed, so the next call may try it again."""
        pool = s.pool_items

        def op(conn: Connection) -> None:
            conn.execute(
                update(pool)
                .where(pool.c.item_id == item_id, pool.c.generation_id.is_(None))
                .values(claimed_until=None)
            )

        self.store._writer.run(op)

    def pending_pool_items(self, namespace: str) -> int:
        with self.store._read() as conn:
            return _pending_count(conn, normalize_namespace(namespace))

    # -- images --------------------------------------------------------------------------------

    def image_in_namespace(self, namespace: str, image_sha256: str) -> bool:
        namespace = normalize_namespace(namespace)
        g, pool = s.generations, s.pool_items
        with self.store._read() as conn:
            found = (
                conn.execute(
                    select(g.c.seq)
                    .where(and_(g.c.namespace == namespace, g.c.image_sha256 == image_sha256))
                    .limit(1)
                ).first()
                or conn.execute(
                    select(pool.c.item_id)
                    .where(and_(pool.c.namespace == namespace, pool.c.image_sha256 == image_sha256))
                    .limit(1)
                ).first()
            )
        return found is not None


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)
