"""The feedback log: generations, candidates, images and judgements, stored durably.

Contract:

- The FeedbackLog deployment is the sole writer of the feedback tables (see ``schema``); it builds
  one ``FeedbackStore(StoreSettings)`` and every write goes through the store's group-commit
  writer. A write method returns only after the transaction holding the write has committed
  durably (SQLite WAL + ``synchronous=FULL``, PostgreSQL ``synchronous_commit=on``): an
  acknowledged generation or judgement survives ``kill -9`` of the process.
- Ids are issued here (``types.new_id``); candidate ids are ``<generation_id>-c<index>``.
- The held-out split is decided here, when a generation is written, from a hash of the image's
  sha256 (``held_out_for``): the same image is always on the same side, whoever writes it.
- ``submit_feedback`` is idempotent per (namespace, idempotency key): the same key with the same
  canonical body returns the stored receipt with ``duplicate=True``; the same key with another
  body raises ``AlreadyExists``. A new key from the same annotator for the same generation is the
  next revision; only the latest revision counts in stats, exports and snapshots.
- Corrected rationales live in their own table and reach training rows only when asked for.
- Annotator flags (``flag_annotator``, ``clear_annotator_flag``, ``annotator_flags``): an annotator
  flagged for low agreement (``illume.training.reliability``) stays flagged in that namespace until
  ``clear_annotator_flag``; flagging an already flagged annotator updates the evidence (kappa,
  overlap, reason) but keeps the time it was first flagged. ``delete_annotator`` deletes the flags.
- Images: with ``image_dir`` set, bytes go to ``image_dir/<sha[:2]>/<sha>`` (temp file, fsync,
  rename, fsync of the directory) before the generation's transaction, so an acknowledged
  generation always has its image; without it, bytes go to the ``images`` table in the same
  transaction as the generation. Deleting the last generation that uses an image deletes it.
- The judging queue (``illume.store.queue``) keeps its leases and pool items in this store:
  deleting a generation deletes its leases and the pool item it was generated for, and an image
  a pool item still holds is kept; deleting an annotator deletes their leases.
- Errors are ``illume.errors`` types with one-line reasons: ``NotFound`` (unknown generation, or
  one of another namespace), ``InvalidRequest`` (inconsistent verdict, foreign candidate id, bad
  rating, bad cursor), ``AlreadyExists`` (idempotency key reused with another body).

Nothing here imports Ray or the protobuf stubs; ``services/`` converts these records to protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Integer, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from illume.durable import fsync_dir
from illume.errors import AlreadyExists, InvalidRequest, NotFound
from illume.store import schema as s
from illume.store.export import (
    ExportItem,
    decode_cursor,
    encode_cursor,
    params_fingerprint,
    rows_for,
)
from illume.store.groupcommit import GroupCommitWriter
from illume.store.settings import StoreSettings
from illume.store.types import (
    EXPORT_FORMATS,
    FINISH_REASONS,
    VERDICTS,
    AdapterFeedbackStats,
    AnnotatorFlag,
    CandidateRecord,
    FeedbackReceipt,
    FeedbackStats,
    FeedbackSubmission,
    GenerationRecord,
    Judgement,
    NewGeneration,
    candidate_id_for,
    new_id,
    normalize_namespace,
    parse_rfc3339,
    rfc3339,
    utcnow,
)

MAX_KEY_LEN = 128
MAX_ANNOTATOR_LEN = 128
MAX_CORRECTED_LEN = 4000
MAX_EXPORT_PAGE = 1000
DEFAULT_EXPORT_PAGE = 100
_UINT64_MAX = 2**64 - 1
_READ_BATCH = 200


def held_out_for(image_sha256: str, fraction: float) -> bool:
    """Whether an image belongs to the held-out split: a stable hash of its sha256 below ``fraction``."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(b"illume/held-out\x00" + image_sha256.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _body_sha256(sub: FeedbackSubmission, namespace: str) -> str:
    # The canonical body: list order of fitting ids and of ratings carries no meaning, so a client
    # that retries with another order still gets its duplicate receipt.
    body = {
        "generation_id": sub.generation_id,
        "namespace": namespace,
        "verdict": sub.verdict,
        "fitting": sorted(sub.fitting_candidate_ids),
        "ratings": sorted((str(k), int(v)) for k, v in sub.ratings.items()),
        "answer_correct": sub.answer_correct,
        "corrected_rationale": sub.corrected_rationale,
        "annotator_id": sub.annotator_id,
    }
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def _validate_submission(sub: FeedbackSubmission) -> None:
    """Checks that need no database (the candidate ids are checked in the write)."""
    if not sub.generation_id:
        raise InvalidRequest("generation_id is required")
    if not sub.idempotency_key or len(sub.idempotency_key) > MAX_KEY_LEN:
        raise InvalidRequest(f"idempotency_key must be 1-{MAX_KEY_LEN} characters")
    if not sub.annotator_id or len(sub.annotator_id) > MAX_ANNOTATOR_LEN:
        raise InvalidRequest(f"annotator_id must be 1-{MAX_ANNOTATOR_LEN} characters")
    if sub.verdict not in VERDICTS:
        raise InvalidRequest("verdict must be selected, none_fit or skipped")
    fitting = list(sub.fitting_candidate_ids)
    if sub.verdict == "selected" and not fitting:
        raise InvalidRequest("verdict selected needs at least one fitting_candidate_id")
    if sub.verdict != "selected" and fitting:
        raise InvalidRequest(f"verdict {sub.verdict} takes no fitting_candidate_ids")
    if len(set(fitting)) != len(fitting):
        raise InvalidRequest("fitting_candidate_ids repeats a candidate")
    for cid, rating in sub.ratings.items():
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 4:
            raise InvalidRequest(f"rating of {cid} must be an integer from 1 to 4")
    if len(sub.corrected_rationale) > MAX_CORRECTED_LEN:
        raise InvalidRequest(f"corrected_rationale is longer than {MAX_CORRECTED_LEN} characters")
    if sub.answer_correct is not None and not isinstance(sub.answer_correct, bool):
        raise InvalidRequest("answer_correct must be true, false or absent")


