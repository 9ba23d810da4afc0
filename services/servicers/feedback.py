"""FeedbackService: SubmitFeedback, GetGeneration, GetFeedbackStats, ExportFeedback, NextItem,
GetImage.

Feedback references server-issued generation and candidate ids only. The annotator id is the
calling key's principal: a request may leave it empty or repeat it; another id needs the key's
``submit_on_behalf`` permission (PERMISSION_DENIED otherwise), and such a submission is written to
the audit table before it is stored (docs/SERVING.md, "Submitting on behalf of annotators"). Writes
go through the FeedbackLog deployment (the only writer of the feedback tables).

NextItem (docs/SERVING.md, "The judging queue") asks the FeedbackLog's queue for the caller's next
item. A pool item comes back claimed but not generated: it is generated here as Generate would
(adapter ``production`` when the namespace has one, else the base model; logged like any
generation), then linked to its pool item and leased to the caller. A failed generation frees the
claim and the call answers the generation's status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from illume.errors import InvalidRequest, NotFound, PermissionDenied
from illume.store.queue import PoolClaim
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, validate_namespace
from services.auth import Caller
from services.convert import (
    EXPORT_FORMAT_FROM_PB,
    generation_to_pb,
    handed_item_to_pb,
    stats_to_pb,
    submission_from_pb,
)
from services.servicers.base import ServicerBase, rpc, rpc_stream

# At most this many submissions per call to the FeedbackLog, and this many such calls in flight.
FEEDBACK_BATCH = 64
FEEDBACK_BATCHES_IN_FLIGHT = 2
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# The adapter a pool item's candidates come from, when the namespace has it (else the base model).
POOL_ADAPTER = "production"
MEDIA_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


class SubmissionBatcher:
    """Sends concurrent SubmitFeedback writes of one Ingress replica to the FeedbackLog together.

    Each call to the FeedbackLog costs both replicas Serve's per-request work (routing,
    serialisation, the replica's request handling) whatever it carries, and the FeedbackLog is a
    single replica: one call per judgement held SubmitFeedback to about half the rate of a trivial
    RPC (docs/BENCHMARKS.md, "Feedback throughput"). Submissions that arrive while calls are in
    flight wait for the next call, so an idle server adds no delay and a busy one sends up to
    ``max_batch`` per call, ``max_in_flight`` calls at a time. Each caller gets its own receipt
    or error; a failed call fails only the submissions it carried (they are idempotent by key).
    """

    def __init__(
        self, send: Any, max_batch: int = FEEDBACK_BATCH, max_in_flight: int = FEEDBACK_BATCHES_IN_FLIGHT
    ):
        self._send = send  # list[FeedbackSubmission] -> awaitable list[receipt | error]
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = 0

    async def submit(self, submission: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((submission, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                try:
                    results = await self._send([s for s, _ in batch])
                except Exception as error:  # the whole call failed (a replica restarting, ...)
                    results = [error] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller went away
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._in_flight -= 1


class FeedbackServicer(ServicerBase):
    """Judgements of generated candidates and the training rows built from them."""

    feedback_log: Any
    limits: RequestLimits
    registry: Any
    _generate: Any  # RationaleServicer._generate, beside this class in the Ingress (pool items)
    feedback_batcher: SubmissionBatcher | None = None  # the Ingress's; None: one call per write

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
        if self.feedback_batcher is not None:
            receipt = await self.feedback_batcher.submit(submission)
        else:
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

    @rpc("annotator", pb.NextItemResponse)
    async def NextItem(
        self, request: pb.NextItemRequest, grpc_context: Any, caller: Caller
    ) -> pb.NextItemResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        if request.selection not in ("", "active", "random"):
            raise InvalidRequest(f"selection must be active or random, not {request.selection!r}")
        item = await self.feedback_log.next_item.remote(namespace, caller.principal, request.selection)
        if isinstance(item, PoolClaim):
            item = await self._generate_pool_item(item, caller)
        return handed_item_to_pb(item)

    async def _generate_pool_item(self, claim: PoolClaim, caller: Caller) -> Any:
        try:
            image = await self.feedback_log.pool_image.remote(claim.item_id)
            request = pb.GenerateRequest(
                image=image,
                question=claim.question,
                namespace=claim.namespace,
                adapter=POOL_ADAPTER,
                client_request_id=f"pool:{claim.item_id}",
            )
            if claim.answer:
                request.answer = claim.answer
            try:
                reply = await self._generate(request, None)
            except NotFound:  # no production adapter in this namespace yet
                request.adapter = "base"
                reply = await self._generate(request, None)
        except BaseException:
            await self.feedback_log.release_pool_claim.remote(claim.item_id)
            raise
        return await self.feedback_log.attach_pool_generation.remote(
            claim, reply.generation_id, caller.principal
        )

    @rpc("annotator", pb.GetImageResponse)
    async def GetImage(
        self, request: pb.GetImageRequest, grpc_context: Any, caller: Caller
    ) -> pb.GetImageResponse:
        namespace = validate_namespace(request.namespace, self.limits)
        sha = request.image_sha256.lower()
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise InvalidRequest("image_sha256 must be 64 hex digits")
        image = await self.feedback_log.image.remote(namespace, sha)
        return pb.GetImageResponse(image=image, media_type=media_type_of(image))

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


def media_type_of(image: bytes) -> str:
    """The media type of stored image bytes (the store keeps only allowed formats)."""
    for magic, media_type in MEDIA_TYPES:
        if image.startswith(magic):
            return media_type
    return "image/webp" if image[8:12] == b"WEBP" else "application/octet-stream"
