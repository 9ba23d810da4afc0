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
  one (measured 10-15% slower batches on 2 cores when batches ran on the asyncio worker threads);
- adapters are (namespace, version): a request resolves only to its namespace's versions, the
  outcome's ``adapter_version`` is the wire label ``rationale-v<N>`` of that namespace, and the
  candidates metric is labelled by namespace and version;
- every replica reports itself (``illume.store.replicas``): a heartbeat row with its health,
  queue depth, last adapter reload and loaded (namespace, version) pairs, written at start, every
  ``HEARTBEAT_INTERVAL_S``, at once after an adapter change, and removed when the replica
  stops; ``GetServerStatus`` reads the rows (docs/ARCHITECTURE.md, "Server status").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray import serve

from illume.adapters.routing import AdapterRouter, Resolution
from illume.generation.generator import GenerateRequest, GenerateResult, Generator
from illume.models import load_model
from illume.store.replicas import ReplicaHeartbeat, ReplicaTable
from illume.store.settings import StoreSettings
from services import metrics
from services.config import GeneratorSettings

log = logging.getLogger("ray.serve")

HEARTBEAT_INTERVAL_S = 2.0  # the Ingress reports a replica silent for 5x this long as unhealthy
PRUNE_AFTER_S = 3600.0  # a starting replica deletes rows this old (replicas that died)


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
        self._queued = 0  # requests on this replica not answered yet
        self._in_batch = 0  # of those, the ones in a running batch
        self._started_at = time.time()
        self._replica_id, self._node_id = self._identity()
        self._replicas = self._open_replica_table(store)
        self._beat_stop = threading.Event()
        self._beat_wake = threading.Event()  # set: write a heartbeat now (an adapter change)
        if self._replicas is not None:
            self.adapters.on_change = self._beat_wake.set
            self._beat()  # before the replica is ready: GetServerStatus sees it at once
            try:
                self._replicas.prune(PRUNE_AFTER_S)
            except Exception:
                log.warning("pruning old replica heartbeats failed", exc_info=True)
            threading.Thread(target=self._heartbeats, name="illume-heartbeat", daemon=True).start()
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
        self._in_batch += len(works)
        try:
            return await self._run_formed_batch(works)
        finally:
            self._in_batch -= len(works)

    async def _run_formed_batch(self, works: list[GenerateWork]) -> list[GenerateOutcome]:
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
            metrics.record_candidates(resolution.namespace, resolution.version_label, len(result.candidates))
        metrics.record_batch(len(runnable), [outcomes[i].queue_ms for i, _, _ in runnable], tokens)

    def check_health(self) -> None:
        reason = self._unhealthy()
        if reason:
            raise RuntimeError(reason)

    def _unhealthy(self) -> str:
        """Why this replica cannot serve ("" when it can)."""
        if getattr(self, "core", None) is None or self.core.loaded is None:
            return "model not loaded"
        if getattr(self._torch, "_shutdown", False):
            return "generation thread stopped"
        return ""

    # -- heartbeats (GetServerStatus) ------------------------------------------------------------

    @staticmethod
    def _identity() -> tuple[str, str]:
        import os
        import socket

        context = serve.get_replica_context()
        replica_id = context.replica_id.unique_id if context else ""
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id() or ""
        except Exception:
            node_id = ""
        return replica_id or f"{socket.gethostname()}-{os.getpid()}", node_id

    def _open_replica_table(self, store: StoreSettings | None) -> ReplicaTable | None:
        if self.adapters.registry is not None:
            return ReplicaTable(self.adapters.registry)
        if store is None:
            return None
        try:
            from illume.store.registry import AdapterRegistry

            return ReplicaTable(AdapterRegistry.open(store))
        except Exception:
            log.exception("the store is unreachable: this replica reports no heartbeats")
            return None

    def heartbeat(self) -> ReplicaHeartbeat:
        """This replica's state as it reports it (the row ``_beat`` writes)."""
        unhealthy = self._unhealthy()
        degraded = self.adapters.health()
        return ReplicaHeartbeat(
            replica_id=self._replica_id,
            node_id=self._node_id,
            model_id=self.core.loaded.model_id if self.core is not None else "",
            healthy=not unhealthy,
            health_reason=unhealthy or degraded,
            queue_depth=max(0, self._queued - self._in_batch),
            loaded_adapters=tuple(self.adapters.loaded_adapters()),
            aliases=tuple(self.adapters.alias_table()),
            last_reload_at=self.adapters.last_reload_at,
            started_at=self._started_at,
            heartbeat_at=time.time(),
        )

    def _beat(self) -> None:
        try:
            self._replicas.heartbeat(self.heartbeat())
        except Exception:
            log.warning("writing this replica's heartbeat failed", exc_info=True)

    def _heartbeats(self) -> None:
        while not self._beat_stop.is_set():
            self._beat_wake.wait(HEARTBEAT_INTERVAL_S)
            self._beat_wake.clear()
            if not self._beat_stop.is_set():
                self._beat()

    def __del__(self) -> None:
        stop = getattr(self, "_beat_stop", None)
        if stop is not None:
            stop.set()
            self._beat_wake.set()
        replicas = getattr(self, "_replicas", None)
        if replicas is not None:
            with contextlib.suppress(Exception):  # the row goes stale and is pruned later anyway
                replicas.remove(self._replica_id)
        adapters = getattr(self, "adapters", None)
        if adapters is not None:
            adapters.stop()
        executor = getattr(self, "_torch", None)
        if executor is not None:
            executor.shutdown(wait=False)

    def status(self) -> dict:
        """What this replica has loaded and how busy it is (this replica only; GetServerStatus
        reads every replica's heartbeat row instead)."""
        beat = self.heartbeat()
        return {
            "replica_id": beat.replica_id,
            "loaded_adapters": [f"{ns}/rationale-v{v}" for ns, v in beat.loaded_adapters],
            "aliases": self.adapters.alias_lines(),
            "queue_depth": beat.queue_depth,
            "model_id": beat.model_id,
        }
