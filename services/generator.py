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

Token budget (docs/SERVING.md, "Streaming and batching"). Before a request joins the queue its
cost is counted (``Generator.request_cost``: prompt tokens by the processor + n x max_new_tokens
+ the answer's tokens when the model answers); one that alone exceeds the replica's budget
(``token_budget``, or derived from the device's free memory) is INVALID_ARGUMENT with the numbers.
Admission is Serve's own: ``@serve.batch`` gets ``TokenAdmission.size`` as its ``batch_size_fn``,
which measures a batch in request slots, ``max(requests, ceil(tokens x max_batch_size / budget))``,
so a batch stays within ``max_batch_size`` slots exactly when it holds at most ``max_batch_size``
requests and at most ``budget`` tokens. A request that does not fit is put back in Serve's queue
(at its end: Ray 2.60 re-queues it behind later arrivals) and joins a later batch; it is never
dropped, and its deadline still applies when that batch forms. A batch holds its whole budget until
its longest row ends (no request joins a running batch); with ``ForkEngine`` finished rows leave
the decode at once and cost no more compute, with ``RepeatedRowsEngine`` they run to the end.

Streaming (``generate_stream``): the same batches; a streamed request yields a header outcome (the
answer known, no candidates) after the answer step, then each unique candidate (``CandidateOut``,
finish order, final index) as its row ends, then the final outcome (the candidates as sent) or an
error outcome. If its caller goes away, the request leaves the queue (not batched yet), is not
prefilled (answer step running) or has its rows dropped from the decode (``ForkEngine``);
``status()`` counts the cancelled streams and the dropped rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from illume.adapters.routing import AdapterRouter, Resolution
from illume.generation.generator import (
    AnswerReady,
    CandidateOut,
    GenerateRequest,
    GenerateResult,
    Generator,
    RequestCost,
    RequestDone,
    derive_token_budget,
    over_budget,
)
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
    # Set by the replica, never sent: the request's token cost, and its stream's channel.
    cost: RequestCost | None = None
    sink: _Channel | None = field(default=None, repr=False, compare=False)


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


class _Channel:
    """One streamed request's events, from the torch thread to the coroutine that yields them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()  # set when the caller went away: drop the rows

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class TokenAdmission:
    """``@serve.batch``'s ``batch_size_fn``: a batch's size in request slots (module docstring).

    ``size(works) <= max_batch_size`` holds exactly when the batch has at most ``max_batch_size``
    requests and at most ``budget`` tokens, because ``ceil(t x M / B) <= M`` iff ``t <= B``.
    """

    def __init__(self, budget: int, max_batch_size: int) -> None:
        self.budget = max(1, budget)
        self.max_batch_size = max_batch_size

    def tokens(self, works: Sequence[GenerateWork]) -> int:
        return sum(w.cost.total for w in works if w.cost is not None)

    def size(self, works: Sequence[GenerateWork]) -> int:
        slots = -(-self.tokens(works) * self.max_batch_size // self.budget)  # ceil, in integers
        return max(len(works), slots)

    def fits(self, works: Sequence[GenerateWork]) -> bool:
        return self.size(works) <= self.max_batch_size

    def refuse(self, cost: RequestCost) -> str:
        """The INVALID_ARGUMENT reason for a request that can never fit ("" when it can)."""
        return over_budget(cost, self.budget)


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
        # Read after the model is loaded, so the derived budget is what is left beside it.
        budget = settings.token_budget or derive_token_budget(
            self.core.loaded, settings.token_budget_memory_fraction
        )
        self.admission = TokenAdmission(budget, settings.max_batch_size)
        # Decorated per replica so every batching setting applies, max_concurrent_batches included:
        # with two, the next batch forms while one runs and starts the moment the lock frees.
        self._batch = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            max_concurrent_batches=settings.max_concurrent_batches,
            batch_size_fn=self.admission.size,
        )(self._run_batch)
        self._streams_cancelled = 0
        self._rows_dropped = 0
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
        log.info(
            "generator ready: model %s on %s, token budget %d",
            self.core.loaded.model_id,
            self.core.loaded.device,
            self.admission.budget,
        )

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
            work.cost = await asyncio.to_thread(self.core.request_cost, work.request)
            reason = self.admission.refuse(work.cost)
            if reason:  # it would never fit a batch: Serve's queue would fail it with a bare error
                return GenerateOutcome(
                    error_code="INVALID_ARGUMENT", error_reason=reason, model_id=self.core.loaded.model_id
                )
            return await self._batch(work)
        finally:
            self._queued -= 1

    async def generate_stream(self, work: GenerateWork) -> AsyncIterator[GenerateOutcome | CandidateOut]:
        """``generate`` as a stream (module docstring, "Streaming"): a header outcome (or an error
        outcome, which ends the stream), candidates as their rows end, then the final outcome."""
        channel = _Channel(asyncio.get_running_loop())
        work.sink = channel
        task = asyncio.ensure_future(self.generate(work))
        finished = False
        try:
            async for item in _drain(channel.queue, task):
                yield item
            finished = True
            yield task.result()
        finally:
            if not finished:
                self._cancel(channel, task)

    def _cancel(self, channel: _Channel, task: asyncio.Future) -> None:
        """The caller went away: its rows stop; a request not batched yet leaves Serve's queue."""
        channel.cancelled.set()
        if not task.done():
            task.cancel()
        self._streams_cancelled += 1

    async def _run_batch(self, works: list[GenerateWork]) -> list[GenerateOutcome]:
        # Serve's batch_size_fn admitted this batch; a failure here would mean Serve changed.
        assert self.admission.fits(works), "a batch exceeds the token budget"
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
            await self._run(runnable, outcomes, started, [works[i].sink for i, _, _ in runnable])
        return outcomes

    async def _run(
        self,
        runnable: list[tuple[int, GenerateRequest, Resolution]],
        outcomes: list[GenerateOutcome],
        started: float,
        sinks: list[_Channel | None],
    ) -> None:
        requests = [self.adapters.bind(request, resolution) for _, request, resolution in runnable]
        for i, _, resolution in runnable:  # what a streamed header needs before the candidates
            outcomes[i].adapter_version, outcomes[i].batch_size = resolution.version_label, len(runnable)
        headers = [outcomes[i] for i, _, _ in runnable]
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._torch, self._generate, requests, sinks, headers)
        except Exception:
            log.exception("generate failed for a batch of %d", len(requests))
            for i, _, _ in runnable:
                outcomes[i].error_code, outcomes[i].error_reason = "INTERNAL", "generation failed"
            return
        elapsed_ms = (time.time() - started) * 1000
        tokens = 0
        for (i, _, resolution), result in zip(runnable, results, strict=True):
            outcome = outcomes[i]
            outcome.generate_ms = elapsed_ms
            if result is None:  # a stream whose caller went away: nobody reads this outcome
                outcome.error_code, outcome.error_reason = "CANCELLED", "the caller went away"
                continue
            outcome.result = result
            tokens += sum(c.token_count for c in result.candidates)
            metrics.record_candidates(resolution.namespace, resolution.version_label, len(result.candidates))
        metrics.record_batch(len(runnable), [outcomes[i].queue_ms for i, _, _ in runnable], tokens)

    def _generate(
        self,
        requests: list[GenerateRequest],
        sinks: list[_Channel | None],
        headers: list[GenerateOutcome],
    ) -> list[GenerateResult | None]:
        """One batch on the torch thread; streamed requests get their events as they happen."""
        results: list[GenerateResult | None] = [None] * len(requests)
        streamed = [sink is not None for sink in sinks]
        cancelled = [sink.cancelled.is_set if sink is not None else None for sink in sinks]
        with self._using(requests):
            for event in self.core.stream(requests, streamed, cancelled):
                sink = sinks[event.request]
                if isinstance(event, RequestDone):
                    results[event.request] = event.result
                    self._rows_dropped += event.rows_dropped
                elif sink is None or sink.cancelled.is_set():
                    continue
                elif isinstance(event, AnswerReady):
                    sink.put(_header(headers[event.request], requests[event.request], event))
                else:
                    sink.put(event.candidate)
        return results

    def _using(self, requests: list[GenerateRequest]) -> contextlib.AbstractContextManager[Any]:
        """Keep the batch's adapters from being evicted until it is done (as AdapterRouter.generate)."""
        cache = self.adapters.cache
        return cache.using(r.adapter for r in requests) if cache is not None else contextlib.nullcontext()

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
            "token_budget": self.admission.budget,
            "streams_cancelled": self._streams_cancelled,
            "rows_dropped": self._rows_dropped,
        }


def _header(template: GenerateOutcome, request: GenerateRequest, answer: AnswerReady) -> GenerateOutcome:
    """A streamed request's first item: its outcome so far, with the answer and no candidates."""
    result = GenerateResult(
        answer=answer.answer,
        answer_generated=answer.answer_generated,
        seed=request.sampling.seed,
        adapter=request.adapter,
        candidates=[],
    )
    return GenerateOutcome(
        result=result,
        adapter_version=template.adapter_version,
        queue_ms=template.queue_ms,
        batch_size=template.batch_size,
        model_id=template.model_id,
    )


async def _drain(queue: asyncio.Queue[Any], task: asyncio.Future) -> AsyncIterator[Any]:
    """The queue's items until ``task`` is done and the queue empty. The torch thread puts every
    event before the batch's result reaches ``task``, so nothing is left behind."""
    while not (task.done() and queue.empty()):
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            yield getter.result()
