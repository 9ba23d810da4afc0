"""Protobuf <-> core conversion: the only place that knows both the wire contract and the core.

Servicers call these to parse requests into core types and to build replies from core results;
the core (``illume``) never imports the generated stubs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from illume.errors import InvalidRequest
from illume.generation.generator import CandidateOut, GenerateRequest, SamplingParams
from illume.store.queue import HandedItem, NewPoolItem
from illume.store.types import (
    AdapterFeedbackStats,
    AdapterRecord,
    AnnotatorFlag,
    CandidateRecord,
    FeedbackStats,
    FeedbackSubmission,
    GenerationRecord,
    Judgement,
    NewGeneration,
    RoundRecord,
    adapter_name,
    candidate_id_for,
    rfc3339,
)
from illume.training.reliability import AnnotatorAgreement, ReliabilityConfig
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, build_sampling

FINISH_TO_PB = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH}
VERDICT_FROM_PB = {
    pb.VERDICT_SELECTED: "selected",
    pb.VERDICT_NONE_FIT: "none_fit",
    pb.VERDICT_SKIPPED: "skipped",
}
VERDICT_TO_PB = {v: k for k, v in VERDICT_FROM_PB.items()}
EXPORT_FORMAT_FROM_PB = {
    pb.EXPORT_FORMAT_SFT: "sft",
    pb.EXPORT_FORMAT_DPO: "dpo",
    pb.EXPORT_FORMAT_KTO: "kto",
}


def sampling_from_pb(message: pb.SamplingParams, limits: RequestLimits) -> SamplingParams:
    """Validated sampling parameters (0 or empty fields take the server defaults)."""
    return build_sampling(
        limits,
        n=message.n,
        temperatures=list(message.temperatures),
        top_k_fraction=message.top_k_fraction,
        top_p=message.top_p,
        max_new_tokens=message.max_new_tokens,
        seed=message.seed if message.HasField("seed") else None,
        min_new_tokens=message.min_new_tokens,
    )


def sampling_to_pb(sampling: SamplingParams | Mapping[str, Any]) -> pb.SamplingParams:
    values = sampling if isinstance(sampling, Mapping) else sampling.__dict__
    return pb.SamplingParams(
        n=int(values.get("n", 0)),
        temperatures=[float(t) for t in values.get("temperatures", ())],
        top_k_fraction=float(values.get("top_k_fraction", 0.0)),
        top_p=float(values.get("top_p", 0.0)),
        max_new_tokens=int(values.get("max_new_tokens", 0)),
        seed=int(values.get("seed", 0)),
        min_new_tokens=int(values.get("min_new_tokens", 0)),
    )


def candidate_to_pb(candidate: CandidateRecord | CandidateOut) -> pb.Candidate:
    """A stored candidate, or a sampled one of an ephemeral generation (which has no id)."""
    return pb.Candidate(
        candidate_id=candidate.candidate_id if isinstance(candidate, CandidateRecord) else "",
        index=candidate.index,
        text=candidate.text,
        temperature=candidate.temperature,
        token_count=candidate.token_count,
        finish_reason=FINISH_TO_PB.get(candidate.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        mean_logprob=candidate.mean_logprob,
    )


def submission_from_pb(
    request: pb.SubmitFeedbackRequest, namespace: str, annotator: str
) -> FeedbackSubmission:
    """The core submission; the verdict must be explicit and the idempotency key present."""
    if request.verdict not in VERDICT_FROM_PB:
        raise InvalidRequest("verdict is required (SELECTED, NONE_FIT or SKIPPED)")
    key = request.idempotency_key.strip()
    if not 1 <= len(key) <= 128:
        raise InvalidRequest("idempotency_key must be 1-128 characters")
    if not request.generation_id:
        raise InvalidRequest("generation_id is required")
    ratings: dict[str, int] = {}
    for rating in request.ratings:
        if rating.candidate_id in ratings:
            raise InvalidRequest(f"candidate {rating.candidate_id} is rated twice")
        ratings[rating.candidate_id] = int(rating.rating)
    if len(request.corrected_rationale) > 2000:
        raise InvalidRequest("corrected_rationale is longer than 2000 characters")
    return FeedbackSubmission(
        generation_id=request.generation_id,
        verdict=VERDICT_FROM_PB[request.verdict],
        annotator_id=request.annotator_id.strip() or annotator,
        idempotency_key=key,
        namespace=namespace,
        fitting_candidate_ids=tuple(request.fitting_candidate_ids),
        ratings=ratings,
        answer_correct=request.answer_correct if request.HasField("answer_correct") else None,
        corrected_rationale=request.corrected_rationale.strip(),
    )


def judgement_to_pb(judgement: Judgement) -> pb.Judgement:
    message = pb.Judgement(
        feedback_id=judgement.feedback_id,
        annotator_id=judgement.annotator_id,
        verdict=VERDICT_TO_PB[judgement.verdict],
        fitting_candidate_ids=list(judgement.fitting_candidate_ids),
        ratings=[pb.CandidateRating(candidate_id=k, rating=v) for k, v in sorted(judgement.ratings.items())],
        corrected_rationale=judgement.corrected_rationale,
        revision=judgement.revision,
        created_at=rfc3339(judgement.created_at),
    )
    if judgement.answer_correct is not None:
        message.answer_correct = judgement.answer_correct
    return message


def generation_to_pb(record: GenerationRecord) -> pb.Generation:
    return pb.Generation(
        generation_id=record.generation_id,
        namespace=record.namespace,
        image_sha256=record.image_sha256,
        question=record.question,
        answer=record.answer,
        answer_generated=record.answer_generated,
        candidates=[candidate_to_pb(c) for c in record.candidates],
        sampling=sampling_to_pb(record.sampling),
        seed=record.seed,
        adapter_requested=record.adapter_requested,
        adapter_version=record.adapter_version,
        model_id=record.model_id,
        held_out=record.held_out,
        created_at=rfc3339(record.created_at),
        judgements=[judgement_to_pb(j) for j in record.judgements],
    )


def _adapter_stats_to_pb(stats: AdapterFeedbackStats) -> pb.AdapterFeedbackStats:
    return pb.AdapterFeedbackStats(
        adapter_version=stats.adapter_version,
        generations=stats.generations,
        judged_generations=stats.judged_generations,
        accepted_generations=stats.accepted_generations,
        judged_candidates=stats.judged_candidates,
        accepted_candidates=stats.accepted_candidates,
        answers_judged=stats.answers_judged,
        answers_correct=stats.answers_correct,
        first_generation_at=stats.first_generation_at,
    )


def handed_item_to_pb(item: HandedItem | None) -> pb.NextItemResponse:
    if item is None:
        return pb.NextItemResponse(has_item=False)
    return pb.NextItemResponse(
        has_item=True,
        generation=generation_to_pb(item.generation),
        lease_expires_at=rfc3339(item.lease_expires_at),
        reason=item.reason,
        score=item.score,
        remaining=item.remaining,
    )


def pool_items_from_pb(request: pb.AddPoolItemsRequest) -> list[NewPoolItem]:
    return [NewPoolItem(image=i.image, question=i.question, answer=i.answer) for i in request.items]


def stats_to_pb(stats: FeedbackStats) -> pb.FeedbackStats:
    return pb.FeedbackStats(
        namespace=stats.namespace,
        generations=stats.generations,
        feedback=stats.feedback,
        selected=stats.selected,
        none_fit=stats.none_fit,
        skipped=stats.skipped,
        held_out_generations=stats.held_out_generations,
        by_adapter=[_adapter_stats_to_pb(a) for a in stats.by_adapter],
    )


def adapter_to_pb(record: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(
        namespace=record.namespace,
        version=record.version,
        name=record.name,
        aliases=list(record.aliases),
        artifact_uri=record.artifact_uri,
        manifest_json=json.dumps(dict(record.manifest), sort_keys=True),
        round_id=record.round_id,
        parent_version=record.parent_version,
        created_at=rfc3339(record.created_at),
        state=record.state,
    )


def round_to_pb(record: RoundRecord) -> pb.TuningRound:
    return pb.TuningRound(
        round_id=record.round_id,
        namespace=record.namespace,
        state=record.state,
        reason=record.reason,
        snapshot_sha256=record.snapshot_sha256,
        rationale_rows=record.rationale_rows,
        answer_rows=record.answer_rows,
        adapter_version=record.adapter_version,
        scores_json=json.dumps(dict(record.scores), sort_keys=True),
        job_id=record.job_id,
        started_at=rfc3339(record.started_at),
        finished_at=rfc3339(record.finished_at) if record.finished_at else "",
    )


def namespace_to_pb(record: Any) -> pb.Namespace:
    """A ``NamespaceRecord`` as the wire's ``Namespace``."""
    return pb.Namespace(
        name=record.name, declared_at=rfc3339(record.declared_at), declared_by=record.declared_by
    )


