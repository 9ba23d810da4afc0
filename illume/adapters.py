"""Adapter manifests, verification, and the replica-side ``AdapterCache`` (load, verify, LRU, swap).

Manifest (``illume_manifest.json``, written by ``build_manifest`` into the adapter directory and
stored in the registry row):

- ``files``: every file of the directory except the manifest itself (relative POSIX name -> size
  and sha256); ``content_sha256``: sha256 of the canonical JSON of ``files`` -- the identity of an
  adapter's bytes; ``adapter_sha256``: ``illume.training.round.adapter_sha256`` (config + weights);
- provenance: ``base_fingerprint`` (the base checkpoint it was trained on), ``snapshot_sha256``,
  ``parent_version``, ``train_config`` with its ``config_sha256``, ``lora_config``, ``metrics``
  (non-finite numbers become null), ``code_version``.

``verify_adapter_dir(dir, manifest, base_fingerprint)`` raises ``AdapterVerificationError``
(FAILED_PRECONDITION) on a wrong base fingerprint, a missing or extra file, a size or sha256
mismatch, an unsafe file name, a manifest that is inconsistent with itself, or an in-directory
manifest that describes other bytes. The manifest to verify against is the registry's copy.

``AdapterCache`` (DESIGN.md section 4, "Adapters", "Hot reload", "Adapter swaps and threads"):

- ``prepare(name, uri, manifest)`` downloads into ``work_dir`` and verifies (checksums, base
  fingerprint, the peft config and the safetensors header parse) without touching the generator's
  lock, so batches keep running while a new version is fetched;
- ``install(prepared, pinned=())`` takes ``generator.lock`` -- the lock a whole ``generate`` call
  holds -- and injects the adapter (``is_trainable=False``, eval mode), wrapping the model in a
  ``PeftModel`` on first use. No forward pass ever sees a half-installed adapter, and a failed
  install is rolled back under the same lock;
- a name is never overwritten: installing a loaded name is a no-op when its ``content_sha256``
  matches and ``AdapterConflict`` (ALREADY_EXISTS) otherwise; names are ``rationale-v<N>``;
- at most ``capacity`` adapters stay loaded: installing evicts the least recently used ones, never
  one in ``pinned`` (the caller's production/canary versions), never one held by ``using()`` (a
  batch resolved to it and waits for the lock), never the one just installed. If everything is
  protected the cache runs over capacity rather than unload a version that is serving. Evicting the
  last adapter unwraps the model back to the plain base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illume.artifacts import ArtifactStore, list_files
from illume.errors import AlreadyExists, FailedPrecondition, InvalidRequest, NotFound
from illume.store.registry import parse_version
from illume.store.types import adapter_name

log = logging.getLogger(__name__)

MANIFEST_NAME = "illume_manifest.json"
MANIFEST_FORMAT = 1
ADAPTER_KIND = "peft-lora"
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
_NAME_RE = re.compile(r"^rationale-v[1-9][0-9]*$")


class AdapterVerificationError(FailedPrecondition):
    """An adapter's files, manifest or base model do not match (maps to FAILED_PRECONDITION)."""


class AdapterConflict(AlreadyExists):
    """A loaded adapter name would be overwritten with other weights (maps to ALREADY_EXISTS)."""


# --- manifests -------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same bytes on every machine."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _files_of(adapter_dir: Path) -> dict[str, dict[str, Any]]:
    files = list_files(adapter_dir)
    files.pop(MANIFEST_NAME, None)
    return files


