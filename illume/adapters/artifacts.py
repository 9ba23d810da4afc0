"""Artifact storage for adapter directories: a local directory or an object store, one interface.

Contract:

- ``put_dir(local_dir, key) -> uri`` stores the files under ``local_dir`` (recursively) at ``key``
  and returns the URI that names them; ``get_dir(uri, local_dir) -> Path`` copies them into
  ``local_dir`` (which must not exist or be empty); ``exists(uri)``; ``delete(uri)`` (idempotent).
- Artifacts are immutable. A ``put_dir`` to a key that already holds the *same* files (names and
  sha256) returns the existing URI (a retried upload is harmless); a key holding other files is
  ``AlreadyExists``. Nothing is ever overwritten.
- Readers never see a partial artifact:
  - ``LocalArtifactStore(root)`` copies into a temporary directory under ``root`` (same file
    system), fsyncs, then renames it into place; URIs are ``file://`` URIs of absolute paths
    (plain paths are accepted too);
  - ``FsspecArtifactStore`` (``s3://bucket/prefix`` through fsspec/s3fs, or any fsspec protocol)
    uploads every file, then writes ``.illume-artifact.json`` (file names, sizes, sha256) last. An
    artifact exists only once that marker exists; ``get_dir`` downloads exactly the files the
    marker lists, checks their sizes and sha256, and renames the finished local directory into
    place; ``delete`` removes the marker first.
- Settings come from an ``ArtifactSettings`` object built by the caller; nothing here reads the
  environment (s3fs/botocore fall back to their own credential chain only when no key is given).
- ``arrow_filesystem(uri, storage_options)`` gives the pyarrow file system (and the path on it)
  that reaches a location of the same object store with the same options, for writers that take
  pyarrow file systems (Ray Train's storage); ``is_local_uri`` tells node-local locations apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field, SecretStr

from illume.durable import fsync_dir, fsync_tree
from illume.errors import AlreadyExists, InvalidRequest, NotFound

MARKER = ".illume-artifact.json"
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class ArtifactSettings(BaseModel):
    """Where adapter artifacts are stored and how to reach the object store."""

    root: str = Field(
        "var/illume/adapters",
        description="A local directory (or file:// URI) or an object-store prefix such as s3://bucket/prefix.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, Ceph, moto); None: the provider's default endpoint."
    )
    key: str | None = Field(None, description="S3 access key id; None: s3fs's default credential chain.")
    secret: SecretStr | None = Field(None, description="S3 secret access key.")
    token: SecretStr | None = Field(None, description="S3 session token (temporary credentials).")
    region: str | None = Field(None, description="S3 region name.")
    anon: bool = Field(False, description="Anonymous (unsigned) access to a public bucket.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="More fsspec storage options, merged last (e.g. 'use_ssl')."
    )

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for ``root``'s protocol (empty for local roots)."""
        if _protocol(self.root) in ("", "file"):
            return dict(self.extra)
        options: dict[str, Any] = {}
        if self.anon:
            options["anon"] = True
        if self.key is not None:
            options["key"] = self.key
        if self.secret is not None:
            options["secret"] = self.secret.get_secret_value()
        if self.token is not None:
            options["token"] = self.token.get_secret_value()
        if self.endpoint_url is not None:
            options["endpoint_url"] = self.endpoint_url
        if self.region is not None:
            options["client_kwargs"] = {"region_name": self.region}
        options.update(self.extra)
        return options

    def open(self) -> ArtifactStore:
        """The artifact store these settings describe."""
        return open_artifact_store(self.root, self.storage_options())


# --- helpers ---------------------------------------------------------------------------------


def _protocol(uri: str) -> str:
    parsed = urlparse(uri)
    # A Windows drive letter or a plain path has no (or a one-letter) scheme.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(local_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every regular file under ``local_dir`` (relative POSIX name -> size and sha256), sorted.

    Symbolic links and other special files are refused: an artifact is plain files only.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory")
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise InvalidRequest(f"{path} is a symbolic link; artifacts hold plain files only")
        if path.is_dir():
            continue
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a regular file")
        name = path.relative_to(root).as_posix()
        out[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def _check_key(key: str) -> str:
    key = key.strip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(_TMP_PREFIX) for p in parts):
        raise InvalidRequest(f"invalid artifact key {key!r}")
    return key


