"""Fixtures of the multi-node tests: the namespaced Ray cluster (harness.py), the S3 endpoint, the
PostgreSQL forwarder and database, the default model on a path every node sees, and the deployed
app.

Each test module gets its own cluster; everything it made (namespaces, bridge, processes, the
database, the run directory) is removed afterwards even when the test failed. The run directory
lives under the checkout's git-ignored ``.data/multinode/`` because every node's /tmp is private;
``ILLUME_MULTINODE_KEEP=1`` keeps it (the nodes' logs) for a post-mortem.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from illume.store.settings import StoreSettings
from services.auth import key_sha256
from services.config import ApiKey, AppConfig, AuthSettings

from .harness import ROOT_IP, Cluster, NodeSpec, TcpForwarder, cluster_network, free_port_on, skip_reason

REPO = Path(__file__).resolve().parents[3]
RUNS = REPO / ".data" / "multinode"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_PORT = 5432
BUCKET = "illume-multinode"
S3_KEY = S3_SECRET = "testing"
GRPC_PORT = 9000
KEYS = {
    "client": "multinode-client-key-0000",
    "annotator": "multinode-annotator-key-0",
    "admin": "multinode-admin-key-00000",
}

HEAD = NodeSpec("head", "10.77.0.10", num_cpus=0)
# The serving node: Ingress, Generator, FeedbackLog and LoopController (CPUs are logical in Ray).
SERVE = NodeSpec("serve", "10.77.0.11", num_cpus=3, resources={"illume-serve": 1})
# The training node: two Ray Train workers and the round's driver, then the gate's task.
TRAIN = NodeSpec("train", "10.77.0.12", num_cpus=3, resources={"illume-train": 3})


@dataclass
class Deployment:
    """What a test reaches: the cluster, the app's config and the serving node's gRPC address."""

    cluster: Cluster
    config: AppConfig
    grpc_target: str
    # Steps before the test (what, node, start epoch s, seconds), for the printed timeline.
    timeline: list[tuple[str, str, float, float]]


@pytest.fixture(scope="module")
def run_dir() -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    for stale in RUNS.glob("run-*"):  # a crashed run's (the namespaces' names are fixed: one run at a time)
        shutil.rmtree(stale, ignore_errors=True)
    path = RUNS / f"run-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    if os.environ.get("ILLUME_MULTINODE_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def network(run_dir):
    """The bridge and the nodes' namespaces (Ray not started yet); removed afterwards."""
    with cluster_network(HEAD, [SERVE, TRAIN], run_dir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def s3_endpoint(network) -> str:
    """moto in server mode on the bridge address, with the bucket of the artifacts and Ray Train."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port_on(ROOT_IP)
    server = ThreadedMotoServer(ip_address=ROOT_IP, port=port, verbose=False)
    server.start()
    endpoint = f"http://{ROOT_IP}:{port}"
    try:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def database(network) -> str:
    """A fresh PostgreSQL database, reached from the nodes through a forwarder on the bridge."""
    import psycopg

    name = f"illume_mn_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {str(error).strip()[:200]}")
    forwarder = TcpForwarder((ROOT_IP, PG_PORT), ("127.0.0.1", PG_PORT)).start()
    try:
        yield f"postgresql+psycopg://postgres@{ROOT_IP}:{PG_PORT}/{name}"
    finally:
        forwarder.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def model_dir(run_dir) -> Path:
    """A copy of the project's default model (the random fallback in a checkout without it) on a
    path every node sees: the run directory, not /tmp. A random model's rationales score NaN at the
    gate, which then refuses the candidate; the default model's are words."""
    from illume.models.default import default_model_dir

    return Path(shutil.copytree(default_model_dir(run_dir), run_dir / "model"))


@pytest.fixture(scope="module")
def world(run_dir) -> list:
    """Questions about generated scenes, in the default model's domain (images read by the test)."""
    from illume.data import load_vqax
    from illume.world import build_world

    out = run_dir / "world"
    build_world(out, {"train": 12, "val": 0, "test": 0}, seed=3)
    return load_vqax(out / "train.json")


def api_keys() -> AuthSettings:
    return AuthSettings(
        keys=[
            ApiKey(sha256=key_sha256(key), role=role, principal=f"multinode-{role}", namespaces=["*"])
            for role, key in KEYS.items()
        ]
    )


def store_settings(url: str) -> StoreSettings:
    # Images live in the database: no node shares a directory with another.
    return StoreSettings(url=url, image_dir=None)


def deploy(cluster: Cluster, config: AppConfig, timeout_s: float = 90.0) -> None:
    """Run the deploying driver inside the serving node (tests/integration/multinode/deploy_app.py)."""
    config_file = cluster.root / "app-config.json"
    config_file.write_text(config.model_dump_json())
    driver = Path(__file__).with_name("deploy_app.py")
    cluster.run_in(
        cluster.node(SERVE.name),
        [sys.executable, str(driver), cluster.gcs_address, str(config_file), str(GRPC_PORT)],
        timeout_s,
        "deploy-app",
    )


@pytest.fixture(scope="module")
def ray_cluster(network, s3_endpoint, database) -> Cluster:
    """The started cluster (after the endpoints it uses exist)."""
    network.start()
    return network