def build_manifest(
    adapter_dir: str | Path,
    *,
    base_fingerprint: str,
    snapshot_sha256: str,
    parent_version: int,
    train_config: Mapping[str, Any],
    lora_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    code_version: str,
) -> dict[str, Any]:
    """Describe ``adapter_dir`` (checksums + provenance) and write it as ``illume_manifest.json``."""
    from illume.training.round import adapter_sha256

    adapter_dir = Path(adapter_dir)
    files = _files_of(adapter_dir)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise InvalidRequest(f"{adapter_dir} lacks {', '.join(missing)} (a peft save_pretrained directory)")
    if not base_fingerprint:
        raise InvalidRequest("base_fingerprint is required")
    train = _finite(dict(train_config))
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": ADAPTER_KIND,
        "files": files,
        "content_sha256": sha256_json(files),
        "adapter_sha256": adapter_sha256(adapter_dir),
        "base_fingerprint": base_fingerprint,
        "snapshot_sha256": snapshot_sha256,
        "parent_version": int(parent_version),
        "train_config": train,
        "config_sha256": sha256_json(train),
        "lora_config": _finite(dict(lora_config)),
        "metrics": _finite(dict(metrics)),
        "code_version": code_version,
    }
    (adapter_dir / MANIFEST_NAME).write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``illume_manifest.json`` of a directory."""
    path = Path(adapter_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path} not found") from None


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in parts
        and "." not in parts
    )


def verify_adapter_dir(adapter_dir: str | Path, manifest: Mapping[str, Any], base_fingerprint: str) -> None:
    """Raise ``AdapterVerificationError`` unless ``adapter_dir`` holds exactly the manifest's bytes
    and the manifest names ``base_fingerprint`` (see the module docstring)."""
    adapter_dir = Path(adapter_dir)
    fail = AdapterVerificationError
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("kind") != ADAPTER_KIND:
        raise fail(f"unsupported manifest (format {manifest.get('format')!r}, kind {manifest.get('kind')!r})")
    expected = manifest.get("files")
    if not isinstance(expected, Mapping) or not expected:
        raise fail("the manifest lists no files")
    if manifest.get("content_sha256") != sha256_json(dict(expected)):
        raise fail("the manifest's content_sha256 does not match its file list")
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise fail(
            f"adapter was trained on base {str(manifest.get('base_fingerprint'))[:12]}, "
            f"this replica serves base {base_fingerprint[:12]}"
        )
    unsafe = [name for name in expected if not _safe_name(name) or name == MANIFEST_NAME]
    if unsafe:
        raise fail(f"unsafe file name {unsafe[0]!r} in the manifest")
    missing_required = [name for name in REQUIRED_FILES if name not in expected]
    if missing_required:
        raise fail(f"the manifest lacks {', '.join(missing_required)}")
    try:
        actual = _files_of(adapter_dir)
    except (NotFound, InvalidRequest) as exc:
        raise fail(f"cannot read {adapter_dir}: {exc.reason}") from None
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        raise fail(f"file {missing[0]} is missing ({len(missing)} missing)")
    if extra:
        raise fail(f"unexpected file {extra[0]} ({len(extra)} not in the manifest)")
    for name, meta in sorted(expected.items()):
        got = actual[name]
        if got["size"] != meta.get("size") or got["sha256"] != meta.get("sha256"):
            raise fail(f"checksum mismatch for {name}")
    in_dir = adapter_dir / MANIFEST_NAME
    if in_dir.is_file():
        try:
            local = json.loads(in_dir.read_text())
        except ValueError:
            raise fail(f"{MANIFEST_NAME} in the directory is not JSON") from None
        if local.get("content_sha256") != manifest.get("content_sha256") or local.get(
            "base_fingerprint"
        ) != manifest.get("base_fingerprint"):
            raise fail(f"{MANIFEST_NAME} in the directory describes another adapter")


def check_peft_files(adapter_dir: str | Path) -> dict[str, Any]:
    """Parse the peft config and the safetensors header (cheap checks done before the lock)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterVerificationError(f"adapter_config.json is unreadable: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterVerificationError(f"peft_type {config.get('peft_type')!r} is not LORA")
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterVerificationError(f"adapter_model.safetensors is unreadable: {exc}") from None
    if not keys or not all("lora_" in k for k in keys):
        raise AdapterVerificationError("adapter_model.safetensors holds no (or non-LoRA) tensors")
    return config


def check_adapter_name(name: str) -> int:
    """The version of an adapter name ``rationale-v<N>``; ``InvalidRequest`` for any other name."""
    version = parse_version(name) if _NAME_RE.match(name) else None
    if version is None or adapter_name(version) != name:
        raise InvalidRequest(f"adapter name {name!r} is not of the form rationale-v<N>")
    return version


# --- the cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedAdapter:
    """A downloaded, verified adapter directory, ready to be installed."""

    name: str
    uri: str
    path: Path
    sha256: str  # the manifest's content_sha256
    manifest: Mapping[str, Any] = field(repr=False)


@dataclass
class _Entry:
    prepared: PreparedAdapter
    in_use: int = 0


class AdapterCache:
    """Installed adapters of one ``Generator`` (see the module docstring)."""

    def __init__(
        self,
        generator: Any,
        artifacts: ArtifactStore,
        capacity: int = 4,
        work_dir: str | Path = "var/illume/adapter-cache",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.generator = generator
        self.artifacts = artifacts
        self.capacity = capacity
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._state = threading.Lock()  # bookkeeping only; taken after generator.lock, never before
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._in_use: dict[str, int] = {}
        self._downloads: dict[str, threading.Lock] = {}

    # -- queries -------------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Installed adapter names, least recently used first."""
        with self._state:
            return list(self._entries)

    def sha256_of(self, name: str) -> str | None:
        """The ``content_sha256`` of an installed adapter (None if not installed by this cache)."""
        with self._state:
            entry = self._entries.get(name)
            return entry.prepared.sha256 if entry else None

    def is_loaded(self, name: str, sha256: str | None = None) -> bool:
        with self._state:
            entry = self._entries.get(name)
            return entry is not None and (sha256 is None or entry.prepared.sha256 == sha256)

    def touch(self, name: str) -> None:
        """Mark ``name`` as just used (LRU order)."""
        with self._state:
            if name in self._entries:
                self._entries.move_to_end(name)

    @contextlib.contextmanager
    def using(self, names: Iterable[str | None]) -> Iterator[None]:
        """Protect ``names`` from eviction while a batch that resolved to them waits and runs."""
        held = [n for n in names if n]
        with self._state:
            for name in held:
                self._in_use[name] = self._in_use.get(name, 0) + 1
                if name in self._entries:
                    self._entries.move_to_end(name)
        try:
            yield
        finally:
            with self._state:
                for name in held:
                    self._in_use[name] -= 1
                    if not self._in_use[name]:
                        del self._in_use[name]

    # -- prepare (off the hot path) ------------------------------------------------------------

    def base_fingerprint(self) -> str:
        return self.generator.loaded.fingerprint()

    def prepare(self, name: str, uri: str, manifest: Mapping[str, Any]) -> PreparedAdapter:
        """Download ``uri`` into the work directory and verify it; never takes the generator lock."""
        check_adapter_name(name)
        sha = str(manifest.get("content_sha256", ""))
        with self._state:
            entry = self._entries.get(name)
            lock = self._downloads.setdefault(name, threading.Lock())
        if entry is not None:
            if entry.prepared.sha256 != sha:
                raise AdapterConflict(f"adapter {name} is loaded with other weights")
            return entry.prepared
        with lock:  # one download per name at a time
            path = self.work_dir / f"{name}-{sha[:12] or 'nosha'}-{uuid.uuid4().hex[:8]}"
            try:
                self.artifacts.get_dir(uri, path)
                verify_adapter_dir(path, manifest, self.base_fingerprint())
                check_peft_files(path)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
        return PreparedAdapter(name=name, uri=uri, path=path, sha256=sha, manifest=dict(manifest))

    # -- install / evict (under the generator lock) --------------------------------------------

    def install(self, prepared: PreparedAdapter, pinned: Iterable[str] = ()) -> bool:
        """Inject a prepared adapter between batches; True if it was installed now (False: no-op)."""
        pinned = set(pinned)
        with self.generator.lock:
            with self._state:
                entry = self._entries.get(prepared.name)
            if entry is not None:
                if entry.prepared.sha256 != prepared.sha256:
                    raise AdapterConflict(f"adapter {prepared.name} is loaded with other weights")
                self.touch(prepared.name)
                if entry.prepared.path != prepared.path:
                    shutil.rmtree(prepared.path, ignore_errors=True)
                return False
            if prepared.name in self.generator.adapter_names():
                raise AdapterConflict(f"adapter {prepared.name} is loaded but not managed by this cache")
            if not prepared.path.is_dir():
                raise FailedPrecondition(f"prepared adapter {prepared.name} has no files at {prepared.path}")
            self._inject(prepared)
            with self._state:
                self._entries[prepared.name] = _Entry(prepared)
            self._evict_over_capacity(pinned | {prepared.name})
        log.info("installed adapter %s (%s)", prepared.name, prepared.sha256[:12])
        return True

    def ensure(self, name: str, uri: str, manifest: Mapping[str, Any], pinned: Iterable[str] = ()) -> bool:
        """Prepare and install ``name`` unless it is loaded already; True if it was installed now."""
        sha = str(manifest.get("content_sha256", ""))
        with self._state:
            entry = self._entries.get(name)
        if entry is not None:
            if entry.prepared.sha256 != sha:
                raise AdapterConflict(f"adapter {name} is loaded with other weights")
            self.touch(name)
            return False
        return self.install(self.prepare(name, uri, manifest), pinned=pinned)

    def evict(self, name: str) -> bool:
        """Unload ``name``; False if it was not loaded. Refuses a name held by ``using()``."""
        with self.generator.lock:
            with self._state:
                if name not in self._entries:
                    return False
                if self._in_use.get(name):
                    raise FailedPrecondition(f"adapter {name} is in use by a pending batch")
                entry = self._entries.pop(name)
            self._remove(name)
        shutil.rmtree(entry.prepared.path, ignore_errors=True)
        log.info("evicted adapter %s", name)
        return True

    def _evict_over_capacity(self, protected: set[str]) -> None:
        """Drop least recently used adapters beyond capacity (caller holds generator.lock)."""
        while True:
            with self._state:
                if len(self._entries) <= self.capacity:
                    return
                victim = next(
                    (n for n in self._entries if n not in protected and not self._in_use.get(n)), None
                )
                if victim is None:
                    log.warning(
                        "adapter cache over capacity (%d > %d): every loaded adapter is pinned or in use",
                        len(self._entries),
                        self.capacity,
                    )
                    return
                entry = self._entries.pop(victim)
            self._remove(victim)
            shutil.rmtree(entry.prepared.path, ignore_errors=True)
            log.info("evicted adapter %s (least recently used)", victim)

    def _inject(self, prepared: PreparedAdapter) -> None:
        """Add the adapter to the model (caller holds generator.lock); roll back on any failure."""
        from peft import PeftConfig, PeftModel

        loaded = self.generator.loaded
        model = loaded.model
        name = prepared.name
        wrapped_now = not isinstance(model, PeftModel)
        try:
            if wrapped_now:
                config = PeftConfig.from_pretrained(str(prepared.path))
                config.inference_mode = True
                model = _peft_model_class(config)(model, config, adapter_name=name)
            result = model.load_adapter(str(prepared.path), adapter_name=name, is_trainable=False)
            missing = [k for k in getattr(result, "missing_keys", []) if name in k and "lora_" in k]
            if missing:
                raise AdapterVerificationError(f"adapter {name} lacks {len(missing)} LoRA weights")
            for param_name, param in model.named_parameters():
                if f".{name}." in param_name:
                    param.requires_grad_(False)
            model.eval()
        except BaseException:
            if wrapped_now and isinstance(model, PeftModel):
                loaded.model = model.unload()
            elif name in getattr(model, "peft_config", {}):
                model.delete_adapter(name)
            raise
        loaded.model = model

    def _remove(self, name: str) -> None:
        """Delete an adapter from the model (caller holds generator.lock)."""
        loaded = self.generator.loaded
        model = loaded.model
        if name not in getattr(model, "peft_config", {}):
            return
        if list(model.peft_config) == [name]:
            loaded.model = model.unload()  # the last adapter: back to the plain base model
            loaded.model.eval()
        else:
            if name in model.active_adapters:
                # Rows name their adapter (peft adapter_names), so which one is "active" does not
                # change any output; move it off the doomed one, frozen (inference mode).
                other = next(n for n in model.peft_config if n != name)
                model.set_adapter(other, inference_mode=True)
            model.delete_adapter(name)

    def close(self) -> None:
        """Remove the work directory's prepared files of adapters that are not installed."""
        with self._state:
            keep = {e.prepared.path for e in self._entries.values()}
        for path in self.work_dir.iterdir():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _peft_model_class(config: Any) -> Any:
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)


__all__ = [
    "MANIFEST_NAME",
    "AdapterCache",
    "AdapterConflict",
    "AdapterVerificationError",
    "PreparedAdapter",
    "build_manifest",
    "check_adapter_name",
    "check_peft_files",
    "read_manifest",
    "sha256_json",
    "verify_adapter_dir",
]


def publish_adapter(
    registry: Any,
    artifacts: ArtifactStore,
    adapter_dir: str | Path,
    *,
    namespace: str,
    key: str,
    base_fingerprint: str,
    snapshot_sha256: str,
    parent_version: int,
    train_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    code_version: str,
    round_id: str = "",
) -> Any:
    """Write the manifest into ``adapter_dir``, store the directory under ``key`` and register it.

    Returns the registry's record (the version number is the registry's). The LoRA config is read
    from the directory's ``adapter_config.json``.
    """
    adapter_dir = Path(adapter_dir)
    manifest = build_manifest(
        adapter_dir,
        base_fingerprint=base_fingerprint,
        snapshot_sha256=snapshot_sha256,
        parent_version=parent_version,
        train_config=train_config,
        lora_config=json.loads((adapter_dir / "adapter_config.json").read_text()),
        metrics=metrics,
        code_version=code_version,
    )
    uri = artifacts.put_dir(adapter_dir, key)
    return registry.register(namespace, uri, manifest, round_id=round_id, parent_version=parent_version)