def audit_to_pb(record: Any) -> pb.AuditEvent:
    """An ``AuditRecord`` as the wire's ``AuditEvent``."""
    return pb.AuditEvent(
        seq=record.seq,
        at=rfc3339(record.at),
        principal=record.principal,
        key_id=record.key_id,
        action=record.action,
        namespace=record.namespace,
        arguments_json=json.dumps(dict(record.arguments), sort_keys=True),
    )


def annotator_to_pb(
    annotator_id: str, agreement: AnnotatorAgreement | None, judgements: int, flag: AnnotatorFlag | None
) -> pb.Annotator:
    """One annotator of ``ListAnnotators``: the agreement check's numbers now (``agreement`` None:
    no current decision, e.g. only a flag left), and the stored flag (``flag``: the latest, set or
    cleared; None: never flagged)."""
    message = pb.Annotator(annotator_id=annotator_id, judgements=judgements)
    if agreement is not None:
        message.overlap_items = agreement.overlap_items
        message.decisions = agreement.decisions
        message.assessment = agreement.reason
        message.below_threshold = agreement.flagged
        if agreement.kappa is not None:
            message.kappa = agreement.kappa
        if agreement.agreement is not None:
            message.agreement = agreement.agreement
    if flag is not None:
        message.flagged = flag.active
        message.flag_reason = flag.reason
        message.flagged_at = rfc3339(flag.flagged_at)
        message.cleared = not flag.active
        if flag.cleared_at is not None:
            message.cleared_at = rfc3339(flag.cleared_at)
            message.cleared_by = flag.cleared_by
    return message


