"""The product's metrics, through Ray's metrics API (exported on Ray's metrics port).

Inside Ray processes a prometheus-client HTTP server would fight over ports, so every deployment
records here and Ray exports (KubeRay scrapes the port). Names are prefixed ``ray_`` on export;
Serve adds the deployment, replica and application tags itself. Metric objects are created lazily,
once per process, so importing this module starts nothing. Versions restart at 1 in every
namespace, so every per-adapter series is labelled by ``namespace`` and ``adapter_version`` (the
wire label ``rationale-v<N>`` or ``base``) together.
"""

from __future__ import annotations

import functools
from typing import Any

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.serve.metrics import Counter, Histogram

    return {
        "requests": Counter(
            "illume_requests_total",
            description="RPCs answered, by RPC and status code.",
            tag_keys=("rpc", "code"),
        ),
        "latency": Histogram(
            "illume_request_latency_ms",
            description="RPC latency in the Ingress, by RPC.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("rpc",),
        ),
        "first_candidate": Histogram(
            "illume_time_to_first_candidate_ms",
            description="GenerateStream: time from the call's arrival to its first candidate message.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("rpc",),
        ),
        "batch_size": Histogram(
            "illume_batch_size", description="Requests per generate batch.", boundaries=BATCH_BOUNDARIES
        ),
        # Ray exports a histogram's _sum from bucket midpoints, so exact means come from counters.
        "batches": Counter("illume_batches_total", description="Generate batches run."),
        "batched": Counter(
            "illume_batched_requests_total", description="Requests served in generate batches."
        ),
        "queue_wait": Histogram(
            "illume_queue_wait_ms",
            description="Time a request waited before its batch started.",
            boundaries=LATENCY_BOUNDARIES_MS,
        ),
        "tokens": Counter("illume_generated_tokens_total", description="Tokens generated in candidates."),
        "candidates": Counter(
            "illume_candidates_total",
            description="Candidates returned, by namespace and adapter version.",
            tag_keys=("namespace", "adapter_version"),
        ),
        "feedback": Counter(
            "illume_feedback_submissions_total",
            description="Feedback submissions stored (duplicates excluded), by verdict.",
            tag_keys=("verdict",),
        ),
        "judged": Counter(
            "illume_candidates_judged_total",
            description="Candidates judged in stored feedback, by namespace and adapter version.",
            tag_keys=("namespace", "adapter_version"),
        ),
        "accepted": Counter(
            "illume_candidates_accepted_total",
            description=(
                "Candidates judged fitting, by namespace and adapter version"
                " (acceptance = accepted / judged)."
            ),
            tag_keys=("namespace", "adapter_version"),
        ),
    }


def record_request(rpc: str, code: str, latency_ms: float) -> None:
    m = _metrics()
    m["requests"].inc(1, tags={"rpc": rpc, "code": code})
    m["latency"].observe(latency_ms, tags={"rpc": rpc})


def record_first_candidate(rpc: str, latency_ms: float) -> None:
    """A stream's time to its first candidate (beside ``request_latency_ms``, which ends at its last)."""
    _metrics()["first_candidate"].observe(latency_ms, tags={"rpc": rpc})


def record_batch(batch_size: int, queue_waits_ms: list[float], tokens: int) -> None:
    m = _metrics()
    m["batch_size"].observe(batch_size)
    m["batches"].inc(1)
    m["batched"].inc(batch_size)
    for wait in queue_waits_ms:
        m["queue_wait"].observe(wait)
    if tokens:
        m["tokens"].inc(tokens)


def record_candidates(namespace: str, adapter_version: str, count: int) -> None:
    if count:
        _metrics()["candidates"].inc(count, tags={"namespace": namespace, "adapter_version": adapter_version})


def record_feedback(
    verdict: str, adapter_version: str, judged: int, accepted: int, namespace: str = ""
) -> None:
    m = _metrics()
    m["feedback"].inc(1, tags={"verdict": verdict})
    tags = {"namespace": namespace, "adapter_version": adapter_version}
    if judged:
        m["judged"].inc(judged, tags=tags)
    if accepted:
        m["accepted"].inc(accepted, tags=tags)
