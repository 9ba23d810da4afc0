"""FsspecArtifactStore against a local S3 (moto server on 127.0.0.1): put/get/exists/delete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from illume.adapters.artifacts import MARKER, ArtifactSettings, FsspecArtifactStore, open_artifact_store
from illume.errors import AlreadyExists, InvalidRequest, NotFound
from tests.integration.conftest import free_port

BUCKET = "illume-adapters"


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

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


@pytest.fixture
def settings(s3_endpoint) -> ArtifactSettings:
    return ArtifactSettings(
        root=f"s3://{BUCKET}/prod",
        endpoint_url=s3_endpoint,
        key="testing",
        secret="testing",
        region="us-east-1",
    )


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    (path / "sub").mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (path / "sub" / "notes.txt").write_text("nested files travel too")
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_through_s3(settings, adapter_dir, tmp_path):
    store = settings.open()
    assert isinstance(store, FsspecArtifactStore)
    assert "secret=SecretStr('**********')" in repr(settings)  # the secret never reaches logs
    uri = store.put_dir(adapter_dir, "default/rationale-v1")
    assert uri == f"s3://{BUCKET}/prod/default/rationale-v1"
    assert store.exists(uri)
    out = store.get_dir(uri, tmp_path / "copy")
    assert _tree(out) == _tree(adapter_dir)  # the marker is not part of the artifact
    assert MARKER not in _tree(out)

    # Immutable: the same files again is a harmless retry, other files are refused.
    assert store.put_dir(adapter_dir, "default/rationale-v1") == uri
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"other weights")
    with pytest.raises(AlreadyExists):
        store.put_dir(adapter_dir, "default/rationale-v1")
    with pytest.raises(FileExistsError):
        store.get_dir(uri, tmp_path / "copy")  # never writes into a non-empty directory

    store.delete(uri)
    assert not store.exists(uri)
    assert not store.fs.exists(f"{BUCKET}/prod/default/rationale-v1")
    store.delete(uri)  # idempotent
    with pytest.raises(NotFound):
        store.get_dir(uri, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()


def test_an_upload_without_its_marker_does_not_exist(settings, adapter_dir, tmp_path):
    """A writer that died before the marker left no artifact: readers see none."""
    store = open_artifact_store(settings.root, settings.storage_options())
    prefix = f"{BUCKET}/prod/default/rationale-v2"
    store.fs.put_file(str(adapter_dir / "adapter_config.json"), f"{prefix}/adapter_config.json")
    uri = f"s3://{prefix}"
    assert not store.exists(uri)
    with pytest.raises(NotFound):
        store.get_dir(uri, tmp_path / "partial")
    # The completed upload then wins, and the stray file is not part of it.
    assert store.put_dir(adapter_dir, "default/rationale-v2") == uri
    assert set(_tree(store.get_dir(uri, tmp_path / "full"))) == set(_tree(adapter_dir))


def test_corrupted_objects_are_refused_on_download(settings, adapter_dir, tmp_path):
    store = settings.open()
    uri = store.put_dir(adapter_dir, "default/rationale-v3")
    with store.fs.open(f"{BUCKET}/prod/default/rationale-v3/adapter_model.safetensors", "wb") as handle:
        handle.write(b"flipped")
    with pytest.raises(InvalidRequest, match="checksum"):
        store.get_dir(uri, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))


def test_uris_outside_the_root_and_bad_keys_are_refused(settings):
    store = settings.open()
    with pytest.raises(InvalidRequest):
        store.exists(f"s3://{BUCKET}/elsewhere/x")
    for key in ("", "../x", "a/../b", ".tmp-x"):
        with pytest.raises(InvalidRequest):
            store.uri_for(key)
