"""What every RPC shares: authentication, role and namespace checks, status codes, metrics.

The guard order of every call (docs/SERVING.md, "Namespaces"): the key (UNAUTHENTICATED), its role
(PERMISSION_DENIED), then the request's namespace: a syntactically bad name is INVALID_ARGUMENT, a
name the key may not use is PERMISSION_DENIED whether or not it exists, and an undeclared name the
key may use is NOT_FOUND. Only then does the method run, so nothing of a namespace a key may not use
is ever read or written.

Serve's gRPC proxy answers INTERNAL with a stack trace when a method raises, so no method lets an
exception escape: core errors become their status code and one-line reason; a full queue becomes
RESOURCE_EXHAUSTED; anything unexpected is logged here and answered INTERNAL with a fixed line.

Once the replica drains (``Drain``, services/ingress.py says when), every new call is refused
first, before its key is read: UNAVAILABLE, "server is shutting down" (safe to retry elsewhere,
nothing was done). Calls admitted before keep running to their end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from illume.errors import IllumeError, NotFound, Unavailable
from illume.validation import RequestLimits, validate_namespace
from services import metrics
from services.auth import Authenticator, Caller

log = logging.getLogger("ray.serve")
INTERNAL_REASON = "internal error; see the server log"
SHUTTING_DOWN_REASON = "server is shutting down"


class StreamAborted(Exception):
    """Ends a server stream after its status was set: Serve sends the status set on the context
    only with a message or when the method raises, and raising is what keeps the client from
    seeing a stray empty message before the error."""


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def _code_and_reason(exc: BaseException) -> tuple[str, str]:
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, IllumeError):
        return exc.code, exc.reason
    if isinstance(exc, BackPressureError):
        return "RESOURCE_EXHAUSTED", "the server's queue is full; retry later"
    if isinstance(exc, RayActorError | ActorUnavailableError | DeploymentUnavailableError):
        # A replica died or is restarting: the call may be retried (feedback is idempotent per key).
        log.warning(
            "a replica was unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )
        return "UNAVAILABLE", "a server component is restarting; retry"
    log.exception("unexpected error in an RPC", exc_info=exc)
    return "INTERNAL", INTERNAL_REASON


class DeclaredNamespaces:
    """The declared namespaces as one Ingress replica sees them.

    A cached set of names; a name not in it makes the set be re-read from the store, at most once
    per ``refresh_s`` (so a name declared through another replica is seen within ``refresh_s``, and
    a flood of undeclared names costs one read per ``refresh_s``). Names are never undeclared.
    Calls that arrive while a read is under way wait for it: the first burst of calls to a new
    replica once got NOT_FOUND for declared names, answered from the still empty set.
    """

    def __init__(self, load: Callable[[], frozenset[str]], refresh_s: float) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._names: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")
        self._reading: asyncio.Future | None = None

    def add(self, name: str) -> None:
        self._names = self._names | {name}

    async def contains(self, name: str) -> bool:
        if name in self._names:
            return True
        if self._reading is None and time.monotonic() - self._loaded_at >= self._refresh_s:
            self._loaded_at = time.monotonic()
            self._reading = asyncio.ensure_future(self._read())
        if self._reading is not None:
            await asyncio.shield(self._reading)
        return name in self._names

    async def _read(self) -> None:
        try:
            self._names = self._names | await asyncio.to_thread(self._load)
        finally:
            self._reading = None


class Drain:
    """Whether this Ingress replica still admits calls: once ``begin`` is called it never does again
    (a stopping replica is not restarted; Serve starts a new one). Safe to call from any thread."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() when draining began

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self, why: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.info("Ingress replica draining (%s): new calls are refused with UNAVAILABLE", why)

    def admit(self) -> None:
        """Raise ``Unavailable`` ("server is shutting down") once draining has begun."""
        if self.since is not None:
            raise Unavailable(SHUTTING_DOWN_REASON)


