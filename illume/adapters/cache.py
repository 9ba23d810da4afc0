"""The replica-side ``AdapterCache``: load, verify, LRU, swap.

``AdapterCache`` (docs/ARCHITECTURE.md, "Adapters", "Hot reload", "Adapter swaps and threads"):

- ``prepare(name, uri, manifest)`` downloads into ``work_dir`` and verifies (checksums, base
  fingerprint, the peft config and the safetensors header parse) without touching the generator's
  lock, so batches keep running while a new version is fetched;
- ``install(prepared, pinned=())`` takes ``generator.lock`` -- the lock a whole ``generate`` call
  holds -- and injects the adapter (``is_trainable=False``, eval mode), wrapping the model in a
  ``PeftModel`` on first use. No forward pass ever sees a half-installed adapter, and a failed
  install is rolled back under the same lock;
- a name is never overwritten: installing a loaded name is a no-op when its ``content_sha256``
  matches and ``AdapterConflict`` (ALREADY_EXISTS) otherwise; names are served names
  ``ns-<namespace>--rationale-v<N>`` (``illume.adapters.served_name``), so one namespace's version
  never takes the place (or the LRU slot or pin) of another namespace's same number;
- at most ``capacity`` adapters stay loaded: installing evicts the least recently used ones, never
  one in ``pinned`` (the caller's production/canary versions), never one held by ``using()`` (a
  batch resolved to it and waits for the lock), never the one just installed. If everything is
  protected the cache runs over capacity rather than unload a version that is serving. Evicting the
  last adapter unwraps the model back to the plain base model.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illume.adapters.artifacts import ArtifactStore
from illume.adapters.manifest import (
    AdapterConflict,
    AdapterVerificationError,
    check_adapter_name,
    check_peft_files,
    verify_adapter_dir,
)
from illume.errors import FailedPrecondition

log = logging.getLogger(__name__)


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
            # Delimited by dots: "ns-a--rationale-v1" is a prefix of "ns-a--rationale-v12".
            missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
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
