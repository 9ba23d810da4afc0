"""The tuning job's placement rules: no node-local paths across nodes, storage Ray can reach, the
wait for training resources (custom ones, GPUs, a group that autoscales from zero), and the
Jobs API client's token."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from illume.models.loading import ModelSettings
from illume.store.settings import StoreSettings
from services.config import AppConfig, FeedbackLogSettings, GeneratorSettings, TuningSettings, default_config
from services.tuner import bundles_fit, check_locations, storage_uri, wait_for_resources, worker_bundle

POSTGRES = "postgresql+psycopg://postgres@db:5432/illume"


def _config(artifact_uri: str, *, url: str = POSTGRES, image_dir=None, **fields) -> AppConfig:
    tuning = fields.pop("tuning", {})
    return AppConfig(
        generator=GeneratorSettings(model=ModelSettings(path=Path("/models/m"))),
        feedback_log=FeedbackLogSettings(store=StoreSettings(url=url, image_dir=image_dir)),
        artifact_uri=artifact_uri,
        artifact_options={"endpoint_url": "http://10.77.0.1:5000"},
        tuning=TuningSettings(**tuning),
        **fields,
    )


# --- node-local paths ------------------------------------------------------------------------


def test_a_local_artifact_store_is_refused_on_several_nodes_with_the_setting_named():
    config = _config("/data/adapters")
    with pytest.raises(RuntimeError) as refused:
        check_locations(config, alive_nodes=3)
    reason = str(refused.value)
    assert "\n" not in reason
    assert reason.startswith("artifact_uri '/data/adapters' is a path on one node")
    assert "3 nodes" in reason and "shared_filesystem" in reason


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        (_config("s3://b/p", tuning={"storage_path": "/home/ray/s3:/b/p"}), "tuning.storage_path"),
        (_config("s3://b/p", tuning={"storage_path": "file:///mnt/ray"}), "tuning.storage_path"),
        (_config("s3://b/p", image_dir=Path("/data/images")), "feedback_log.store.image_dir"),
        (_config("s3://b/p", url="sqlite:////data/f.db"), "feedback_log.store.url"),
    ],
)
def test_every_node_local_location_is_refused(config, setting):
    with pytest.raises(RuntimeError, match=f"^{setting} "):
        check_locations(config, alive_nodes=2)


def test_local_paths_pass_on_one_node_or_when_declared_shared():
    check_locations(_config("/data/adapters"), alive_nodes=1)
    check_locations(_config("/data/adapters", shared_filesystem=True), alive_nodes=4)
    check_locations(_config("s3://bucket/illume"), alive_nodes=4)  # all remote: nothing to refuse


def test_the_embedded_default_declares_its_one_machine_filesystem_shared(tmp_path):
    assert default_config(tmp_path, tmp_path / "model").shared_filesystem is True
    assert AppConfig.model_fields["shared_filesystem"].default is False
    assert TuningSettings().jobs_api_address == ""


def test_ray_train_storage_follows_the_s3_artifact_store_with_its_endpoint():
    from illume.adapters.artifacts import arrow_filesystem

    config = _config("s3://bucket/illume")
    assert storage_uri(config) == "s3://bucket/illume/ray-train"
    filesystem, path = arrow_filesystem(storage_uri(config), config.artifact_options)
    assert path == "bucket/illume/ray-train"  # RunConfig wants the scheme stripped with a filesystem
    assert filesystem.handler.fs.storage_options["endpoint_url"] == "http://10.77.0.1:5000"
    assert arrow_filesystem("/data/ray-train")[0] is None
    assert storage_uri(_config("s3://b/p", tuning={"storage_path": "s3://other/x"})) == "s3://other/x"


# --- waiting for resources -------------------------------------------------------------------


class FakeCluster:
    """Nodes' total and free resources; an autoscaler that adds ``grows_to`` once asked."""

    def __init__(self, nodes, free=None, autoscaler=False, grows_to=None):
        self.nodes = [dict(n) for n in nodes]
        self.free = [dict(n) for n in (free if free is not None else nodes)]
        self.autoscaler = autoscaler
        self.grows_to = grows_to
        self.requests: list[list[dict]] = []

    def free_per_node(self):
        return self.free

    def total_per_node(self):
        return self.nodes

    def autoscaler_running(self):
        return self.autoscaler

    def request(self, bundles):
        self.requests.append(bundles)
        if bundles and self.grows_to is not None:
            self.nodes.append(dict(self.grows_to))
            self.free.append(dict(self.grows_to))


