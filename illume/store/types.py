"""Core record types of the feedback store and the adapter registry.

They mirror the wire contract (``protos/illume/v1/illume.proto``: Generation, Candidate,
SubmitFeedbackRequest, Judgement, FeedbackStats, Adapter, TuningRound) field for field, so the
servicers in ``services/`` convert them to protobuf one-to-one; the core never imports the stubs.
All records are frozen: a record is a value read from (or about to be written to) the store.

Ids are issued by the server: :func:`new_id` gives 32 lower-case hex characters whose first 12 are
the millisecond clock, so ids sort by creation time (ULID-like) and stay unique without a
coordinator. Candidate ids are derived from the generation id (``<generation_id>-c<index>``) so a
streaming reply can name them before the generation is stored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

FinishReason = Literal["eos", "length"]
VerdictKind = Literal["selected", "none_fit", "skipped"]
ExportFormat = Literal["sft", "dpo", "kto"]
AdapterState = Literal["registered", "rejected", "deleted"]
RoundState = Literal[
    "pending", "snapshot", "training", "evaluating", "canary", "promoted", "rejected", "failed"
]

VERDICTS: tuple[str, ...] = ("selected", "none_fit", "skipped")
FINISH_REASONS: tuple[str, ...] = ("eos", "length")
EXPORT_FORMATS: tuple[str, ...] = ("sft", "dpo", "kto")
ROUND_STATES: tuple[str, ...] = (
    "pending",
    "snapshot",
    "training",
    "evaluating",
    # The gate passed and the adapter serves the canary share; the LoopController ends the round.
    "canary",
    "promoted",
    "rejected",
    "failed",
)
TERMINAL_ROUND_STATES: frozenset[str] = frozenset({"promoted", "rejected", "failed"})
DEFAULT_NAMESPACE = "default"
BASE_ADAPTER = "base"


def new_id() -> str:
    """A fresh server-issued id: 12 hex digits of the millisecond clock + 80 random bits."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def candidate_id_for(generation_id: str, index: int) -> str:
    """The stable id of candidate ``index`` of a generation."""
    return f"{generation_id}-c{index}"


def adapter_name(version: int) -> str:
    """The name a replica loads a version under; never reused for other weights."""
    return f"rationale-v{version}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(ts: datetime | None) -> str:
    """RFC 3339 UTC with microseconds, as the wire contract's ``created_at`` fields ("" if None)."""
    if ts is None:
        return ""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: str | None) -> datetime | None:
    """The time a stored RFC 3339 string names (None for "" or None): the inverse of ``rfc3339``."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def normalize_namespace(namespace: str | None) -> str:
    """The wire contract's rule: an empty namespace means ``default``."""
    return namespace or DEFAULT_NAMESPACE


class SampledCandidate(Protocol):
    """What the store reads of a sampled candidate (the generator's ``CandidateOut`` is one)."""

    text: str
    temperature: float
    token_count: int
    finish_reason: str
    mean_logprob: float


@dataclass(frozen=True)
class NewCandidate:
    """A sampled candidate built by hand (tools, tests): a ``SampledCandidate``; the store issues the id."""

    text: str
    temperature: float
    token_count: int
    finish_reason: FinishReason = "eos"
    mean_logprob: float = 0.0


@dataclass(frozen=True)
class NewGeneration:
    """A generation as the serving path hands it to the store: the store validates it, issues the
    generation and candidate ids (unless ``generation_id`` was pre-issued) and decides ``held_out``."""

    namespace: str
    image: bytes = field(repr=False)
    question: str
    answer: str
    answer_generated: bool
    candidates: Sequence[SampledCandidate]
    sampling: Mapping[str, Any]
    seed: int
    adapter_requested: str
    adapter_version: str
    model_id: str
    client_request_id: str = ""
    generation_id: str | None = None


@dataclass(frozen=True)
class CandidateRecord:
    """One stored candidate rationale (proto ``Candidate``)."""

    candidate_id: str
    index: int
    text: str
    temperature: float
    token_count: int
    finish_reason: FinishReason
    mean_logprob: float


@dataclass(frozen=True)
class Judgement:
    """One annotator's current judgement of a generation (proto ``Judgement``)."""

    feedback_id: str
    annotator_id: str
    verdict: VerdictKind
    fitting_candidate_ids: tuple[str, ...]
    ratings: Mapping[str, int]
    answer_correct: bool | None
    corrected_rationale: str
    revision: int
    created_at: datetime


