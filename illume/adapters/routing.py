"""Adapter routing on a Generator replica: which adapter serves a request, and hot reload.

Contract (docs/ARCHITECTURE.md, "Hot reload"):
- the registry is the source of truth; a watcher thread follows it (PostgreSQL LISTEN/NOTIFY when
  available, polling the registry epoch always, as the fallback) and, for each watched namespace,
  loads the versions its aliases name into the ``AdapterCache`` (download and sha256 / base-model
  verification off the hot path, injection between batches under the generation lock), and only
  then flips the replica's alias table; a version that fails verification is refused, logged, and
  the alias keeps its previous version;
- ``resolve(ref, namespace)`` runs when a batch forms and only reads the replica's alias table and
  the installed adapters, so no request names a version the replica lacks: "" is the namespace's
  routing (``canary`` for its share of unpinned traffic, else ``production``, else the base
  model), "base" is the base model, an alias or a version ("7", "rationale-v7") pins it;
- ``prepare_ref`` runs before a request joins a batch: it loads a pinned version (or a namespace
  seen for the first time) so that resolution at batch time finds it;
- requests in flight keep the version they were resolved to (the swap only changes the table used
  by later batches; versions still named by an alias are never evicted);
- an adapter's identity is (namespace, version): versions restart at 1 in every namespace, so the
  model, the cache (its LRU and pins) and the alias table name a version by its served name
  ``ns-<namespace>--rationale-v<N>`` (``illume.adapters.served_name``); a request only ever
  resolves to its own namespace's versions, and one batch may mix several namespaces' adapters.
  ``Resolution.version_label`` is the wire label ``rationale-v<N>`` (read within the request's
  namespace), ``Resolution.adapter_name`` the served name the batch row runs.
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from illume.adapters import CANARY, PRODUCTION, parse_served_name, served_name
from illume.errors import IllumeError
from illume.generation.generator import GenerateRequest, GenerateResult, Generator
from illume.store.registry import AdapterRegistry, parse_version
from illume.store.types import adapter_name

log = logging.getLogger("ray.serve")
BASE_LABEL = "base"


@dataclass(frozen=True)
class Resolution:
    """The adapter chosen for one request (or why none could be)."""

    version_label: str = BASE_LABEL  # the wire label: "base" or "rationale-v<N>" of the namespace
    adapter_name: str | None = None  # the served (peft) name: "ns-<namespace>--rationale-v<N>"
    namespace: str = ""
    error_code: str = ""
    error_reason: str = ""


@dataclass(frozen=True)
class _Alias:
    version: int
    share: float | None


class AdapterRouter:
    """Resolves adapter references, keeps the registry's adapters loaded, runs batches."""

    def __init__(
        self,
        core: Generator,
        settings: Any,
        store: Any = None,
        artifact_uri: str = "",
        artifact_options: dict | None = None,
        namespaces: tuple[str, ...] = ("default",),
    ) -> None:
        self.core = core
        self.settings = settings
        self._aliases: dict[str, dict[str, _Alias]] = {}
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.registry: AdapterRegistry | None = None
        self.cache = None
        # When the replica last applied the registry (an alias table read) or installed a version.
        self.last_reload_at: float | None = None
        self.refresh_error = ""  # why the last refresh failed ("" after a successful one)
        # Called (no arguments) after the alias table or the installed adapters changed.
        self.on_change: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        if store is None or not artifact_uri:
            return
        from illume.adapters.artifacts import open_artifact_store
        from illume.adapters.cache import AdapterCache

        self.registry = AdapterRegistry.open(store)
        self.cache = AdapterCache(
            core,
            open_artifact_store(artifact_uri, artifact_options or None),
            settings.adapter_cache_size,
            Path(tempfile.mkdtemp(prefix="illume-adapters-")),
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._epoch = -1
        for namespace in namespaces:
            self._aliases.setdefault(namespace, {})
        self.refresh()  # a (re)started replica comes up on the current production
        self._listener = (
            self.registry.listen(lambda _ns: self._wake.set()) if self.registry.supports_notify else None
        )
        self._thread = threading.Thread(target=self._watch, name="illume-adapter-watch", daemon=True)
        self._thread.start()

    # -- watching the registry -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.adapter_poll_interval_s)
            self._wake.clear()
            try:
                epoch = self.registry.registry_epoch()
                if epoch != self._epoch:
                    self.refresh()
                self.refresh_error = ""
            except Exception as exc:
                self.refresh_error = f"adapter refresh failed: {type(exc).__name__}"
                log.exception("adapter refresh failed; serving continues on the loaded versions")

    def refresh(self) -> None:
        """Load what every watched namespace's aliases name, then switch the alias table."""
        epoch = self.registry.registry_epoch()
        for namespace in list(self._aliases):
            self._refresh_namespace(namespace)
        self._epoch = epoch

    def health(self) -> str:
        """Why adapter routing is degraded ("" when it works; the replica serves what it has)."""
        if self.registry is None:
            return ""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "adapter watcher stopped"
        return self.refresh_error

    def _refresh_namespace(self, namespace: str) -> None:
        records = self.registry.aliases(namespace)
        table: dict[str, _Alias] = {}
        current = self._aliases.get(namespace, {})
        for alias, record in records.items():
            if self._load(namespace, record.version):
                table[alias] = _Alias(record.version, record.share)
            elif alias in current:
                table[alias] = current[alias]  # refused: keep serving the previous version
        with self._lock:
            self._aliases[namespace] = table
        self.last_reload_at = time.time()
        self._changed()

    def _load(self, namespace: str, version: int) -> bool:
        # No early return on a loaded name: the cache compares the loaded bytes with the registry's
        # manifest (same sha: a no-op; other bytes: AdapterConflict, refused).
        name = served_name(namespace, version)
        try:
            record = self.registry.get(namespace, version)
            # The cache evicts least recently used versions beyond its capacity, never aliased ones.
            if self.cache.ensure(name, record.artifact_uri, dict(record.manifest), pinned=self._pinned()):
                self.last_reload_at = time.time()
                log.info("adapter %s installed", name)
                self._changed()
            return True
        except IllumeError as exc:
            log.error("adapter %s refused: %s", name, exc.reason)
        except Exception:
            log.exception("adapter %s could not be loaded", name)
        return False

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("adapter change callback failed")

    def _pinned(self) -> set[str]:
        with self._lock:
            return {served_name(ns, a.version) for ns, table in self._aliases.items() for a in table.values()}

    def stop(self) -> None:
        if self.registry is None:
            return
        self._stop.set()
        self._wake.set()
        if self._listener is not None:
            self._listener.stop()

    # -- per request -----------------------------------------------------------------------------

    def prepare_ref(self, ref: str, namespace: str) -> None:
        """Before batching: load a pinned version or a declared namespace not seen yet (blocking; a
        thread). An undeclared namespace is never watched, so callers cannot grow the replica's
        tables; the Ingress refuses such requests before they get here."""
        if self.registry is None:
            return
        if namespace not in self._aliases:
            if not self.registry.is_declared(namespace):
                return
            with self._lock:
                self._aliases.setdefault(namespace, {})
            self._refresh_namespace(namespace)
        version = parse_version(ref) if ref not in ("", BASE_LABEL) else None
        if (
            version is not None
            and version >= 1
            and served_name(namespace, version) not in self.core.adapter_names()
        ):
            self._load(namespace, version)

    def resolve(self, ref: str, namespace: str) -> Resolution:
        """The adapter (of ``namespace`` only) that serves ``ref`` on this replica now."""
        return replace(self._resolve(ref, namespace), namespace=namespace)

    def _resolve(self, ref: str, namespace: str) -> Resolution:
        ref = (ref or "").strip()
        if ref == BASE_LABEL:
            return Resolution()
        with self._lock:
            table = dict(self._aliases.get(namespace, {}))
        if ref == "":
            canary = table.get(CANARY)
            if canary and canary.share and self._rng.random() < canary.share:
                return self._installed(namespace, canary.version)
            production = table.get(PRODUCTION)
            return self._installed(namespace, production.version) if production else Resolution()
        version = parse_version(ref)
        if version is None:
            alias = table.get(ref)
            if alias is None:
                return Resolution(error_code="NOT_FOUND", error_reason=f"adapter alias {ref!r} is not set")
            return self._installed(namespace, alias.version)
        return self._installed(namespace, version)

    def _installed(self, namespace: str, version: int) -> Resolution:
        if version < 1:
            return Resolution(
                error_code="NOT_FOUND", error_reason=f"adapter version {version} is not available"
            )
        name = served_name(namespace, version)
        if name not in self.core.adapter_names():
            return Resolution(
                error_code="NOT_FOUND", error_reason=f"adapter version {version} is not available"
            )
        return Resolution(version_label=adapter_name(version), adapter_name=name, namespace=namespace)

    def bind(self, request: GenerateRequest, resolution: Resolution) -> GenerateRequest:
        return replace(request, adapter=resolution.adapter_name)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        if self.cache is None:
            return self.core.generate(requests)
        # Keep the batch's adapters from being evicted until it is done.
        with self.cache.using(r.adapter for r in requests):
            return self.core.generate(requests)

    def loaded_names(self) -> list[str]:
        """The served names of the adapters installed in the model."""
        return self.core.adapter_names()

    def loaded_adapters(self) -> list[tuple[str, int]]:
        """(namespace, version) of every installed adapter (names not made by ``served_name``,
        which the router never loads, are left out)."""
        parsed = (parse_served_name(name) for name in self.core.adapter_names())
        return sorted(p for p in parsed if p is not None)

    def alias_table(self) -> list[tuple[str, str, int]]:
        """(namespace, alias, version) of the replica's alias table."""
        with self._lock:
            return sorted(
                (ns, alias, a.version) for ns, table in self._aliases.items() for alias, a in table.items()
            )

    def watched_namespaces(self) -> set[str]:
        """The namespaces whose aliases this replica follows."""
        with self._lock:
            return set(self._aliases)

    def alias_lines(self) -> list[str]:
        return [f"{ns}/{alias}={adapter_name(version)}" for ns, alias, version in self.alias_table()]
