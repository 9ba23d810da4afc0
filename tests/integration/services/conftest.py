"""The Serve application, started once per test session on the shared local Ray cluster.

It runs the real application (Ingress, Generator, FeedbackLog) behind Serve's gRPC proxy on a
free port, with a tiny random-weight LLaVA built here, an SQLite feedback log in a temporary
directory, one API key per role (all namespaces; the annotator key may submit on behalf of
others, as a labelling tool's would) and the scoped keys of the isolation matrix
(tests/integration/services/test_isolation.py): two declared tenants and a hashed keys file that
is re-read every ``KEYS_RELOAD_S``.
"""

from __future__ import annotations

import io
import itertools
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from illume.client import IllumeClient
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
)

KEYS = {
    "client": "client-key-0123456789",
    "annotator": "annotator-key-0123456789",
    "admin": "admin-key-0123456789",
}
# Keys of the isolation matrix: principal, role and namespaces (tenant-a's, and tenant-b's admin).
TENANT_A, TENANT_B = "tenant-a", "tenant-b"
SCOPED_KEYS = {
    "client-a": ("client-key-a-0123456789", "client", [TENANT_A]),
    "annotator-a": ("annotator-key-a-0123456789", "annotator", [TENANT_A]),
    "admin-a": ("admin-key-a-0123456789", "admin", [TENANT_A]),
    "admin-b": ("admin-key-b-0123456789", "admin", [TENANT_B]),
}
# The web app's browser test judges in namespaces of its own, with annotators scoped to each.
WEB_A, WEB_B = "web-a", "web-b"
WEB_KEYS = {
    "annotator": ("annotator-key-web-a-0123456789", "annotator", "web-annotator-a", [WEB_A]),
    "annotator_b": ("annotator-key-web-b-0123456789", "annotator", "web-annotator-b", [WEB_B]),
}
DECLARED = ["default", TENANT_A, TENANT_B, WEB_A, WEB_B]
KEYS_RELOAD_S = 1.0
MAX_BATCH = 4
MAX_QUEUED = 12


def _keys() -> list[ApiKey]:
    keys = [
        ApiKey(
            sha256=key_sha256(k),
            role=r,
            principal=f"test-{r}",
            namespaces=["*"],
            permissions=["submit_on_behalf"] if r == "annotator" else [],
        )
        for r, k in KEYS.items()
    ]
    keys += [
        ApiKey(sha256=key_sha256(k), role=r, principal=name, namespaces=ns)
        for name, (k, r, ns) in SCOPED_KEYS.items()
    ]
    keys += [
        ApiKey(sha256=key_sha256(k), role=r, principal=p, namespaces=ns) for k, r, p, ns in WEB_KEYS.values()
    ]
    return keys


def write_keys_file(path: Path, keys: dict[str, str]) -> None:
    """The hashed keys file the app re-reads: ``{principal: key}``, client keys of tenant-a."""
    entries = [
        {"sha256": key_sha256(k), "role": "client", "principal": p, "namespaces": [TENANT_A]}
        for p, k in keys.items()
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)  # atomic, as a Secret volume's update is


def app_config(
    model_dir: Path, store: StoreSettings, keys_file: Path | None = None, **generator
) -> AppConfig:
    return AppConfig(
        generator=GeneratorSettings(
            model=ModelSettings(path=model_dir),
            max_batch_size=MAX_BATCH,
            batch_wait_timeout_s=0.05,
            max_queued_requests=MAX_QUEUED,
            num_cpus=1,
            **generator,
        ),
        feedback_log=FeedbackLogSettings(store=store),
        auth=AuthSettings(keys=_keys(), keys_file=keys_file, reload_interval_s=KEYS_RELOAD_S),
        namespaces=DECLARED,
        tuning=TuningSettings(enabled=False),
    )


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    return build_tiny_vlm("llava", tmp_path_factory.mktemp("served-model"), _FALLBACK_TEXTS, hidden=32)