class _FeedbackWriteStatements:
    """The statements of one feedback write, built once: a statement object memoizes its cache
    key, so executing the same object skips building and keying it again."""

    def __init__(self) -> None:
        f, g, c = s.feedback, s.generations, s.candidates
        self.by_key = select(f.c.feedback_id, f.c.body_sha256, f.c.revision).where(
            f.c.namespace == bindparam("ns"), f.c.idempotency_key == bindparam("key")
        )
        self.generation = (
            select(g.c.namespace, g.c.adapter_version, c.c.candidate_id)
            .select_from(g.outerjoin(c, c.c.generation_id == g.c.generation_id))
            .where(g.c.generation_id == bindparam("gid"))
        )
        self.retire = (
            update(f)
            .where(
                f.c.generation_id == bindparam("gid"),
                f.c.annotator_id == bindparam("annotator"),
                f.c.is_current.is_(True),
            )
            .values(is_current=False)
            .returning(f.c.revision)
        )
        self.insert_feedback = insert(f)
        self.insert_items = insert(s.feedback_items)
        self.insert_correction = insert(s.corrections)


_FEEDBACK_WRITE = _FeedbackWriteStatements()


class FeedbackStore:
    """The durable feedback log of one deployment (SQLite or PostgreSQL, chosen by the URL)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.backend = settings.backend
        self.engine = s.create_store_engine(settings)
        self.schema_version = s.migrate(self.engine, settings.db_schema)
        self._image_dir = settings.image_dir
        if self._image_dir is not None:
            self._image_dir.mkdir(parents=True, exist_ok=True)
        self._writer = GroupCommitWriter(
            self.engine,
            enabled=settings.group_commit_enabled,
            max_batch=settings.group_commit_max_batch,
            max_wait_ms=settings.group_commit_max_wait_ms,
        )

    # -- lifecycle and health ------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued writes, stop the writer and close the connections."""
        self._writer.close()
        self.engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def commit_count(self) -> int:
        """Write transactions committed by this store object (group commits count once)."""
        return self._writer.commits

    @property
    def write_count(self) -> int:
        """Writes completed by this store object."""
        return self._writer.writes

    def durability_settings(self) -> dict[str, str]:
        """The durability settings a connection really runs with, read back from the database."""
        return s.durability_settings(self.engine)

    def integrity_check(self) -> bool:
        """SQLite ``PRAGMA integrity_check`` passes; PostgreSQL answers a trivial query."""
        return s.integrity_check(self.engine)

    def is_held_out(self, image_sha256: str) -> bool:
        """The split an image falls in under this store's ``held_out_fraction``."""
        return held_out_for(image_sha256, self.settings.held_out_fraction)

    # -- images --------------------------------------------------------------------------------

    def _image_path(self, sha: str) -> Path:
        assert self._image_dir is not None
        return self._image_dir / sha[:2] / sha

    def _write_image_file(self, sha: str, data: bytes) -> None:
        path = self._image_path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.parent / f".{sha}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # atomic: readers see no file or the whole file
        # Always fsync the directory entries: a concurrent writer of the same image may have
        # renamed the file without having fsynced the directory yet.
        fsync_dir(path.parent)
        fsync_dir(path.parent.parent)

    def get_image(self, image_sha256: str) -> bytes:
        """The stored bytes of an image; ``NotFound`` if no generation keeps it."""
        if self._image_dir is not None:
            try:
                return self._image_path(image_sha256).read_bytes()
            except (FileNotFoundError, ValueError):
                raise NotFound(f"image {image_sha256} not found") from None
        with self.engine.connect() as conn:
            data = conn.execute(select(s.images.c.data).where(s.images.c.sha256 == image_sha256)).scalar()
        if data is None:
            raise NotFound(f"image {image_sha256} not found")
        return bytes(data)

    def _keep_image(self, conn: Connection, sha: str, data: bytes, created_at: str) -> None:
        """Inside a write: the image in the ``images`` table, or its file (written before the write
        by the caller) still there."""
        if self._image_dir is None:
            self._insert_ignore(
                conn, s.images, {"sha256": sha, "data": data, "size": len(data), "created_at": created_at}
            )
        elif not self._image_path(sha).exists():
            # A deletion of the image's last user ran after the caller wrote the file.
            self._write_image_file(sha, data)

    def _insert_ignore(self, conn: Connection, table: Any, values: Mapping[str, Any]) -> None:
        stmt = (pg_insert if self.backend == "postgresql" else sqlite_insert)(table).values(**values)
        conn.execute(stmt.on_conflict_do_nothing())

    # -- generations ---------------------------------------------------------------------------

    def _prepare_generation(self, new: NewGeneration) -> tuple[GenerationRecord, bytes]:
        if not new.image:
            raise InvalidRequest("image is empty")
        if not 0 <= int(new.seed) <= _UINT64_MAX:
            raise InvalidRequest("seed must be an unsigned 64-bit integer")
        if len(new.client_request_id) > 128:
            raise InvalidRequest("client_request_id is longer than 128 characters")
        for c in new.candidates:
            if c.finish_reason not in FINISH_REASONS:
                raise InvalidRequest(f"finish_reason must be eos or length, not {c.finish_reason!r}")
        gid = new.generation_id or new_id()
        sha = hashlib.sha256(new.image).hexdigest()
        record = GenerationRecord(
            generation_id=gid,
            namespace=normalize_namespace(new.namespace),
            image_sha256=sha,
            question=new.question,
            answer=new.answer,
            answer_generated=bool(new.answer_generated),
            candidates=tuple(
                CandidateRecord(
                    candidate_id=candidate_id_for(gid, i),
                    index=i,
                    text=c.text,
                    temperature=float(c.temperature),
                    token_count=int(c.token_count),
                    finish_reason=c.finish_reason,
                    mean_logprob=float(c.mean_logprob),
                )
                for i, c in enumerate(new.candidates)
            ),
            sampling=dict(new.sampling),
            seed=int(new.seed),
            adapter_requested=new.adapter_requested,
            adapter_version=new.adapter_version,
            model_id=new.model_id,
            held_out=self.is_held_out(sha),
            client_request_id=new.client_request_id,
            created_at=utcnow(),
        )
        return record, new.image

    def _generation_op(self, record: GenerationRecord, image: bytes) -> Any:
        def op(conn: Connection) -> GenerationRecord:
            exists = conn.execute(
                select(s.generations.c.seq).where(s.generations.c.generation_id == record.generation_id)
            ).first()
            if exists:
                raise AlreadyExists(f"generation {record.generation_id} already exists")
            self._keep_image(conn, record.image_sha256, image, rfc3339(record.created_at))
            conn.execute(
                insert(s.generations).values(
                    generation_id=record.generation_id,
                    namespace=record.namespace,
                    image_sha256=record.image_sha256,
                    question=record.question,
                    answer=record.answer,
                    answer_generated=record.answer_generated,
                    sampling_json=json.dumps(dict(record.sampling), sort_keys=True),
                    seed=str(record.seed),
                    adapter_requested=record.adapter_requested,
                    adapter_version=record.adapter_version,
                    model_id=record.model_id,
                    held_out=record.held_out,
                    client_request_id=record.client_request_id,
                    created_at=rfc3339(record.created_at),
                )
            )
            if record.candidates:
                conn.execute(
                    insert(s.candidates),
                    [
                        {
                            "candidate_id": c.candidate_id,
                            "generation_id": record.generation_id,
                            "idx": c.index,
                            "text": c.text,
                            "temperature": c.temperature,
                            "token_count": c.token_count,
                            "finish_reason": c.finish_reason,
                            "mean_logprob": c.mean_logprob,
                        }
                        for c in record.candidates
                    ],
                )
            return record

        return op

    def record_generation(self, generation: NewGeneration) -> GenerationRecord:
        """Store a generation, its candidates and its image; returns it with ids and ``held_out``.

        ``generation_id`` may be pre-issued (``new_id()``) when the reply names it before the
        generation is stored (streaming); otherwise one is issued here.
        """
        record, data = self._prepare_generation(generation)
        if self._image_dir is not None:
            self._write_image_file(record.image_sha256, data)
        return self._writer.run(self._generation_op(record, data))

    async def arecord_generation(self, generation: NewGeneration) -> GenerationRecord:
        """``record_generation`` for asyncio callers; the event loop is never blocked."""
        record, data = self._prepare_generation(generation)
        if self._image_dir is not None:
            await asyncio.to_thread(self._write_image_file, record.image_sha256, data)
        return await self._await_op(self._generation_op(record, data))

    async def _await_op(self, op: Any) -> Any:
        if self._writer.enabled:
            return await asyncio.wrap_future(self._writer.submit(op))
        return await asyncio.to_thread(self._writer.run, op)

    # -- feedback ------------------------------------------------------------------------------

    def _feedback_op(self, sub: FeedbackSubmission) -> Any:
        _validate_submission(sub)
        namespace = normalize_namespace(sub.namespace)
        body_sha = _body_sha256(sub, namespace)

        def op(conn: Connection) -> FeedbackReceipt:
            # Prebuilt statements (_FEEDBACK_WRITE): every write waits for the single writer, and
            # building and keying the expressions anew was a third of each write's time there.
            stored = conn.execute(
                _FEEDBACK_WRITE.by_key, {"ns": namespace, "key": sub.idempotency_key}
            ).first()
            if stored is not None:
                if stored.body_sha256 != body_sha:
                    raise AlreadyExists("idempotency_key was already used with a different body")
                return FeedbackReceipt(stored.feedback_id, duplicate=True, revision=stored.revision)
            # One statement for the generation and its candidate ids.
            rows = conn.execute(_FEEDBACK_WRITE.generation, {"gid": sub.generation_id}).all()
            if not rows or rows[0].namespace != namespace:
                raise NotFound(f"generation {sub.generation_id} not found in namespace {namespace}")
            generation = rows[0]
            known = {r.candidate_id for r in rows if r.candidate_id is not None}
            for cid in sub.fitting_candidate_ids:
                if cid not in known:
                    raise InvalidRequest(f"candidate {cid} is not a candidate of this generation")
            for cid in sub.ratings:
                if cid not in known:
                    raise InvalidRequest(f"rated candidate {cid} is not a candidate of this generation")
            # The current revision is the latest one: retiring it returns the revision to follow.
            previous = conn.execute(
                _FEEDBACK_WRITE.retire, {"gid": sub.generation_id, "annotator": sub.annotator_id}
            ).scalar()
            revision = int(previous or 0) + 1
            fid = new_id()
            conn.execute(
                _FEEDBACK_WRITE.insert_feedback,
                {
                    "feedback_id": fid,
                    "generation_id": sub.generation_id,
                    "namespace": namespace,
                    "annotator_id": sub.annotator_id,
                    "idempotency_key": sub.idempotency_key,
                    "body_sha256": body_sha,
                    "verdict": sub.verdict,
                    "answer_correct": sub.answer_correct,
                    "revision": revision,
                    "is_current": True,
                    "created_at": rfc3339(utcnow()),
                },
            )
            fitting = set(sub.fitting_candidate_ids)
            touched = sorted(fitting | set(sub.ratings))
            if touched:
                conn.execute(
                    _FEEDBACK_WRITE.insert_items,
                    [
                        {
                            "feedback_id": fid,
                            "candidate_id": cid,
                            "fitting": cid in fitting,
                            "rating": sub.ratings.get(cid),
                        }
                        for cid in touched
                    ],
                )
            if sub.corrected_rationale:
                conn.execute(
                    _FEEDBACK_WRITE.insert_correction, {"feedback_id": fid, "text": sub.corrected_rationale}
                )
            return FeedbackReceipt(
                fid,
                duplicate=False,
                revision=revision,
                candidates=len(known),
                adapter_version=generation.adapter_version,
            )

        return op

    def submit_feedback(self, submission: FeedbackSubmission) -> FeedbackReceipt:
        """Store one judgement durably (idempotent per key; see the module docstring)."""
        return self._writer.run(self._feedback_op(submission))

    async def asubmit_feedback(self, submission: FeedbackSubmission) -> FeedbackReceipt:
        """``submit_feedback`` for asyncio callers (many callers share one group commit)."""
        return await self._await_op(self._feedback_op(submission))

    # -- reads ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        conn = self.engine.connect()
        if self.backend == "postgresql":
            # One snapshot for the several statements of a read (SQLite's BEGIN gives one already).
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        try:
            with conn.begin():
                yield conn
        finally:
            conn.close()

    def _load(self, conn: Connection, gen_rows: Sequence[Any]) -> list[GenerationRecord]:
        """Full records (candidates and current judgements) for rows of ``generations``."""
        ids = [r.generation_id for r in gen_rows]
        if not ids:
            return []
        cands: dict[str, list[CandidateRecord]] = defaultdict(list)
        for c in conn.execute(
            select(s.candidates).where(s.candidates.c.generation_id.in_(ids)).order_by(s.candidates.c.idx)
        ):
            cands[c.generation_id].append(
                CandidateRecord(
                    candidate_id=c.candidate_id,
                    index=c.idx,
                    text=c.text,
                    temperature=c.temperature,
                    token_count=c.token_count,
                    finish_reason=c.finish_reason,
                    mean_logprob=c.mean_logprob,
                )
            )
        f = s.feedback
        fb_rows = conn.execute(
            select(f).where(f.c.generation_id.in_(ids), f.c.is_current.is_(True)).order_by(f.c.seq)
        ).all()
        fids = [r.feedback_id for r in fb_rows]
        items: dict[str, list[Any]] = defaultdict(list)
        corrected: dict[str, str] = {}
        if fids:
            for it in conn.execute(select(s.feedback_items).where(s.feedback_items.c.feedback_id.in_(fids))):
                items[it.feedback_id].append(it)
            for cr in conn.execute(select(s.corrections).where(s.corrections.c.feedback_id.in_(fids))):
                corrected[cr.feedback_id] = cr.text
        judgements: dict[str, list[Judgement]] = defaultdict(list)
        for r in fb_rows:
            its = items.get(r.feedback_id, [])
            fit = {i.candidate_id for i in its if i.fitting}
            judgements[r.generation_id].append(
                Judgement(
                    feedback_id=r.feedback_id,
                    annotator_id=r.annotator_id,
                    verdict=r.verdict,
                    # Candidate order, not text order ("-c10" would sort before "-c2").
                    fitting_candidate_ids=tuple(
                        c.candidate_id for c in cands.get(r.generation_id, []) if c.candidate_id in fit
                    ),
                    ratings={i.candidate_id: i.rating for i in its if i.rating is not None},
                    answer_correct=r.answer_correct,
                    corrected_rationale=corrected.get(r.feedback_id, ""),
                    revision=r.revision,
                    created_at=parse_rfc3339(r.created_at),
                )
            )
        return [
            GenerationRecord(
                generation_id=g.generation_id,
                namespace=g.namespace,
                image_sha256=g.image_sha256,
                question=g.question,
                answer=g.answer,
                answer_generated=bool(g.answer_generated),
                candidates=tuple(cands.get(g.generation_id, [])),
                sampling=json.loads(g.sampling_json),
                seed=int(g.seed),
                adapter_requested=g.adapter_requested,
                adapter_version=g.adapter_version,
                model_id=g.model_id,
                held_out=bool(g.held_out),
                client_request_id=g.client_request_id,
                created_at=parse_rfc3339(g.created_at),
                judgements=tuple(judgements.get(g.generation_id, [])),
            )
            for g in gen_rows
        ]

    def get_generation(self, generation_id: str, namespace: str = "") -> GenerationRecord:
        """One generation with its candidates and current judgements; ``NotFound`` if absent."""
        namespace = normalize_namespace(namespace)
        with self._read() as conn:
            row = conn.execute(
                select(s.generations).where(s.generations.c.generation_id == generation_id)
            ).first()
            if row is None or row.namespace != namespace:
                raise NotFound(f"generation {generation_id} not found in namespace {namespace}")
            return self._load(conn, [row])[0]

    def stats(self, namespace: str = "") -> FeedbackStats:
        """Counts of a namespace, in total and per adapter version (proto ``FeedbackStats``)."""
        namespace = normalize_namespace(namespace)
        g, f, c, fi = s.generations, s.feedback, s.candidates, s.feedback_items
        current = and_(f.c.namespace == namespace, f.c.is_current.is_(True))
        with self._read() as conn:
            per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            held_out = 0
            first_at: dict[str, str] = {}
            for row in conn.execute(
                select(
                    g.c.adapter_version,
                    func.count(),
                    func.sum(g.c.held_out.cast(Integer)),
                    func.min(g.c.created_at),
                )
                .where(g.c.namespace == namespace)
                .group_by(g.c.adapter_version)
            ):
                per[row[0]]["generations"] = int(row[1])
                held_out += int(row[2] or 0)
                first_at[row[0]] = row[3] or ""
            for version, judged, correct in conn.execute(
                select(
                    g.c.adapter_version,
                    func.count(),
                    func.sum(f.c.answer_correct.cast(Integer)),
                )
                .join(f, f.c.generation_id == g.c.generation_id)
                .where(current, f.c.answer_correct.is_not(None))
                .group_by(g.c.adapter_version)
            ):
                per[version]["answers_judged"] = int(judged)
                per[version]["answers_correct"] = int(correct or 0)
            feedback_total = conn.execute(
                select(func.count()).select_from(f).where(f.c.namespace == namespace)
            ).scalar_one()
            verdicts = dict(
                conn.execute(select(f.c.verdict, func.count()).where(current).group_by(f.c.verdict)).all()
            )
            judged_ids = (
                select(f.c.generation_id).where(current, f.c.verdict != "skipped").distinct().subquery()
            )
            for key, verdict_filter in (
                ("judged_generations", f.c.verdict != "skipped"),
                ("accepted_generations", f.c.verdict == "selected"),
            ):
                for version, n in conn.execute(
                    select(g.c.adapter_version, func.count(func.distinct(g.c.generation_id)))
                    .join(f, f.c.generation_id == g.c.generation_id)
                    .where(current, verdict_filter)
                    .group_by(g.c.adapter_version)
                ):
                    per[version][key] = int(n)
            for version, n in conn.execute(
                select(g.c.adapter_version, func.count())
                .select_from(c)
                .join(g, g.c.generation_id == c.c.generation_id)
                .where(c.c.generation_id.in_(select(judged_ids.c.generation_id)))
                .group_by(g.c.adapter_version)
            ):
                per[version]["judged_candidates"] = int(n)
            for version, n in conn.execute(
                select(g.c.adapter_version, func.count(func.distinct(fi.c.candidate_id)))
                .select_from(fi)
                .join(f, f.c.feedback_id == fi.c.feedback_id)
                .join(g, g.c.generation_id == f.c.generation_id)
                .where(current, fi.c.fitting.is_(True))
                .group_by(g.c.adapter_version)
            ):
                per[version]["accepted_candidates"] = int(n)
        by_adapter = tuple(
            AdapterFeedbackStats(
                adapter_version=version, first_generation_at=first_at.get(version, ""), **counts
            )
            for version, counts in sorted(per.items())
        )
        return FeedbackStats(
            namespace=namespace,
            generations=sum(a.generations for a in by_adapter),
            feedback=int(feedback_total),
            selected=int(verdicts.get("selected", 0)),
            none_fit=int(verdicts.get("none_fit", 0)),
            skipped=int(verdicts.get("skipped", 0)),
            held_out_generations=held_out,
            by_adapter=by_adapter,
        )

    def export(
        self,
        format: str,
        namespace: str = "",
        cursor: str | None = None,
        limit: int = DEFAULT_EXPORT_PAGE,
        include_held_out: bool = False,
        include_corrected: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of TRL training rows (see ``illume.store.export``) and the cursor after it.

        ``next_cursor`` is None when the export reached the end of the stored judgements.
        Held-out generations are left out unless ``include_held_out``; corrected rationales unless
        ``include_corrected``.
        """
        if format not in EXPORT_FORMATS:
            raise InvalidRequest(f"unknown export format {format!r} (sft, dpo or kto)")
        limit = limit or DEFAULT_EXPORT_PAGE
        if not 1 <= limit <= MAX_EXPORT_PAGE:
            raise InvalidRequest(f"page size must be 1-{MAX_EXPORT_PAGE}")
        namespace = normalize_namespace(namespace)
        fingerprint = params_fingerprint(format, namespace, include_held_out, include_corrected)
        seq, skip = decode_cursor(cursor, fingerprint)
        g, f = s.generations, s.feedback
        rows: list[dict[str, Any]] = []
        batch = max(limit, 50)
        with self._read() as conn:
            while True:
                query = (
                    select(
                        f.c.seq,
                        f.c.feedback_id,
                        f.c.verdict,
                        f.c.generation_id,
                        g.c.question,
                        g.c.answer,
                        g.c.image_sha256,
                    )
                    .join(g, g.c.generation_id == f.c.generation_id)
                    .where(
                        f.c.namespace == namespace,
                        f.c.is_current.is_(True),
                        f.c.seq >= seq,
                        f.c.verdict != "skipped",
                    )
                    .order_by(f.c.seq)
                    .limit(batch)
                )
                if not include_held_out:
                    query = query.where(g.c.held_out.is_(False))
                judged = conn.execute(query).all()
                if not judged:
                    return rows, None
                items = self._export_items(conn, judged, include_corrected)
                for j in judged:
                    produced = rows_for(format, items[j.feedback_id])
                    start = skip if j.seq == seq else 0
                    room = limit - len(rows)
                    taken = produced[start : start + room]
                    rows.extend(taken)
                    if start + len(taken) < len(produced):
                        # The page ends inside this judgement: resume at its next row.
                        return rows, encode_cursor(j.seq, start + len(taken), fingerprint)
                    if len(rows) == limit:
                        return rows, encode_cursor(j.seq + 1, 0, fingerprint)
                if len(judged) < batch:
                    return rows, None
                seq, skip = judged[-1].seq + 1, 0

    def _export_items(
        self, conn: Connection, judged: Sequence[Any], include_corrected: bool
    ) -> dict[str, ExportItem]:
        gids = list({j.generation_id for j in judged})
        fids = [j.feedback_id for j in judged]
        texts: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for c in conn.execute(
            select(s.candidates.c.generation_id, s.candidates.c.candidate_id, s.candidates.c.text)
            .where(s.candidates.c.generation_id.in_(gids))
            .order_by(s.candidates.c.generation_id, s.candidates.c.idx)
        ):
            texts[c.generation_id].append((c.candidate_id, c.text))
        fitting: dict[str, set[str]] = defaultdict(set)
        for it in conn.execute(
            select(s.feedback_items.c.feedback_id, s.feedback_items.c.candidate_id).where(
                s.feedback_items.c.feedback_id.in_(fids), s.feedback_items.c.fitting.is_(True)
            )
        ):
            fitting[it.feedback_id].add(it.candidate_id)
        corrected: dict[str, str] = {}
        if include_corrected:
            # Only read when asked: corrected rationales are client text (see the module docstring).
            corrected = dict(
                conn.execute(
                    select(s.corrections.c.feedback_id, s.corrections.c.text).where(
                        s.corrections.c.feedback_id.in_(fids)
                    )
                ).all()
            )
        return {
            j.feedback_id: ExportItem(
                question=j.question,
                answer=j.answer,
                image_sha256=j.image_sha256,
                verdict=j.verdict,
                candidate_texts=texts.get(j.generation_id, []),
                fitting=frozenset(fitting.get(j.feedback_id, set())),
                corrected=corrected.get(j.feedback_id, ""),
            )
            for j in judged
        }

    def iter_judged(
        self,
        namespace: str = "",
        include_held_out: bool = False,
        since: datetime | None = None,
        *,
        only_held_out: bool = False,
    ) -> Iterator[GenerationRecord]:
        """Generations with at least one current non-skipped judgement, oldest first.

        Each comes with its candidates and all current judgements (skips included). With ``since``
        only generations with a current judgement stored at or after that time are yielded; with
        ``only_held_out`` only held-out ones (the gate's evidence, without reading the rest). Reads
        in batches, each in its own short transaction, so a long snapshot build holds no lock.
        """
        namespace = normalize_namespace(namespace)
        g, f = s.generations, s.feedback
        judged = select(f.c.generation_id).where(
            f.c.namespace == namespace, f.c.is_current.is_(True), f.c.verdict != "skipped"
        )
        if since is not None:
            recent = select(f.c.generation_id).where(
                f.c.namespace == namespace, f.c.is_current.is_(True), f.c.created_at >= rfc3339(since)
            )
        last = 0
        while True:
            query = (
                select(g)
                .where(g.c.namespace == namespace, g.c.seq > last, g.c.generation_id.in_(judged))
                .order_by(g.c.seq)
                .limit(_READ_BATCH)
            )
            if only_held_out:
                query = query.where(g.c.held_out.is_(True))
            elif not include_held_out:
                query = query.where(g.c.held_out.is_(False))
            if since is not None:
                query = query.where(g.c.generation_id.in_(recent))
            with self._read() as conn:
                gen_rows = conn.execute(query).all()
                records = self._load(conn, gen_rows)
            yield from records
            if len(gen_rows) < _READ_BATCH:
                return
            last = gen_rows[-1].seq

    # -- annotator flags -----------------------------------------------------------------------

    def flag_annotator(
        self,
        namespace: str,
        annotator_id: str,
        *,
        reason: str,
        kappa: float | None = None,
        overlap_items: int = 0,
        flagged_by: str = "",
    ) -> AnnotatorFlag:
        """Flag ``annotator_id`` in ``namespace`` until an admin clears it; returns the flag."""
        namespace = normalize_namespace(namespace)
        if not annotator_id or len(annotator_id) > MAX_ANNOTATOR_LEN:
            raise InvalidRequest(f"annotator_id must be 1-{MAX_ANNOTATOR_LEN} characters")
        t = s.annotator_flags
        evidence = {"kappa": kappa, "overlap_items": int(overlap_items), "reason": reason}

        def op(conn: Connection) -> AnnotatorFlag:
            key = and_(t.c.namespace == namespace, t.c.annotator_id == annotator_id)
            row = conn.execute(select(t).where(key)).first()
            if row is not None and row.cleared_at is None:
                conn.execute(update(t).where(key).values(**evidence))  # still flagged: since then
            else:
                fresh = {
                    **evidence,
                    "flagged_at": rfc3339(utcnow()),
                    "flagged_by": flagged_by,
                    "cleared_at": None,
                    "cleared_by": "",
                }
                if row is None:
                    conn.execute(insert(t).values(namespace=namespace, annotator_id=annotator_id, **fresh))
                else:
                    conn.execute(update(t).where(key).values(**fresh))
            return _flag(conn.execute(select(t).where(key)).one())

        return self._writer.run(op)

    def clear_annotator_flag(self, namespace: str, annotator_id: str, cleared_by: str = "") -> bool:
        """Clear the flag of ``annotator_id`` (an admin's decision); False if none was set."""
        namespace = normalize_namespace(namespace)
        t = s.annotator_flags

        def op(conn: Connection) -> bool:
            done = conn.execute(
                update(t)
                .where(t.c.namespace == namespace, t.c.annotator_id == annotator_id, t.c.cleared_at.is_(None))
                .values(cleared_at=rfc3339(utcnow()), cleared_by=cleared_by)
            )
            return bool(done.rowcount)

        return self._writer.run(op)

    def annotator_flags(self, namespace: str = "", include_cleared: bool = False) -> list[AnnotatorFlag]:
        """The flags of ``namespace`` (only those still set unless ``include_cleared``), by annotator."""
        namespace = normalize_namespace(namespace)
        t = s.annotator_flags
        query = select(t).where(t.c.namespace == namespace).order_by(t.c.annotator_id)
        if not include_cleared:
            query = query.where(t.c.cleared_at.is_(None))
        with self._read() as conn:
            return [_flag(row) for row in conn.execute(query)]

    # -- deletion ------------------------------------------------------------------------------

    def _drop_feedback(self, conn: Connection, feedback_ids: list[str]) -> None:
        if not feedback_ids:
            return
        conn.execute(delete(s.corrections).where(s.corrections.c.feedback_id.in_(feedback_ids)))
        conn.execute(delete(s.feedback_items).where(s.feedback_items.c.feedback_id.in_(feedback_ids)))
        conn.execute(delete(s.feedback).where(s.feedback.c.feedback_id.in_(feedback_ids)))

    def delete_generation(self, generation_id: str, namespace: str | None = None) -> bool:
        """Delete a generation with its candidates, judgements and (if unshared) its image.

        Returns False if it did not exist (deletion is idempotent). With ``namespace`` given, a
        generation of another namespace counts as absent.
        """
        g = s.generations

        def op(conn: Connection) -> bool:
            row = conn.execute(
                select(g.c.namespace, g.c.image_sha256).where(g.c.generation_id == generation_id)
            )
            found = row.first()
            if found is None or (namespace is not None and found.namespace != normalize_namespace(namespace)):
                return False
            fids = list(
                conn.execute(
                    select(s.feedback.c.feedback_id).where(s.feedback.c.generation_id == generation_id)
                ).scalars()
            )
            self._drop_feedback(conn, fids)
            conn.execute(delete(s.item_leases).where(s.item_leases.c.generation_id == generation_id))
            # A pool item's generation goes with the item: the image is what is being deleted.
            conn.execute(delete(s.pool_items).where(s.pool_items.c.generation_id == generation_id))
            conn.execute(delete(s.candidates).where(s.candidates.c.generation_id == generation_id))
            conn.execute(delete(g).where(g.c.generation_id == generation_id))
            shared = (
                conn.execute(select(g.c.seq).where(g.c.image_sha256 == found.image_sha256).limit(1)).first()
                or conn.execute(
                    select(s.pool_items.c.item_id)
                    .where(s.pool_items.c.image_sha256 == found.image_sha256)
                    .limit(1)
                ).first()
            )
            if shared is None:
                if self._image_dir is None:
                    conn.execute(delete(s.images).where(s.images.c.sha256 == found.image_sha256))
                else:
                    # Unlinked inside the writer, where a concurrent record of the same image
                    # re-writes a missing file before it commits (see _generation_op).
                    self._image_path(found.image_sha256).unlink(missing_ok=True)
            return True

        return self._writer.run(op)

    def delete_annotator(self, annotator_id: str) -> int:
        """Delete every judgement (all revisions, all namespaces) of one annotator; returns how many."""

        def op(conn: Connection) -> int:
            fids = list(
                conn.execute(
                    select(s.feedback.c.feedback_id).where(s.feedback.c.annotator_id == annotator_id)
                ).scalars()
            )
            self._drop_feedback(conn, fids)
            conn.execute(delete(s.annotator_flags).where(s.annotator_flags.c.annotator_id == annotator_id))
            conn.execute(delete(s.item_leases).where(s.item_leases.c.annotator_id == annotator_id))
            return len(fids)

        return self._writer.run(op)


def _flag(row: Any) -> AnnotatorFlag:
    return AnnotatorFlag(
        namespace=row.namespace,
        annotator_id=row.annotator_id,
        kappa=row.kappa,
        overlap_items=int(row.overlap_items),
        reason=row.reason,
        flagged_at=parse_rfc3339(row.flagged_at),
        flagged_by=row.flagged_by,
        cleared_at=parse_rfc3339(row.cleared_at),
        cleared_by=row.cleared_by,
    )
