"""Adapters of several namespaces over real gRPC: each namespace is served its own v1.

Versions restart at 1 in every namespace. Two namespaces each publish a v1 (random LoRA weights
of different seeds), promoted to production; requests in each, alone and mixed in one batch, must
give exactly the candidates of in-process generation with that namespace's adapter, and the
logged generation, the metrics and GetServerStatus must name the namespace's own version.

The module deploys the application with an artifact store and a store of its own (the session's
app has none), and deploys the session's app again when it is done.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from illume.adapters.artifacts import open_artifact_store
from illume.adapters.manifest import publish_adapter
from illume.client import IllumeClient
from illume.generation.generator import GenerateRequest, Generator, SamplingParams
from illume.images import decode_image
from illume.models import ModelSettings, load_model, lora_target_regex
from illume.models.loading import base_model_fingerprint
from illume.store import AdapterRegistry
from illume.store.settings import StoreSettings
from illume.training.round import load_adapter_model

from .conftest import KEYS, SCOPED_KEYS, deploy, png, wait_for_metric

NS_X, NS_Y = "adapters-x", "adapters-y"
SEEDS = {NS_X: 101, NS_Y: 202}
QUESTION, ANSWER = "what colour is the square?", "red"
SAMPLING = {"n": 3, "temperatures": [0.9], "top_k_fraction": 0.5, "max_new_tokens": 8}


def random_lora(base_dir: Path, out: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter for the base at ``base_dir``, saved like a trained one."""
    import torch
    from peft import LoraConfig, get_peft_model

    loaded = load_model(ModelSettings(path=base_dir))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=lora_target_regex(loaded.model), init_lora_weights=False
    )
    get_peft_model(loaded.model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tenant_app(sqlite_app, served_model_dir, tmp_path_factory):
    """The app with an artifact store and a fresh store in which each namespace has a v1 in
    production; yields (config, {namespace: adapter dir})."""
    data = tmp_path_factory.mktemp("tenant-adapters")
    store = StoreSettings(url=f"sqlite:///{data / 'feedback.db'}", image_dir=data / "img")
    config = sqlite_app.model_copy(
        update={
            "artifact_uri": str(data / "artifacts"),
            "feedback_log": sqlite_app.feedback_log.model_copy(update={"store": store}),
            "namespaces": [*sqlite_app.namespaces, NS_X, NS_Y],
        }
    )
    registry = AdapterRegistry.open(store)
    artifacts = open_artifact_store(config.artifact_uri)
    fingerprint = base_model_fingerprint(served_model_dir)
    dirs = {}
    for namespace, seed in SEEDS.items():
        path = random_lora(served_model_dir, data / f"{namespace}-v1", seed)
        record = publish_adapter(
            registry,
            artifacts,
            path,
            namespace=namespace,
            key=f"{namespace}/adapters/v1",
            base_fingerprint=fingerprint,
            snapshot_sha256="0" * 64,
            parent_version=0,
            train_config={"seed": seed},
            metrics={},
            code_version="test",
        )
        assert record.version == 1
        registry.set_alias(namespace, "production", 1)
        dirs[namespace] = path
    registry.close()
    deploy(config)
    try:
        yield config, dirs
    finally:
        deploy(sqlite_app)  # later tests expect the session's application


@pytest.fixture(scope="module")
def expected(tenant_app, served_model_dir) -> dict[str, dict[int, list[str]]]:
    """In-process candidates by namespace ("base" too) and seed: the adapter loaded with peft."""
    _, dirs = tenant_app
    image = decode_image(png())
    out = {}
    for key in (NS_X, NS_Y, "base"):
        loaded = load_model(ModelSettings(path=served_model_dir))
        adapter = None
        if key != "base":
            loaded.model = load_adapter_model(loaded.model, dirs[key], adapter_name="direct")
            adapter = "direct"
        generator = Generator(loaded)
        out[key] = {}
        for seed in (1, 2, 3):
            request = GenerateRequest(
                image=image,
                question=QUESTION,
                answer=ANSWER,
                adapter=adapter,
                sampling=SamplingParams(
                    n=SAMPLING["n"],
                    temperatures=tuple(SAMPLING["temperatures"]),
                    top_k_fraction=SAMPLING["top_k_fraction"],
                    max_new_tokens=SAMPLING["max_new_tokens"],
                    seed=seed,
                ),
            )
            out[key][seed] = [c.text for c in generator.generate([request])[0].candidates]
    for seed in (1, 2, 3):  # the test means something only if the three differ
        assert len({tuple(out[k][seed]) for k in out}) == 3, seed
    return out


def _generate(client: IllumeClient, namespace: str, seed: int, adapter: str = "", ephemeral: bool = True):
    return client.generate(
        png(),
        QUESTION,
        ANSWER,
        namespace=namespace,
        adapter=adapter,
        seed=seed,
        ephemeral=ephemeral,
        timeout=120,
        **SAMPLING,
    )


def test_each_namespace_is_served_its_own_v1_alone(tenant_app, grpc_port, expected):
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=KEYS["client"]) as client:
        for adapter in ("", "production", "1", "rationale-v1"):
            for namespace in (NS_X, NS_Y):
                reply = _generate(client, namespace, 1, adapter)
                assert [c.text for c in reply.candidates] == expected[namespace][1], (namespace, adapter)
                assert reply.adapter_version == "rationale-v1"  # the wire label, within the namespace
        base = _generate(client, NS_X, 1, "base")
        assert [c.text for c in base.candidates] == expected["base"][1]
        assert base.adapter_version == "base"


