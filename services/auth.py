"""API-key authentication and role checks from the gRPC invocation metadata.

Serve's gRPC proxy has no interceptors, so the Ingress authenticates each call itself: the client
sends ``authorization: Bearer <key>``; only the key's sha256 is configured. Roles nest: an admin
may do what an annotator may, an annotator what a client may.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from illume.errors import PermissionDenied, Unauthenticated
from services.config import ApiKey, AuthSettings

ROLE_RANK = {"client": 0, "annotator": 1, "admin": 2}
ANONYMOUS_ADMIN = "anonymous"


@dataclass(frozen=True)
class Caller:
    """Who is calling, and with what role."""

    principal: str
    role: str

    def require(self, role: str) -> None:
        if ROLE_RANK[self.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"this call needs the {role} role; the key has {self.role}")


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(settings: AuthSettings) -> list[ApiKey]:
    """The configured keys plus those of ``keys_file`` (a JSON list of ApiKey objects)."""
    keys = list(settings.keys)
    if settings.keys_file is not None:
        keys.extend(ApiKey.model_validate(k) for k in json.loads(Path(settings.keys_file).read_text()))
    return keys


class Authenticator:
    """Maps the metadata of a call to a ``Caller`` or raises UNAUTHENTICATED."""

    def __init__(self, settings: AuthSettings) -> None:
        self.enabled = settings.enabled
        self._keys = {k.sha256: k for k in load_keys(settings)}
        if self.enabled and not self._keys:
            raise ValueError("auth is enabled but no API keys are configured")

    def authenticate(self, metadata: Iterable[tuple[str, str]]) -> Caller:
        if not self.enabled:
            return Caller(ANONYMOUS_ADMIN, "admin")
        header = next((v for k, v in metadata if k.lower() == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        digest = key_sha256(token.strip())
        for known, key in self._keys.items():
            if hmac.compare_digest(known, digest):
                return Caller(key.principal, key.role)
        raise Unauthenticated("unknown API key")
