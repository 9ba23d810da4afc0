"""Sessions, CSRF tokens and the sign-in rate limit of the annotation web app (services/web.py).

Contract:

- ``SessionSecret.load(path)`` reads the operator's secret once (at least 32 bytes, else
  ``ValueError`` with a one-line reason) or makes a random one per process when ``path`` is None.
  Two keys are derived from it: one encrypts the session cookie, one signs CSRF tokens, so
  neither use can be turned into the other.
- A ``Session`` is everything the app keeps about a signed-in person, and it lives only in the
  cookie, encrypted and authenticated with Fernet: the API key, what WhoAmI said of it, a CSRF
  nonce, the sign-in time, the items handed to the person and not yet judged, the last submission
  (for one level of undo) and a one-shot message. A cookie that does not decrypt, does not parse or
  is older than the session's lifetime reads as no session.
- CSRF tokens are HMAC-SHA256 of a nonce under the CSRF key, compared in constant time: the
  session's nonce once signed in; before that, the nonce of a short-lived pre-session cookie
  (double submit, the form carries the HMAC and the cookie the nonce).
- ``SignInLimiter`` is a token bucket per client address, in this replica's memory only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

MIN_SECRET_BYTES = 32
SESSION_COOKIE = "illume_session"
PRE_SESSION_COOKIE = "illume_csrf"
PRE_SESSION_TTL_S = 3600
# Items handed to a person and not yet judged, kept so that a reload shows the same item again.
MAX_PENDING = 4
# A session carries its namespaces; a key allowed very many would overflow a cookie (4 KiB), so
# the list stops growing here (the RPCs still decide what the key may use).
MAX_NAMESPACES_JSON = 1500


@dataclass(frozen=True)
class SessionSecret:
    """The keys derived from the operator's secret."""

    cookie_key: bytes
    csrf_key: bytes

    @classmethod
    def from_bytes(cls, secret: bytes) -> SessionSecret:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the session secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} needed"
            )
        return cls(
            cookie_key=hmac.new(secret, b"illume-web/session-cookie", hashlib.sha256).digest(),
            csrf_key=hmac.new(secret, b"illume-web/csrf", hashlib.sha256).digest(),
        )

    @classmethod
    def load(cls, path: Path | None) -> SessionSecret:
        """The secret of ``path`` (read now, once), or a random one for this process when None."""
        if path is None:
            return cls.from_bytes(os.urandom(MIN_SECRET_BYTES))
        try:
            secret = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read web.session_secret_file {path}: {error.strerror}") from None
        try:
            return cls.from_bytes(secret)
        except ValueError as error:
            raise ValueError(f"web.session_secret_file {path}: {error}") from None

    def csrf_token(self, purpose: str, nonce: str) -> str:
        """The token a form carries for ``nonce`` (purpose keeps pre-session and session apart)."""
        return hmac.new(self.csrf_key, f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, purpose: str, nonce: str, token: str) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self.csrf_token(purpose, nonce), token)


@dataclass(frozen=True)
class LastSubmission:
    """What undo withdraws: the generation, its namespace and the submission's idempotency key."""

    namespace: str
    generation_id: str
    idempotency_key: str


@dataclass(frozen=True)
class Session:
    """A signed-in person, as the cookie carries it."""

    api_key: str
    principal: str
    role: str
    namespaces: tuple[str, ...]
    nonce: str
    issued_at: float
    pending: tuple[tuple[str, str], ...] = ()  # (namespace, generation id), oldest first
    last: LastSubmission | None = None
    flash: str = ""
    key_id: str = field(default="")

    @classmethod
    def start(cls, api_key: str, principal: str, role: str, namespaces: list[str], key_id: str) -> Session:
        return cls(
            api_key=api_key,
            principal=principal,
            role=role,
            namespaces=_bounded_namespaces(namespaces),
            nonce=secrets.token_urlsafe(24),
            issued_at=time.time(),
            key_id=key_id,
        )

    def pending_in(self, namespace: str) -> str | None:
        """The oldest item handed out in ``namespace`` and not judged yet."""
        return next((gid for ns, gid in self.pending if ns == namespace), None)

    def with_pending(self, namespace: str, generation_id: str, first: bool = False) -> Session:
        rest = tuple(p for p in self.pending if p != (namespace, generation_id))
        entry = ((namespace, generation_id),)
        pending = entry + rest if first else rest + entry
        return replace(self, pending=pending[:MAX_PENDING] if first else pending[-MAX_PENDING:])

    def without_pending(self, namespace: str, generation_id: str) -> Session:
        return replace(self, pending=tuple(p for p in self.pending if p != (namespace, generation_id)))

    def with_flash(self, message: str) -> Session:
        return replace(self, flash=message.splitlines()[0][:300] if message else "")

    def with_last(self, last: LastSubmission | None) -> Session:
        return replace(self, last=last)

    def remaining_s(self, ttl_s: float, now: float | None = None) -> float:
        return self.issued_at + ttl_s - (time.time() if now is None else now)


def _bounded_namespaces(namespaces: list[str]) -> tuple[str, ...]:
    kept: list[str] = []
    size = 0
    for name in namespaces:
        size += len(name) + 3
        if size > MAX_NAMESPACES_JSON:
            break
        kept.append(name)
    return tuple(kept)


class SessionCodec:
    """Session <-> cookie value (Fernet: AES-128-CBC + HMAC-SHA256, with a timestamp)."""

    def __init__(self, secret: SessionSecret, ttl_s: float) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(secret.cookie_key))
        self.ttl_s = ttl_s

    def encode(self, session: Session) -> str:
        data = asdict(session)
        return self._fernet.encrypt(json.dumps(data, separators=(",", ":")).encode()).decode("ascii")

    def decode(self, value: str | None) -> Session | None:
        """The session of a cookie value; None when absent, forged, unreadable or expired."""
        if not value:
            return None
        try:
            data = json.loads(self._fernet.decrypt(value.encode("ascii")))
            session = _session_from_dict(data)
        except (InvalidToken, ValueError, TypeError, KeyError, UnicodeError):
            return None
        if session.remaining_s(self.ttl_s) <= 0:
            return None
        return session


def _session_from_dict(data: dict[str, Any]) -> Session:
    last = data.get("last")
    return Session(
        api_key=str(data["api_key"]),
        principal=str(data["principal"]),
        role=str(data["role"]),
        namespaces=tuple(str(n) for n in data["namespaces"]),
        nonce=str(data["nonce"]),
        issued_at=float(data["issued_at"]),
        pending=tuple((str(ns), str(gid)) for ns, gid in data.get("pending", ())),
        last=LastSubmission(**last) if last else None,
        flash=str(data.get("flash", "")),
        key_id=str(data.get("key_id", "")),
    )


class SignInLimiter:
    """Sign-in attempts per client address: a token bucket of ``per_minute`` tokens refilled evenly."""

    def __init__(self, per_minute: int, clock: Any = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def attempt(self, address: str) -> float:
        """Take one token for ``address``: 0 when allowed, else the seconds to wait for one."""
        now = self._clock()
        tokens, at = self._buckets.get(address, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[address] = (tokens - 1.0, now)
            self._forget_full(now)
            return 0.0
        self._buckets[address] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        # Bounded memory under many addresses: a bucket refilled to capacity is the default anyway.
        if len(self._buckets) < 4096:
            return
        full_after = self.capacity / self.rate
        self._buckets = {a: (t, at) for a, (t, at) in self._buckets.items() if now - at < full_after}


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
