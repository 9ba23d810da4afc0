"""One tuning round on a multi-node Ray cluster, through the public gRPC API (slow, needs root).

The cluster (harness.py): a head with 0 CPUs, a serving node and a training node, each in its own
network namespace with a private /tmp; adapters and Ray Train's storage on an S3 endpoint, the
feedback log on PostgreSQL, the model on a path every node has. What a user relies on: feedback
given through the serving node's gRPC proxy makes the LoopController (on the serving node) start a
round; the round's job and both Ray Train workers run on the training node, the gate passes the
candidate, it is promoted, and the next Generate on the serving node is answered by the new
version. The test prints a timeline of the round (where each step ran and how long it took).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from illume.evaluation.gate import GateConfig
from illume.models.loading import ModelSettings
from illume.training.round import TrainConfig
from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings

from .conftest import (
    BUCKET,
    GRPC_PORT,
    KEYS,
    S3_KEY,
    S3_SECRET,
    SERVE,
    TRAIN,
    Deployment,
    api_keys,
    deploy,
    store_settings,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TERMINAL = {"promoted", "rejected", "failed"}
JOB_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}
JUDGEMENTS = 6
ROUND_TIMEOUT_S = 240.0


def multinode_config(model_dir, database_url: str, s3_endpoint: str) -> AppConfig:
    """Serving pinned to the serving node, training to the training node, nothing shared by path."""
    return AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir),
            num_cpus=1,
            max_batch_size=4,
            batch_wait_timeout_s=0.02,
            adapter_poll_interval_s=0.5,
        ),
        feedback_log=FeedbackLogSettings(store=store_settings(database_url)),
        auth=api_keys(),
        artifact_uri=f"s3://{BUCKET}/adapters",
        artifact_options={"endpoint_url": s3_endpoint, "key": S3_KEY, "secret": S3_SECRET},
        shared_filesystem=False,
        serve_resources={"illume-serve": 0.01},
        tuning=TuningSettings(
            min_new_judgements=JUDGEMENTS,
            check_interval_s=1.0,
            lease_ttl_s=6.0,
            jobs_api_address="",  # resolved from the cluster, as on KubeRay
            schedule_timeout_s=120,
            num_workers=2,
            worker_resources={"illume-train": 1},
            entrypoint_resources={"illume-train": 0.5},
            storage_path=f"s3://{BUCKET}/ray-train",
            train=TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, seed=0),
            # The gate's own decisions are unit-tested; here it must run and let the candidate pass
            # (a held-out set too small to judge is skipped; min_items=0 would judge an empty one).
            gate=GateConfig(
                min_items=1, allow_empty=True, default_tolerance=1e6, tokenize=False, max_new_tokens=8
            ),
        ),
    )


@pytest.fixture(scope="module")
def deployment(ray_cluster, model_dir, database, s3_endpoint) -> Deployment:
    config = multinode_config(model_dir, database, s3_endpoint)
    start = time.time()
    deploy(ray_cluster, config)
    timeline = [("deploy the Serve application (driver)", SERVE.name, start, time.time() - start)]
    return Deployment(ray_cluster, config, f"{SERVE.ip}:{GRPC_PORT}", timeline)


def client(deployment: Deployment, role: str):
    from illume.client import IllumeClient

    return IllumeClient(deployment.grpc_target, api_key=KEYS[role])


def wait_until(predicate, timeout_s: float, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None


def test_the_cluster_refuses_callers_without_its_token(ray_cluster):
    """Ray's token authentication is on: the dashboard (Jobs API, state API) wants the token."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403)
    assert isinstance(ray_cluster.jobs(), list)  # with the token


def _ms(value) -> float | None:
    return float(value) / 1000 if value else None


def _seconds(iso: str) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


@dataclass
class Step:
    """One line of the round's timeline: what ran, on which node, when (epoch s) and how long."""

    what: str
    node: str
    start: float | None = None
    seconds: float | None = None


