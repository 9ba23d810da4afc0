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

from illume.errors import IllumeError, NotFound
from illume.selection import SelectionConfig
from illume.store import FeedbackStore, StoreSettings
from illume.store.queue import HandedItem, JudgingQueue, NewPoolItem, PoolClaim, PoolUpload
from illume.store.types import (
    FeedbackReceipt,
    FeedbackStats,
    FeedbackSubmission,
    GenerationRecord,
    NewGeneration,
    normalize_namespace,
)
from services import metrics
from services.config import FeedbackLogSettings


@serve.deployment
class FeedbackLogDeployment:
    """Owns the FeedbackStore of the application."""

    def __init__(self, settings: FeedbackLogSettings, selection: SelectionConfig | None = None) -> None:
        self.settings = settings
        self.store = FeedbackStore(settings.store)
        self.queue = JudgingQueue(self.store, selection or SelectionConfig())

    @property
    def store_settings(self) -> StoreSettings:
        return self.settings.store

    async def record_generation(self, generation: NewGeneration) -> GenerationRecord:
        """Store a generation (``FeedbackStore.record_generation``)."""
        return await self.store.arecord_generation(generation)

    async def submit_feedback(self, submission: FeedbackSubmission) -> FeedbackReceipt:
        receipt = await self.store.asubmit_feedback(submission)
        if not receipt.duplicate:
            # From what the write read: a second read per judgement halved the feedback rate
            # (docs/BENCHMARKS.md, "Feedback throughput").
            judged = receipt.candidates if submission.verdict != "skipped" else 0
            metrics.record_feedback(
                submission.verdict,
                receipt.adapter_version,
                judged,
                len(submission.fitting_candidate_ids),
                namespace=normalize_namespace(submission.namespace),
            )
        return receipt

    async def submit_feedback_batch(
        self, submissions: list[FeedbackSubmission]
    ) -> list[FeedbackReceipt | Exception]:
        """``submit_feedback`` for each submission, in one call (the Ingress's batcher sends them):
        they share the group commit; each result is its receipt or its error, as a value."""
        results = await asyncio.gather(
            *(self.submit_feedback(s) for s in submissions), return_exceptions=True
        )
        return [r if isinstance(r, FeedbackReceipt | IllumeError) else _plain_error(r) for r in results]

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

    async def next_item(
        self, namespace: str, annotator_id: str, mode: str = ""
    ) -> HandedItem | PoolClaim | None:
        """The annotator's next item, leased (``JudgingQueue.next_item``), or a claimed pool item."""
        return await self.queue.anext_item(namespace, annotator_id, mode)

    async def pool_image(self, item_id: str) -> bytes:
        return await asyncio.to_thread(self.queue.pool_image, item_id)

    async def attach_pool_generation(
        self, claim: PoolClaim, generation_id: str, annotator_id: str
    ) -> HandedItem:
        return await asyncio.to_thread(self.queue.attach_pool_generation, claim, generation_id, annotator_id)

    async def release_pool_claim(self, item_id: str) -> None:
        await asyncio.to_thread(self.queue.release_pool_claim, item_id)

    async def add_pool_items(self, namespace: str, items: list[NewPoolItem], added_by: str) -> PoolUpload:
        return await asyncio.to_thread(self.queue.add_pool_items, namespace, items, added_by)

    async def image(self, namespace: str, image_sha256: str) -> bytes:
        """An image the namespace holds; ``NotFound`` otherwise (images are shared by hash)."""

        def read() -> bytes:
            if not self.queue.image_in_namespace(namespace, image_sha256):
                raise NotFound(f"image {image_sha256} not found in namespace {namespace}")
            return self.store.get_image(image_sha256)

        return await asyncio.to_thread(read)

    async def durability(self) -> dict[str, str]:
        return await asyncio.to_thread(self.store.durability_settings)

    def check_health(self) -> None:
        if not self.store.integrity_check():
            raise RuntimeError("feedback store integrity check failed")


def _plain_error(error: BaseException) -> Exception:
    """An unexpected error as a value the Ingress can receive (its own class may not unpickle
    there); the Ingress answers it INTERNAL and the FeedbackLog's log has the details."""
    import logging

    logging.getLogger("ray.serve").error("feedback write failed", exc_info=error)
    return RuntimeError(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
