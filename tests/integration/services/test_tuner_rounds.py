"""Tuning rounds on the session's Ray cluster with two data-parallel Ray Train workers (gloo on
CPU), the artifacts and Ray Train's storage in S3 (moto in server mode), and a tiny model.

- a round trains, checkpoints every epoch into the S3 storage, gates and promotes;
- a worker that dies right after the round's first checkpoint is replaced, the run continues from
  that checkpoint, and the adapter equals (tensor for tensor) the uninterrupted round's;
- a round resubmitted after its job was lost reuses the snapshot it recorded and continues from
  the run's last checkpoint, giving the same adapter again.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from illume.evaluation.gate import GateConfig
from illume.models.loading import ModelSettings
from illume.store import AdapterRegistry, FeedbackStore, FeedbackSubmission, NewCandidate, NewGeneration
from illume.store.settings import StoreSettings
from illume.training.round import TrainConfig
from illume.training.snapshot import SnapshotConfig
from tests.integration.conftest import free_port
from tests.integration.services.conftest import tiny_llava_for

pytestmark = pytest.mark.slow
BUCKET = "illume-rounds"
S3_OPTIONS = {"key": "testing", "secret": "testing"}
NAMESPACE = "default"


@pytest.fixture(scope="module")
def s3_endpoint():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from illume.world import build_world

    return build_world(tmp_path_factory.mktemp("world"), sizes={"train": 12, "val": 0, "test": 0}, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world) -> Path:
    return tiny_llava_for(world["train"], tmp_path_factory.mktemp("model"))


def _judge(store: FeedbackStore, item, question: str, key: str) -> None:
    """Record a generation of ``item`` whose one candidate (its gold rationale) is accepted."""
    record = store.record_generation(
        NewGeneration(
            namespace=NAMESPACE,
            image=Path(item.image_path).read_bytes(),
            question=question,
            answer=item.answer,
            answer_generated=False,
            candidates=[NewCandidate(item.explanations[0], 0.3, 8)],
            sampling={"n": 1},
            seed=0,
            adapter_requested="",
            adapter_version="base",
            model_id="tiny",
        )
    )
    store.submit_feedback(
        FeedbackSubmission(
            generation_id=record.generation_id,
            verdict="selected",
            annotator_id="tester",
            idempotency_key=key,
            namespace=NAMESPACE,
            fitting_candidate_ids=(record.candidates[0].candidate_id,),
            answer_correct=True,
        )
    )


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory, world) -> StoreSettings:
    """Every item generated once and its gold rationale accepted; about a third held out."""
    path = tmp_path_factory.mktemp("store")
    settings = StoreSettings(url=f"sqlite:///{path / 'feedback.db'}", held_out_fraction=0.3)
    with FeedbackStore(settings) as store:
        for k, item in enumerate(world["train"]):
            _judge(store, item, item.question, f"judge-{k}")
    return settings


@pytest.fixture(scope="module")
def round_config(ray_cluster, s3_endpoint, model_dir, store_settings):
    from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings

    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=model_dir)),
        feedback_log=FeedbackLogSettings(store=store_settings),
        artifact_uri=f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}",
        artifact_options={"endpoint_url": s3_endpoint, **S3_OPTIONS},
        tuning=TuningSettings(
            num_workers=2,
            cpus_per_worker=1,
            schedule_timeout_s=60,
            max_failures=1,
            train=TrainConfig(epochs=3, batch_size=2, learning_rate=5e-3, seed=0),
            snapshot=SnapshotConfig(replay_ratio=1),
            # Every candidate passes: the gate's decisions are unit-tested; here it has to run.
            gate=GateConfig(
                min_items=0, allow_empty=True, default_tolerance=1e6, tokenize=False, max_new_tokens=6
            ),
        ),
    )


def _run(config, **tuning):
    from services.tuner import run_round

    if tuning:
        config = config.model_copy(update={"tuning": config.tuning.model_copy(update=tuning)})
    registry = AdapterRegistry.open(config.feedback_log.store)
    record = registry.create_round(NAMESPACE, "pending")
    return run_round(config, NAMESPACE, record.round_id)


def _adapter_tensors(config, version: int) -> dict:
    from safetensors.torch import load_file

    from illume.adapters.artifacts import open_artifact_store

    registry = AdapterRegistry.open(config.feedback_log.store)
    record = registry.get(NAMESPACE, str(version))
    local = Path(f"/tmp/illume-test-adapter-{uuid.uuid4().hex}")
    open_artifact_store(config.artifact_uri, config.artifact_options).get_dir(record.artifact_uri, local)
    return load_file(local / "adapter_model.safetensors")


def _checkpoints(config, round_id: str) -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=config.artifact_options["endpoint_url"], **S3_OPTIONS)
    run = f"{config.artifact_uri}/ray-train/round-{round_id}"
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run) if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))


def _assert_same_tensors(first: dict, second: dict) -> None:
    import torch

    assert first.keys() == second.keys() and first
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different[:3]


@pytest.fixture(scope="module")
def uninterrupted(round_config):
    """The reference round: two workers, no failure."""
    return _run(round_config)


def test_a_round_with_two_gloo_workers_checkpoints_gates_and_promotes(round_config, uninterrupted):
    final = uninterrupted
    assert final.state == "promoted", final.reason
    assert final.adapter_version == 1 and final.rationale_rows > 0
    assert final.scores["gate"]["items"] > 0  # the gate's task scored held-out generations
    train = final.scores["train"]
    assert train["resumed_after_epoch"] == 0 and train["steps"] > 0
    # Three epoch checkpoints and the final adapter were written; the newest two are kept.
    assert len(_checkpoints(round_config, final.round_id)) == 2
    registry = AdapterRegistry.open(round_config.feedback_log.store)
    assert registry.get(NAMESPACE, "production").version == 1


def test_a_worker_lost_after_the_first_checkpoint_resumes_to_the_same_adapter(
    round_config, uninterrupted, tmp_path, monkeypatch
):
    from services.tuner import WORKER_EXIT_ENV

    marker = tmp_path / "worker-exited"
    monkeypatch.setenv(WORKER_EXIT_ENV, json.dumps({"rank": 1, "epoch": 1, "marker": str(marker)}))
    final = _run(round_config)
    assert marker.exists(), "the worker was not killed"
    assert final.state in ("promoted", "rejected"), final.reason
    assert final.snapshot_sha256 == uninterrupted.snapshot_sha256
    assert final.scores["train"]["resumed_after_epoch"] == 1  # continued after epoch 1, not from 0
    _assert_same_tensors(
        _adapter_tensors(round_config, uninterrupted.adapter_version),
        _adapter_tensors(round_config, final.adapter_version),
    )


def test_a_resubmitted_round_reuses_its_snapshot_and_the_last_checkpoint(
    round_config, uninterrupted, world, tmp_path, monkeypatch
):
    from services.tuner import WORKER_EXIT_ENV, run_round, train_with_ray

    registry = AdapterRegistry.open(round_config.feedback_log.store)
    record = registry.create_round(NAMESPACE, "pending")
    snapshot_uri = f"{round_config.artifact_uri}/{NAMESPACE}/snapshots/{uninterrupted.snapshot_sha256}"
    # The first job: its run checkpoints epoch 1, then dies for good (no retry left).
    monkeypatch.setenv(
        WORKER_EXIT_ENV, json.dumps({"rank": 1, "epoch": 1, "marker": str(tmp_path / "exited")})
    )
    no_retry = round_config.model_copy(
        update={"tuning": round_config.tuning.model_copy(update={"max_failures": 0})}
    )
    with pytest.raises(Exception):  # noqa: B017 (Ray Train's error type is not the point)
        train_with_ray(no_retry, snapshot_uri, record.round_id, tmp_path / "unused", None)
    monkeypatch.delenv(WORKER_EXIT_ENV)
    registry.update_round(
        record.round_id, "training", snapshot_sha256=uninterrupted.snapshot_sha256, rationale_rows=1
    )
    # New feedback arrived meanwhile: a rebuilt snapshot would differ; the recorded one is reused.
    with FeedbackStore(round_config.feedback_log.store) as store:
        for k, item in enumerate(world["train"]):
            _judge(store, item, f"which shape is it, {k}?", f"late-{k}")
    final = run_round(round_config, NAMESPACE, record.round_id)
    assert final.state in ("promoted", "rejected"), final.reason
    assert final.snapshot_sha256 == uninterrupted.snapshot_sha256
    assert final.scores["train"]["resumed_after_epoch"] == 1
    _assert_same_tensors(
        _adapter_tensors(round_config, uninterrupted.adapter_version),
        _adapter_tensors(round_config, final.adapter_version),
    )