@dataclass(frozen=True)
class GenerationRecord:
    """One stored generation (proto ``Generation``); ``judgements`` holds the current revisions."""

    generation_id: str
    namespace: str
    image_sha256: str
    question: str
    answer: str
    answer_generated: bool
    candidates: tuple[CandidateRecord, ...]
    sampling: Mapping[str, Any]
    seed: int
    adapter_requested: str
    adapter_version: str
    model_id: str
    held_out: bool
    client_request_id: str
    created_at: datetime
    judgements: tuple[Judgement, ...] = ()


@dataclass(frozen=True)
class FeedbackSubmission:
    """One annotator's judgement as submitted (proto ``SubmitFeedbackRequest``).

    ``annotator_id`` must already be filled in (the servicer uses the authenticated caller's id
    when the request leaves it empty).
    """

    generation_id: str
    verdict: VerdictKind
    annotator_id: str
    idempotency_key: str
    namespace: str = DEFAULT_NAMESPACE
    fitting_candidate_ids: tuple[str, ...] = ()
    ratings: Mapping[str, int] = field(default_factory=dict)
    answer_correct: bool | None = None
    corrected_rationale: str = ""


@dataclass(frozen=True)
class AnnotatorFlag:
    """An annotator flagged in a namespace for low agreement (``cleared_at`` None: still flagged)."""

    namespace: str
    annotator_id: str
    kappa: float | None
    overlap_items: int
    reason: str
    flagged_at: datetime
    flagged_by: str
    cleared_at: datetime | None = None
    cleared_by: str = ""

    @property
    def active(self) -> bool:
        return self.cleared_at is None


@dataclass(frozen=True)
class FeedbackReceipt:
    """The acknowledgement of a submission (proto ``SubmitFeedbackResponse``)."""

    feedback_id: str
    duplicate: bool
    revision: int
    # What the write read anyway, for the caller's metrics (no second read): the generation's
    # candidate count and adapter version. Zero and "" on a duplicate.
    candidates: int = 0
    adapter_version: str = ""


@dataclass(frozen=True)
class AdapterFeedbackStats:
    """Feedback counts of one adapter version (proto ``AdapterFeedbackStats``)."""

    adapter_version: str
    generations: int = 0
    judged_generations: int = 0
    accepted_generations: int = 0
    judged_candidates: int = 0
    accepted_candidates: int = 0
    answers_judged: int = 0
    answers_correct: int = 0
    first_generation_at: str = ""  # RFC 3339 UTC; "" when the version has no generation


@dataclass(frozen=True)
class FeedbackStats:
    """Feedback counts of a namespace (proto ``FeedbackStats``)."""

    namespace: str
    generations: int
    feedback: int
    selected: int
    none_fit: int
    skipped: int
    held_out_generations: int
    by_adapter: tuple[AdapterFeedbackStats, ...]


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter version in the registry (proto ``Adapter``)."""

    namespace: str
    version: int
    name: str
    aliases: tuple[str, ...]
    artifact_uri: str
    manifest: Mapping[str, Any]
    round_id: str
    parent_version: int
    created_at: datetime
    state: AdapterState
    reason: str = ""


@dataclass(frozen=True)
class AliasRecord:
    """Where an alias points; ``share`` is the canary's share of unpinned traffic (None otherwise)."""

    namespace: str
    alias: str
    version: int
    share: float | None
    updated_at: datetime


@dataclass(frozen=True)
class RoundRecord:
    """One tuning round (proto ``TuningRound``)."""

    round_id: str
    namespace: str
    state: RoundState
    reason: str
    snapshot_sha256: str
    rationale_rows: int
    answer_rows: int
    adapter_version: int
    scores: Mapping[str, Any]
    job_id: str
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class LeaseRecord:
    """A named lease; ``token`` grows on every change of holder (a fencing token)."""

    name: str
    holder: str
    expires_at: float
    token: int


@dataclass(frozen=True)
class Actor:
    """Who makes a change that is audited: the key's principal and its short non-secret id (the
    first 8 hex digits of the key's sha256; "" for system events)."""

    principal: str
    key_id: str = ""


@dataclass(frozen=True)
class NamespaceRecord:
    """One declared namespace (proto ``Namespace``)."""

    name: str
    declared_at: datetime
    declared_by: str


@dataclass(frozen=True)
class AuditRecord:
    """One audited admin action or system event (proto ``AuditEvent``)."""

    seq: int
    at: datetime
    principal: str
    key_id: str
    action: str
    namespace: str
    arguments: Mapping[str, Any]
