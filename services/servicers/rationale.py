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
from illume.store.types import NewCandidate
from illume.v1 import illume_pb2 as pb
from illume.validation import RequestLimits, build_generate_request, validate_namespace
from services.auth import Caller
from services.convert import FINISH_TO_PB, sampling_from_pb
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
        if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID:
            raise InvalidRequest(f"client_request_id is longer than {MAX_CLIENT_REQUEST_ID} characters")
        namespace = validate_namespace(request.namespace, self.limits)
        sampling = sampling_from_pb(request.sampling, self.limits)
        answer = request.answer if request.HasField("answer") else None
        core_request = await asyncio.to_thread(
            build_generate_request, self.limits, request.image, request.question, answer, sampling
        )
        work = GenerateWork(
            request=core_request,
            adapter_ref=request.adapter,
            namespace=namespace,
            deadline=deadline_from(grpc_context, arrived),
            arrived=arrived,
        )
        outcome: GenerateOutcome = await self.generator.generate.remote(work)
        if outcome.error_code:
            raise error_for_code(outcome.error_code, outcome.error_reason)
        result = outcome.result
        reply = pb.GenerateResponse(
            answer=result.answer,
            answer_generated=result.answer_generated,
            seed=result.seed,
            adapter_requested=request.adapter,
            adapter_version=outcome.adapter_version,
            model_id=outcome.model_id,
            client_request_id=request.client_request_id,
        )
        generation_id, held_out, ids = "", False, {}
        if not request.ephemeral:
            record = await self.feedback_log.record_generation.remote(
                namespace=namespace,
                image=request.image,
                question=core_request.question,
                answer=result.answer,
                answer_generated=result.answer_generated,
                candidates=[
                    NewCandidate(c.text, c.temperature, c.token_count, c.finish_reason, c.mean_logprob)
                    for c in result.candidates
                ],
                sampling=dict(sampling.__dict__),
                seed=result.seed,
                adapter_requested=request.adapter,
                adapter_version=outcome.adapter_version,
                model_id=outcome.model_id,
                client_request_id=request.client_request_id,
            )
            generation_id, held_out = record.generation_id, record.held_out
            ids = {c.index: c.candidate_id for c in record.candidates}
        reply.generation_id, reply.held_out = generation_id, held_out
        for c in result.candidates:
            reply.candidates.append(
                pb.Candidate(
                    candidate_id=ids.get(c.index, ""),
                    index=c.index,
                    text=c.text,
                    temperature=c.temperature,
                    token_count=c.token_count,
                    finish_reason=FINISH_TO_PB[c.finish_reason],
                    mean_logprob=c.mean_logprob,
                )
            )
        reply.timings.CopyFrom(
            pb.Timings(
                queue_ms=outcome.queue_ms,
                generate_ms=outcome.generate_ms,
                total_ms=(time.time() - arrived) * 1000,
                batch_size=outcome.batch_size,
            )
        )
        return reply

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
