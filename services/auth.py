"""API-key authentication, role, namespace and permission checks from the gRPC invocation metadata.

Serve's gRPC proxy has no interceptors, so the Ingress authenticates each call itself: the client
sends ``authorization: Bearer <key>``; only the key's sha256 is configured. Roles nest: an admin
may do what an annotator may, an annotator what a client may. A key names the namespaces it may use
(``["*"]``: all; a key without the field, as in key files written before namespaces were scoped,
may use all and is logged with a warning at load). Logs, metrics and the audit table name a key by
its ``key_id`` (the first 8 hex digits of its sha256), never by the key.

The keys file is re-read when its content changes, checked at most every ``reload_interval_s``
on the next call (docs/SERVING.md, "Keys"): a key removed from it fails on its first call after
the next check, a key added works then, without a restart. A file that cannot be read or parsed
keeps the keys loaded before (logged as an error).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illume.errors import PermissionDenied, Unauthenticated
from illume.store.types import Actor
from services.config import SUBMIT_ON_BEHALF, ApiKey, AuthSettings

log = logging.getLogger("ray.serve")

ROLE_RANK = {"client": 0, "annotator": 1, "admin": 2}
ANONYMOUS_ADMIN = "anonymous"
KEY_ID_CHARS = 8


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(sha256_hex: str) -> str:
    """The short, non-secret name of a key in logs, metrics and the audit table."""
    return sha256_hex[:KEY_ID_CHARS]


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's principal, role, short id, namespaces (None: all) and grants."""

    principal: str
    role: str
    key_id: str = ""
    namespaces: frozenset[str] | None = None
    permissions: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, key: ApiKey) -> Caller:
        return cls(
            principal=key.principal,
            role=key.role,
            key_id=key_id_of(key.sha256),
            namespaces=None if key.all_namespaces else frozenset(key.namespaces or ()),
            permissions=frozenset(key.permissions),
        )

    @property
    def all_namespaces(self) -> bool:
        return self.namespaces is None

    def may_use(self, namespace: str) -> bool:
        """Whether the key may use ``namespace`` (declared or not: that is checked apart)."""
        return self.namespaces is None or namespace in self.namespaces

    def may(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def may_submit_on_behalf(self) -> bool:
        return self.may(SUBMIT_ON_BEHALF)

    @property
    def actor(self) -> Actor:
        return Actor(principal=self.principal, key_id=self.key_id)

    def require(self, role: str) -> None:
        if ROLE_RANK[self.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"this call needs the {role} role; the key has {self.role}")

    def require_namespace(self, namespace: str) -> None:
        """PERMISSION_DENIED for a namespace the key may not use, with the same reason whether or
        not the namespace exists (so a caller cannot learn which other namespaces exist)."""
        if not self.may_use(namespace):
            raise PermissionDenied(f"this key may not use namespace {namespace!r}")


def _parse_keys(text: str) -> list[ApiKey]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("the keys file must hold a JSON list of keys")
    return [ApiKey.model_validate(k) for k in data]


def load_keys(settings: AuthSettings) -> list[ApiKey]:
    """The configured keys plus those of ``keys_file`` (a JSON list of ApiKey objects)."""
    keys = list(settings.keys)
    if settings.keys_file is not None:
        keys.extend(_parse_keys(Path(settings.keys_file).read_text()))
    return keys


def _warn_unscoped(keys: Iterable[ApiKey]) -> None:
    for key in keys:
        if key.namespaces is None:
            log.warning(
                "API key %s (principal %s) has no 'namespaces' list: it may use every namespace; "
                'give it an explicit list (["*"] for all)',
                key_id_of(key.sha256),
                key.principal,
            )


class Authenticator:
    """Maps the metadata of a call to a ``Caller`` or raises UNAUTHENTICATED.

    ``on_reload(event)`` is called after the keys file changed and was reloaded, with the key ids
    added and removed (the Ingress audits it)."""

    def __init__(
        self,
        settings: AuthSettings,
        on_reload: Callable[[Mapping[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = settings.enabled
        self._static = list(settings.keys)
        self._file = Path(settings.keys_file) if settings.keys_file is not None else None
        self._interval = settings.reload_interval_s
        self._on_reload = on_reload
        self._clock = clock
        self._file_digest = ""
        file_keys: list[ApiKey] = []
        if self._file is not None:
            data = self._file.read_bytes()
            self._file_digest = hashlib.sha256(data).hexdigest()
            file_keys = _parse_keys(data.decode())
        self._next_check = clock() + self._interval
        self._keys = self._index(file_keys)
        _warn_unscoped(self._keys.values())
        if self.enabled and not self._keys:
            raise ValueError("auth is enabled but no API keys are configured")

    def _index(self, file_keys: list[ApiKey]) -> dict[str, ApiKey]:
        return {k.sha256: k for k in [*self._static, *file_keys]}

    @property
    def key_ids(self) -> list[str]:
        return sorted(key_id_of(k) for k in self._keys)

    def maybe_reload(self, force: bool = False) -> bool:
        """Re-read the keys file if its check is due and its content changed; True if reloaded."""
        if self._file is None:
            return False
        now = self._clock()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self._interval
        try:
            data = self._file.read_bytes()
        except OSError as exc:
            log.error("could not read the keys file (%s); keeping the %d keys loaded", exc, len(self._keys))
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._file_digest:
            return False
        self._file_digest = digest  # a broken file is reported once, not on every check
        try:
            file_keys = _parse_keys(data.decode())
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("the keys file is invalid (%s); keeping the %d keys loaded", reason, len(self._keys))
            return False
        before = set(self._keys)
        self._keys = self._index(file_keys)
        added = sorted(key_id_of(k) for k in set(self._keys) - before)
        removed = sorted(key_id_of(k) for k in before - set(self._keys))
        _warn_unscoped(k for k in self._keys.values() if k.sha256 not in before)
        if not self._keys and self.enabled:
            log.warning("the keys file holds no keys: every call is now UNAUTHENTICATED")
        log.info("keys file reloaded: %d keys; added %s; removed %s", len(self._keys), added, removed)
        if self._on_reload is not None:
            try:
                self._on_reload({"file_sha256": digest, "added": added, "removed": removed})
            except Exception:
                log.exception("the key-reload callback failed")
        return True

    def authenticate(self, metadata: Iterable[tuple[str, str]]) -> Caller:
        if not self.enabled:
            return Caller(ANONYMOUS_ADMIN, "admin")
        self.maybe_reload()
        header = next((v for k, v in metadata if k.lower() == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        digest = key_sha256(token.strip())
        for known, key in self._keys.items():
            if hmac.compare_digest(known, digest):
                return Caller.of(key)
        raise Unauthenticated("unknown API key")
