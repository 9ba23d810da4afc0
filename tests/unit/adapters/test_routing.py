"""AdapterRouter across namespaces: an adapter is (namespace, version), never just the version.

Versions restart at 1 in every namespace. Each namespace's v1 here is a different random LoRA, so
candidates show whose weights ran: every request must give exactly what in-process generation
with its own namespace's adapter gives, alone and with other namespaces' rows in the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from illume.adapters.artifacts import LocalArtifactStore
from illume.adapters.manifest import publish_adapter
from illume.adapters.routing import AdapterRouter
from illume.generation.generator import Generator
from illume.models import ModelSettings, load_model
from illume.store.registry import AdapterRegistry
from illume.store.settings import StoreSettings
from illume.store.types import Actor
from illume.training.round import load_adapter_model

from .conftest import make_request, save_random_lora, signature

# tenant-a and tenant-b: v1 promoted to production; tenant-c: v1 registered, no alias.
SEEDS = {"tenant-a": 11, "tenant-b": 22, "tenant-c": 33}
PROMOTED = ("tenant-a", "tenant-b")


@dataclass(frozen=True)
class Tenants:
    store: StoreSettings
    artifact_uri: str
    registry: AdapterRegistry
    dirs: dict[str, Path]  # namespace -> its v1's directory
    records: dict[str, object]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, base_dir, fingerprint) -> Tenants:
    root = tmp_path_factory.mktemp("tenants")
    store = StoreSettings(url=f"sqlite:///{root / 'store.db'}", image_dir=root / "images")
    artifacts = LocalArtifactStore(root / "artifacts")
    registry = AdapterRegistry.open(store)
    dirs, records = {}, {}
    for namespace, seed in SEEDS.items():
        registry.declare_namespace(namespace, Actor("test-admin"))
        path = save_random_lora(base_dir, root / f"{namespace}-v1", seed=seed)
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
        assert record.version == 1  # versions restart at 1 in every namespace
        if namespace in PROMOTED:
            registry.set_alias(namespace, "production", 1)
        dirs[namespace], records[namespace] = path, record
    return Tenants(store, str(root / "artifacts"), registry, dirs, records)


@pytest.fixture(scope="module")
def expected(tenants, base_dir, images) -> dict[str, list]:
    """In-process generation: each namespace's v1 loaded directly with peft on a fresh base, and
    the base model."""
    out = {}
    for namespace, path in tenants.dirs.items():
        loaded = load_model(ModelSettings(path=base_dir))
        loaded.model = load_adapter_model(loaded.model, path, adapter_name="direct")
        out[namespace] = signature(Generator(loaded).generate([make_request(images[0], adapter="direct")])[0])
    base = Generator(load_model(ModelSettings(path=base_dir)))
    out["base"] = signature(base.generate([make_request(images[0])])[0])
    assert len({str(v) for v in out.values()}) == len(out), "every v1 (and the base) must differ"
    return out


def _router(generator, tenants, capacity=4) -> AdapterRouter:
    settings = SimpleNamespace(adapter_cache_size=capacity, adapter_poll_interval_s=3600.0)
    return AdapterRouter(generator, settings, tenants.store, tenants.artifact_uri, namespaces=("default",))


@pytest.fixture
def router(generator, tenants):
    r = _router(generator, tenants)
    yield r
    r.stop()


def _serve(router, works, images):
    """Prepare and resolve each (namespace, ref), then run them as one batch (like _run_batch)."""
    for namespace, ref in works:
        router.prepare_ref(ref, namespace)
    resolutions = [router.resolve(ref, namespace) for namespace, ref in works]
    assert [r.error_code for r in resolutions] == [""] * len(works), resolutions
    requests = [router.bind(make_request(images[0]), r) for r in resolutions]
    return resolutions, [signature(r) for r in router.generate(requests)]


@pytest.mark.parametrize("ref", ["", "production", "1", "rationale-v1"])
def test_each_namespace_gets_its_own_v1_alone_and_in_a_mixed_batch(router, expected, images, ref):
    # tenant-a first: its v1 is loaded when tenant-b asks for its own v1.
    alone = {namespace: _serve(router, [(namespace, ref)], images) for namespace in PROMOTED}
    assert {ns: got for ns, (_, got) in alone.items()} == {ns: [expected[ns]] for ns in PROMOTED}
    works = [("tenant-b", ref), ("tenant-a", ref), ("default", ""), ("tenant-a", "base"), ("tenant-b", ref)]
    resolutions, got = _serve(router, works, images)
    assert got == [
        expected["tenant-b"],
        expected["tenant-a"],
        expected["base"],
        expected["base"],
        expected["tenant-b"],
    ]
    # The wire label stays rationale-v1: it is read within the request's namespace.
    assert [r.version_label for r in resolutions] == [
        "rationale-v1",
        "rationale-v1",
        "base",
        "base",
        "rationale-v1",
    ]
    assert [r.namespace for r in resolutions] == [ns for ns, _ in works]
    assert [r.namespace for ns in PROMOTED for r in alone[ns][0]] == list(PROMOTED)
    assert sorted(router.loaded_adapters()) == [("tenant-a", 1), ("tenant-b", 1)]
    assert ("tenant-a", "production", 1) in router.alias_table()
    assert ("tenant-b", "production", 1) in router.alias_table()


def test_a_pinned_version_loads_even_when_another_namespace_has_that_number_loaded(router, expected, images):
    _serve(router, [("tenant-a", "")], images)
    assert router.loaded_adapters() == [("tenant-a", 1)]
    _, got = _serve(router, [("tenant-c", "1"), ("tenant-a", "1")], images)
    assert got == [expected["tenant-c"], expected["tenant-a"]]
    assert sorted(router.loaded_adapters()) == [("tenant-a", 1), ("tenant-c", 1)]


def test_a_version_is_not_found_when_only_another_namespace_has_it_loaded(router, images):
    _serve(router, [("tenant-a", "")], images)
    # Resolution alone (no prepare_ref): tenant-c's v1 is not loaded, tenant-a's is.
    resolution = router.resolve("1", "tenant-c")
    assert resolution.error_code == "NOT_FOUND" and resolution.adapter_name is None
    assert router.resolve("1", "tenant-unknown").error_code == "NOT_FOUND"
    assert router.resolve("production", "tenant-c").error_code == "NOT_FOUND"  # no alias there
    assert router.resolve("", "tenant-c").version_label == "base"


def test_eviction_never_drops_another_namespaces_aliased_version(generator, tenants, expected, images):
    router = _router(generator, tenants, capacity=2)
    try:
        _serve(router, [("tenant-a", ""), ("tenant-b", "")], images)
        # A pinned, non-aliased version beyond capacity: the aliased v1s of both namespaces stay.
        _, got = _serve(router, [("tenant-c", "1")], images)
        assert got == [expected["tenant-c"]]
        assert sorted(router.loaded_adapters()) == [("tenant-a", 1), ("tenant-b", 1), ("tenant-c", 1)]
        _, got = _serve(router, [("tenant-a", ""), ("tenant-b", "")], images)
        assert got == [expected["tenant-a"], expected["tenant-b"]]
    finally:
        router.stop()


def test_a_name_loaded_with_other_weights_is_refused_not_served(router, tenants, expected, images):
    """The router's load goes through the cache's sha check even when the name is loaded already."""
    from illume.adapters import parse_served_name

    b = tenants.records["tenant-b"]
    a_name = "ns-tenant-a--rationale-v1"
    assert parse_served_name(a_name) == ("tenant-a", 1)
    # tenant-b's bytes under tenant-a's name (what a namespace-blind name would have produced).
    router.cache.ensure(a_name, b.artifact_uri, dict(b.manifest))
    router.prepare_ref("", "tenant-a")  # first sight of tenant-a: reads its aliases, loads v1
    assert ("tenant-a", "production", 1) not in router.alias_table()  # refused
    resolution = router.resolve("", "tenant-a")
    assert resolution.version_label == "base"  # never B's weights under A's label
    assert router.resolve("production", "tenant-a").error_code == "NOT_FOUND"


def test_served_names_and_status_tables(router, images):
    _serve(router, [("tenant-b", ""), ("tenant-a", "1")], images)
    assert router.loaded_names() == ["ns-tenant-a--rationale-v1", "ns-tenant-b--rationale-v1"]
    assert "tenant-a/production=rationale-v1" in router.alias_lines()
    assert router.last_reload_at is not None and router.health() == ""


def test_an_undeclared_namespace_is_never_watched(router):
    router.prepare_ref("", "never-declared")
    router.prepare_ref("1", "never-declared")
    assert "never-declared" not in router.watched_namespaces()
    router.prepare_ref("", "tenant-a")
    assert "tenant-a" in router.watched_namespaces()
