"""Adapter manifests: checksums of every file, provenance, and verification that refuses tampering."""

from __future__ import annotations

import json
import shutil

import pytest

from illume.adapters import served_name
from illume.adapters.manifest import (
    MANIFEST_NAME,
    AdapterVerificationError,
    build_manifest,
    check_adapter_name,
    read_manifest,
    sha256_json,
    verify_adapter_dir,
)
from illume.errors import InvalidRequest
from illume.training.round import adapter_sha256


@pytest.fixture
def copy(tmp_path, adapters):
    """A private copy of rationale-v1's directory (with its manifest) and that manifest."""
    stored = adapters["rationale-v1"]
    path = tmp_path / "v1"
    shutil.copytree(stored.path, path)
    return path, stored.manifest


def test_manifest_lists_every_file_and_the_provenance(adapters, fingerprint):
    stored = adapters["rationale-v1"]
    manifest = stored.manifest
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    for meta in manifest["files"].values():
        assert len(meta["sha256"]) == 64 and meta["size"] > 0
    assert manifest["content_sha256"] == sha256_json(manifest["files"])
    assert manifest["adapter_sha256"] == adapter_sha256(stored.path)
    assert manifest["base_fingerprint"] == fingerprint
    assert manifest["config_sha256"] == sha256_json(manifest["train_config"])
    assert manifest["parent_version"] == 0 and manifest["code_version"] == "test"
    assert manifest["metrics"] == {"loss": 1.5, "rationale_loss": None}  # NaN is not JSON
    assert read_manifest(stored.path) == manifest
    json.dumps(manifest, allow_nan=False)


def test_manifest_is_deterministic_and_tracks_the_train_config(copy, fingerprint):
    path, manifest = copy
    kwargs = dict(
        base_fingerprint=fingerprint,
        snapshot_sha256="0" * 64,
        parent_version=0,
        lora_config={"r": 4, "lora_alpha": 16},
        metrics={"loss": 1.5},
        code_version="test",
    )
    a = build_manifest(path, train_config={"epochs": 1, "seed": 1, "learning_rate": 0.01}, **kwargs)
    b = build_manifest(path, train_config={"seed": 1, "learning_rate": 0.01, "epochs": 1}, **kwargs)
    c = build_manifest(path, train_config={"seed": 1, "learning_rate": 0.02, "epochs": 1}, **kwargs)
    assert a == b and a["content_sha256"] == manifest["content_sha256"]  # the manifest file is not hashed
    assert c["config_sha256"] != a["config_sha256"]


def test_a_good_directory_verifies(copy, fingerprint):
    path, manifest = copy
    verify_adapter_dir(path, manifest, fingerprint)
    (path / MANIFEST_NAME).unlink()  # the in-directory copy is optional
    verify_adapter_dir(path, manifest, fingerprint)


def test_a_flipped_byte_is_refused(copy, fingerprint):
    path, manifest = copy
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(
        AdapterVerificationError, match=r"checksum mismatch for adapter_model\.safetensors"
    ) as err:
        verify_adapter_dir(path, manifest, fingerprint)
    assert err.value.code == "FAILED_PRECONDITION"


def test_a_wrong_base_fingerprint_is_refused(copy):
    path, manifest = copy
    with pytest.raises(AdapterVerificationError, match="trained on base"):
        verify_adapter_dir(path, manifest, "f" * 64)


def test_missing_and_extra_files_are_refused(copy, fingerprint):
    path, manifest = copy
    (path / "notes.txt").write_text("not in the manifest")
    with pytest.raises(AdapterVerificationError, match=r"unexpected file notes\.txt"):
        verify_adapter_dir(path, manifest, fingerprint)
    (path / "notes.txt").unlink()
    (path / "README.md").unlink()
    with pytest.raises(AdapterVerificationError, match=r"README\.md is missing"):
        verify_adapter_dir(path, manifest, fingerprint)


def test_an_edited_manifest_is_refused(copy, fingerprint):
    path, manifest = copy
    forged = json.loads(json.dumps(manifest))
    forged["files"]["adapter_model.safetensors"]["sha256"] = "0" * 64  # without fixing content_sha256
    with pytest.raises(AdapterVerificationError, match="content_sha256"):
        verify_adapter_dir(path, forged, fingerprint)
    escaping = json.loads(json.dumps(manifest))
    escaping["files"]["../evil"] = {"size": 1, "sha256": "0" * 64}
    escaping["content_sha256"] = sha256_json(escaping["files"])
    with pytest.raises(AdapterVerificationError, match="unsafe file name"):
        verify_adapter_dir(path, escaping, fingerprint)


def test_an_in_directory_manifest_of_another_adapter_is_refused(copy, adapters, fingerprint):
    path, manifest = copy
    shutil.copy(adapters["rationale-v2"].path / MANIFEST_NAME, path / MANIFEST_NAME)
    with pytest.raises(AdapterVerificationError, match="describes another adapter"):
        verify_adapter_dir(path, manifest, fingerprint)


def test_build_needs_a_peft_directory(tmp_path, fingerprint):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match=r"adapter_model\.safetensors"):
        build_manifest(
            tmp_path,
            base_fingerprint=fingerprint,
            snapshot_sha256="",
            parent_version=0,
            train_config={},
            lora_config={},
            metrics={},
            code_version="",
        )


def test_adapter_names_are_namespace_and_version():
    assert check_adapter_name("ns-default--rationale-v12") == ("default", 12)
    # '-' and "--" may occur in a namespace: the name is parsed from its anchored end; '.' is '~'.
    for namespace in ("a--b", "x.y", "t-", "--rationale-v1", "_", "é"):
        assert check_adapter_name(served_name(namespace, 3)) == (namespace, 3)
    assert served_name("x.y", 3) == "ns-x~y--rationale-v3"
    assert len({served_name(ns, 1) for ns in ("a-", "a", "a--", "a.", "a_")}) == 5
    bad_names = (
        "rationale-v12",  # the wire label says nothing of the namespace
        "ns---rationale-v1",  # empty namespace
        "ns-a--rationale-v0",
        "ns-a--rationale-v07",
        "ns-a.b--rationale-v1",  # '.' is written '~'
        "ns-a b--rationale-v1",
        "ns-a/../b--rationale-v1",
        "ns-a--rationale-v1x",
        "v1",
        "production",
    )
    for bad in bad_names:
        with pytest.raises(InvalidRequest):
            check_adapter_name(bad)
    for namespace, version in (("", 1), ("a b", 1), ("a", 0), ("a", True)):
        with pytest.raises(ValueError):
            served_name(namespace, version)