def deploy(config: AppConfig) -> None:
    from ray import serve

    from services.app import build_app
    from services.config import ROUTE_PREFIX

    serve.run(build_app(config), name="illume", route_prefix=ROUTE_PREFIX)


@pytest.fixture(scope="session")
def sqlite_app(grpc_port, served_model_dir, tmp_path_factory) -> AppConfig:
    data = tmp_path_factory.mktemp("sqlite-app")
    write_keys_file(data / "keys.json", {})
    config = app_config(
        served_model_dir,
        StoreSettings(url=f"sqlite:///{data / 'feedback.db'}", image_dir=data / "img"),
        keys_file=data / "keys.json",
    )
    deploy(config)
    return config


def client_for(port: int, role: str) -> IllumeClient:
    return IllumeClient(f"127.0.0.1:{port}", api_key=KEYS[role])


@pytest.fixture
def client(sqlite_app, grpc_port):
    with client_for(grpc_port, "client") as c:
        yield c


@pytest.fixture
def annotator(sqlite_app, grpc_port):
    with client_for(grpc_port, "annotator") as c:
        yield c


@pytest.fixture
def admin(sqlite_app, grpc_port):
    with client_for(grpc_port, "admin") as c:
        yield c


def png(colour: str = "red", size: int = 32) -> bytes:
    """A plain square PNG of ``colour`` (the tests' images; one colour, one sha256)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class WebServer:
    """The served web app as the browser test sees it (tests/integration/services/test_web_browser.py)."""

    base_url: str
    keys: dict[str, str]
    namespace_a: str
    namespace_b: str
    store: FeedbackStore
    seed_generations: Callable[[str, list[str]], list[str]]


@pytest.fixture(scope="module")
def web_server(sqlite_app, grpc_port, http_port) -> Iterator[WebServer]:
    """The application's Ingress serves the pages on Serve's HTTP proxy; generations are seeded
    through Generate (logged, so the judging queue hands them out)."""
    colours = itertools.cycle(("red", "green", "blue", "yellow", "purple", "orange", "white", "black"))

    def seed(namespace: str, questions: list[str]) -> list[str]:
        ids = []
        with client_for(grpc_port, "admin") as admin:
            for question in questions:
                reply = admin.generate(
                    png(next(colours), 48),
                    question,
                    "yes",
                    n=3,
                    max_new_tokens=6,
                    min_new_tokens=2,
                    namespace=namespace,
                )
                ids.append(reply.generation_id)
        return ids

    store = FeedbackStore(sqlite_app.feedback_log.store)
    keys = {"admin": KEYS["admin"], **{role: k for role, (k, _, _, _) in WEB_KEYS.items()}}
    try:
        yield WebServer(f"http://127.0.0.1:{http_port}", keys, WEB_A, WEB_B, store, seed)
    finally:
        store.close()


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Samples of Ray's metrics endpoint, parsed with prometheus-client's exposition parser."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    ]


def metric_sum(port: int, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in scrape(port) if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def wait_for_metric(port: int, name: str, predicate, timeout: float = 30.0, **labels: str) -> float:
    """Poll until ``predicate(value)`` holds (Ray exports metrics periodically); bounded in time."""
    deadline = time.monotonic() + timeout
    value = metric_sum(port, name, **labels)
    while not predicate(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = metric_sum(port, name, **labels)
    return value


def settled_metric(port: int, name: str, timeout: float = 30.0, **labels: str) -> float:
    """The value once earlier work has been exported: two readings a few report intervals apart agree."""
    deadline = time.monotonic() + timeout
    value = metric_sum(port, name, **labels)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        again = metric_sum(port, name, **labels)
        if again == value:
            return value
        value = again
    return value


def tiny_llava_for(items: list, directory: Path) -> Path:
    """A tiny random LLaVA whose tokenizer knows ``items``' world and the prompts' own words."""
    from illume.generation.prompts import answer_prompt, rationale_prompt
    from illume.world import world_texts

    texts = [*world_texts(items, distractors=1), rationale_prompt("what", "yes"), answer_prompt("what")]
    return build_tiny_vlm("llava", directory, texts, image_size=32, patch_size=8)
