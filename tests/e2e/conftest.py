"""The whole loop on the session's Ray cluster: serving, feedback, Ray Train rounds, hot reload.

The application runs with tuning enabled (a LoopController submitting rounds through the Ray Jobs
API of the test cluster's dashboard), an SQLite feedback log and a local artifact store in a
temporary directory, on the embedded default model (or, in a checkout without it, the random
fallback model, which exercises the same machinery).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from illume.data import load_vqax
from illume.evaluation.gate import GateConfig
from illume.models.default import default_model_dir
from illume.models.loading import ModelSettings
from illume.store.settings import StoreSettings
from illume.training.round import TrainConfig
from illume.world import build_world
from services.auth import key_sha256
from services.config import (
    ApiKey,
    AppConfig,
    AuthSettings,
    FeedbackLogSettings,
    GeneratorSettings,
    TuningSettings,
)

KEYS = {
    "client": "e2e-client-key-000000",
    "annotator": "e2e-annotator-key-0000",
    "admin": "e2e-admin-key-000000",
}


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def model_dir(e2e_dir) -> Path:
    """A copy of the default model (one test hides it from the training job)."""
    import shutil

    return Path(shutil.copytree(default_model_dir(e2e_dir), e2e_dir / "model"))


@pytest.fixture(scope="session")
def world(e2e_dir):
    out = e2e_dir / "world"
    build_world(out, {"train": 48, "val": 8, "test": 0}, seed=3)
    return {"train": load_vqax(out / "train.json"), "val": load_vqax(out / "val.json")}


def e2e_config(model_dir: Path, data: Path, dashboard_port: int) -> AppConfig:
    # A replay pool (answered questions whose images the training workers read from disk): the
    # judged questions mostly get an accepted rationale, so most answer rows come from it.
    replay = data / "replay"
    build_world(replay, {"train": 24, "val": 0, "test": 0}, seed=5)
    return AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir),
            max_batch_size=8,
            batch_wait_timeout_s=0.02,
            adapter_poll_interval_s=0.2,
        ),
        feedback_log=FeedbackLogSettings(
            store=StoreSettings(url=f"sqlite:///{data / 'feedback.db'}", image_dir=data / "images")
        ),
        auth=AuthSettings(
            keys=[ApiKey(sha256=key_sha256(k), role=r, principal=f"e2e-{r}") for r, k in KEYS.items()]
        ),
        artifact_uri=str(data / "artifacts"),
        tuning=TuningSettings(
            min_new_judgements=100_000,  # rounds start on demand in these tests
            check_interval_s=1.0,
            lease_ttl_s=6.0,
            jobs_api_address=f"http://127.0.0.1:{dashboard_port}",
            schedule_timeout_s=120,
            train=TrainConfig(epochs=2, learning_rate=5e-3, batch_size=8, seed=0),
            # The gate's own decisions are unit-tested; here every candidate passes so the
            # promotion and hot-reload path runs deterministically.
            gate=GateConfig(
                min_items=0, allow_empty=True, default_tolerance=1e6, tokenize=False, max_new_tokens=16
            ),
            storage_path=str(data / "ray-train"),
            replay_data=str(replay / "train.json"),
        ),
    )


@pytest.fixture(scope="session")
def e2e_app(grpc_port, dashboard_port, model_dir, e2e_dir) -> AppConfig:
    from ray import serve

    from services.app import build_app
    from services.config import ROUTE_PREFIX

    data = e2e_dir / "data"
    data.mkdir()
    config = e2e_config(model_dir, data, dashboard_port)
    serve.run(build_app(config), name="illume", route_prefix=ROUTE_PREFIX)
    return config


def client(port: int, role: str):
    from illume.client import IllumeClient

    return IllumeClient(f"127.0.0.1:{port}", api_key=KEYS[role])


def wait_until(predicate, timeout: float, interval: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value (returned) or the time is up (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
