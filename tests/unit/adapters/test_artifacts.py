"""LocalArtifactStore: atomic, immutable directories; settings and scheme selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from illume.adapters.artifacts import (
    ArtifactSettings,
    FsspecArtifactStore,
    LocalArtifactStore,
    open_artifact_store,
)
from illume.errors import AlreadyExists, InvalidRequest, NotFound


def _dir(path: Path, weights: bytes = b"weights") -> Path:
    (path / "nested").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "nested" / "a.txt").write_text("a")
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_local_round_trip(tmp_path):
    store = LocalArtifactStore(tmp_path / "root")
    source = _dir(tmp_path / "src")
    uri = store.put_dir(source, "default/rationale-v1")
    assert uri == (tmp_path / "root" / "default" / "rationale-v1").resolve().as_uri()
    assert store.exists(uri) and store.exists(str(tmp_path / "root" / "default" / "rationale-v1"))
    assert _tree(store.get_dir(uri, tmp_path / "out")) == _tree(source)
    assert not [p for p in (tmp_path / "root" / "default").iterdir() if p.name.startswith(".tmp-")]
    assert store.put_dir(source, "default/rationale-v1") == uri  # a retry with the same files
    with pytest.raises(AlreadyExists):
        store.put_dir(_dir(tmp_path / "other", b"other"), "default/rationale-v1")
    with pytest.raises(FileExistsError):
        store.get_dir(uri, tmp_path / "out")
    store.delete(uri)
    store.delete(uri)
    assert not store.exists(uri)
    with pytest.raises(NotFound):
        store.get_dir(uri, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()


def test_local_refuses_escapes_and_symlinks(tmp_path):
    store = LocalArtifactStore(f"file://{tmp_path}/root")
    assert store.root == (tmp_path / "root").resolve()
    for key in ("../x", "", "a/./b", ".tmp-a"):
        with pytest.raises(InvalidRequest):
            store.uri_for(key)
    with pytest.raises(InvalidRequest, match="outside"):
        store.exists((tmp_path / "elsewhere").as_uri())
    with pytest.raises(InvalidRequest):
        store.exists("s3://bucket/x")
    source = _dir(tmp_path / "src")
    (source / "link").symlink_to(tmp_path / "secret-file")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        store.put_dir(source, "k")


def test_settings_pick_the_store_by_scheme(tmp_path):
    assert isinstance(open_artifact_store(str(tmp_path)), LocalArtifactStore)
    assert isinstance(ArtifactSettings(root=str(tmp_path)).open(), LocalArtifactStore)
    settings = ArtifactSettings(
        root="s3://bucket/prefix",
        endpoint_url="http://127.0.0.1:9",
        key="k",
        secret="s",
        region="eu-west-1",
        extra={"use_ssl": False},
    )
    assert settings.storage_options() == {
        "key": "k",
        "secret": "s",
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"region_name": "eu-west-1"},
        "use_ssl": False,
    }
    assert ArtifactSettings(root=str(tmp_path), key="k").storage_options() == {}
    pytest.importorskip("s3fs")
    store = settings.open()  # no network access until a call
    assert isinstance(store, FsspecArtifactStore) and store.uri_for("a/b") == "s3://bucket/prefix/a/b"
