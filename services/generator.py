"""The Generator deployment: owns the model and serves generation in dynamic batches.

Contract:
- ``generate(work)`` accepts one validated core request (``GenerateWork``) and returns a
  ``GenerateOutcome``; it never raises for a single bad request: errors travel in the outcome so
  one request cannot fail its batch;
- requests are batched across callers with ``@serve.batch`` (size and wait from the settings); the
  batch runs in a worker thread (``asyncio.to_thread``) so health checks and queueing continue;
- a request whose deadline has passed when its batch forms is dropped (DEADLINE_EXCEEDED) before
  any model work; the adapter a request asks for (alias, version, "base" or the namespace's
  routing) is resolved when the batch forms, so no request names a version the replica lacks;
- every outcome names the adapter version that produced it;
- torch's thread count follows the replica's CPUs (``torch_threads`` or ``num_cpus`` rounded up);
- the model is loaded and every batch generated on one dedicated thread: each thread that runs
  torch ops gets its own OpenMP team, and an idle team's spinning workers take CPU from the busy
  one (measured 10-15% slower batches on 2 cores when batches ran on the asyncio worker threads).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray import serve

from illume.adapters.routing import AdapterRouter, Resolution
from illume.generation.generator import GenerateRequest, GenerateResult, Generator
from illume.models import load_model
from illume.store.settings import StoreSettings
from services import metrics
from services.config import GeneratorSettings

log = logging.getLogger("ray.serve")


@dataclass
class GenerateWork:
    """One validated request as the Ingress hands it to a Generator."""

    request: GenerateRequest
    adapter_ref: str = ""
    namespace: str = "default"
    deadline: float | None = None  # epoch seconds; None: no deadline
    arrived: float = field(default_factory=time.time)


@dataclass
class GenerateOutcome:
    """A Generator's answer to one ``GenerateWork``: a result, or an error code and reason."""

    result: GenerateResult | None = None
    adapter_version: str = "base"
    error_code: str = ""
    error_reason: str = ""
    queue_ms: float = 0.0
    generate_ms: float = 0.0
    batch_size: int = 0
    model_id: str = ""


@serve.deployment
class GeneratorDeployment:
    """A replica of the model; see the module docstring for the contract."""

    def __init__(
        self,
        settings: GeneratorSettings,
        store: StoreSettings | None = None,
        artifact_uri: str = "",
        artifact_options: dict | None = None,
        namespaces: tuple[str, ...] = ("default",),
    ) -> None:
        self.settings = settings
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="illume-torch")
        self.core = self._torch.submit(self._load_model, settings).result()
        self.adapters = AdapterRouter(self.core, settings, store, artifact_uri, artifact_options, namespaces)
        # Decorated per replica so every batching setting applies, max_concurrent_batches included:
        # with two, the next batch forms while one runs and starts the moment the lock frees.
        self._batch = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            max_concurrent_batches=settings.max_concurrent_batches,
        )(self._run_batch)
        self._queued = 0
        log.info("generator ready: model %s on %s", self.core.loaded.model_id, self.core.loaded.device)

    @staticmethod
    def _load_model(settings: GeneratorSettings) -> Generator:
        import torch

        torch.set_num_threads(settings.torch_threads or max(1, math.ceil(settings.num_cpus)))
        model_settings = settings.model
        if settings.num_gpus > 0 and model_settings.device == "auto":
            model_settings = model_settings.model_copy(update={"device": "cuda"})
        return Generator(load_model(model_settings))

    async def generate(self, work: GenerateWork) -> GenerateOutcome:
        self._queued += 1
        try:
            await asyncio.to_thread(self.adapters.prepare_ref, work.adapter_ref, work.namespace)
            return await self._batch(work)
        finally:
            self._queued -= 1

    async def _run_batch(self, works: list[GenerateWork]) -> list[GenerateOutcome]:
        started = time.time()
        outcomes = [GenerateOutcome(model_id=self.core.loaded.model_id) for _ in works]
        runnable: list[tuple[int, GenerateRequest, Resolution]] = []
        for i, work in enumerate(works):
            outcomes[i].queue_ms = (started - work.arrived) * 1000
            if work.deadline is not None and started >= work.deadline:
                outcomes[i].error_code, outcomes[i].error_reason = (
                    "DEADLINE_EXCEEDED",
                    "deadline passed in queue",
                )
                continue
            resolution = self.adapters.resolve(work.adapter_ref, work.namespace)
            if resolution.error_code:
                outcomes[i].error_code, outcomes[i].error_reason = (
                    resolution.error_code,
                    resolution.error_reason,
                )
                continue
            runnable.append((i, work.request, resolution))
        if runnable:
            await self._run(runnable, outcomes, started)
        return outcomes

    async def _run(
        self,
        runnable: list[tuple[int, GenerateRequest, Resolution]],
        outcomes: list[GenerateOutcome],
        started: float,
    ) -> None:
        requests = [self.adapters.bind(request, resolution) for _, request, resolution in runnable]
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._torch, self.adapters.generate, requests)
        except Exception:
            log.exception("generate failed for a batch of %d", len(requests))
            for i, _, _ in runnable:
                outcomes[i].error_code, outcomes[i].error_reason = "INTERNAL", "generation failed"
            return
        elapsed_ms = (time.time() - started) * 1000
        tokens = 0
        for (i, _, resolution), result in zip(runnable, results, strict=True):
            outcome = outcomes[i]
            outcome.result, outcome.adapter_version = result, resolution.version_label
            outcome.generate_ms, outcome.batch_size = elapsed_ms, len(runnable)
            tokens += sum(c.token_count for c in result.candidates)
            metrics.record_candidates(resolution.version_label, len(result.candidates))
        metrics.record_batch(len(runnable), [outcomes[i].queue_ms for i, _, _ in runnable], tokens)

    def check_health(self) -> None:
        if self.core is None:
            raise RuntimeError("model not loaded")

    def __del__(self) -> None:
        adapters = getattr(self, "adapters", None)
        if adapters is not None:
            adapters.stop()
        executor = getattr(self, "_torch", None)
        if executor is not None:
            executor.shutdown(wait=False)

    def status(self) -> dict:
        """What this replica has loaded and how busy it is (for GetServerStatus)."""
        context = serve.get_replica_context()
        return {
            "replica_id": context.replica_id.unique_id if context else "",
            "loaded_adapters": self.adapters.loaded_names(),
            "aliases": self.adapters.alias_lines(),
            "queue_depth": self._queued,
            "model_id": self.core.loaded.model_id,
        }