def annotators_to_pb(
    agreements: Sequence[AnnotatorAgreement],
    judgements: Mapping[str, int],
    flags: Sequence[AnnotatorFlag],
    config: ReliabilityConfig,
) -> pb.ListAnnotatorsResponse:
    """``ListAnnotators``' reply: every annotator with an agreement row, a judgement or a flag (set
    or cleared), by id, and the thresholds of ``config``."""
    by_id = {a.annotator: a for a in agreements}
    flag_of = {f.annotator_id: f for f in flags}
    ids = sorted(set(by_id) | set(judgements) | set(flag_of))
    return pb.ListAnnotatorsResponse(
        annotators=[annotator_to_pb(i, by_id.get(i), judgements.get(i, 0), flag_of.get(i)) for i in ids],
        flag_below_kappa=config.flag_below_kappa,
        min_overlap_items=config.min_overlap_items,
        min_annotators=config.min_annotators,
    )


def cleared_flag_to_pb(flag: AnnotatorFlag) -> pb.ClearAnnotatorFlagResponse:
    """``ClearAnnotatorFlag``'s reply from the flag as stored after the clear."""
    return pb.ClearAnnotatorFlagResponse(
        cleared=not flag.active,
        annotator_id=flag.annotator_id,
        flagged_at=rfc3339(flag.flagged_at),
        cleared_at=rfc3339(flag.cleared_at),
    )