def _safe_relative(name: str) -> str:
    """A relative file name from a marker, refusing absolute paths and '..' (no path escapes)."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise InvalidRequest(f"unsafe file name {name!r} in an artifact")
    return name


def _prepare_target(local_dir: Path) -> Path:
    """The temporary sibling a download goes to; ``local_dir`` must not exist or be empty."""
    if local_dir.exists():
        if not local_dir.is_dir() or any(local_dir.iterdir()):
            raise FileExistsError(f"{local_dir} exists and is not an empty directory")
        local_dir.rmdir()
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_dir.parent / f"{_TMP_PREFIX}{local_dir.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


# --- the interface ---------------------------------------------------------------------------


class ArtifactStore(ABC):
    """Immutable directories addressed by URI (see the module docstring)."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI ``put_dir(..., key)`` returns."""

    @abstractmethod
    def put_dir(self, local_dir: str | Path, key: str) -> str:
        """Store the files of ``local_dir`` at ``key``; returns their URI."""

    @abstractmethod
    def get_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Copy the artifact at ``uri`` into ``local_dir`` (absent or empty); returns ``local_dir``."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether a complete artifact is stored at ``uri``."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the artifact at ``uri`` (no error if it is absent)."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts as directories under ``root`` on a local (or mounted) file system."""

    def __init__(self, root: str | Path) -> None:
        root_str = str(root)
        if _protocol(root_str) == "file":
            root_str = unquote(urlparse(root_str).path)
        self.root = Path(root_str).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def uri_for(self, key: str) -> str:
        return (self.root / _check_key(key)).as_uri()

    def _path(self, uri: str) -> Path:
        if _protocol(uri) == "file":
            path = Path(unquote(urlparse(uri).path)).resolve()
        elif _protocol(uri) == "":
            path = Path(uri).resolve()
        else:
            raise InvalidRequest(f"{uri!r} is not a local artifact URI")
        if path == self.root or self.root not in path.parents:
            raise InvalidRequest(f"{uri!r} is outside the artifact root {self.root}")
        return path

    def put_dir(self, local_dir: str | Path, key: str) -> str:
        files = list_files(local_dir)
        uri = self.uri_for(key)
        target = self._path(uri)
        if target.exists():
            return self._existing(uri, target, files)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex}"
        try:
            shutil.copytree(local_dir, tmp, symlinks=False)
            fsync_tree(tmp)
            try:
                os.rename(tmp, target)  # atomic; fails if another writer got there first
            except OSError:
                if target.exists():
                    return self._existing(uri, target, files)
                raise
            fsync_dir(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return uri

    @staticmethod
    def _existing(uri: str, target: Path, files: Mapping[str, Any]) -> str:
        if list_files(target) != files:
            raise AlreadyExists(f"artifact {uri} already exists with other files")
        return uri

    def get_dir(self, uri: str, local_dir: str | Path) -> Path:
        source = self._path(uri)
        if not source.is_dir():
            raise NotFound(f"artifact {uri} not found")
        local_dir = Path(local_dir)
        tmp = _prepare_target(local_dir)
        try:
            tmp.rmdir()
            shutil.copytree(source, tmp, symlinks=False)
            os.rename(tmp, local_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return local_dir

    def exists(self, uri: str) -> bool:
        return self._path(uri).is_dir()

    def delete(self, uri: str) -> None:
        target = self._path(uri)
        if not target.exists():
            return
        # Rename away first, so no reader sees a half-deleted directory.
        doomed = target.parent / f"{_TMP_PREFIX}deleted-{target.name}-{uuid.uuid4().hex}"
        os.rename(target, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


class FsspecArtifactStore(ArtifactStore):
    """Artifacts under an fsspec URL prefix (``s3://bucket/prefix``) with a completion marker."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        protocol = _protocol(root)
        if not protocol:
            raise InvalidRequest(f"{root!r} has no URL scheme")
        options = dict(storage_options or {})
        # Fresh listings on every call (another process may have written), and no shared instance
        # whose options another caller chose.
        options.setdefault("skip_instance_cache", True)
        if protocol in ("s3", "s3a"):
            options.setdefault("use_listings_cache", False)
        self.protocol = protocol
        self.root = root.rstrip("/")
        self.fs = fsspec.filesystem(protocol, **options)

    def uri_for(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def _path(self, uri: str) -> str:
        if _protocol(uri) != self.protocol or not uri.rstrip("/").startswith(self.root + "/"):
            raise InvalidRequest(f"{uri!r} is not under the artifact root {self.root}")
        return self.fs._strip_protocol(uri.rstrip("/"))

    def _marker(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(f"{path}/{MARKER}", "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def put_dir(self, local_dir: str | Path, key: str) -> str:
        files = list_files(local_dir)
        if MARKER in files:
            raise InvalidRequest(f"{MARKER} is a reserved file name")
        uri = self.uri_for(key)
        path = self._path(uri)
        existing = self._marker(path)
        if existing is not None:
            if existing.get("files") != files:
                raise AlreadyExists(f"artifact {uri} already exists with other files")
            return uri
        for name in files:
            self.fs.put_file(str(Path(local_dir) / name), f"{path}/{name}")
        marker = json.dumps({"format": 1, "files": files}, sort_keys=True).encode()
        with self.fs.open(f"{path}/{MARKER}", "wb") as handle:
            handle.write(marker)
        return uri

    def get_dir(self, uri: str, local_dir: str | Path) -> Path:
        path = self._path(uri)
        marker = self._marker(path)
        if marker is None:
            raise NotFound(f"artifact {uri} not found (no completion marker)")
        local_dir = Path(local_dir)
        tmp = _prepare_target(local_dir)
        try:
            for name, meta in marker["files"].items():
                dest = tmp / _safe_relative(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{path}/{name}", str(dest))
                if dest.stat().st_size != meta["size"] or file_sha256(dest) != meta["sha256"]:
                    raise InvalidRequest(f"artifact {uri}: {name} does not match its recorded checksum")
            os.rename(tmp, local_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return local_dir

    def exists(self, uri: str) -> bool:
        return self.fs.exists(f"{self._path(uri)}/{MARKER}")

    def delete(self, uri: str) -> None:
        path = self._path(uri)
        marker = self._marker(path)
        if marker is not None:
            self.fs.rm_file(f"{path}/{MARKER}")  # first: readers now see no artifact
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` is a plain path or a ``file://`` URI (a node-local location)."""
    return _protocol(str(uri)) in ("", "file")


def arrow_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """A pyarrow file system reaching ``uri`` with the artifact store's fsspec options, and the
    path on it (``s3://bucket/prefix`` -> ``bucket/prefix``): what Ray Train's
    ``RunConfig(storage_filesystem=..., storage_path=...)`` takes. A local ``uri`` gives
    ``(None, absolute path)``, leaving the file system to the caller."""
    if is_local_uri(uri):
        path = unquote(urlparse(uri).path) if _protocol(uri) == "file" else uri
        return None, str(Path(path).resolve())
    import fsspec
    import pyarrow.fs

    protocol = _protocol(uri)
    options = dict(storage_options or {})
    # The same listing freshness as the artifact store (another process writes there too).
    options.setdefault("skip_instance_cache", True)
    if protocol in ("s3", "s3a"):
        options.setdefault("use_listings_cache", False)
    fs = fsspec.filesystem(protocol, **options)
    handler = pyarrow.fs.FSSpecHandler(fs)
    return pyarrow.fs.PyFileSystem(handler), fs._strip_protocol(uri.rstrip("/"))


def open_artifact_store(root: str, storage_options: dict[str, Any] | None = None) -> ArtifactStore:
    """A ``LocalArtifactStore`` for paths and ``file://`` roots, else an ``FsspecArtifactStore``."""
    if _protocol(str(root)) in ("", "file"):
        return LocalArtifactStore(root)
    return FsspecArtifactStore(str(root), storage_options)


__all__ = [
    "MARKER",
    "ArtifactSettings",
    "ArtifactStore",
    "FsspecArtifactStore",
    "LocalArtifactStore",
    "arrow_filesystem",
    "file_sha256",
    "is_local_uri",
    "list_files",
    "open_artifact_store",
]
