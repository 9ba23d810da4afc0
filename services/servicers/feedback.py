"""FeedbackService: SubmitFeedback, GetGeneration, GetFeedbackStats, ExportFeedback.

Feedback references server-issued generation and candidate ids only. The annotator id is the
calling key's principal: a request may leave it empty or repeat it; another id needs the key's
``submit_on_behalf`` permission (PERMISSION_DENIED otherwise), and such a submission is written to
the audit table before it is stored (docs/SERVING.md, "Submitting on behalf of annotators"). Writes
go through the FeedbackLog deployment (the only writer of the feedback tables).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from illume.errors import InvalidRequest, PermissionDenied
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, validate_namespace
from services.auth import Caller
from services.convert import EXPORT_FORMAT_FROM_PB, generation_to_pb, stats_to_pb, submission_from_pb
from services.servicers.base import ServicerBase, rpc, rpc_stream

DEFAULT_PAGE = 100
MAX_PAGE = 1000


class FeedbackServicer(ServicerBase):
    """Judgements of generated candidates and the training rows built from them."""

    feedback_log: Any
    limits: RequestLimits
    registry: Any

    @rpc("annotator", pb.SubmitFeedbackResponse)
    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, grpc_context: Any, caller: Caller
    ) -> pb.SubmitFeedbackResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        submission = submission_from_pb(request, namespace, caller.principal)
        if submission.annotator_id != caller.principal:
            if not caller.may_submit_on_behalf:
                raise PermissionDenied(
                    "feedback is recorded under the key's principal; another annotator_id needs "
                    "the submit_on_behalf permission"
                )
            # Audited first: a stored on-behalf judgement always has its audit row.
            await asyncio.to_thread(
                self.registry.record_audit,
                caller.actor,
                "feedback.submit_on_behalf",
                namespace,
                {
                    "annotator_id": submission.annotator_id,
                    "generation_id": submission.generation_id,
                    "idempotency_key": submission.idempotency_key,
                },
            )
        receipt = await self.feedback_log.submit_feedback.remote(submission)
        return pb.SubmitFeedbackResponse(
            feedback_id=receipt.feedback_id, duplicate=receipt.duplicate, revision=receipt.revision
        )

    @rpc("annotator", pb.Generation)
    async def GetGeneration(
        self, request: pb.GetGenerationRequest, grpc_context: Any, caller: Caller
    ) -> pb.Generation:
        if not request.generation_id:
            raise InvalidRequest("generation_id is required")
        namespace = validate_namespace(request.namespace, self.limits)
        return generation_to_pb(
            await self.feedback_log.get_generation.remote(request.generation_id, namespace)
        )

    @rpc("annotator", pb.FeedbackStats)
    async def GetFeedbackStats(
        self, request: pb.GetFeedbackStatsRequest, grpc_context: Any, caller: Caller
    ) -> pb.FeedbackStats:
        namespace = validate_namespace(request.namespace, self.limits)
        return stats_to_pb(await self.feedback_log.stats.remote(namespace))

    @rpc_stream("admin")
    async def ExportFeedback(
        self, request: pb.ExportFeedbackRequest, grpc_context: Any, caller: Caller
    ) -> AsyncIterator[pb.ExportFeedbackResponse]:
        namespace = validate_namespace(request.namespace, self.limits)
        if request.format not in EXPORT_FORMAT_FROM_PB:
            raise InvalidRequest("format is required (SFT, DPO or KTO)")
        page_size = request.page_size or DEFAULT_PAGE
        if not 1 <= page_size <= MAX_PAGE:
            raise InvalidRequest(f"page_size must be 1-{MAX_PAGE}")
        cursor, pages = request.cursor or None, 0
        while True:
            rows, next_cursor = await self.feedback_log.export.remote(
                EXPORT_FORMAT_FROM_PB[request.format],
                namespace,
                cursor,
                page_size,
                request.include_held_out,
                request.include_corrected,
            )
            pages += 1
            for i, row in enumerate(rows):
                last = i == len(rows) - 1
                yield pb.ExportFeedbackResponse(
                    json_row=json.dumps(row, sort_keys=True), next_cursor=(next_cursor or "") if last else ""
                )
            if next_cursor is None or not rows or (request.max_pages and pages >= request.max_pages):
                return
            cursor = next_cursor