def request_namespace(request: Any) -> str | None:
    """The namespace field of a request (empty means ``default``); None for a request without one
    (GetServerStatus), whose method returns only what ``caller.may_use`` allows. Which RPCs have no
    namespace is pinned by tests/unit/services/test_namespace_guard.py."""
    if "namespace" not in request.DESCRIPTOR.fields_by_name:
        return None
    return request.namespace


class ServicerBase:
    """State the servicers share (set by the Ingress)."""

    auth: Authenticator
    declared: DeclaredNamespaces
    limits: RequestLimits
    drain: Drain | None = None  # the Ingress sets its own; None never drains

    def admit(self) -> None:
        """Refuse the call (``Unavailable``) once this replica drains."""
        if self.drain is not None:
            self.drain.admit()

    def caller(self, grpc_context: Any) -> Caller:
        return self.auth.authenticate(grpc_context.invocation_metadata() if grpc_context else [])

    async def authorize_namespace(self, caller: Caller, raw: str) -> str:
        """The namespace a request names, once the key may use it and it is declared."""
        namespace = validate_namespace(raw, self.limits)
        caller.require_namespace(namespace)
        if not await self.declared.contains(namespace):
            raise NotFound(f"namespace {namespace!r} is not declared")
        return namespace


def _log_denied(name: str, code: str, reason: str, caller: Caller | None) -> None:
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        who = f"key {caller.key_id} ({caller.principal})" if caller else "an unknown key"
        log.info("%s %s for %s: %s", name, code, who, reason)


async def _guard(
    self: ServicerBase,
    request: Any,
    grpc_context: Any,
    role: str,
    namespace: Callable[[Any], str | None] | None,
) -> Caller:
    caller = self.caller(grpc_context)
    caller.require(role)
    raw = namespace(request) if namespace is not None else None
    if raw is not None:
        await self.authorize_namespace(caller, raw)
    return caller


def rpc(
    role: str, response: Callable[[], Any], namespace: Callable[[Any], str | None] | None = request_namespace
) -> Callable:
    """Wrap a unary method ``(self, request, grpc_context, caller) -> reply``; ``namespace`` reads
    the request's namespace for the guard (None: the method checks what it touches itself)."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        @functools.wraps(method)
        async def unary(self: ServicerBase, request: Any, grpc_context: Any = None) -> Any:
            started, code, caller = time.perf_counter(), "OK", None
            try:
                self.admit()
                caller = await _guard(self, request, grpc_context, role, namespace)
                return await method(self, request, grpc_context, caller)
            except Exception as exc:
                code, reason = _code_and_reason(exc)
                _log_denied(name, code, reason, caller)
                if grpc_context is not None:
                    grpc_context.set_code(_status(code))
                    grpc_context.set_details(reason)
                return response()
            finally:
                metrics.record_request(name, code, (time.perf_counter() - started) * 1000)

        return unary

    return wrap


def rpc_stream(role: str, namespace: Callable[[Any], str | None] | None = request_namespace) -> Callable:
    """Wrap a server-streaming method ``(self, request, grpc_context, caller) -> async iterator``."""

    def wrap(method: Callable) -> Callable:
        name = method.__name__

        @functools.wraps(method)
        async def streaming(self: ServicerBase, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
            started, code, caller = time.perf_counter(), "OK", None
            try:
                self.admit()
                caller = await _guard(self, request, grpc_context, role, namespace)
                async for item in method(self, request, grpc_context, caller):
                    yield item
            except Exception as exc:
                code, reason = _code_and_reason(exc)
                _log_denied(name, code, reason, caller)
                if grpc_context is None:
                    raise
                grpc_context.set_code(_status(code))
                grpc_context.set_details(reason)
                raise StreamAborted(reason) from None
            finally:
                metrics.record_request(name, code, (time.perf_counter() - started) * 1000)

        return streaming

    return wrap
