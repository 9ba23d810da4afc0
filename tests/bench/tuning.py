"""Tuning benchmark: hot-reload latency, throughput during swaps, and one round's phases.

    python -m tests.bench.tuning --replicas 2 --judgements 1000

1. Promotion to first reply: after each Admin PromoteAdapter returns, client threads keep calling
   Generate; it reports the time to the first reply naming the new version and the time until the
   last 16 replies (spread over the replicas by Serve's router) all name it.
2. Throughput during swaps against steady state: the same load for the same time, once without
   and once with a promotion every ``--swap-every`` seconds.
3. One round for ``--judgements`` judgements: judged generations are written through the feedback
   store's API (world items, candidates from their gold and distractor rationales, one accepted),
   then a round is started through the Admin API; the round's own phase timings are printed
   (snapshot, Ray Train, evaluation, promotion).
Figures, not assertions; they go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

from tests.bench.models import BENCH_DIR, bench_model

KEY = "bench-admin-key-0123456789"


def _config(model_dir: Path, data: Path, dashboard_port: int, replicas: int):
    from illume.evaluation.gate import GateConfig
    from illume.models.loading import ModelSettings
    from illume.store.settings import StoreSettings
    from illume.training.round import TrainConfig
    from services.auth import key_sha256
    from services.config import (
        ApiKey,
        AppConfig,
        AuthSettings,
        FeedbackLogSettings,
        GeneratorSettings,
        TuningSettings,
    )

    return AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir),
            num_replicas=replicas,
            num_cpus=1,
            max_batch_size=16,
            adapter_poll_interval_s=0.5,
        ),
        feedback_log=FeedbackLogSettings(store=StoreSettings(url=f"sqlite:///{data / 'feedback.db'}")),
        auth=AuthSettings(keys=[ApiKey(sha256=key_sha256(KEY), role="admin", principal="bench")]),
        artifact_uri=str(data / "artifacts"),
        tuning=TuningSettings(
            min_new_judgements=10**9,
            jobs_api_address=f"http://127.0.0.1:{dashboard_port}",
            train=TrainConfig(epochs=1, learning_rate=1e-3, batch_size=16),
            gate=GateConfig(min_items=0, allow_empty=True, default_tolerance=1e6, tokenize=False),
            storage_path=str((data / "ray-train").resolve()),
        ),
    )


def _train_adapters(config, items, count: int) -> list[int]:
    from illume.adapters.artifacts import open_artifact_store
    from illume.adapters.manifest import publish_adapter
    from illume.images import load_image_file
    from illume.models.loading import base_model_fingerprint
    from illume.store import AdapterRegistry
    from illume.training.round import TrainConfig, train_round
    from illume.training.snapshot import JudgedItem, build_snapshot

    model_dir = config.generator.model.path
    snapshot = build_snapshot(
        [
            JudgedItem(
                item_id=i.question_id,
                image=str(i.image_path),
                question=i.question,
                answer=i.answer,
                accepted=(i.explanations[0],),
            )
            for i in items[:16]
        ]
    )
    registry = AdapterRegistry.open(config.feedback_log.store)
    artifacts = open_artifact_store(config.artifact_uri)
    versions = []
    for seed in range(count):
        train = TrainConfig(epochs=1, max_steps=2, learning_rate=1e-2, seed=seed)
        out = Path(config.artifact_uri).parent / f"trained-{seed}"
        train_round(snapshot, train, model_dir=model_dir, image_loader=load_image_file, out_dir=out)
        record = publish_adapter(
            registry,
            artifacts,
            out,
            namespace="default",
            key=f"default/adapters/bench-{seed}",
            base_fingerprint=base_model_fingerprint(model_dir),
            snapshot_sha256=snapshot.sha256,
            parent_version=0,
            train_config=train.model_dump(mode="json"),
            metrics={},
            code_version="bench",
        )
        versions.append(record.version)
    return versions


class Load:
    """Client threads calling Generate until stopped; records (time, version, candidates)."""

    def __init__(self, port: int, items, threads: int = 8) -> None:
        from illume.client import IllumeClient

        self.replies: list[tuple[float, str, int]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = []
        for w in range(threads):
            client = IllumeClient(f"127.0.0.1:{port}", api_key=KEY)
            t = threading.Thread(target=self._run, args=(client, items, w), daemon=True)
            self._threads.append(t)

    def _run(self, client, items, worker: int) -> None:
        rng = random.Random(worker)
        while not self._stop.is_set():
            item = rng.choice(items)
            try:
                reply = client.generate(
                    Path(item.image_path).read_bytes(),
                    item.question,
                    item.answer,
                    n=2,
                    temperatures=[1.0],
                    max_new_tokens=16,
                    ephemeral=True,
                    timeout=120,
                )
                with self._lock:
                    self.replies.append((time.perf_counter(), reply.adapter_version, len(reply.candidates)))
            except Exception:
                with self._lock:
                    self.failures += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def promotion_latency(admin, load: Load, versions: list[int]) -> list[dict]:
    out = []
    for version in versions:
        name = f"rationale-v{version}"
        admin.promote(str(version), timeout=30)
        t0 = time.perf_counter()
        first = everywhere = None
        deadline = t0 + 60
        while time.perf_counter() < deadline and everywhere is None:
            time.sleep(0.02)
            after = [r for r in list(load.replies) if r[0] >= t0]
            hits = [r for r in after if r[1] == name]
            if hits and first is None:
                first = hits[0][0] - t0
            if len(after) >= 16 and all(r[1] == name for r in after[-16:]):
                # The first reply after the last one that still named an older version.
                stale = [i for i, r in enumerate(after) if r[1] != name]
                everywhere = after[stale[-1] + 1 if stale else 0][0] - t0
        out.append({"version": name, "first_reply_s": first, "all_recent_replies_s": everywhere})
        print(f"  promotion of {name}: {out[-1]}", flush=True)
    return out


def throughput(load_factory, seconds: float, swap=None, every: float = 2.0) -> float:
    with load_factory() as load:
        time.sleep(3)  # warm
        start_count = len(load.replies)
        start = time.perf_counter()
        next_swap = start + every
        while time.perf_counter() - start < seconds:
            time.sleep(0.05)
            if swap and time.perf_counter() >= next_swap:
                swap()
                next_swap += every
        done = load.replies[start_count:]
        elapsed = time.perf_counter() - start
    return sum(r[2] for r in done) / elapsed


def write_judgements(config, items, count: int, seed: int = 0) -> None:
    from illume.store import FeedbackStore, NewGeneration
    from illume.store.types import FeedbackSubmission, NewCandidate
    from illume.world import distractor_rationales

    rng = random.Random(seed)
    store = FeedbackStore(config.feedback_log.store)
    try:
        for i in range(count):
            item = items[i % len(items)]
            texts = [item.explanations[0], *distractor_rationales(item, rng, 3)]
            record = store.record_generation(
                NewGeneration(
                    namespace="default",
                    image=Path(item.image_path).read_bytes(),
                    question=item.question,
                    answer=item.answer,
                    answer_generated=False,
                    candidates=[NewCandidate(t, 0.9, len(t.split())) for t in texts],
                    sampling={},
                    seed=i,
                    adapter_requested="",
                    adapter_version="base",
                    model_id="bench",
                )
            )
            store.submit_feedback(
                FeedbackSubmission(
                    generation_id=record.generation_id,
                    verdict="selected",
                    annotator_id=f"bench-{i}",
                    idempotency_key=f"bench-{i}",
                    fitting_candidate_ids=(record.candidates[0].candidate_id,),
                    answer_correct=True,
                )
            )
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--judgements", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--swap-every", type=float, default=2.0)
    args = parser.parse_args()

    import ray

    from illume.client import IllumeClient
    from illume.data import load_vqax
    from illume.world import build_world
    from services.local import start, stop
    from tests.conftest import free_port

    data = (BENCH_DIR / f"tuning-{int(time.time())}").resolve()
    data.mkdir(parents=True)
    world = data / "world"
    build_world(world, {"train": 400, "val": 50, "test": 0}, seed=11)
    train, val = load_vqax(world / "train.json"), load_vqax(world / "val.json")
    dashboard, port = free_port(), free_port()
    config = _config(bench_model(args.model).resolve(), data, dashboard, args.replicas)
    versions = _train_adapters(config, train, 3)
    ray.init(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        log_to_driver=False,
    )
    try:
        start(config, port, 8)
        admin = IllumeClient(f"127.0.0.1:{port}", api_key=KEY)
        print(f"model {config.generator.model.path}, {args.replicas} generator replicas", flush=True)
        with Load(port, val) as load:
            time.sleep(3)
            latencies = promotion_latency(admin, load, versions)
            print(f"  failed requests during promotions: {load.failures}", flush=True)
        cycle = iter(versions * 100)
        steady = throughput(lambda: Load(port, val), args.seconds)
        swapping = throughput(
            lambda: Load(port, val),
            args.seconds,
            swap=lambda: admin.promote(str(next(cycle)), timeout=30),
            every=args.swap_every,
        )
        print(
            f"  throughput steady {steady:.1f} cand/s, "
            f"during swaps every {args.swap_every}s {swapping:.1f} cand/s, "
            f"ratio {swapping / steady:.2f}",
            flush=True,
        )
        t = time.perf_counter()
        write_judgements(config, train, args.judgements)
        print(f"  wrote {args.judgements} judged generations in {time.perf_counter() - t:.1f}s", flush=True)
        started = admin.start_round(force=True, timeout=60)
        t = time.perf_counter()
        record = started
        while record.state not in ("promoted", "rejected", "failed"):
            time.sleep(2)
            record = admin.get_round(started.round_id, timeout=30)
        wall = time.perf_counter() - t
        scores = json.loads(record.scores_json or "{}")
        print(
            f"  round {record.state} ({record.reason}) in {wall:.1f}s wall: "
            f"rows {record.rationale_rows} rationale "
            f"+ {record.answer_rows} answer; phases {scores.get('timings')}",
            flush=True,
        )
        print(
            json.dumps(
                {
                    "promotions": latencies,
                    "steady": steady,
                    "swapping": swapping,
                    "round_wall_s": wall,
                    "round_timings": scores.get("timings"),
                }
            )
        )
    finally:
        stop()


if __name__ == "__main__":
    main()