class Placement:
    """Where things ran, from the cluster's state API (node ids mapped to this test's node names)."""

    def __init__(self, deployment: Deployment) -> None:
        cluster = deployment.cluster
        by_ip = {n.ip: n.name for n in cluster.nodes}
        self.node_name = {n["node_id"]: by_ip.get(n["node_ip"], n["node_ip"]) for n in cluster.state("nodes")}
        self.actors = cluster.state("actors")
        self.tasks = cluster.state("tasks")
        self.jobs = cluster.jobs()
        (cluster.root / "state.json").write_text(
            json.dumps({"actors": self.actors, "tasks": self.tasks, "jobs": self.jobs}, default=str)
        )

    def where(self, node_id: str | None) -> str:
        return self.node_name.get(node_id or "", f"unknown node {node_id}")

    def actors_named(self, fragment: str) -> list[dict]:
        return [
            a
            for a in self.actors
            if fragment in (a.get("class_name") or "") or fragment in (a.get("name") or "")
        ]

    def tasks_named(self, fragment: str) -> list[dict]:
        return [t for t in self.tasks if fragment in (t.get("func_or_class_name") or t.get("name") or "")]

    def job(self, submission_id: str) -> dict | None:
        return next((j for j in self.jobs if j.get("submission_id") == submission_id), None)

    def actor_span(self, actor_id: str) -> tuple[float | None, float | None]:
        """First start and last end of the actor's tasks (its creation included), epoch seconds."""
        own = [t for t in self.tasks if t.get("actor_id") == actor_id]
        starts = [_ms(t.get("start_time_ms")) for t in own if t.get("start_time_ms")]
        ends = [_ms(t.get("end_time_ms")) for t in own if t.get("end_time_ms")]
        return (min(starts) if starts else None, max(ends) if ends else None)


def round_steps(placement: Placement, record, scores: dict) -> list[Step]:
    """The round's steps as the cluster and the round record saw them."""
    job = placement.job(record.job_id) or {}
    driver = placement.where(job.get("driver_node_id"))
    controllers = placement.actors_named("LoopController")
    steps = [
        Step(
            "round created by the LoopController",
            placement.where(controllers[0]["node_id"]) if controllers else "?",
            _seconds(record.started_at),
        )
    ]
    job_start, job_end = _ms(job.get("start_time")), _ms(job.get("end_time"))
    steps.append(
        Step(
            "round job (driver): snapshot, train, gate, publish",
            driver,
            job_start,
            (job_end - job_start) if job_start and job_end else None,
        )
    )
    for phase, seconds in (scores.get("timings") or {}).items():
        steps.append(Step(f"  driver phase {phase.removesuffix('_s')}", driver, None, seconds))
    for worker in placement.actors_named("RayTrainWorker"):
        start, end = placement.actor_span(worker["actor_id"])
        steps.append(
            Step(
                f"Ray Train worker (pid {worker.get('pid')})",
                placement.where(worker["node_id"]),
                start,
                (end - start) if start and end else None,
            )
        )
    for task in placement.tasks_named("gate"):
        start, end = _ms(task.get("start_time_ms")), _ms(task.get("end_time_ms"))
        steps.append(
            Step(
                f"gate task {task.get('func_or_class_name')}",
                placement.where(task.get("node_id")),
                start,
                (end - start) if start and end else None,
            )
        )
    finished = _seconds(record.finished_at)
    steps.append(Step(f"round {record.state}", "", finished, None))
    return steps


def print_timeline(steps: list[Step], origin: float, took_s: float) -> None:
    """The timeline, times relative to ``origin`` (the last judgement's submission)."""
    print(f"\nmulti-node round timeline (test {took_s:.1f} s; 'at' is seconds after the last judgement)")
    print(f"  {'at':>8} {'took':>8}  {'node':<8} step")
    for step in sorted(steps, key=lambda s: (s.start is None, s.start or 0)):
        at = f"{step.start - origin:+8.1f}" if step.start else " " * 8
        took = f"{step.seconds:8.2f}" if step.seconds is not None else " " * 8
        print(f"  {at} {took}  {step.node:<8} {step.what}")


def _job_status(cluster, submission_id: str) -> str | None:
    return next((j.get("status") for j in cluster.jobs() if j.get("submission_id") == submission_id), None)