def new_generation(
    request: pb.GenerateRequest,
    core: GenerateRequest,
    namespace: str,
    outcome: Any,
    generation_id: str | None = None,
) -> NewGeneration:
    """What the FeedbackLog stores of a served ``Generate``: the request as asked (raw image bytes,
    the adapter reference and client id), the validated question and sampling, and the outcome of a
    ``GeneratorDeployment`` (the result, the adapter version that ran, the model). ``generation_id``
    is pre-issued by ``GenerateStream``, whose header names it before the generation is stored."""
    result = outcome.result
    return NewGeneration(
        namespace=namespace,
        image=request.image,
        question=core.question,
        answer=result.answer,
        answer_generated=result.answer_generated,
        candidates=tuple(result.candidates),
        sampling=dict(core.sampling.__dict__),
        seed=result.seed,
        adapter_requested=request.adapter,
        adapter_version=outcome.adapter_version,
        model_id=outcome.model_id,
        client_request_id=request.client_request_id,
        generation_id=generation_id,
    )


def stream_header_to_pb(
    request: pb.GenerateRequest, header: Any, generation_id: str, held_out: bool
) -> pb.GenerateResponse:
    """``GenerateStream``'s first message: the reply without candidates and timings, naming the
    pre-issued ``generation_id`` ("" when ephemeral) and the split the store will put it in."""
    result = header.result
    return pb.GenerateResponse(
        generation_id=generation_id,
        held_out=held_out,
        answer=result.answer,
        answer_generated=result.answer_generated,
        seed=result.seed,
        adapter_requested=request.adapter,
        adapter_version=header.adapter_version,
        model_id=header.model_id,
        client_request_id=request.client_request_id,
    )


def streamed_candidate_to_pb(candidate: CandidateOut, generation_id: str) -> pb.Candidate:
    """One streamed candidate, with the id the store will give it (``<generation_id>-c<index>``)."""
    message = candidate_to_pb(candidate)
    if generation_id:
        message.candidate_id = candidate_id_for(generation_id, candidate.index)
    return message


def generate_response_to_pb(
    request: pb.GenerateRequest, outcome: Any, record: GenerationRecord | None, total_ms: float
) -> pb.GenerateResponse:
    """The reply to ``Generate``: the stored generation's ids when it was logged (``record``), the
    sampled candidates without ids when it was ephemeral, and where the time went."""
    result = outcome.result
    candidates = record.candidates if record is not None else result.candidates
    return pb.GenerateResponse(
        generation_id=record.generation_id if record is not None else "",
        held_out=record.held_out if record is not None else False,
        answer=result.answer,
        answer_generated=result.answer_generated,
        seed=result.seed,
        adapter_requested=request.adapter,
        adapter_version=outcome.adapter_version,
        model_id=outcome.model_id,
        client_request_id=request.client_request_id,
        candidates=[candidate_to_pb(c) for c in candidates],
        timings=pb.Timings(
            queue_ms=outcome.queue_ms,
            generate_ms=outcome.generate_ms,
            total_ms=total_ms,
            batch_size=outcome.batch_size,
        ),
    )


def replica_status_to_pb(
    beat: Any, now: float, stale_after_s: float, may_use: Callable[[str], bool]
) -> pb.ReplicaStatus:
    """One replica's heartbeat row (``illume.store.replicas.ReplicaHeartbeat``) as the caller may
    see it: adapters and aliases only of namespaces ``may_use`` allows; a heartbeat older than
    ``stale_after_s`` makes the replica unhealthy ("no heartbeat for N s")."""
    age = beat.age_s(now)
    healthy = bool(beat.healthy) and age <= stale_after_s
    reason = beat.health_reason if age <= stale_after_s else f"no heartbeat for {age:.0f} s"
    return pb.ReplicaStatus(
        replica_id=beat.replica_id,
        loaded_adapters=[f"{ns}/{adapter_name(v)}" for ns, v in beat.loaded_adapters if may_use(ns)],
        aliases=[f"{ns}/{alias}={adapter_name(v)}" for ns, alias, v in beat.aliases if may_use(ns)],
        queue_depth=max(0, int(beat.queue_depth)),
        node_id=beat.node_id,
        healthy=healthy,
        health_reason=reason,
        last_reload_at=_epoch_rfc3339(beat.last_reload_at),
        heartbeat_at=_epoch_rfc3339(beat.heartbeat_at),
        heartbeat_age_s=age,
        model_id=beat.model_id,
    )


def _epoch_rfc3339(seconds: float | None) -> str:
    from datetime import UTC, datetime

    return "" if seconds is None else rfc3339(datetime.fromtimestamp(seconds, UTC))
