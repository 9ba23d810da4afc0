"""The ILLUME loop as a service, through the public gRPC API (slow: real Ray Train rounds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from illume.adapters.artifacts import open_artifact_store
from illume.adapters.manifest import publish_adapter
from illume.generation.generator import GenerateRequest, Generator, SamplingParams
from illume.images import decode_image, load_image_file
from illume.models import ModelSettings, load_model
from illume.models.loading import base_model_fingerprint
from illume.store import AdapterRegistry
from illume.training.round import TrainConfig, train_round
from illume.training.snapshot import JudgedItem, build_snapshot

from .conftest import client, wait_until

pytestmark = pytest.mark.slow
TERMINAL = {"promoted", "rejected", "failed"}
SAMPLING = {"n": 2, "temperatures": [1.0], "max_new_tokens": 8}


def _bytes(item) -> bytes:
    return Path(item.image_path).read_bytes()


def _give_feedback(port: int, items) -> int:
    """Generate for each item with its gold answer; the 'annotator' accepts the first candidate."""
    accepted = 0
    with client(port, "client") as c, client(port, "annotator") as a:
        for item in items:
            reply = c.generate(_bytes(item), item.question, item.answer, n=4, max_new_tokens=12, timeout=300)
            if not reply.candidates:
                continue
            a.submit_feedback(
                reply.generation_id,
                fitting=[reply.candidates[0].candidate_id],
                answer_correct=True,
                idempotency_key=f"e2e-{reply.generation_id}",
            )
            accepted += 1
    return accepted


def _await_round(admin, round_id: str, timeout: float = 900):
    return wait_until(
        lambda: (r := admin.get_round(round_id, timeout=30)).state in TERMINAL and r, timeout, 2.0
    )


def _served_version(port: int, item) -> str:
    with client(port, "client") as c:
        return c.generate(
            _bytes(item), item.question, item.answer, ephemeral=True, timeout=120, **SAMPLING
        ).adapter_version


def test_one_real_round_is_promoted_and_served(e2e_app, grpc_port, world):
    assert _give_feedback(grpc_port, world["train"][:16]) > 0
    with client(grpc_port, "admin") as admin:
        started = admin.start_round(force=True, timeout=60)
        assert started.state == "pending" and started.job_id
        with pytest.raises(grpc.RpcError) as second:
            admin.start_round(force=True, timeout=60)
        assert second.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # one round at a time
        final = _await_round(admin, started.round_id)
        assert final, "the round did not finish in time"
        assert final.state == "promoted", final.reason
        assert final.rationale_rows > 0 and final.snapshot_sha256
        # Judged questions give at most one answer row each (16 - rationale rows); the replay
        # pool tops them up to 10 per rationale row (24 items), and the workers read its images.
        assert final.answer_rows >= min(24, 10 * final.rationale_rows)
        name = f"rationale-v{final.adapter_version}"
        assert "production" in admin.get_adapter(name, timeout=30).aliases
    item = world["val"][0]
    assert wait_until(lambda: _served_version(grpc_port, item) == name, 30), "the new version was not served"


# --- hot reload under load -------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_versions(e2e_app, world, model_dir, tmp_path_factory) -> dict[int, Path]:
    """Three adapters trained once per session (core train_round), registered like a tuner does."""
    store = e2e_app.feedback_log.store
    registry = AdapterRegistry.open(store)
    artifacts = open_artifact_store(e2e_app.artifact_uri)
    items = [
        JudgedItem(
            item_id=i.question_id,
            image=str(i.image_path),
            question=i.question,
            answer=i.answer,
            accepted=(i.explanations[0],),
        )
        for i in world["train"][:12]
    ]
    snapshot = build_snapshot(items)
    versions: dict[int, Path] = {}
    for seed in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"trained-{seed}")
        config = TrainConfig(epochs=1, max_steps=3, learning_rate=5e-2, seed=seed)
        result = train_round(snapshot, config, model_dir=model_dir, image_loader=load_image_file, out_dir=out)
        record = publish_adapter(
            registry,
            artifacts,
            result.adapter_dir,
            namespace="default",
            key=f"default/adapters/test-{seed}",
            base_fingerprint=base_model_fingerprint(model_dir),
            snapshot_sha256=snapshot.sha256,
            parent_version=0,
            train_config=config.model_dump(mode="json"),
            metrics={},
            code_version="test",
        )
        versions[record.version] = result.adapter_dir
    return versions


def test_three_promotions_under_load_drop_nothing_and_label_truthfully(
    e2e_app, grpc_port, world, trained_versions, model_dir
):
    items = world["val"]
    failures: list[str] = []
    replies: list[tuple[object, object]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with client(grpc_port, "client") as c:
            i = 0
            while not stop.is_set():
                item = items[(worker + i) % len(items)]
                i += 1
                try:
                    reply = c.generate(
                        _bytes(item),
                        item.question,
                        item.answer,
                        ephemeral=True,
                        timeout=120,
                        seed=1000 * worker + i,
                        **SAMPLING,
                    )
                    replies.append((item, reply))
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        with client(grpc_port, "admin") as admin:
            for version in trained_versions:
                admin.promote(str(version), timeout=30)
                name = f"rationale-v{version}"
                assert wait_until(lambda n=name: any(r.adapter_version == n for _, r in replies[-8:]), 30), (
                    name
                )
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not failures, failures[:3]
    seen = {r.adapter_version for _, r in replies}
    assert {f"rationale-v{v}" for v in trained_versions} <= seen

    # The version label is true: regenerate in-process with the named adapter and the returned seed.
    from peft import PeftModel

    loaded = load_model(ModelSettings(path=model_dir))
    first, *rest = trained_versions.items()
    loaded.model = PeftModel.from_pretrained(loaded.model, first[1], adapter_name=f"rationale-v{first[0]}")
    for version, path in rest:
        loaded.model.load_adapter(path, adapter_name=f"rationale-v{version}", is_trainable=False)
    generator = Generator(loaded)
    sample = {}
    for item, reply in replies:
        sample.setdefault(reply.adapter_version, (item, reply))
    for version_label, (item, reply) in sample.items():
        adapter = None if version_label == "base" else version_label
        if adapter is not None and adapter not in generator.adapter_names():
            continue  # a version promoted by an earlier test, not trained here
        request = GenerateRequest(
            image=decode_image(_bytes(item)),
            question=item.question,
            answer=item.answer,
            adapter=adapter,
            sampling=SamplingParams(
                n=SAMPLING["n"],
                temperatures=(1.0,),
                max_new_tokens=SAMPLING["max_new_tokens"],
                seed=reply.seed,
            ),
        )
        local = generator.generate([request])[0]
        assert [c.text for c in local.candidates] == [c.text for c in reply.candidates], version_label


def _corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = next(target.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return target


def test_corrupt_or_foreign_adapters_are_refused_and_rollback_works(
    e2e_app, grpc_port, world, trained_versions, model_dir, tmp_path
):
    registry = AdapterRegistry.open(e2e_app.feedback_log.store)
    artifacts = open_artifact_store(e2e_app.artifact_uri)
    item = world["val"][1]
    with client(grpc_port, "admin") as admin:
        good = max(trained_versions)
        admin.promote(str(good), timeout=30)
        good_name = f"rationale-v{good}"
        assert wait_until(lambda: _served_version(grpc_port, item) == good_name, 30)
        source = trained_versions[good]
        manifest = json.loads((source / "illume_manifest.json").read_text())

        flipped = _corrupt_copy(source, tmp_path / "flipped")
        (flipped / "illume_manifest.json").write_text(json.dumps(manifest))
        bad = registry.register("default", artifacts.put_dir(flipped, "default/adapters/flipped"), manifest)
        admin.promote(str(bad.version), timeout=30)
        time.sleep(3)
        assert _served_version(grpc_port, item) == good_name  # refused: serving continues on the good one

        foreign = {**manifest, "base_fingerprint": "0" * 64}
        other = tmp_path / "foreign"
        shutil.copytree(source, other)
        (other / "illume_manifest.json").write_text(json.dumps(foreign))
        wrong = registry.register("default", artifacts.put_dir(other, "default/adapters/foreign"), foreign)
        admin.promote(str(wrong.version), timeout=30)
        time.sleep(3)
        assert _served_version(grpc_port, item) == good_name
        status = admin.server_status(timeout=30)
        loaded = status.replicas[0].loaded_adapters
        assert f"default/rationale-v{good}" in loaded
        assert f"default/rationale-v{bad.version}" not in loaded
        assert f"default/rationale-v{wrong.version}" not in loaded

        previous = sorted(v for v in trained_versions if v != good)[-1]
        admin.promote(str(previous), timeout=30)
        assert wait_until(lambda: _served_version(grpc_port, item) == f"rationale-v{previous}", 30)
        admin.promote(str(good), timeout=30)
        assert wait_until(lambda: _served_version(grpc_port, item) == good_name, 30)
        rolled = admin.rollback(timeout=30)  # back to the production before the latest promotion
        assert rolled.version == previous and "production" in rolled.aliases
        assert wait_until(lambda: _served_version(grpc_port, item) == f"rationale-v{previous}", 30)


def test_a_failing_training_job_leaves_serving_untouched(e2e_app, grpc_port, world, model_dir):
    item = world["val"][2]
    before = _served_version(grpc_port, item)
    _give_feedback(grpc_port, world["train"][16:20])
    hidden = model_dir.with_name(model_dir.name + "-hidden")
    with client(grpc_port, "admin") as admin:
        # The job loads the base model from disk; with the directory gone its training fails.
        model_dir.rename(hidden)
        try:
            started = admin.start_round(force=True, timeout=60)
            final = _await_round(admin, started.round_id)
        finally:
            hidden.rename(model_dir)
        assert final and final.state == "failed" and final.reason
    assert _served_version(grpc_port, item) == before


def _controller_pids() -> list[int]:
    title = "ServeReplica:illume:LoopController"
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if title in " ".join(p.info["cmdline"] or [])
    ]


def test_controller_restart_during_a_round_starts_no_second_round(e2e_app, grpc_port, world):
    _give_feedback(grpc_port, world["train"][20:28])
    with client(grpc_port, "admin") as admin:
        before = {r.round_id for r in admin.list_rounds(page_size=100, timeout=30).rounds}
        started = admin.start_round(force=True, timeout=60)
        pids = _controller_pids()
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: set(_controller_pids()) - set(pids), 60), "the controller did not come back"
        with pytest.raises(grpc.RpcError) as again:
            admin.start_round(force=True, timeout=60)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        final = _await_round(admin, started.round_id)
        assert final and final.state in TERMINAL
        after = {r.round_id for r in admin.list_rounds(page_size=100, timeout=30).rounds}
        assert after - before == {started.round_id}