def _submit_feedback(deployment: Deployment, items) -> list[str]:
    """Generate once per item; the annotator accepts the first candidate each time."""
    generations = []
    with client(deployment, "client") as c, client(deployment, "annotator") as a:
        for item in items[:JUDGEMENTS]:
            image = Path(item.image_path).read_bytes()
            reply = c.generate(image, item.question, item.answer, n=2, max_new_tokens=12, timeout=120)
            assert reply.candidates, "a Generate on the serving node returned no candidates"
            a.submit_feedback(
                reply.generation_id,
                fitting=[reply.candidates[0].candidate_id],
                answer_correct=True,
                idempotency_key=f"mn-{reply.generation_id}",
            )
            generations.append(reply.generation_id)
    return generations


def _served_version(deployment: Deployment, item) -> str:
    with client(deployment, "client") as c:
        image = Path(item.image_path).read_bytes()
        reply = c.generate(
            image, item.question, item.answer, n=1, max_new_tokens=4, ephemeral=True, timeout=60
        )
        return reply.adapter_version


def test_a_round_started_by_feedback_trains_on_the_training_node_and_is_served(deployment, world):
    started = time.monotonic()
    steps = [Step(*row) for row in deployment.timeline]
    cluster = deployment.cluster
    feedback_start = time.time()
    _submit_feedback(deployment, world)
    origin = time.time()
    steps.append(
        Step(
            f"{JUDGEMENTS} Generate + SubmitFeedback via the serving node's proxy",
            "root ns",
            feedback_start,
            origin - feedback_start,
        )
    )
    with client(deployment, "admin") as admin:
        first = wait_until(lambda: list(admin.list_rounds(timeout=30).rounds), 60)
        assert first, "the LoopController started no round after enough accepted judgements"
        round_id = first[0].round_id
        final = wait_until(
            lambda: (r := admin.get_round(round_id, timeout=30)).state in TERMINAL and r, ROUND_TIMEOUT_S
        )
        record = final or admin.get_round(round_id, timeout=30)
    # The driver exits a moment after it finished the round; its job's end time is then known.
    wait_until(lambda: _job_status(cluster, record.job_id) in JOB_ENDED, 30, 0.5)
    placement = Placement(deployment)
    scores = json.loads(record.scores_json or "{}")
    steps += round_steps(placement, record, scores)
    job = placement.job(record.job_id) or {}
    controllers = placement.actors_named("LoopController")
    workers = placement.actors_named("RayTrainWorker")
    gate_tasks = placement.tasks_named("gate")
    try:
        assert record.state == "promoted", (
            f"round {round_id} ended {record.state or 'unfinished'}: {record.reason}\n"
            f"job: {json.dumps({k: job.get(k) for k in ('status', 'message', 'driver_node_id')})}"
        )
        assert {placement.where(a["node_id"]) for a in controllers} == {SERVE.name}, (
            "the LoopController did not run on the serving node"
        )
        driver = placement.where(job.get("driver_node_id"))
        assert driver == TRAIN.name, f"the round's job driver ran on {driver}"
        assert len(workers) >= 2, f"{len(workers)} Ray Train workers ran (2 configured)"
        assert {placement.where(w["node_id"]) for w in workers} == {TRAIN.name}, (
            "a Ray Train worker ran off the training node"
        )
        assert gate_tasks, "the gate's evaluation ran in no Ray task"
        assert {placement.where(t.get("node_id")) for t in gate_tasks} == {TRAIN.name}, (
            "the gate ran off the training node"
        )
        assert "gate" in scores, "the round has no gate scores"

        name = f"rationale-v{record.adapter_version}"
        promoted = _seconds(record.finished_at) or time.time()
        served = wait_until(lambda: _served_version(deployment, world[-1]) == name, 60, 0.5)
        assert served, f"the serving node did not answer with {name} after the promotion"
        steps.append(Step(f"first Generate answered by {name}", SERVE.name, time.time(), None))
        steps[-1].seconds = steps[-1].start - promoted
        generators = Placement(deployment).actors_named("Generator")
        assert {placement.where(g["node_id"]) for g in generators if g.get("state") == "ALIVE"} == {
            SERVE.name
        }
    finally:
        print_timeline(steps, origin, time.monotonic() - started)
        if record.state != "promoted":
            print(cluster.log_tails())
