"""Feedback throughput through the server: SubmitFeedback against a trivial Admin RPC.

    python -m tests.bench.feedback --calls 2000 --concurrency 64 --runs 3

The real application (Ingress, FeedbackLog, a tiny Generator that no call here uses) on a local
Ray cluster, an SQLite feedback log seeded with ``--calls`` x runs generations before the server
starts. A load generator on 127.0.0.1 (grpc.aio, one channel, ``--concurrency`` calls in flight)
sends, alternately and ``--runs`` times: ``--calls`` ListAdapters calls (authentication, the
namespace guard, one registry read: the floor of any RPC through this server), then ``--calls``
SubmitFeedback calls, each judging a different generation with a fresh idempotency key, each
acknowledged only once durable. It prints calls/s of both, their ratio (the target: SubmitFeedback
>= 0.8x ListAdapters at concurrency 64) and p50/p99 latency. Every acknowledged judgement is
checked to be in the store afterwards. Figures, not assertions; they go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

KEY = "bench-feedback-key-0123456789"


def seed_generations(store_settings, count: int) -> list[tuple[str, list[str]]]:
    """``count`` generations of three candidates in ``default``; (generation id, candidate ids)."""
    from illume.store import FeedbackStore, NewCandidate, NewGeneration

    out = []
    with FeedbackStore(store_settings) as store:
        for i in range(count):
            record = store.record_generation(
                NewGeneration(
                    namespace="default",
                    image=f"bench-image-{i}".encode(),
                    question=f"what is shown in picture {i}?",
                    answer="a dog",
                    answer_generated=False,
                    candidates=[NewCandidate(f"because it barks {k}", 0.9, 4) for k in range(3)],
                    sampling={},
                    seed=i,
                    adapter_requested="",
                    adapter_version="base",
                    model_id="bench",
                )
            )
            out.append((record.generation_id, [c.candidate_id for c in record.candidates]))
    return out


async def drive(port: int, calls: list, concurrency: int) -> dict:
    """Run ``calls`` (coroutine factories taking a stub set) with ``concurrency`` in flight."""
    import grpc

    from illume.v1 import illume_pb2_grpc as rpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stubs = (rpc.FeedbackServiceStub(channel), rpc.AdminServiceStub(channel))
        queue: asyncio.Queue = asyncio.Queue()
        for call in calls:
            queue.put_nowait(call)

        async def worker() -> None:
            while not queue.empty():
                call = queue.get_nowait()
                began = time.perf_counter()
                await call(*stubs)
                latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "calls_per_s": len(calls) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def list_adapters_calls(count: int) -> list:
    from illume.v1 import illume_pb2 as pb

    metadata = (("authorization", f"Bearer {KEY}"),)

    def call(feedback, admin):
        return admin.ListAdapters(pb.ListAdaptersRequest(namespace="default"), metadata=metadata, timeout=60)

    return [call] * count


def submit_calls(generations: list[tuple[str, list[str]]], acknowledged: list[str]) -> list:
    from illume.v1 import illume_pb2 as pb

    metadata = (("authorization", f"Bearer {KEY}"),)

    def make(generation_id: str, candidate_ids: list[str]):
        async def call(feedback, admin):
            reply = await feedback.SubmitFeedback(
                pb.SubmitFeedbackRequest(
                    generation_id=generation_id,
                    verdict=pb.VERDICT_SELECTED,
                    fitting_candidate_ids=candidate_ids[:1],
                    idempotency_key=uuid.uuid4().hex,
                    namespace="default",
                ),
                metadata=metadata,
                timeout=60,
            )
            acknowledged.append(reply.feedback_id)

        return call

    return [make(gid, cids) for gid, cids in generations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of each RPC per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()

    import ray
    from ray import serve

    from illume.models.default import _FALLBACK_TEXTS
    from illume.models.loading import ModelSettings
    from illume.models.tiny import build_tiny_vlm
    from illume.store import FeedbackStore
    from illume.store.settings import StoreSettings
    from services.auth import key_sha256
    from services.config import (
        ApiKey,
        AppConfig,
        AuthSettings,
        FeedbackLogSettings,
        GeneratorSettings,
        TuningSettings,
        WebSettings,
    )
    from services.local import local_only_ray, start
    from tests.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="illume-bench-feedback-"))
    store_settings = StoreSettings(url=f"sqlite:///{work / 'feedback.db'}", image_dir=work / "images")
    print(f"seeding {args.calls * args.runs} generations ...", flush=True)
    generations = seed_generations(store_settings, args.calls * args.runs)
    model_dir = build_tiny_vlm("llava", work / "model", _FALLBACK_TEXTS, hidden=32)
    config = AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=model_dir), num_cpus=1),
        feedback_log=FeedbackLogSettings(store=store_settings),
        auth=AuthSettings(
            keys=[ApiKey(sha256=key_sha256(KEY), role="admin", principal="bench", namespaces=["*"])]
        ),
        tuning=TuningSettings(enabled=False),
        web=WebSettings(enabled=False),
    )
    port = free_port()
    local_only_ray()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    acknowledged: list[str] = []
    rows = []
    try:
        start(config, port, args.num_cpus, dashboard=False)
        warm = generations[: args.concurrency]
        asyncio.run(drive(port, list_adapters_calls(args.concurrency), args.concurrency))
        asyncio.run(drive(port, submit_calls(warm, []), args.concurrency))
        rest = generations[args.concurrency :]
        for run in range(args.runs):
            batch = rest[run * args.calls : (run + 1) * args.calls]
            admin = asyncio.run(drive(port, list_adapters_calls(len(batch)), args.concurrency))
            submit = asyncio.run(drive(port, submit_calls(batch, acknowledged), args.concurrency))
            ratio = submit["calls_per_s"] / admin["calls_per_s"]
            rows.append((admin, submit, ratio))
            print(
                f"run {run + 1}: ListAdapters {admin['calls_per_s']:.0f} calls/s "
                f"(p50 {admin['p50_ms']:.0f} ms, p99 {admin['p99_ms']:.0f} ms); SubmitFeedback "
                f"{submit['calls_per_s']:.0f} calls/s (p50 {submit['p50_ms']:.0f} ms, p99 "
                f"{submit['p99_ms']:.0f} ms); ratio {ratio:.2f}x",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    with FeedbackStore(store_settings) as store:
        stored = store.stats("default").feedback
    expected = len(acknowledged) + min(args.concurrency, len(generations))
    print(
        f"\nconcurrency {args.concurrency}, {args.calls} calls of each per run, {args.runs} runs, "
        f"{os.cpu_count()} cores"
    )
    print("| run | ListAdapters calls/s | SubmitFeedback calls/s | ratio | submit p50 ms | submit p99 ms |")
    print("|---|---|---|---|---|---|")
    for k, (admin, submit, ratio) in enumerate(rows, 1):
        print(
            f"| {k} | {admin['calls_per_s']:.0f} | {submit['calls_per_s']:.0f} | {ratio:.2f}x | "
            f"{submit['p50_ms']:.0f} | {submit['p99_ms']:.0f} |"
        )
    median = statistics.median(r[2] for r in rows)
    print(f"median ratio SubmitFeedback / ListAdapters: {median:.2f}x (target >= 0.8x)")
    print(f"acknowledged judgements stored: {stored} of {expected} (all acknowledged must be there)")


if __name__ == "__main__":
    main()
