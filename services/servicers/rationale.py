"""RationaleService: Generate and GenerateStream.

Validate (core types), authorise (client role), hand the request to a Generator replica (batched
there), log the generation through the FeedbackLog (unless ephemeral) and reply with the ids the
client needs for feedback. The reply names the adapter asked for and the version that ran.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from illume.errors import InvalidRequest, error_for_code
from illume.generation.generator import GenerateRequest
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, build_generate_request, validate_namespace
from services.auth import Caller
from services.convert import generate_response_to_pb, new_generation, sampling_from_pb
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

    async def _generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        arrived = time.time()
        namespace, core = await self._validate(request)
        work = GenerateWork(
            request=core,
            adapter_ref=request.adapter,
            namespace=namespace,
            deadline=deadline_from(grpc_context, arrived),
            arrived=arrived,
        )
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
        reply = await self._generate(request, grpc_context)
        candidates = list(reply.candidates)
        del reply.candidates[:]
        yield pb.GenerateStreamResponse(header=reply)
        for candidate in candidates:
            yield pb.GenerateStreamResponse(candidate=candidate)