TRAIN = {"CPU": 1.0, "illume-train": 1.0}
SERVE_NODE = {"CPU": 8.0, "illume-serve": 1.0}
TRAIN_NODE = {"CPU": 2.0, "illume-train": 2.0}


def test_bundles_fit_per_node_never_across_nodes():
    assert bundles_fit([TRAIN, TRAIN], [SERVE_NODE, TRAIN_NODE])
    assert not bundles_fit([TRAIN] * 3, [SERVE_NODE, TRAIN_NODE])  # 9 CPUs in all, 2 where it counts
    assert not bundles_fit([{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}])


def test_the_worker_bundle_holds_cpus_the_gpu_and_the_custom_resources():
    tuning = TuningSettings(cpus_per_worker=4, use_gpu=True, worker_resources={"illume-train": 1})
    assert worker_bundle(tuning) == {"CPU": 4, "GPU": 1.0, "illume-train": 1}


def test_a_cluster_too_small_without_an_autoscaler_fails_at_once():
    cluster = FakeCluster([SERVE_NODE])  # no node has illume-train
    started = time.monotonic()
    with pytest.raises(RuntimeError) as short:
        wait_for_resources([TRAIN, TRAIN], timeout_s=30, cluster=cluster, poll_s=0.01)
    assert time.monotonic() - started < 1
    assert str(short.value) == (
        "training needs 2 x {CPU: 1, illume-train: 1} and the cluster's nodes cannot hold them "
        "(no autoscaler runs to add nodes)"
    )
    assert cluster.requests == []


def test_a_gpu_group_scaling_up_from_zero_is_requested_and_waited_for():
    gpu = {"CPU": 1.0, "GPU": 1.0, "illume-train": 1.0}
    cluster = FakeCluster(
        [SERVE_NODE], autoscaler=True, grows_to={"CPU": 8.0, "GPU": 2.0, "illume-train": 2.0}
    )
    assert wait_for_resources([gpu, gpu], timeout_s=30, cluster=cluster, poll_s=0.01) is True
    assert cluster.requests == [[gpu, gpu]]


def test_an_autoscaler_that_adds_nothing_fails_after_the_timeout():
    cluster = FakeCluster([SERVE_NODE], autoscaler=True)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"within 0.3s .*requested from the autoscaler\)$"):
        wait_for_resources([TRAIN], timeout_s=0.3, cluster=cluster, poll_s=0.01)
    assert 0.3 <= time.monotonic() - started < 5


def test_busy_resources_are_waited_for_without_asking_the_autoscaler():
    cluster = FakeCluster([SERVE_NODE, TRAIN_NODE], free=[SERVE_NODE, {"CPU": 0.0, "illume-train": 2.0}])

    def release():
        time.sleep(0.2)
        cluster.free[1]["CPU"] = 2.0

    threading.Thread(target=release).start()
    assert wait_for_resources([TRAIN, TRAIN], timeout_s=10, cluster=cluster, poll_s=0.01) is False
    assert cluster.requests == []


# --- the Jobs API client's token -------------------------------------------------------------

_CLIENT = """
import sys
from ray.job_submission import JobSubmissionClient
try:
    JobSubmissionClient(sys.argv[1])
except Exception as exc:
    print("client error:", exc)
"""


def test_the_jobs_client_sends_the_cluster_token_when_token_auth_is_on(tmp_path):
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("authorization"))
            body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "0123456789abcdef0123456789abcdef"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        subprocess.run([sys.executable, "-c", _CLIENT, address], env=env, timeout=120, check=True)
        assert seen and seen[0] == f"Bearer {token}"
        seen.clear()
        env["RAY_AUTH_MODE"] = "disabled"
        subprocess.run([sys.executable, "-c", _CLIENT, address], env=env, timeout=120, check=True)
        assert seen and seen[0] is None
    finally:
        server.shutdown()


def test_ray_train_takes_the_gpu_worker_bundle():
    from ray.train import ScalingConfig

    tuning = TuningSettings(
        num_workers=2, cpus_per_worker=4, use_gpu=True, worker_resources={"illume-train": 1}
    )
    scaling = ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker=worker_bundle(tuning))
    assert scaling.total_resources == {"CPU": 8, "GPU": 2, "illume-train": 2}
