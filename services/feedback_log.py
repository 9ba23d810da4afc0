"""The FeedbackLog deployment: the only writer of generations and feedback.

Contract: every method is async; writes go to the store's group-commit writer without blocking the
event loop and reads run in a worker thread, so many concurrent writes share one durable commit; a
method returns only after its write is durable. Core errors (NotFound, AlreadyExists,
InvalidRequest) propagate unchanged to the Ingress, which maps them to status codes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from illume.store import FeedbackStore, StoreSettings
from illume.store.types import (
    FeedbackReceipt,
    FeedbackStats,
    FeedbackSubmission,
    GenerationRecord,
    NewGeneration,
)
from services import metrics
from services.config import FeedbackLogSettings


@serve.deployment
class FeedbackLogDeployment:
    """Owns the FeedbackStore of the application."""

    def __init__(self, settings: FeedbackLogSettings) -> None:
        self.settings = settings
        self.store = FeedbackStore(settings.store)

    @property
    def store_settings(self) -> StoreSettings:
        return self.settings.store

    async def record_generation(self, generation: NewGeneration) -> GenerationRecord:
        """Store a generation (``FeedbackStore.record_generation``)."""
        return await self.store.arecord_generation(generation)

    async def submit_feedback(self, submission: FeedbackSubmission) -> FeedbackReceipt:
        receipt = await self.store.asubmit_feedback(submission)
        if not receipt.duplicate:
            await self._record_feedback_metrics(submission)
        return receipt

    async def _record_feedback_metrics(self, submission: FeedbackSubmission) -> None:
        generation = await asyncio.to_thread(
            self.store.get_generation, submission.generation_id, submission.namespace
        )
        judged = len(generation.candidates) if submission.verdict != "skipped" else 0
        metrics.record_feedback(
            submission.verdict,
            generation.adapter_version,
            judged,
            len(submission.fitting_candidate_ids),
            namespace=generation.namespace,
        )

    async def get_generation(self, generation_id: str, namespace: str) -> GenerationRecord:
        return await asyncio.to_thread(self.store.get_generation, generation_id, namespace)

    async def stats(self, namespace: str) -> FeedbackStats:
        return await asyncio.to_thread(self.store.stats, namespace)

    async def export(
        self,
        format: str,
        namespace: str,
        cursor: str | None,
        limit: int,
        include_held_out: bool,
        include_corrected: bool,
    ) -> tuple[list[dict[str, Any]], str | None]:
        return await asyncio.to_thread(
            self.store.export, format, namespace, cursor, limit, include_held_out, include_corrected
        )

    async def durability(self) -> dict[str, str]:
        return await asyncio.to_thread(self.store.durability_settings)

    def check_health(self) -> None:
        if not self.store.integrity_check():
            raise RuntimeError("feedback store integrity check failed")
