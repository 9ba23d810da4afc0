"""AdapterCache: prepare off the lock, install under it, never overwrite a name, LRU with pinning."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from illume.adapters import served_name
from illume.adapters.cache import AdapterCache
from illume.adapters.manifest import AdapterConflict, AdapterVerificationError, build_manifest
from illume.errors import FailedPrecondition, InvalidRequest
from illume.generation.generator import Generator
from illume.models import ModelSettings, load_model
from illume.models.tiny import build_tiny_vlm
from illume.training.round import load_adapter_model

from .conftest import make_request, manifest_for, save_random_lora, signature


@pytest.fixture
def cache(generator, adapter_store, tmp_path) -> AdapterCache:
    return AdapterCache(generator, adapter_store, capacity=2, work_dir=tmp_path / "cache")


def _ensure(cache, stored, pinned=()):
    return cache.ensure(stored.name, stored.uri, stored.manifest, pinned=pinned)


def test_an_installed_adapter_generates_like_the_adapter_loaded_directly(
    cache, generator, adapters, base_dir, images
):
    plain = [signature(r) for r in generator.generate([make_request(images[0])])]
    v1 = adapters["rationale-v1"]
    assert _ensure(cache, v1) is True
    assert generator.adapter_names() == [v1.name] and cache.loaded() == [v1.name]
    direct = load_model(ModelSettings(path=base_dir))
    direct.model = load_adapter_model(direct.model, adapters["rationale-v1"].path, adapter_name="x")
    expected = Generator(direct).generate([make_request(images[0], adapter="x")])[0]
    got = generator.generate([make_request(images[0], adapter=v1.name), make_request(images[0])])
    assert signature(got[0]) == signature(expected)
    assert signature(got[0]) != plain[0]  # the adapter changes the output
    assert [signature(got[1])] == plain  # base rows are unchanged
    # Inference mode: eval, and no adapter weight wants gradients.
    assert not generator.model.training
    assert not any(p.requires_grad for n, p in generator.model.named_parameters() if "lora_" in n)


def test_installing_a_loaded_name_is_a_no_op_or_a_conflict(cache, adapters, tmp_path):
    v1, v2 = adapters["rationale-v1"], adapters["rationale-v2"]
    assert _ensure(cache, v1) is True
    assert _ensure(cache, v1) is False  # same sha: nothing happens
    assert cache.install(cache.prepare(v1.name, v1.uri, v1.manifest)) is False
    with pytest.raises(AdapterConflict) as err:  # v2's bytes under v1's name
        cache.ensure(v1.name, v2.uri, v2.manifest)
    assert err.value.code == "ALREADY_EXISTS"
    with pytest.raises(InvalidRequest):
        cache.ensure("production", v1.uri, v1.manifest)
    assert cache.loaded() == [v1.name]


def test_a_refused_adapter_leaves_the_served_ones_untouched(cache, generator, adapters, images, tmp_path):
    v1, v2 = adapters["rationale-v1"], adapters["rationale-v2"]
    _ensure(cache, v1)
    before = generator.generate([make_request(images[0], adapter=v1.name), make_request(images[1])])
    # A flipped byte in the stored artifact of v2.
    tampered_dir = tmp_path / "v2-tampered"
    shutil.copytree(v2.path, tampered_dir)
    weights = tampered_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    tampered_uri = cache.artifacts.put_dir(tampered_dir, "default/rationale-v2-tampered")
    with pytest.raises(AdapterVerificationError, match="checksum"):
        cache.ensure(v2.name, tampered_uri, v2.manifest)
    # A manifest for another base model.
    other_base = dict(v2.manifest, base_fingerprint="e" * 64)
    with pytest.raises(AdapterVerificationError, match="trained on base"):
        cache.ensure(v2.name, v2.uri, other_base)
    assert cache.loaded() == [v1.name] and generator.adapter_names() == [v1.name]
    assert list((cache.work_dir).iterdir()) == [cache._entries[v1.name].prepared.path]  # refused files gone
    after = generator.generate([make_request(images[0], adapter=v1.name), make_request(images[1])])
    assert [signature(r) for r in after] == [signature(r) for r in before]


def test_an_adapter_that_does_not_fit_the_model_is_rolled_back(
    cache, generator, adapters, fingerprint, images, tmp_path, tiny_texts
):
    """Weights of a wider model under a manifest naming our base: peft fails mid-install."""
    plain = signature(generator.generate([make_request(images[0])])[0])
    wide_base = build_tiny_vlm("llava", tmp_path / "wide", tiny_texts, hidden=64)
    wide = save_random_lora(wide_base, tmp_path / "wide-lora", seed=5)
    manifest = manifest_for(wide, fingerprint, 5)
    uri = cache.artifacts.put_dir(wide, "default/rationale-v5-wide")
    with pytest.raises(Exception, match="size mismatch"):  # first install: the wrap is undone
        cache.ensure(served_name("default", 5), uri, manifest)
    assert generator.adapter_names() == [] and cache.loaded() == []
    assert not hasattr(generator.model, "peft_config")
    assert signature(generator.generate([make_request(images[0])])[0]) == plain
    _ensure(cache, adapters["rationale-v1"])
    with pytest.raises(Exception, match="size mismatch"):  # later install: the adapter is deleted
        cache.ensure(served_name("default", 5), uri, manifest)
    assert generator.adapter_names() == [adapters["rationale-v1"].name]
    assert signature(generator.generate([make_request(images[0])])[0]) == plain


def test_lru_eviction_spares_pinned_and_in_use_adapters(cache, generator, adapters, images):
    v1, v2, v3, v4 = (adapters[f"rationale-v{i}"] for i in (1, 2, 3, 4))
    _ensure(cache, v1)
    _ensure(cache, v2)
    cache.touch(v1.name)  # v2 is now the least recently used
    _ensure(cache, v3)
    assert cache.loaded() == [v1.name, v3.name]
    # v1 is the least recently used, but pinned (production): v3 goes instead.
    _ensure(cache, v4, pinned={v1.name})
    assert cache.loaded() == [v1.name, v4.name]
    assert generator.adapter_names() == [v1.name, v4.name]
    # A batch resolved to v1 and v4 holds them: the cache runs over capacity rather than drop them.
    with cache.using([v1.name, v4.name, None]):
        _ensure(cache, v2)
        assert set(cache.loaded()) == {v1.name, v4.name, v2.name}
        with pytest.raises(FailedPrecondition, match="in use"):
            cache.evict(v4.name)
        results = generator.generate([make_request(images[0], adapter=n) for n in (v1.name, v4.name)])
        assert all(r.candidates for r in results)
    _ensure(cache, v3)  # back under control: the LRU ones go
    assert len(cache.loaded()) == 2 and cache.loaded()[-1] == v3.name


def test_evicting_the_last_adapter_restores_the_plain_model(cache, generator, adapters, images):
    plain = signature(generator.generate([make_request(images[2])])[0])
    _ensure(cache, adapters["rationale-v1"])
    _ensure(cache, adapters["rationale-v2"])
    v1, v2 = adapters["rationale-v1"].name, adapters["rationale-v2"].name
    assert cache.evict(v1) is True and cache.evict(v1) is False
    assert generator.adapter_names() == [v2]
    assert cache.evict(v2) is True
    assert generator.adapter_names() == [] and not hasattr(generator.model, "peft_config")
    assert signature(generator.generate([make_request(images[2])])[0]) == plain
    assert list(cache.work_dir.iterdir()) == []
    with pytest.raises(KeyError):
        generator.generate([make_request(images[2], adapter=v2)])


def test_prepare_does_not_wait_for_a_running_batch(cache, generator, adapters):
    """prepare() downloads and verifies while another thread holds the generator lock."""
    v1 = adapters["rationale-v1"]
    holding, release = threading.Event(), threading.Event()

    def long_batch():
        with generator.lock:
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=long_batch)
    thread.start()
    try:
        assert holding.wait(10)
        finished = threading.Event()
        prepared = []
        worker = threading.Thread(
            target=lambda: (prepared.append(cache.prepare(v1.name, v1.uri, v1.manifest)), finished.set())
        )
        worker.start()
        assert finished.wait(20), "prepare blocked on the generator lock"
        assert prepared[0].path.is_dir()
        # install waits for the batch to end.
        installer = threading.Thread(target=cache.install, args=(prepared[0],))
        installer.start()
        installer.join(0.3)
        assert installer.is_alive() and generator.adapter_names() == []
    finally:
        release.set()
        thread.join()
    installer.join(20)
    assert generator.adapter_names() == [v1.name]


def test_a_manifest_without_required_files_is_refused(cache, adapters, fingerprint, tmp_path):
    v1 = adapters["rationale-v1"]
    path = tmp_path / "only-config"
    path.mkdir()
    shutil.copy(v1.path / "adapter_config.json", path)
    (path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    manifest = build_manifest(
        path,
        base_fingerprint=fingerprint,
        snapshot_sha256="",
        parent_version=0,
        train_config={},
        lora_config={},
        metrics={},
        code_version="",
    )
    uri = cache.artifacts.put_dir(path, "default/garbage")
    with pytest.raises(AdapterVerificationError, match="unreadable"):
        cache.ensure(served_name("default", 9), uri, manifest)
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert cache.loaded() == []
