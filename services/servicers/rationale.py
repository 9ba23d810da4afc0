"""RationaleService: Generate and GenerateStream.

Validate (core types), authorise (client role), hand the request to a Generator replica (batched
there), log the generation through the FeedbackLog (unless ephemeral) and reply with the ids the
client needs for feedback. The reply names the adapter asked for and the version that ran.

GenerateStream (docs/SERVING.md, "Streaming and batching"):
- the generation id is issued here (``new_id``) before anything runs, so the header names it;
  ``held_out`` is computed here from the image's sha256 with the store's fraction, as the store
  will; the header goes out once the answer is known, before any candidate;
- each unique candidate follows as soon as its row ends, duplicates dropped in finish order, with
  its final id ``<generation_id>-c<index>``;
- after the last candidate the generation is stored (the same ``NewGeneration`` Generate stores,
  with the pre-issued id and the candidates as sent); the stream ends OK only after that commit.
  Until then the id is unknown to FeedbackService (NOT_FOUND): submit feedback after the stream ends;
- a caller that goes away (cancels, disconnects, its deadline passes) ends the call here: the
  Generator drops its rows and nothing is stored, so its ids never name a generation;
- ``illume_time_to_first_candidate_ms`` records arrival -> first candidate message.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

from illume.errors import InvalidRequest, error_for_code
from illume.generation.generator import CandidateOut, GenerateRequest
from illume.store.feedback import held_out_for
from illume.store.types import new_id
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, build_generate_request, validate_namespace
from services import metrics
from services.auth import Caller
from services.convert import (
    generate_response_to_pb,
    new_generation,
    sampling_from_pb,
    stream_header_to_pb,
    streamed_candidate_to_pb,
)
from services.generator import GenerateOutcome, GenerateWork
from services.servicers.base import ServicerBase, rpc, rpc_stream

TIMEOUT_METADATA = "illume-timeout-ms"
MAX_CLIENT_REQUEST_ID = 128


def deadline_from(grpc_context: Any, arrived: float) -> float | None:
    """An absolute deadline from the client's ``illume-timeout-ms`` metadata (relative to arrival)."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key.lower() == TIMEOUT_METADATA:
            try:
                return arrived + max(0.0, float(value)) / 1000
            except ValueError:
                raise InvalidRequest(f"{TIMEOUT_METADATA} must be a number of milliseconds") from None
    return None


class RationaleServicer(ServicerBase):
    """Generate candidate rationales."""

    generator: Any
    feedback_log: Any
    limits: RequestLimits

    async def _work(self, request: pb.GenerateRequest, grpc_context: Any) -> tuple[GenerateWork, str]:
        """The validated work for a Generator, and the request's namespace."""
        arrived = time.time()
        namespace, core = await self._validate(request)
        work = GenerateWork(
            request=core,
            adapter_ref=request.adapter,
            namespace=namespace,
            deadline=deadline_from(grpc_context, arrived),
            arrived=arrived,
        )
        return work, namespace

    async def _generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        work, namespace = await self._work(request, grpc_context)
        arrived, core = work.arrived, work.request
        outcome: GenerateOutcome = await self.generator.generate.remote(work)
        if outcome.error_code:
            raise error_for_code(outcome.error_code, outcome.error_reason)
        record = None
        if not request.ephemeral:
            record = await self.feedback_log.record_generation.remote(
                new_generation(request, core, namespace, outcome)
            )
        return generate_response_to_pb(request, outcome, record, (time.time() - arrived) * 1000)

    async def _validate(self, request: pb.GenerateRequest) -> tuple[str, GenerateRequest]:
        """The request's namespace and its core form (the image is decoded off the event loop)."""
        if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID:
            raise InvalidRequest(f"client_request_id is longer than {MAX_CLIENT_REQUEST_ID} characters")
        namespace = validate_namespace(request.namespace, self.limits)
        sampling = sampling_from_pb(request.sampling, self.limits)
        answer = request.answer if request.HasField("answer") else None
        core = await asyncio.to_thread(
            build_generate_request, self.limits, request.image, request.question, answer, sampling
        )
        return namespace, core

    @rpc("client", pb.GenerateResponse)
    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: Any, caller: Caller
    ) -> pb.GenerateResponse:
        return await self._generate(request, grpc_context)

    @rpc_stream("client")
    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any, caller: Caller
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        work, namespace = await self._work(request, grpc_context)
        generation_id = "" if request.ephemeral else new_id()
        events = self.generator.options(stream=True).generate_stream.remote(work)
        completed = False
        try:
            header: GenerateOutcome = await events.__anext__()
            _raise_for(header)
            held_out = not request.ephemeral and self._held_out(request.image)
            yield pb.GenerateStreamResponse(
                header=stream_header_to_pb(request, header, generation_id, held_out)
            )
            final: GenerateOutcome | None = None
            async for item in events:
                if isinstance(item, GenerateOutcome):
                    final = item
                    break
                if item.index == 0:  # the first candidate sent (indices count what was sent)
                    metrics.record_first_candidate("GenerateStream", (time.time() - work.arrived) * 1000)
                yield pb.GenerateStreamResponse(candidate=streamed_candidate_to_pb(item, generation_id))
            if final is None:
                raise RuntimeError("the Generator's stream ended without its outcome")
            _raise_for(final)
            if not request.ephemeral:
                await self.feedback_log.record_generation.remote(
                    new_generation(request, work.request, namespace, final, generation_id)
                )
            completed = True
        finally:
            if not completed:  # the caller went away or the call failed: stop the Generator's work
                events.cancel()

    def _held_out(self, image: bytes) -> bool:
        """The split the store will put this image in (``FeedbackStore.is_held_out``)."""
        config = getattr(self, "config", None)
        if config is None:
            return False
        fraction = config.feedback_log.store.held_out_fraction
        return held_out_for(hashlib.sha256(image).hexdigest(), fraction)


def _raise_for(outcome: GenerateOutcome | CandidateOut) -> None:
    """Raise the core error an error outcome carries (the stream ends with its status code)."""
    if not isinstance(outcome, GenerateOutcome):
        raise RuntimeError("the Generator's stream sent a candidate before its header")
    if outcome.error_code:
        raise error_for_code(outcome.error_code, outcome.error_reason)