def test_namespaces_mixed_in_one_batch(tenant_app, grpc_port, expected):
    """Four concurrent requests, two per namespace: a batch of three or more mixes both."""
    works = [(NS_X, 2), (NS_Y, 2), (NS_X, 3), (NS_Y, 3)]
    mixed = False
    client = IllumeClient(f"127.0.0.1:{grpc_port}", api_key=KEYS["client"])
    with client, ThreadPoolExecutor(len(works)) as pool:
        for _ in range(10):
            replies = list(pool.map(lambda w: _generate(client, *w), works))
            for (namespace, seed), reply in zip(works, replies, strict=True):
                assert [c.text for c in reply.candidates] == expected[namespace][seed], (namespace, seed)
                assert reply.adapter_version == "rationale-v1"
            if max(r.timings.batch_size for r in replies) >= 3:
                mixed = True
                break
    assert mixed, "no batch mixed the two namespaces in 10 tries"


def test_logged_provenance_metrics_and_server_status_name_the_namespace(
    tenant_app, grpc_port, metrics_port, expected
):
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=KEYS["admin"]) as admin:
        for namespace in (NS_X, NS_Y):
            reply = _generate(admin, namespace, 1, ephemeral=False)
            assert [c.text for c in reply.candidates] == expected[namespace][1]
            logged = admin.get_generation(reply.generation_id, namespace=namespace)
            assert (logged.namespace, logged.adapter_version) == (namespace, "rationale-v1")
        # Replicas report themselves (a heartbeat at once after an adapter change, else every few
        # seconds), so the status may lag a load by a moment.
        want = {f"{NS_X}/rationale-v1", f"{NS_Y}/rationale-v1"}
        deadline = time.monotonic() + 15
        status = admin.server_status(timeout=30)
        while (
            not want <= {a for r in status.replicas for a in r.loaded_adapters}
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            status = admin.server_status(timeout=30)
        assert status.ready and status.healthy_replicas == len(status.replicas) == 1
        replica = status.replicas[0]
        assert replica.healthy and replica.model_id == status.model_id and replica.heartbeat_at
        assert replica.last_reload_at and replica.heartbeat_age_s < 15
        assert want <= set(replica.loaded_adapters)
        assert f"{NS_Y}/production=rationale-v1" in replica.aliases
    scoped_key = SCOPED_KEYS["client-a"][0]  # a key of tenant-a only
    with IllumeClient(f"127.0.0.1:{grpc_port}", api_key=scoped_key) as scoped:
        replica = scoped.server_status(timeout=30).replicas[0]
        assert not any(a.startswith((f"{NS_X}/", f"{NS_Y}/")) for a in replica.loaded_adapters)
        assert not any(a.startswith((f"{NS_X}/", f"{NS_Y}/")) for a in replica.aliases)
        with pytest.raises(grpc.RpcError) as denied:
            _generate(scoped, NS_X, 1)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for namespace in (NS_X, NS_Y):
        counted = wait_for_metric(
            metrics_port,
            "ray_illume_candidates_total",
            lambda v: v > 0,
            namespace=namespace,
            adapter_version="rationale-v1",
        )
        assert counted > 0, namespace
