"""Serving benchmark: the real gRPC path against the in-process limit and an unbatched server.

    python -m tests.bench.serving --model random-100m --requests 48
    python -m tests.bench.serving --model default

For each concurrency it sends a fixed number of Generate requests (n candidates, exactly
``--tokens`` new tokens each: min_new_tokens = max_new_tokens) from client threads on 127.0.0.1,
and prints throughput (candidates/s), p50/p99 latency and the mean batch size read from the
server's metrics. Side by side, in the same run: (a) the in-process limit, the core generating the
same requests in batches of the same size with no server, and (b) the same server with batching
off (max batch size 1). Figures, not assertions; they go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from tests.bench.models import bench_model, parameter_count


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (i * 37 % 256, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def in_process(model_dir: Path, requests: int, batch: int, n: int, tokens: int) -> dict:
    from illume.generation.generator import GenerateRequest, Generator, SamplingParams
    from illume.images import decode_image
    from illume.models import ModelSettings, load_model

    torch.set_num_threads(os.cpu_count() or 1)
    generator = Generator(load_model(ModelSettings(path=model_dir)))
    sampling = SamplingParams(n=n, temperatures=(1.0,), max_new_tokens=tokens, min_new_tokens=tokens, seed=1)
    work = [
        GenerateRequest(decode_image(_png(i)), f"question {i}?", "red", sampling) for i in range(requests)
    ]
    generator.generate(work[:1])  # warm-up
    started = time.perf_counter()
    candidates = 0
    for i in range(0, requests, batch):
        candidates += sum(len(r.candidates) for r in generator.generate(work[i : i + batch]))
    seconds = time.perf_counter() - started
    return {"candidates_per_s": candidates / seconds, "seconds": seconds, "threads": torch.get_num_threads()}


def _served(port: int, key: str, requests: int, concurrency: int, n: int, tokens: int) -> dict:
    from illume.client import IllumeClient

    latencies: list[float] = []
    images = [_png(i) for i in range(requests)]
    # One channel for all client threads, as a real load generator would keep.
    client = IllumeClient(f"127.0.0.1:{port}", api_key=key)

    def one(i: int) -> int:
        t = time.perf_counter()
        reply = client.generate(
            images[i],
            f"question {i}?",
            "red",
            n=n,
            temperatures=[1.0],
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            seed=i,
            ephemeral=True,
            timeout=600,
        )
        latencies.append(time.perf_counter() - t)
        return len(reply.candidates)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        candidates = sum(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    client.close()
    latencies.sort()
    return {
        "candidates_per_s": candidates / seconds,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "seconds": seconds,
    }


def _counter(metrics_port: int, name: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == name)


def _settled(metrics_port: int, name: str) -> float:
    value = _counter(metrics_port, name)
    for _ in range(20):
        time.sleep(2.5)
        again = _counter(metrics_port, name)
        if again == value:
            return value
        value = again
    return value


def served(
    model_dir: Path,
    levels: list[int],
    requests: int,
    n: int,
    tokens: int,
    max_batch: int,
    num_cpus: float,
    batch_wait_s: float = 0.05,
    concurrent_batches: int = 1,
) -> dict[int, dict]:
    import ray
    from ray import serve

    from illume.models.loading import ModelSettings
    from illume.store.settings import StoreSettings
    from services.auth import key_sha256
    from services.config import ApiKey, AppConfig, AuthSettings, FeedbackLogSettings, GeneratorSettings
    from services.local import start
    from tests.integration.conftest import free_port

    data = Path(".bench") / f"serve-{os.getpid()}"
    key = "bench-key-0123456789"
    config = AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir),
            max_batch_size=max_batch,
            batch_wait_timeout_s=batch_wait_s,
            max_concurrent_batches=concurrent_batches,
            max_queued_requests=1024,
            num_cpus=num_cpus,
        ),
        feedback_log=FeedbackLogSettings(store=StoreSettings(url=f"sqlite:///{data / 'feedback.db'}")),
        auth=AuthSettings(keys=[ApiKey(sha256=key_sha256(key), role="admin", principal="bench")]),
    )
    data.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    results = {}
    try:
        start(config, port, 8, dashboard=False)
        _served(port, key, 2, 1, n, 4)  # warm-up
        for level in levels:
            before_req = _settled(metrics_port, "ray_illume_batched_requests_total")
            before_batches = _counter(metrics_port, "ray_illume_batches_total")
            result = _served(port, key, requests, level, n, tokens)
            after_req = _settled(metrics_port, "ray_illume_batched_requests_total")
            batches = _counter(metrics_port, "ray_illume_batches_total") - before_batches
            result["mean_batch"] = (after_req - before_req) / batches if batches else 0.0
            results[level] = result
            shape = f"max batch {max_batch} x {concurrent_batches}"
            print(f"  served ({shape}) concurrency {level}: {result}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-100m", help="default, random-100m, or a checkpoint dir")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--n", type=int, default=2, help="candidates per request")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per candidate")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--num-cpus", type=float, default=2, help="Ray CPUs (= torch threads) of the replica")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s of the server")
    parser.add_argument(
        "--concurrent-batches", type=int, default=1, help="max_concurrent_batches of the server"
    )
    args = parser.parse_args()
    model_dir = bench_model(args.model).resolve()
    print(
        f"model {model_dir} ({parameter_count(model_dir) / 1e6:.1f}M parameters), {os.cpu_count()} cores, "
        f"{args.requests} requests x {args.n} candidates x {args.tokens} tokens",
        flush=True,
    )

    def limits(when: str) -> dict[int, dict]:
        out = {
            c: in_process(model_dir, args.requests, min(c, args.max_batch), args.n, args.tokens)
            for c in args.levels
        }
        for c, r in out.items():
            print(f"  in-process batch {min(c, args.max_batch)} ({when}): {r}", flush=True)
        return out

    # The in-process limit is measured before and after the served run and averaged, so a shared
    # machine's drift in speed during the run lands on both sides of the ratio.
    before = limits("before")
    batched = served(
        model_dir,
        args.levels,
        args.requests,
        args.n,
        args.tokens,
        args.max_batch,
        args.num_cpus,
        args.batch_wait,
        args.concurrent_batches,
    )
    after = limits("after")
    limit = {
        c: {
            "candidates_per_s": (before[c]["candidates_per_s"] + after[c]["candidates_per_s"]) / 2,
            "threads": before[c]["threads"],
        }
        for c in args.levels
    }
    unbatched = served(
        model_dir,
        [32] if 32 in args.levels else args.levels[-1:],
        args.requests,
        args.n,
        args.tokens,
        1,
        args.num_cpus,
    )
    columns = ["concurrency", "served cand/s", "p50 s", "p99 s", "mean batch", "in-process cand/s", "ratio"]
    print("\n| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for c in args.levels:
        s, lim = batched[c], limit[c]
        ratio = s["candidates_per_s"] / lim["candidates_per_s"]
        print(
            f"| {c} | {s['candidates_per_s']:.1f} | {s['p50_s']:.2f} | {s['p99_s']:.2f} | "
            f"{s['mean_batch']:.1f} | {lim['candidates_per_s']:.1f} | {ratio:.2f} |"
        )
    for c, u in unbatched.items():
        ratio = batched[c]["candidates_per_s"] / u["candidates_per_s"] if c in batched else float("nan")
        print(
            f"\nunbatched server (max batch 1) at concurrency {c}: {u['candidates_per_s']:.1f} cand/s, "
            f"p50 {u['p50_s']:.2f} s; batched / unbatched = {ratio:.2f}"
        )
    print(
        f"threads: in-process torch {limit[args.levels[0]]['threads']}, replica torch = ceil(num_cpus) = "
        f"{max(1, int(-(-args.num_cpus // 1)))}"
    )


if __name__ == "__main__":
    main()
